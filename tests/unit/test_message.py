"""The bytes of a message: parsed back with the standard library's parser and compared with
what ``email.message.EmailMessage`` makes of the same content."""

from __future__ import annotations

import email
import html as html_lib
import re
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import idna
import pytest

from campaignd.config import Channel, Sender, Settings
from campaignd.message import build_email, format_date, mailbox, message_id, one_off_message_id
from campaignd.render import Attachment, Rendered, Renderer, RenderError
from campaignd.unsubscribe import Links, Signer
from tests.unit.test_render import lead, make_settings, render

DATE = datetime(2027, 1, 12, 15, 4, 5, tzinfo=UTC)
SENDER = Sender(
    from_name="Harbor Home Services",
    from_address="hello@harborhome.example",
    reply_to="sales@harborhome.example",
    postal_address="Harbor Home Services, 418 Lakeshore Drive, Springfield, IL 62704, USA",
)


def links_for(lead_id: int, address: str) -> Links:
    signer = Signer(
        keys=[b"0123456789abcdef0123456789abcdef"],
        base_url="https://harborhome.example/campaignd",
        mailto="unsubscribe@harborhome.example",
    )
    return signer.links(lead_id, address)


def build(rendered: Rendered, who: dict[str, Any], **kwargs: Any) -> bytes:
    values: dict[str, Any] = {
        "sender": SENDER,
        "to_name": f"{who['first_name']} {who['last_name']}",
        "to_address": who["email"],
        "msg_id": message_id(touch_id=41, lead_id=int(who["id"]), sender=SENDER),
        "date": DATE,
        "links": links_for(int(who["id"]), who["email"]),
        "step_label": "cold/01-intro",
    }
    values.update(kwargs)
    return build_email(rendered, **values)


def content(part: Any) -> Any:
    """A part's decoded content, line breaks as LF (the parser keeps the CRLF of the wire)."""
    value = part.get_content()
    return value.replace("\r\n", "\n") if isinstance(value, str) else value


