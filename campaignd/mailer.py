"""The SMTP channel: what bytes go to the relay, over which connections, and what the
relay's answer means for the touch.

A small pool of aiosmtplib clients (one client serialises its commands, so parallelism
means several connections), each reused for many messages and reconnected when it
drops; implicit TLS or STARTTLS and login as configured; an optional messages-per-second
limit across the pool. Every answer is classified for the dispatcher:

- accepted after DATA: ``sent``;
- refused for the recipient with a 5xx (or a 5.1.x/5.2.1 status after DATA): ``permanent``,
  a hard bounce that suppresses the address;
- any other 5xx (the sender, the content, a policy): ``rejected``, failed but not
  suppressed;
- a 4xx, or the link failing before the message was handed over: ``temporary``, retried;
- the relay unreachable or refusing the connection: ``unavailable``, not the message's
  fault, so it costs no attempt;
- the link failing or timing out after DATA began: ``unknown``, because the relay may
  have accepted the message; it is never resent by itself.

aiosmtplib makes each connection (TLS, STARTTLS, EHLO, login). When the relay offers
PIPELINING, :mod:`campaignd.pipelining` takes the connection over and sends MAIL, RCPT
and DATA in one write; otherwise the commands go one at a time through aiosmtplib's
command layer. Either way the work aiosmtplib's ``mail``/``rcpt``/``data`` helpers would
do again is skipped: an address campaignd has checked needs no parsing, and a message
that already has CRLF line ends (every one ``build_email`` makes) is not rewritten line
by line.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import cast

import aiosmtplib
import idna
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from aiosmtplib.email import quote_address
from aiosmtplib.response import SMTPResponse

from campaignd.channels import Delivery, Outcome, Outgoing
from campaignd.config import Smtp, TlsMode
from campaignd.pipelining import Pipelined

logger = logging.getLogger(__name__)

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})")
_PLAIN_ADDRESS = re.compile(r"[^\s<>()\[\]\\,;:\"@]+@[^\s<>()\[\]\\,;:\"@]+")
"""An address that goes on the command line as it is: nothing to unquote, nothing that
could smuggle a parameter in (anything else goes through aiosmtplib's own parsing)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")


class Pacer:
    """Spaces calls at most ``rate`` per second (0: no limit), across all callers."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = asyncio.get_running_loop().time()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


def envelope_address(address: str) -> tuple[str, bool]:
    """The address for MAIL FROM/RCPT TO, and whether it needs SMTPUTF8.

    An internationalised domain goes on the wire in its IDNA (``xn--``) form, which
    every relay accepts; only a non-ASCII local part needs the SMTPUTF8 extension.
    """
    local, _, domain = address.rpartition("@")
    if not domain.isascii():
        domain = idna.encode(domain, uts46=True).decode("ascii")
    return f"{local}@{domain}", not local.isascii()


def wire_data(message: bytes, *, crlf: bool = False) -> bytes:
    """``message`` as DATA carries it (RFC 5321, 4.5.2): CRLF line ends, a dot at the start
    of a line doubled, and the closing line of a single dot.

    Line ends are counted rather than rewritten, and not even counted when ``crlf`` says
    they are all CRLF already (as ``build_email`` makes them).
    """
    if not crlf:
        lines = message.count(b"\n")
        if message.count(b"\r\n") != lines or message.count(b"\r") != lines:
            message = _LINE_END.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b".") or b"\n." in message:
        message = _LEADING_DOT.sub(b"..", message)
    return message + b".\r\n"


async def _hello(client: aiosmtplib.SMTP) -> None:
    """EHLO (HELO if the relay refuses it) once per connection: aiosmtplib says it on
    connect only when it needs the extensions there (STARTTLS, login)."""
    if not client.is_ehlo_or_helo_needed:
        return
    try:
        await client.ehlo()
    except SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


class _OneAtATime:
    """A relay without PIPELINING: each command goes through aiosmtplib's command layer
    and waits for its answer."""

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self.client = client

    @property
    def usable(self) -> bool:
        return self.client.is_connected

    async def command(self, line: bytes) -> SMTPResponse:
        return await self.client.execute_command(line, timeout=None)

    async def envelope(self, mail: bytes, rcpt: bytes) -> list[SMTPResponse]:
        """MAIL, then RCPT if the sender was accepted, then DATA if the recipient was."""
        replies = [await self.command(mail)]
        if replies[-1].code == 250:
            replies.append(await self.command(rcpt))
            if replies[-1].code in (250, 251):
                replies.append(await self.command(b"DATA"))
        return replies

    async def data(self, payload: bytes) -> SMTPResponse:
        protocol = self.client.protocol
        if protocol is None:
            raise SMTPServerDisconnected("the connection to the relay is closed")
        # Nothing runs between the write and the read, so the answer cannot be missed.
        protocol.write(payload)
        return await protocol.read_response(timeout=None)

    def close(self) -> None:
        self.client.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SMTPResponseException):
        return f"{exc.code} {exc.message}".strip()
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _about_the_address(code: int, message: str) -> bool:
    """True when a 5xx after DATA is about the mailbox (RFC 3463 x.1.x, 5.2.1), not the content."""
    match = _ENHANCED.match(message)
    if not match:
        return False
    subject, detail = int(match.group(2)), int(match.group(3))
    return code >= 500 and (subject == 1 or (subject == 2 and detail == 1))


class SmtpChannel:
    """Delivers email through an SMTP relay.

    :param settings: the ``[smtp]`` configuration.
    """

    name = "smtp"

    def __init__(self, *, settings: Smtp) -> None:
        self.settings = settings
        self.concurrency = settings.connections
        self._idle: list[_Link] = []
        self._pacer = Pacer(settings.rate)

    def describe(self) -> str:
        return f"SMTP {self.settings.host}:{self.settings.port} ({self.settings.tls.value})"

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        password = s.password.get_secret_value()
        return aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            username=s.username or None,
            password=password if s.username else None,
            use_tls=s.tls == TlsMode.IMPLICIT,
            start_tls=s.tls == TlsMode.STARTTLS,
            timeout=s.timeout.total_seconds(),
            local_hostname=s.helo_name or None,
        )

    async def open(self) -> None:
        """Connections are made on first use and kept for the pass."""

    async def check(self) -> str:
        """Connect, log in and quit: what ``campaignd doctor`` runs. Raises on failure."""
        client = self._client()
        try:
            await client.connect()
            await _hello(client)
            extensions = ", ".join(sorted(client.esmtp_extensions)) or "none"
            await client.quit()
        finally:
            client.close()
        return f"{self.describe()} accepted the connection (extensions: {extensions})"

    async def send(self, message: Outgoing) -> Delivery:
        await self._pacer.wait()
        reused = bool(self._idle)
        link = self._idle.pop() if reused else _Link(self._client())
        delivery, keep = await self._transaction(link, message)
        if delivery.outcome in (Outcome.TEMPORARY, Outcome.UNAVAILABLE) and reused and not keep:
            # A pooled connection may have been dropped by the relay while it sat idle;
            # the message never left, so try once more on a fresh connection.
            link.close()
            link = _Link(self._client())
            delivery, keep = await self._transaction(link, message)
        if keep and link.connected:
            self._idle.append(link)
        else:
            link.close()
        return delivery

    async def _transaction(self, link: _Link, message: Outgoing) -> tuple[Delivery, bool]:
        """One MAIL/RCPT/DATA exchange; returns the delivery and whether the link is reusable."""
        touch = message.touch_id
        client = link.client
        if not link.connected:
            try:
                await client.connect()
                await _hello(client)
            except SMTPAuthenticationError as exc:
                return Delivery(
                    touch, Outcome.UNAVAILABLE, f"the relay refused the login: {_describe(exc)}"
                ), False
            except (SMTPException, OSError, TimeoutError) as exc:
                return Delivery(
                    touch, Outcome.UNAVAILABLE, f"cannot reach the relay: {_describe(exc)}"
                ), False
            if client.supports_extension("pipelining") and client.transport is not None:
                link.talk = Pipelined(cast(asyncio.Transport, client.transport))
            else:
                link.talk = _OneAtATime(client)
        sender, sender_utf8 = envelope_address(message.sender)
        recipient, recipient_utf8 = envelope_address(message.recipient)
        options = b""
        encoding = "ascii"
        if sender_utf8 or recipient_utf8:
            if not client.supports_extension("smtputf8"):
                return Delivery(
                    touch,
                    Outcome.REJECTED,
                    f"{message.recipient} needs SMTPUTF8, which the relay does not offer",
                ), True
            options, encoding = b" SMTPUTF8", "utf-8"
        try:
            mail = b"MAIL FROM:" + _command_path(sender, encoding) + options
            rcpt = b"RCPT TO:" + _command_path(recipient, encoding)
        except ValueError as exc:
            # Line breaks and such would end the command (another command) or be dropped
            # by a lenient parser (another address): refused, nothing sent.
            return Delivery(touch, Outcome.REJECTED, str(exc)), True
        talk = link.talk
        assert talk is not None
        timeout = self.settings.timeout.total_seconds()
        # One deadline for the whole exchange, rather than a timer per command.
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                replies = await talk.envelope(mail, rcpt)
        except TimeoutError:
            detail = f"the relay did not answer within {timeout:g}s"
            return Delivery(touch, Outcome.TEMPORARY, f"link failed before the data: {detail}"), False
        except (SMTPException, OSError) as exc:
            # Nothing was handed over before DATA: safe to try again later.
            return Delivery(touch, Outcome.TEMPORARY, f"link failed before the data: {_describe(exc)}"), False
        refusal = _refusal(message, replies)
        if refusal is not None:
            if replies[-1].code == 354:
                # Pipelined: the relay waits for data it must not get; this connection is done.
                return refusal, False
            return refusal, await self._reset(talk, refusal.code or 0)
        try:
            async with asyncio.timeout_at(deadline):
                done = await talk.data(wire_data(message.data, crlf=message.crlf))
        except TimeoutError:
            detail = f"the relay did not answer within {timeout:g}s"
            return Delivery(touch, Outcome.UNKNOWN, f"link failed during the data: {detail}"), False
        except (SMTPException, OSError) as exc:
            # The relay may have taken the message before the link failed: never guess.
            return Delivery(touch, Outcome.UNKNOWN, f"link failed during the data: {_describe(exc)}"), False
        if done.code != 250:
            refused = Delivery(touch, _data_outcome(done), _reply(done), done.code)
            return refused, await self._reset(talk, done.code)
        return Delivery(touch, Outcome.SENT, _reply(done), done.code), True

    async def _reset(self, talk: Pipelined | _OneAtATime, code: int) -> bool:
        """Make the connection ready for the next message after a refusal; False if it is not."""
        if code == 421 or not talk.usable:
            return False
        try:
            reply = await asyncio.wait_for(talk.command(b"RSET"), self.settings.timeout.total_seconds())
        except (SMTPException, OSError, TimeoutError):
            return False
        return reply.code == 250

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for link in idle:
            try:
                if link.talk is not None and link.talk.usable:
                    await asyncio.wait_for(link.talk.command(b"QUIT"), 2)
            except (SMTPException, OSError, TimeoutError):
                pass
            finally:
                link.close()


@dataclass(slots=True)
class _Link:
    """One connection to the relay: made and greeted by aiosmtplib, then talked over by
    :class:`Pipelined` when the relay offers PIPELINING, one command at a time otherwise."""

    client: aiosmtplib.SMTP
    talk: Pipelined | _OneAtATime | None = None
    """None until connected."""

    @property
    def connected(self) -> bool:
        return self.talk is not None and self.talk.usable

    def close(self) -> None:
        if self.talk is not None:
            self.talk.close()
        self.client.close()


def _command_path(address: str, encoding: str) -> bytes:
    """``<address>`` for MAIL FROM or RCPT TO; raises ValueError for one that cannot go
    on a command line."""
    if _CONTROL.search(address):
        raise ValueError(f"{address!r} contains characters not allowed on an SMTP command line")
    path = f"<{address}>" if _PLAIN_ADDRESS.fullmatch(address) else quote_address(address)
    return path.encode(encoding)


def _refusal(message: Outgoing, replies: list[SMTPResponse]) -> Delivery | None:
    """What a refusal among the replies to MAIL, RCPT and DATA means, or None if all
    three accepted. Replies stop at the first refusal, except when pipelined."""
    touch = message.touch_id
    mail = replies[0]
    if mail.code != 250:
        outcome = Outcome.REJECTED if mail.code >= 500 else Outcome.TEMPORARY
        detail = f"the relay refused the sender {message.sender}: {_reply(mail)}"
        return Delivery(touch, outcome, detail, mail.code)
    rcpt = replies[1]
    if rcpt.code not in (250, 251):
        outcome = Outcome.PERMANENT if rcpt.code >= 500 else Outcome.TEMPORARY
        return Delivery(touch, outcome, _reply(rcpt), rcpt.code)
    data = replies[2]
    if data.code != 354:
        return Delivery(touch, _data_outcome(data), _reply(data), data.code)
    return None


def _data_outcome(reply: SMTPResponse) -> Outcome:
    """A refusal of DATA or of the data: about the mailbox, or the message, or for now."""
    if reply.code >= 500:
        return Outcome.PERMANENT if _about_the_address(reply.code, reply.message) else Outcome.REJECTED
    return Outcome.TEMPORARY


def _reply(reply: SMTPResponse) -> str:
    return f"{reply.code} {reply.message}".strip()
