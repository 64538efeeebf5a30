"""Test and dry-run doubles that ship with the package.

``MemoryChannel`` is a real channel whose only difference is that it keeps messages in
a list instead of sending them; it can be told to answer with a given outcome.
"""

from __future__ import annotations

from collections.abc import Callable

from campaignd.channels import Delivery, Outcome, Outgoing


class MemoryChannel:
    """Keeps every message it is given; answers SENT unless ``answer`` says otherwise."""

    name = "memory"

    def __init__(self, *, concurrency: int = 2, answer: Callable[[Outgoing], Outcome] | None = None) -> None:
        self.concurrency = concurrency
        self.answer = answer
        self.outbox: list[Outgoing] = []
        self.opened = 0
        self.closed = 0

    async def open(self) -> None:
        self.opened += 1

    async def send(self, message: Outgoing) -> Delivery:
        outcome = self.answer(message) if self.answer else Outcome.SENT
        if outcome == Outcome.SENT:
            self.outbox.append(message)
        return Delivery(message.touch_id, outcome, f"memory channel: {outcome.value}")

    async def close(self) -> None:
        self.closed += 1
