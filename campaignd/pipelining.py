"""An SMTP connection that sends its commands in batches (RFC 2920, PIPELINING).

aiosmtplib waits for the answer to each command before it sends the next, so a message
costs four round trips to the relay (MAIL, RCPT, DATA, the data). A relay that offers
PIPELINING takes MAIL, RCPT and DATA together and answers them in order: two round trips
per message, which halves the time a message waits on a distant relay and the work
campaignd does per message on a near one.

aiosmtplib still makes the connection (TLS, STARTTLS, EHLO, login); once it is ready,
:class:`Pipelined` takes the connection over and reads the relay's replies itself,
however the network splits or joins them.
"""

from __future__ import annotations

import asyncio
from collections import deque

from aiosmtplib import SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.response import SMTPResponse

MAX_LINE = 8192
MAX_REPLY = MAX_LINE * 4
"""A reply longer than this (continuation lines included) is refused: it bounds what a
misbehaving relay can make us hold."""


class Pipelined(asyncio.Protocol):
    """Takes over ``transport`` (a connection aiosmtplib has made and greeted) and reads
    the relay's replies in order.

    Write commands with :meth:`write`, then await one :meth:`reply` per command.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._failed: Exception | None = None
        transport.set_protocol(self)

    @property
    def usable(self) -> bool:
        return self._failed is None and not self.transport.is_closing()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._parse()
        except SMTPResponseException as exc:
            self._fail(exc)
            self.transport.close()
            return
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("the relay closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        lost = SMTPServerDisconnected("the connection to the relay was lost")
        if exc is not None:
            lost.__cause__ = exc
        self._fail(lost)

    # -- use ---------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.usable:
            raise self._failed or SMTPServerDisconnected("the connection to the relay is closed")
        self.transport.write(data)

    async def reply(self) -> SMTPResponse:
        """The relay's next reply, in the order of the commands written."""
        while not self._replies:
            if self._failed is not None:
                raise self._failed
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    async def command(self, line: bytes) -> SMTPResponse:
        self.write(line + b"\r\n")
        return await self.reply()

    async def envelope(self, mail: bytes, rcpt: bytes) -> list[SMTPResponse]:
        """MAIL, RCPT and DATA in one write, and their three replies."""
        self.write(mail + b"\r\n" + rcpt + b"\r\nDATA\r\n")
        return [await self.reply(), await self.reply(), await self.reply()]

    async def data(self, payload: bytes) -> SMTPResponse:
        """The message in its wire form (ending with the lone dot), and the reply to it."""
        self.write(payload)
        return await self.reply()

    def close(self) -> None:
        self._fail(SMTPServerDisconnected("the connection to the relay is closed"))
        self.transport.close()

    # -- inside ------------------------------------------------------------------------------

    def _parse(self) -> None:
        """Move every complete reply from the buffer to the queue."""
        buffer = self._buffer
        start = 0
        while True:
            lines: list[bytes] = []
            code = -1
            offset = start
            complete = False
            while True:
                end = buffer.find(b"\n", offset)
                if end == -1:
                    break
                line = bytes(buffer[offset : end + 1])
                offset = end + 1
                if len(line) > MAX_LINE or not line[:3].isdigit():
                    raise SMTPResponseException(-1, f"malformed reply from the relay: {line[:80]!r}")
                code = int(line[:3])
                lines.append(line[4:].strip(b" \t\r\n"))
                if line[3:4] != b"-":
                    complete = True
                    break
            if not complete:
                break
            text = b"\n".join(lines).decode("utf-8", "surrogateescape")
            self._replies.append(SMTPResponse(code, text))
            start = offset
        del buffer[:start]
        if len(buffer) > MAX_REPLY:
            raise SMTPResponseException(-1, "the relay's reply is too long")

    def _fail(self, exc: Exception) -> None:
        if self._failed is None:
            self._failed = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
