"""Direct mail: the channel that hands printed pieces to the print shop.

Each due ``mail`` step's rendered letter (HTML for paged media) is written, atomically,
into ``<state>/print/pending/`` with an address label beside it, where the operator or
the print batch picks it up. The touch counts when the piece is handed over.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from campaignd.channels import Delivery, Outcome, Outgoing


class PrintOutboxChannel:
    """Writes each direct-mail piece as a file for printing."""

    name = "print"
    concurrency = 1

    def __init__(self, *, path: Path) -> None:
        self.path = path
        self.pending = path / "pending"

    async def open(self) -> None:
        await asyncio.to_thread(self.pending.mkdir, parents=True, exist_ok=True)

    async def send(self, message: Outgoing) -> Delivery:
        try:
            await asyncio.to_thread(self._write, message)
        except OSError as exc:
            return Delivery(message.touch_id, Outcome.TEMPORARY, f"cannot write the print file: {exc}")
        return Delivery(message.touch_id, Outcome.SENT, f"queued for print in {self.pending}")

    def _write(self, message: Outgoing) -> None:
        final = self.pending / f"{message.touch_id:08d}-{message.filename_hint or 'letter'}.html"
        tmp = final.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            fh.write(message.data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)

    async def close(self) -> None:
        return None
