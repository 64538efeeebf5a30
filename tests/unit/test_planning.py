"""The plan summary: planned touches grouped by day in the business's time zone."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime

from campaignd.config import Step
from campaignd.planning import PlannedFor, summarise
from campaignd.sequences import PlannedTouch

INTRO = Step(template="cold/01-intro")
POSTCARD = Step(template="cold/02-postcard", channel="mail")


def planned(email: str, at: datetime, step: Step, n: int, **marks: bool) -> PlannedFor:
    return PlannedFor(email, email.split("@")[0], "UTC", PlannedTouch(at, "cold", step, n, **marks))


def test_touches_are_counted_on_the_local_day_they_fall_on() -> None:
    # 05:30 UTC is still the evening before in Chicago.
    late = datetime(2026, 3, 3, 5, 30, tzinfo=UTC)
    morning = datetime(2026, 3, 3, 15, 0, tzinfo=UTC)
    plan = summarise(
        [
            planned("b@example.com", morning, POSTCARD, 2, promotes=True),
            planned("a@example.com", late, INTRO, 1),
            planned("c@example.com", morning, INTRO, 8, flags=True),
        ],
        leads=3,
        ends=Counter({"sequence finished": 1}),
        zone="America/Chicago",
    )
    assert [d.day for d in plan.days] == [date(2026, 3, 2), date(2026, 3, 3)]
    first, second = plan.days
    assert first.steps == Counter({("cold", "01-intro", "email"): 1})
    assert second.steps == Counter({("cold", "01-intro", "email"): 1, ("cold", "02-postcard", "mail"): 1})
    assert (second.promotions, second.flags, second.total) == (1, 1, 2)
    assert [p.email for p in plan.touches] == ["a@example.com", "b@example.com", "c@example.com"]
    assert plan.total == 3 and plan.leads == 3


def test_nothing_planned() -> None:
    plan = summarise([], leads=5, ends=Counter({"lead is paused": 5}), zone="UTC")
    assert plan.days == [] and plan.total == 0 and plan.ends["lead is paused"] == 5