def lines(text: str) -> str:
    """``text`` as it travels: LF line breaks (CRLF on the wire) and a final line break."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def simple(subject: str = "Hello", text: str = "Hi\n", html: str = "<p>Hi</p>\n") -> Rendered:
    return Rendered(subject=subject, html=html, text=text)


def example_messages(tmp_path: Path, who: dict[str, Any]) -> list[tuple[str, Rendered, bytes]]:
    s: Settings = make_settings(tmp_path)
    renderer = Renderer(settings=s)
    out = []
    for tier, seq in s.sequences.items():
        for step in seq.steps:
            if step.channel != Channel.EMAIL:
                continue
            links = links_for(int(who["id"]), who["email"])
            rendered = render(renderer, tier.value, step.id, who, links)
            label = f"{tier.value}/{step.id}"
            out.append((label, rendered, build(rendered, who, links=links, step_label=label)))
    return out


def assert_wellformed(data: bytes) -> None:
    assert data.isascii() or b"@" in data  # only a non-ASCII local part may be UTF-8
    head = data.partition(b"\r\n\r\n")[0]
    # Every line ends in CRLF: the dispatcher tells the SMTP channel so (``Outgoing.crlf``).
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    for line in data.split(b"\r\n"):
        assert len(line) <= 998
    for line in head.split(b"\r\n"):
        if len(line) > 78:  # only one word that cannot be folded (beside its header's name)
            word = line.strip() if line.startswith(b" ") else line.split(b": ", 1)[1]
            assert b" " not in word, line


# -- every example step, parsed back ---------------------------------------------------------


@pytest.mark.parametrize(
    "who",
    [
        lead(
            id=12,
            first_name="Maria",
            last_name="Gonzalez",
            company="Lakeview Dental",
            email="maria@lakeview.example",
        ),
        lead(
            id=13, first_name="Zoë", last_name="Ñúñez", company="Bücher & Söhne", email="zoe@bücher.example"
        ),
        lead(id=14, first_name="", last_name="", company="", email="info@example.com"),
    ],
    ids=["ascii", "accents-and-idn", "bare"],
)
def test_every_example_step_makes_a_standard_message(tmp_path: Path, who: dict[str, Any]) -> None:
    for label, rendered, data in example_messages(tmp_path, who):
        assert_wellformed(data)
        msg = parse(data)
        assert msg.defects == [] and all(not part.defects for part in msg.walk()), label
        for name in ("From", "To", "Reply-To", "Subject", "Date", "Message-ID"):
            assert msg[name].defects == (), (label, name)
        assert msg["From"] == "Harbor Home Services <hello@harborhome.example>"
        assert msg["Reply-To"] == "Harbor Home Services <sales@harborhome.example>"
        assert msg["Subject"] == rendered.subject
        assert msg["Date"].datetime == DATE
        assert msg["Message-ID"] == f"<campaignd.41.{who['id']}@harborhome.example>"
        assert msg["X-Campaignd-Step"] == label
        [to] = msg["To"].addresses
        assert to.display_name == f"{who['first_name']} {who['last_name']}".strip()
        local, _, domain = who["email"].rpartition("@")
        assert (to.username, idna.decode(to.domain)) == (local, domain)
        assert to.domain.isascii()
        links = links_for(int(who["id"]), who["email"])
        assert msg["List-Unsubscribe"] == f"<{links.url}>, <{links.mailto}>"
        assert links.url.startswith("https://")
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

        alternative = msg if not rendered.attachments else msg.get_payload()[0]
        assert alternative.get_content_type() == "multipart/alternative"
        plain, html = alternative.get_payload()
        assert (plain.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
        assert plain.get_content_charset() == html.get_content_charset() == "utf-8"
        assert content(plain) == lines(rendered.text)
        # Non-ASCII characters travel as character references, which HTML readers decode.
        assert content(html) == lines(rendered.html).encode("ascii", "xmlcharrefreplace").decode()
        assert html_lib.unescape(content(html)) == html_lib.unescape(lines(rendered.html))
        for part in (plain, html):
            assert part["Content-Transfer-Encoding"] in ("7bit", "quoted-printable", "base64")
        # Compliance in both parts.
        assert links.url in content(plain) and links.url in content(html)
        assert "418 Lakeshore Drive" in content(plain) and "418 Lakeshore Drive" in content(html)


def test_the_seminar_invitation_is_attached_as_an_ics_file(tmp_path: Path) -> None:
    who = lead(id=21, first_name="Tom", last_name="Becker", email="tom@becker.example")
    [(_, rendered, data)] = [m for m in example_messages(tmp_path, who) if m[0] == "warm/02-seminar"]
    msg = parse(data)
    assert msg.get_content_type() == "multipart/mixed"
    alternative, invitation = msg.get_payload()
    assert alternative.get_content_type() == "multipart/alternative"
    assert invitation.get_content_type() == "text/calendar"
    assert invitation.get_param("method") == "PUBLISH"
    assert invitation.get_content_disposition() == "attachment"
    assert invitation.get_filename() == "winter-seminar.ics"
    cal = icalendar.Calendar.from_ical(content(invitation))
    [event] = cal.walk("VEVENT")
    assert event.decoded("DTSTAMP") == DATE  # made when the message is made
    assert str(event["UID"]) == "campaignd-event-winter-seminar@harborhome.example"
    assert event["DTSTART"].params["TZID"] == "America/Chicago"
    assert event.decoded("DTSTART") == datetime(2027, 1, 14, 18, 30, tzinfo=ZoneInfo("America/Chicago"))
    assert (
        invitation.get_content() == rendered.attachments[0].content(DATE).decode()
    )  # CRLF, as iCalendar wants


# -- the same message as EmailMessage makes it ------------------------------------------------


def reference(rendered: Rendered, who: dict[str, Any], links: Links, msg_id: str, label: str) -> bytes:
    """The same message built with the standard library's EmailMessage."""
    # Long lines as they are: with the default of 78, EmailMessage turns the long words of
    # List-Unsubscribe into encoded words.
    msg = EmailMessage(policy=policy.SMTP.clone(max_line_length=998))
    local, _, domain = who["email"].rpartition("@")
    msg["From"] = f"{SENDER.from_name} <{SENDER.from_address}>"
    msg["To"] = email.headerregistry.Address(
        f"{who['first_name']} {who['last_name']}".strip(), local, idna.encode(domain, uts46=True).decode()
    )
    msg["Reply-To"] = f"{SENDER.from_name} <{SENDER.reply_to}>"
    msg["Subject"] = rendered.subject
    msg["Date"] = format_datetime(DATE)
    msg["Message-ID"] = msg_id
    msg["List-Unsubscribe"] = links.header()
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["X-Campaignd-Step"] = label
    msg.set_content(rendered.text, subtype="plain", charset="utf-8")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8")
    for att in rendered.attachments:
        msg.add_attachment(
            att.content(DATE).decode(),
            subtype="calendar",
            charset="utf-8",
            filename=att.filename,
            params={"method": "PUBLISH"},
        )
    return msg.as_bytes()


