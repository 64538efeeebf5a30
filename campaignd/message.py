"""Message: the exact bytes that go to the SMTP server for one touch.

Owns the MIME structure (``multipart/alternative``: the plain text, then the HTML;
inside ``multipart/mixed`` when there are attachments, such as an event's ``.ics``),
every header (From with display name, To, Reply-To, Subject, Date, a Message-ID on the
sender's domain, RFC 8058 one-click unsubscribe), their encoding (RFC 2047 words for
non-ASCII names and subjects, IDNA for international domains), and keeping anything a
lead could write from injecting a header.

The bytes are assembled here from the standard library's primitives rather than with
``email.message.EmailMessage``, which costs milliseconds per message; the tests parse
every message back with the standard parser and compare it with what ``EmailMessage``
makes. Bodies: ASCII text goes as it is (``7bit``; the HTML arrives ASCII, with
character references), other text as ``base64``, and ``quoted-printable`` where a line
is longer than SMTP allows. The boundaries (``=_`` and a digest of the Message-ID)
cannot occur in base64 or quoted-printable, and a ``7bit`` body holding one is encoded.

Pure: no I/O, and the date is passed in.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime

import idna

from campaignd.config import Sender
from campaignd.exceptions import Problem
from campaignd.render import Attachment, Rendered, RenderError
from campaignd.unsubscribe import Links

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# RFC 5322 atext: a display name made of these (and spaces) needs no quoting.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*")
_BAD_ADDRESS = re.compile(r"[\x00-\x20\x7f<>()\[\],;:\\\"]")
_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
MAX_LINE = 78
"""Header lines are folded to this length where they have a space to fold at (RFC 5322)."""
_WORD_BYTES = 39
"""UTF-8 bytes per RFC 2047 encoded word: 52 characters of base64, 64 with its wrapper."""


def safe_header_text(value: str) -> str:
    """Fold CR, LF, NUL and other control characters to single spaces."""
    return (value if value.isprintable() else _CONTROL.sub(" ", value)).strip()


def message_id(*, touch_id: int, lead_id: int, sender: Sender) -> str:
    """A stable Message-ID per touch: a resend after ``touches retry`` keeps the same one,
    so receiving servers can recognise it."""
    return f"<campaignd.{touch_id}.{lead_id}@{_id_domain(sender)}>"


def one_off_message_id(*, sender: Sender, nonce: str) -> str:
    """A Message-ID for a test send, unique by ``nonce`` (mail providers drop a second
    message with a Message-ID they have seen)."""
    nonce = re.sub(r"[^A-Za-z0-9]", "", nonce) or "0"
    return f"<campaignd.test.{nonce}@{_id_domain(sender)}>"


def _is_message_id(value: str) -> bool:
    """``<left@right>``, printable ASCII without spaces or further angle brackets."""
    inner = value[1:-1]
    return (
        value.startswith("<")
        and value.endswith(">")
        and value.isascii()
        and value.isprintable()
        and inner.count("@") == 1
        and not inner.startswith("@")
        and not inner.endswith("@")
        and " " not in inner
        and "<" not in inner
        and ">" not in inner
    )


def _id_domain(sender: Sender) -> str:
    domain = sender.from_address.rpartition("@")[2] or "localhost"
    try:
        return _ascii_domain(domain)
    except ValueError:
        return "localhost"


# -- headers -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _ascii_domain(domain: str) -> str:
    """The domain as it may appear in a header: its IDNA (``xn--``) form when it is not ASCII."""
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"the domain {domain!r} is not a valid international domain name: {exc}") from None


def addr_spec(address: str) -> str:
    """``address`` checked and made fit for a header: its domain in IDNA form.

    A non-ASCII local part is kept as UTF-8; such an address can only be delivered
    over SMTPUTF8, which the SMTP channel insists on.

    :raises ValueError: if it contains a line break, a control character, a space or
        a character that would change the header's meaning.
    """
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or _BAD_ADDRESS.search(address) or "@" in local:
        raise ValueError(f"{address!r} is not an email address that can go in a header")
    return f"{local}@{_ascii_domain(domain)}"


def _encoded_words(text: str) -> list[str]:
    """``text`` as RFC 2047 ``B`` encoded words, each small enough for one header line,
    never splitting a character between two words."""
    data = text.encode("utf-8")
    words = []
    start = 0
    while start < len(data):
        end = min(start + _WORD_BYTES, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # a continuation byte
            end -= 1
        words.append(
            "=?utf-8?b?" + binascii.b2a_base64(data[start:end], newline=False).decode("ascii") + "?="
        )
        start = end
    return words


def _phrase(name: str) -> str:
    """A display name: as it is, quoted, or encoded, whichever RFC 5322 needs."""
    name = " ".join(safe_header_text(name).split())
    if not name:
        return ""
    if not name.isascii() or "=?" in name:  # (parsers decode encoded words even in quotes)
        return " ".join(_encoded_words(name))
    if _ATOMS.fullmatch(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mailbox(name: str, address: str) -> str:
    """``Name <address>`` for a From/To/Reply-To header (just the address without a name).

    :raises ValueError: if the address cannot go in a header (see :func:`addr_spec`).
    """
    spec = addr_spec(address)
    phrase = _phrase(name)
    return f"{phrase} <{spec}>" if phrase else spec


@functools.lru_cache(maxsize=256)
def _step_header(label: str) -> str:
    return _header("X-Campaignd-Step", _unstructured(label))


def _unstructured(value: str) -> str:
    """A Subject-like value: control characters folded to spaces, RFC 2047 words when it
    is not plain ASCII (or could be mistaken for encoded words)."""
    words = safe_header_text(value).split()
    value = " ".join(words)
    if (
        value.isascii()
        and "=?" not in value
        and (len(value) < MAX_LINE - 12 or max(map(len, words)) < MAX_LINE - 12)
    ):
        return value
    return " ".join(_encoded_words(value))


def _header(name: str, value: str) -> str:
    """``Name: value``, folded at spaces so that lines stay within :data:`MAX_LINE`."""
    line = f"{name}: {value}"
    if len(line) <= MAX_LINE:
        return line
    out: list[str] = []
    words = value.split(" ")
    # The first word stays beside the name, however long: a line with the name alone
    # confuses some parsers.
    current = f"{name}: {words[0]}"
    for word in words[1:]:
        if len(current) + 1 + len(word) > MAX_LINE:
            out.append(current)
            current = " " + word
        else:
            current = f"{current} {word}"
    out.append(current)
    return "\r\n".join(out)


# -- bodies --------------------------------------------------------------------------------------


def _lines(text: str) -> str:
    """``text`` with LF line endings and a final line break."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from broken input
        raise ValueError("the text contains characters that cannot be encoded as UTF-8") from None


