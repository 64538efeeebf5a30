"""A real SMTP server for tests (aiosmtpd on a free port) that can be told to misbehave.

``SmtpServer`` runs in its own thread with its own event loop, so it serves both async
tests and daemons started as separate processes. Everything it accepted is in
``received``; faults are scripted on the ``Faults`` object, which may be changed while
the server runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Received:
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...] = ()

    @property
    def message(self) -> Message:
        return message_from_bytes(self.data)

    @property
    def step(self) -> str:
        return str(self.message.get("X-Campaignd-Step", ""))

    @property
    def message_id(self) -> str:
        return str(self.message.get("Message-ID", ""))


@dataclass
class Faults:
    """What the server does wrong. Each deque is consumed one answer per command."""

    rcpt: dict[str, str] = field(default_factory=dict)
    """Recipient -> the answer to every RCPT for it (e.g. ``550 5.1.1 no such user``)."""
    next_mail: deque[str] = field(default_factory=deque)
    next_rcpt: deque[str] = field(default_factory=deque)
    next_data: deque[str] = field(default_factory=deque)
    """Answers for the next commands; ``drop`` closes the connection instead of answering."""
    stall_rcpt: float = 0.0
    """Seconds to wait before answering each RCPT."""
    stall_data: float = 0.0
    """Seconds to wait before answering the end of DATA (after the message is taken)."""
    drop_after_data: int = 0
    """Close the connection after accepting this many more messages, without answering."""


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def _answer(self, smtp: SMTP, queue: deque[str]) -> str | None:
        if not queue:
            return None
        answer = queue.popleft()
        if answer == "drop":
            smtp.transport.close()  # type: ignore[union-attr]
            return "421 4.4.2 closing"
        return answer

    async def handle_EHLO(
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        self.server.connections += 1
        session.host_name = hostname
        if self.server.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        answer = await self._answer(smtp, self.server.faults.next_mail)
        if answer and not answer.startswith("2"):
            return answer
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return answer or "250 OK"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.server.rcpt_attempts.append(address)
        if self.server.faults.stall_rcpt:
            await asyncio.sleep(self.server.faults.stall_rcpt)
        answer = await self._answer(smtp, self.server.faults.next_rcpt) or self.server.faults.rcpt.get(
            address
        )
        if answer and not answer.startswith("2"):
            return answer
        envelope.rcpt_tos.append(address)
        return answer or "250 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        faults = self.server.faults
        answer = await self._answer(smtp, faults.next_data)
        if answer and not answer.startswith("2"):
            return answer
        content = envelope.original_content or b""
        self.server.received.append(
            Received(str(envelope.mail_from), tuple(envelope.rcpt_tos), content, tuple(envelope.mail_options))
        )
        if faults.stall_data:
            await asyncio.sleep(faults.stall_data)
        if faults.drop_after_data:
            faults.drop_after_data -= 1
            smtp.transport.close()  # type: ignore[union-attr]
            return "421 4.4.2 closing"
        return answer or "250 2.0.0 OK queued"


class SmtpServer:
    """aiosmtpd on 127.0.0.1 and a free port, in a thread of its own.

    Use as a context manager; ``port`` is known once it has started. ``stop()`` and
    ``start()`` may be called again to take the server down and bring it back on the
    same port.
    """

    def __init__(self, *, smtputf8: bool = False, pipelining: bool = True) -> None:
        self.smtputf8 = smtputf8
        """Offer the SMTPUTF8 extension."""
        self.pipelining = pipelining
        """Offer PIPELINING (as most relays do): campaignd then sends MAIL, RCPT and DATA at once."""
        self.received: list[Received] = []
        self.rcpt_attempts: list[str] = []
        self.connections = 0
        """Sessions greeted with EHLO: how many connections clients opened."""
        self.faults = Faults()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> SmtpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ready = threading.Event()
        loop = self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            handler = _Handler(self)

            def factory() -> SMTP:
                return SMTP(
                    handler, hostname="sink.test", loop=loop, timeout=30, enable_SMTPUTF8=self.smtputf8
                )

            server = loop.run_until_complete(
                loop.create_server(factory, "127.0.0.1", self.port, reuse_address=True)
            )
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            server.close()
            # Let connection handlers see their transports close before the loop goes.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"smtpd-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the test SMTP server did not start")

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        loop, self._loop = self._loop, None

        def close_all() -> None:
            if self._server is not None:
                self._server.close()
                for transport in list(getattr(self._server, "_transports", [])):
                    transport.close()
            loop.stop()

        loop.call_soon_threadsafe(close_all)
        self._thread.join(10)
        self._thread = None

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        """Wait until at least ``count`` messages have been accepted."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.received)} messages received, expected {count}")
            time.sleep(0.05)
        return list(self.received)

    def by_recipient(self) -> dict[str, list[str]]:
        """Recipient -> the steps it received, in order."""
        out: dict[str, list[str]] = {}
        for msg in self.received:
            for rcpt in msg.recipients:
                out.setdefault(rcpt, []).append(msg.step)
        return out

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "tls": "none", **extra}