@pytest.mark.parametrize(
    "who",
    [
        lead(
            id=3,
            first_name="Maria",
            last_name="Gonzalez",
            company="Lakeview Dental",
            email="maria@lakeview.example",
        ),
        lead(
            id=4,
            first_name="Zoë",
            last_name="Ñúñez",
            company='<Bücher> & "Söhne"',
            email="zoe@bücher.example",
        ),
        lead(id=5, first_name="Jean-Luc", last_name="O'Brien, Jr.", company="", email="jl@example.com"),
    ],
)
def test_headers_and_decoded_parts_equal_what_emailmessage_makes(tmp_path: Path, who: dict[str, Any]) -> None:
    for label, rendered, data in example_messages(tmp_path, who):
        links = links_for(int(who["id"]), who["email"])
        ours, theirs = parse(data), parse(reference(rendered, who, links, parse(data)["Message-ID"], label))
        for name in (
            "From",
            "To",
            "Reply-To",
            "Subject",
            "Date",
            "Message-ID",
            "List-Unsubscribe",
            "List-Unsubscribe-Post",
            "X-Campaignd-Step",
            "MIME-Version",
        ):
            assert str(ours[name]) == str(theirs[name]), name
        assert ours.get_content_type() == theirs.get_content_type()
        our_parts = [p for p in ours.walk() if not p.is_multipart()]
        their_parts = [p for p in theirs.walk() if not p.is_multipart()]
        assert [p.get_content_type() for p in our_parts] == [p.get_content_type() for p in their_parts]
        for our, their in zip(our_parts, their_parts, strict=True):
            if our.get_content_type() == "text/html":
                assert html_lib.unescape(content(our)) == html_lib.unescape(content(their))
            else:
                assert content(our) == content(their)
            assert our.get_filename() == their.get_filename()


# -- headers -----------------------------------------------------------------------------------


def test_a_non_ascii_name_and_an_international_domain_in_to() -> None:
    who = lead(first_name="Zoë", last_name="Ñúñez", email="zoë.ñúñez@bücher.example")
    data = build(simple(), who)
    raw_to = re.search(rb"^To: (.*?)\r$", data, re.M)
    assert raw_to is not None
    assert raw_to.group(1).startswith(b"=?utf-8?b?")  # the name as an encoded word
    assert raw_to.group(1).endswith(
        "<zoë.ñúñez@xn--bcher-kva.example>".encode()
    )  # SMTPUTF8 only for the local part
    to = parse(data)["To"].addresses[0]
    assert (to.display_name, to.domain) == ("Zoë Ñúñez", "xn--bcher-kva.example")


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("Harbor Home Services", "Harbor Home Services"),
        ("Harbor Home Services, Inc.", '"Harbor Home Services, Inc."'),
        ('Dana "the fixer" Whitfield', '"Dana \\"the fixer\\" Whitfield"'),
        ("=?utf-8?q?fake?=", "=?utf-8?b?PT91dGYtOD9xP2Zha2U/PQ==?="),
        ("", ""),
    ],
)
def test_display_names_are_quoted_when_they_need_it(name: str, shown: str) -> None:
    expected = f"{shown} <a@example.com>" if shown else "a@example.com"
    assert mailbox(name, "a@example.com") == expected
    msg = parse(build(simple(), lead(), to_name=name, to_address="a@example.com"))
    assert msg["To"].addresses[0].display_name == name


def test_long_and_non_ascii_subjects_are_folded_and_encoded() -> None:
    subject = "Zoë, " + "a very long subject line that goes on and on " * 6 + "and ends."
    data = build(simple(subject=subject), lead())
    head = data.split(b"\r\n\r\n")[0]
    subject_lines = re.search(rb"^Subject: .*?(?=\r\n\S)", head, re.M | re.S)
    assert subject_lines is not None and subject_lines.group(0).count(b"\r\n ") >= 3
    assert all(len(line) <= 78 for line in subject_lines.group(0).split(b"\r\n"))
    assert parse(data)["Subject"] == subject
    long_ascii = "Winter " * 30 + "offer"
    assert parse(build(simple(subject=long_ascii), lead()))["Subject"] == long_ascii