def _lines_fit(data: bytes) -> bool:
    """Whether no line of ``data`` (LF line endings) is longer than the 998 characters SMTP
    allows. Looks at most once per 999 bytes: the last line break in each window."""
    pos, end = 0, len(data)
    while end - pos > 998:
        newline = data.rfind(b"\n", pos, pos + 999)
        if newline == -1:
            return False
        pos = newline + 1
    return True


def _seven_bit(data: bytes, boundary: bytes) -> bytes | None:
    """ASCII ``data`` as a ``7bit`` body (CRLF line endings), or None if a line is longer
    than SMTP allows or it holds the boundary."""
    if boundary in data or not _lines_fit(data):
        return None
    return data.replace(b"\n", b"\r\n")


def encode_text(text: str, boundary: bytes) -> tuple[str, bytes]:
    """A plain-text body as (Content-Transfer-Encoding, bytes with CRLF line endings).

    ASCII goes as it is (``7bit``), unless a line is too long or holds the boundary
    (``quoted-printable`` then); other text as ``base64`` (quoted-printable would be
    smaller only for text that is nearly all ASCII, and costs three times as much).
    """
    text = _lines(text)
    if text.isascii():
        data = text.encode("ascii")
        body = _seven_bit(data, boundary)
        return ("7bit", body) if body is not None else ("quoted-printable", _quoted_printable(data))
    # Text is encoded in its canonical form, with CRLF line breaks (RFC 2046).
    return "base64", _base64(_utf8(text.replace("\n", "\r\n")))


# HTML reads the references &#128; to &#159; as Windows-1252 characters, not as C1 controls.
_C1 = re.compile("[\x80-\x9f]")
_RAW_OPEN = re.compile(r"<(style|script)\b", re.I)
_RAW_CLOSE = {"style": re.compile(r"</style", re.I), "script": re.compile(r"</script", re.I)}


