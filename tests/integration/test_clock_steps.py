"""The wall clock stepping back or jumping forward never resends a step nor skips one.

The dispatcher works from recorded times; here its clock is moved by hand while it runs
a sequence against the real databases.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path

from campaignd.daemon import prepare
from campaignd.engine import Dispatcher
from campaignd.store import LeadInput, Store
from campaignd.testing import MemoryChannel
from tests.factories import make_settings

T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
SEQUENCES = """
[sequences.cold]
steps = [
  { template = "cold/01-intro", delay = "0s" },
  { template = "cold/03-reminder", delay = "2h" },
]

[sequences.warm]
steps = [
  { template = "warm/01-sales-letter", delay = "1d" },
  { template = "warm/02-seminar", delay = "1d", event = "winter-seminar" },
]
"""
ORDER = ["cold/01-intro", "cold/03-reminder", "warm/01-sales-letter", "warm/02-seminar"]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def steps_of(channel: MemoryChannel) -> list[str]:
    return [str(message_from_bytes(m.data)["X-Campaignd-Step"]) for m in channel.outbox]


async def test_clock_stepping_back_and_jumping_forward(tmp_path: Path, store: Store) -> None:
    settings = make_settings(tmp_path, sequences=SEQUENCES, threshold=10)
    renderer, signer = prepare(settings)
    clock = Clock(T0)
    email = MemoryChannel()
    dispatcher = Dispatcher(
        store=store,
        settings=settings,
        renderer=renderer,
        signer=signer,
        channels={"email": email, "mail": MemoryChannel()},
        worker="test:1",
        clock=clock,
    )
    store.upsert_leads([LeadInput(email="ann@example.com")], tier="cold", now=T0)

    await dispatcher.run_pass(clock.now)
    assert steps_of(email) == ORDER[:1]
    # NTP steps the clock back an hour: the intro is not sent again, the reminder not early.
    clock.now = T0 - timedelta(hours=1)
    for _ in range(4):
        await dispatcher.run_pass(clock.now)
        clock.now += timedelta(minutes=30)
    assert steps_of(email) == ORDER[:1]
    # Time catches up past the reminder's due time (two hours after the recorded intro).
    clock.now = T0 + timedelta(hours=2)
    await dispatcher.run_pass(clock.now)
    assert steps_of(email) == ORDER[:2]
    # The clock jumps a day (and more) forward: each step still goes once, in order.
    clock.now += timedelta(days=3)
    for _ in range(6):
        await dispatcher.run_pass(clock.now)
        clock.now += timedelta(minutes=1)
    # the sales letter went at once; the seminar waits a day after it, however far the jump
    assert steps_of(email) == ORDER[:3]
    clock.now += timedelta(days=1)
    await dispatcher.run_pass(clock.now)
    # And back again across the whole history: nothing resent.
    clock.now = T0 - timedelta(days=1)
    for _ in range(3):
        await dispatcher.run_pass(clock.now)
        clock.now += timedelta(hours=1)
    assert steps_of(email) == ORDER
    assert max(Counter(steps_of(email)).values()) == 1
    lead = store.get_lead("ann@example.com")
    assert lead.touch_count == 4