@pytest.mark.parametrize(
    "evil",
    [
        "Eve\r\nBcc: victim@example.com",
        "Eve\nBcc: victim@example.com",
        "Eve\rBcc: victim@example.com",
        "Eve\x00Bcc: victim@example.com",
        "Eve\u2028Bcc: victim@example.com",
    ],
)
def test_no_lead_field_can_inject_a_header(evil: str) -> None:
    who = lead(first_name=evil, last_name="Smith")
    data = build(simple(subject=f"Hello {evil}"), who)
    msg = parse(data)
    assert msg["Bcc"] is None
    assert (
        sum(1 for line in data.split(b"\r\n\r\n")[0].split(b"\r\n") if line.lower().startswith(b"bcc")) == 0
    )
    assert "Bcc: victim@example.com" in msg["Subject"]  # folded into the value, harmless
    assert msg["To"].addresses[0].addr_spec == who["email"]


@pytest.mark.parametrize(
    "address",
    [
        "eve@example.com\r\nBcc: victim@example.com",
        "eve@example.com>, <victim@example.com",
        "eve example@x.com",
        "nobody",
    ],
)
def test_an_address_that_would_change_the_header_fails_that_lead(address: str) -> None:
    with pytest.raises(RenderError) as caught:
        build(simple(), lead(email=address))
    assert (
        caught.value.problem.where == "email"
        and "is not an email address that can go in a header" in caught.value.problem.reason
    )


def test_unsubscribe_headers_are_rfc_8058() -> None:
    links = links_for(9, "jane@example.com")
    msg = parse(build(simple(), lead(id=9, email="jane@example.com"), links=links))
    assert msg["List-Unsubscribe"] == f"<{links.url}>, <{links.mailto}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url_only = Links(url=links.url, mailto="")
    assert parse(build(simple(), lead(), links=url_only))["List-Unsubscribe"] == f"<{links.url}>"
    internal = parse(build(simple(), lead(), links=None))
    assert internal["List-Unsubscribe"] is None and internal["List-Unsubscribe-Post"] is None


def one_off_message_ids_are_on_the_sender_s_domain() -> None:
    assert message_id(touch_id=5, lead_id=9, sender=SENDER) == "<campaignd.5.9@harborhome.example>"
    idn = SENDER.model_copy(update={"from_address": "hallo@bücher.example"})
    assert message_id(touch_id=5, lead_id=9, sender=idn) == "<campaignd.5.9@xn--bcher-kva.example>"
    assert one_off_message_id(sender=SENDER, nonce="ab12").startswith(
        "<campaignd.test.ab12@harborhome.example"
    )
    with pytest.raises(ValueError):
        build(simple(), lead(), msg_id="<no domain>")