def _raw_text_is_ascii(html: str) -> bool:
    """Whether the insides of ``<style>`` and ``<script>`` are ASCII (character references
    are not decoded there)."""
    found = _RAW_OPEN.search(html)
    while found is not None:
        end = _RAW_CLOSE[found.group(1).lower()].search(html, found.end())
        stop = end.start() if end is not None else len(html)
        if not html[found.end() : stop].isascii():
            return False
        found = _RAW_OPEN.search(html, stop)
    return True


def encode_html(html: str, boundary: bytes) -> tuple[str, bytes]:
    """An HTML body as (Content-Transfer-Encoding, bytes with CRLF line endings).

    Characters beyond ASCII become numeric character references (``&#8212;``), which
    every HTML reader decodes, so the body goes as ``7bit``: readable, and small. Inside
    ``<style>`` or ``<script>`` references are not decoded, and C1 control characters have
    none; HTML with either goes as ``base64``.
    """
    html = _lines(html)
    if not html.isascii() and (_C1.search(html) or not _raw_text_is_ascii(html)):
        return "base64", _base64(_utf8(html.replace("\n", "\r\n")))
    data = html.encode("ascii", "xmlcharrefreplace")
    body = _seven_bit(data, boundary)
    return ("7bit", body) if body is not None else ("quoted-printable", _quoted_printable(data))


def _quoted_printable(data: bytes) -> bytes:
    """``data`` (with LF line endings) as quoted-printable with CRLF line endings."""
    return binascii.b2a_qp(data, quotetabs=False, istext=True, header=False).replace(b"\n", b"\r\n")


def _base64(data: bytes) -> bytes:
    """``data`` in base64 lines of 76 characters, CRLF line endings, ending with a line break."""
    encoded = binascii.b2a_base64(data, newline=False)
    n = len(encoded)
    return (
        b"\r\n".join(map(encoded.__getitem__, map(slice, range(0, n, 76), range(76, n + 76, 76)))) + b"\r\n"
    )


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@functools.lru_cache(maxsize=16)
def _date_header(seconds: int, offset: int) -> str:
    """RFC 5322 date for a moment (Unix seconds) at a UTC offset (seconds), like
    :func:`email.utils.format_datetime`; cached, as a whole batch shares a few seconds."""
    moment = datetime.fromtimestamp(seconds + offset, UTC)
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset) // 60, 60)
    return (
        f"{_DAYS[moment.weekday()]}, {moment.day:02d} {_MONTHS[moment.month - 1]} {moment.year:04d} "
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {sign}{hours:02d}{minutes:02d}"
    )


def format_date(date: datetime) -> str:
    """The ``Date`` header value for ``date`` (a naive date is taken as UTC)."""
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    offset = date.utcoffset()
    return _date_header(int(date.timestamp()), int(offset.total_seconds()) if offset is not None else 0)


@functools.lru_cache(maxsize=64)
def _sender_headers(from_name: str, from_address: str, reply_to: str) -> tuple[str, ...]:
    headers = [_header("From", mailbox(from_name, from_address))]
    if reply_to:
        headers.append(_header("Reply-To", mailbox(from_name, reply_to)))
    return tuple(headers)


@functools.lru_cache(maxsize=256)
def _filename(name: str) -> str:
    """A file name fit for a quoted header parameter."""
    return _FILENAME.sub("_", name).strip("._") or "attachment"


def _attachment_part(attachment: Attachment, date: datetime, boundary: bytes) -> bytes:
    """The MIME part of an attachment (after its delimiter). The same invitation goes with
    every message of a step, and all of a batch's messages share a few seconds: a part is
    kept for the second it was made in, as long as no boundary can occur in it."""
    try:
        return _made_part(attachment, int(date.timestamp()))
    except _HoldsBoundaries:
        return _encode_part(attachment, attachment.content(date), boundary)


class _HoldsBoundaries(Exception):
    pass


@functools.lru_cache(maxsize=64)
def _made_part(attachment: Attachment, seconds: int) -> bytes:
    data = attachment.content(datetime.fromtimestamp(seconds, UTC))
    if b"=_" in data:  # every boundary starts with it
        raise _HoldsBoundaries
    return _encode_part(attachment, data, b"=_")


