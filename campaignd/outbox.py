"""The local outbox: the email channel used when no SMTP relay is configured.

Every message is written, byte for byte as the relay would receive it, as an ``.eml``
file into a Maildir (``<state>/outbox/new/``), so a new install shows exactly what it
would send and nothing leaves the machine. Any mail client opens the files; so does
``mutt -f``. Each file is written to ``tmp/``, flushed to disk and renamed into ``new/``,
so a crash never leaves half a message where a reader would see it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

from campaignd.channels import Delivery, Outcome, Outgoing


class MaildirChannel:
    """Writes each message into a Maildir instead of sending it.

    :param path: the Maildir; ``tmp``, ``new`` and ``cur`` are created inside it.
    """

    name = "outbox"
    concurrency = 1

    def __init__(self, *, path: Path) -> None:
        self.path = path
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")
        self._seq = 0

    def describe(self) -> str:
        return f"the local outbox {self.path}/new"

    async def open(self) -> None:
        await asyncio.to_thread(self._ensure)

    def _ensure(self) -> None:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    async def send(self, message: Outgoing) -> Delivery:
        try:
            final = await asyncio.to_thread(self._write, message)
        except OSError as exc:
            # Disk full, permissions: the outbox itself is unusable, not this message.
            return Delivery(message.touch_id, Outcome.UNAVAILABLE, f"cannot write to the outbox: {exc}")
        return Delivery(message.touch_id, Outcome.SENT, f"written to {final}")

    def _write(self, message: Outgoing) -> Path:
        self._ensure()
        self._seq += 1
        now = time.time()
        # Maildir's unique name (time, pid, sequence, host), with the touch and step for people.
        unique = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{self._seq}.{self._host}"
        name = f"{unique}.{message.touch_id}.{message.filename_hint or 'message'}.eml"
        tmp = self.path / "tmp" / name
        try:
            with tmp.open("wb") as fh:
                fh.write(message.data)
                fh.flush()
                os.fsync(fh.fileno())
            final = self.path / "new" / name
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final

    async def close(self) -> None:
        return None