@pytest.mark.parametrize(
    "when",
    [
        datetime(2027, 1, 12, 15, 4, 5, tzinfo=UTC),
        datetime(2027, 7, 1, 9, 0, tzinfo=ZoneInfo("America/Chicago")),
        datetime(2027, 3, 28, 1, 30, tzinfo=ZoneInfo("Europe/Berlin")),
        datetime(2027, 7, 1, 9, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2027, 7, 1, 9, 0, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_date_headers_match_the_standard_library(when: datetime) -> None:
    assert format_date(when) == format_datetime(when.replace(microsecond=0))


# -- bodies ------------------------------------------------------------------------------------


def test_escaping_survives_the_trip(tmp_path: Path) -> None:
    who = lead(first_name="<script>alert(1)</script>", company="Brook & Sons", email="x@example.com")
    for _, _, data in example_messages(tmp_path, who):
        msg = parse(data)
        alternative = msg if msg.get_content_type() == "multipart/alternative" else msg.get_payload()[0]
        plain, html = alternative.get_payload()
        assert "<script>" not in content(html) and "&lt;script&gt;alert(1)&lt;/script&gt;" in content(html)
        assert "<script>alert(1)</script>" in content(plain)


def test_long_lines_and_the_boundary_in_a_body_are_encoded() -> None:
    msg_id = message_id(touch_id=1, lead_id=1, sender=SENDER)
    boundary = parse(build(simple(), lead(), msg_id=msg_id)).get_boundary()
    assert boundary is not None
    text = f"first line\n--{boundary}\n--{boundary}--\n" + "x" * 3000 + "\n"
    html = f"<p>--{boundary}</p>\n<p>" + "y" * 3000 + "</p>\n"
    data = build(simple(text=text, html=html), lead(), msg_id=msg_id)
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    plain, part = parse(data).get_payload()
    assert content(plain) == text and content(part) == html
    assert plain["Content-Transfer-Encoding"] == part["Content-Transfer-Encoding"] == "quoted-printable"


def test_line_endings_are_crlf_whatever_the_template_wrote() -> None:
    data = build(simple(text="one\r\ntwo\rthree\nfour", html="<p>a</p>\r\n<p>b</p>"), lead())
    assert b"\n" not in data.replace(b"\r\n", b"")
    plain, html = parse(data).get_payload()
    assert content(plain) == "one\ntwo\nthree\nfour\n"
    assert content(html) == "<p>a</p>\n<p>b</p>\n"


def test_html_with_non_ascii_in_a_stylesheet_goes_as_base64() -> None:
    html = '<html><head><style>p::before { content: "→" }</style></head><body><p>Zoë</p></body></html>\n'
    _, part = parse(build(simple(html=html), lead())).get_payload()
    assert part["Content-Transfer-Encoding"] == "base64"
    assert content(part) == html


def test_html_with_a_c1_control_goes_as_base64() -> None:
    html = "<p>Zo\u00eb \x91quoted\x92</p>\n"  # &#145; would read as a curly quote
    _, part = parse(build(simple(html=html), lead())).get_payload()
    assert part["Content-Transfer-Encoding"] == "base64"
    assert content(part) == html


def test_text_that_cannot_be_encoded_fails_that_lead() -> None:
    with pytest.raises(RenderError):
        build(simple(text="broken \udc80 surrogate"), lead())


def test_attachments_that_are_not_text_go_as_base64() -> None:
    pdf = Attachment("offer.pdf", "application/pdf", lambda _: b"%PDF-1.7\x00\xff binary")
    msg = parse(build(Rendered("Hi", "<p>Hi</p>", "Hi", attachments=(pdf,)), lead()))
    assert msg.get_content_type() == "multipart/mixed"
    attached = msg.get_payload()[1]
    assert attached["Content-Transfer-Encoding"] == "base64"
    assert attached.get_filename() == "offer.pdf"
    assert attached.get_content() == b"%PDF-1.7\x00\xff binary"


def test_extra_headers_are_added_and_checked() -> None:
    msg = parse(build(simple(), lead(), extra_headers=[("X-Campaignd-Test", "yes")]))
    assert msg["X-Campaignd-Test"] == "yes"
    with pytest.raises(ValueError):
        build(simple(), lead(), extra_headers=[("Bcc: x@example.com\r\nX", "y")])


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("a" * 998 + "\n" + "b" * 998 + "\n", "7bit"),
        ("short\n" + "a" * 999 + "\nshort\n", "quoted-printable"),
        ("x\n" * 600 + "a" * 998, "7bit"),
        ("x\n" * 600 + "a" * 999, "quoted-printable"),
        ("a" * 999, "quoted-printable"),
    ],
)
def test_a_line_longer_than_smtp_allows_is_encoded(text: str, encoding: str) -> None:
    plain, _ = parse(build(simple(text=text), lead())).get_payload()
    assert plain["Content-Transfer-Encoding"] == encoding
    assert content(plain) == lines(text)


def test_an_attachment_holding_a_boundary_is_still_one_part() -> None:
    msg_id = message_id(touch_id=3, lead_id=3, sender=SENDER)
    with_ics = Rendered("Hi", "<p>Hi</p>", "Hi", attachments=(simple_ics(b""),))
    boundary = parse(build(with_ics, lead(), msg_id=msg_id)).get_boundary()
    assert boundary is not None
    sneaky = f"BEGIN:VCALENDAR\r\n--{boundary}\r\n--{boundary}--\r\nEND:VCALENDAR\r\n".encode()
    with_ics = Rendered("Hi", "<p>Hi</p>", "Hi", attachments=(simple_ics(sneaky),))
    _, attached = parse(build(with_ics, lead(), msg_id=msg_id)).get_payload()
    assert attached.get_filename() == "event.ics"
    assert content(attached) == sneaky.decode().replace("\r\n", "\n")


def simple_ics(data: bytes) -> Attachment:
    return Attachment("event.ics", "text/calendar; method=PUBLISH", lambda _: data)