def _encode_part(attachment: Attachment, data: bytes, boundary: bytes) -> bytes:
    filename = _filename(attachment.filename)
    media = attachment.content_type
    if media.startswith("text/"):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            cte, body = encode_text(text, boundary)
            return (
                f'Content-Type: {media}; charset="utf-8"; name="{filename}"\r\n'
                f'Content-Disposition: attachment; filename="{filename}"\r\n'
                f"Content-Transfer-Encoding: {cte}\r\n\r\n"
            ).encode("ascii") + body
    return (
        f'Content-Type: {media}; name="{filename}"\r\n'
        f'Content-Disposition: attachment; filename="{filename}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode("ascii") + _base64(data)


# -- the message ---------------------------------------------------------------------------------


def build_email(
    rendered: Rendered,
    *,
    sender: Sender,
    to_name: str,
    to_address: str,
    msg_id: str,
    date: datetime,
    links: Links | None,
    step_label: str = "",
    extra_headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The complete message as bytes, ready for ``DATA``.

    :param rendered: subject, text, HTML and attachments.
    :param links: the lead's unsubscribe links; every marketing message has them (None
        only for mail to the business's own people, such as the digest).
    :param step_label: ``tier/step``, in an ``X-Campaignd-Step`` header.
    :param extra_headers: further headers, for example ``("Auto-Submitted", "auto-generated")``.
    :raises RenderError: when the lead's address cannot be written in a header, or the
        text cannot be encoded; that lead's touch fails, the others go on.
    """
    try:
        to = _header("To", mailbox(to_name, to_address))
    except ValueError as exc:
        raise RenderError(Problem(f"lead {to_address!r}", "email", str(exc))) from None
    from_, *reply_to = _sender_headers(sender.from_name, sender.from_address, sender.reply_to)
    headers = [from_, to, *reply_to]
    if not _is_message_id(msg_id):
        raise ValueError(f"{msg_id!r} is not a Message-ID")
    headers.append(_header("Subject", _unstructured(rendered.subject)))
    headers.append("Date: " + format_date(date))
    headers.append("Message-ID: " + msg_id)
    if links is not None:
        unsubscribe = links.header()
        if "\r" in unsubscribe or "\n" in unsubscribe or "\x00" in unsubscribe:
            unsubscribe = safe_header_text(unsubscribe)
        # Folded between its URIs, the one place it may be: the URIs have no spaces.
        line = "List-Unsubscribe: " + unsubscribe
        headers.append(line if len(line) <= MAX_LINE else line.replace(", <", ",\r\n <"))
        headers.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
    if step_label:
        headers.append(_step_header(step_label))
    for name, value in extra_headers:
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a header name")
        headers.append(_header(name, _unstructured(value)))
    headers.append("MIME-Version: 1.0")

    token = hashlib.blake2b(msg_id.encode("ascii"), digest_size=12).hexdigest()
    alternative = f"=_alt_{token}".encode("ascii")
    try:
        text_cte, text = encode_text(rendered.text, alternative)
        html_cte, html = encode_html(rendered.html, alternative)
    except ValueError as exc:
        raise RenderError(Problem(f"lead {to_address!r}", "", str(exc))) from None
    # Each body ends with a line break of its own; the one before a boundary belongs to
    # the boundary (RFC 2046), hence the CRLF in front of every delimiter after the first.
    body = [
        b'--%s\r\nContent-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: %s\r\n\r\n'
        % (alternative, text_cte.encode("ascii")),
        text,
        b'\r\n--%s\r\nContent-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: %s\r\n\r\n'
        % (alternative, html_cte.encode("ascii")),
        html,
        b"\r\n--%s--\r\n" % alternative,
    ]
    if rendered.attachments:
        mixed = f"=_mix_{token}".encode("ascii")
        inner = body
        body = [b'--%s\r\nContent-Type: multipart/alternative; boundary="%s"\r\n\r\n' % (mixed, alternative)]
        body += inner
        for attachment in rendered.attachments:
            body.append(b"\r\n--%s\r\n" % mixed)
            body.append(_attachment_part(attachment, date, mixed))
        body.append(b"\r\n--%s--\r\n" % mixed)
        headers.append(f'Content-Type: multipart/mixed; boundary="{mixed.decode()}"')
    else:
        headers.append(f'Content-Type: multipart/alternative; boundary="{alternative.decode()}"')
    headers.append("\r\n")
    # Headers are ASCII, except an address whose local part is not (delivered over SMTPUTF8).
    return b"".join([_utf8("\r\n".join(headers)), *body])
