"""The forecast behind ``campaignd plan``: what the next days hold, summed up by day.

Pure: it takes the forecasts the decision core made for each lead
(:func:`campaignd.sequences.forecast`) and the business's time zone, and returns what a
marketer wants to see before anything is sent — how many of which step go out each day,
how many leads will be promoted or handed to sales, and the touches in order. No I/O,
no clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from zoneinfo import ZoneInfo

from campaignd.sequences import PlannedTouch


@dataclass(frozen=True, slots=True)
class PlannedFor:
    """One planned touch and whom it is for."""

    email: str
    name: str
    zone: str
    touch: PlannedTouch


@dataclass(slots=True)
class Day:
    """What one day (in the business's time zone) holds."""

    day: date
    steps: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    """(tier, step, channel) -> how many."""
    promotions: int = 0
    flags: int = 0

    @property
    def total(self) -> int:
        return sum(self.steps.values())


@dataclass(slots=True)
class Plan:
    """The forecast for every lead looked at."""

    days: list[Day]
    touches: list[PlannedFor]
    """Every planned touch, in time order."""
    leads: int
    """Active leads looked at."""
    ends: Counter[str]
    """Why leads have nothing more planned in the period (``sequence finished``, ...)."""

    @property
    def total(self) -> int:
        return len(self.touches)


def summarise(planned: Iterable[PlannedFor], *, leads: int, ends: Counter[str], zone: str) -> Plan:
    """Group planned touches by day in ``zone``, in time order."""
    tz = ZoneInfo(zone)
    touches = sorted(planned, key=lambda p: (p.touch.at, p.email))
    days: dict[date, Day] = {}
    for p in touches:
        local: datetime = p.touch.at.astimezone(tz)
        day = days.setdefault(local.date(), Day(local.date()))
        day.steps[(p.touch.tier, p.touch.step.id, p.touch.step.channel.value)] += 1
        day.promotions += p.touch.promotes
        day.flags += p.touch.flags
    return Plan(days=[days[d] for d in sorted(days)], touches=touches, leads=leads, ends=ends)
