"""The decision core, example by example: plain tables of inputs and expected answers.

Every function here takes ``now`` (or ``at``) as an argument, so nothing freezes the clock
and nothing touches a database. Times are written in the lead's own zone where that is how
a marketer would read them, and in UTC where the instant is the point (DST changes).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from campaignd.config import Channel, Sequence, Step, Tier, Window, load_settings
from campaignd.sequences import (
    Idle,
    LeadState,
    NextTouch,
    Policy,
    Send,
    TouchView,
    Wait,
    apply_touch,
    decide,
    fit_window,
    forecast,
    in_window,
    next_touch,
    why_not_contactable,
    with_touch,
    zone_of,
)

CHI = ZoneInfo("America/Chicago")
LON = ZoneInfo("Europe/London")

# 2026: the US springs forward on Sunday 8 March and falls back on Sunday 1 November; the UK
# on Sunday 29 March and Sunday 25 October.


def utc(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=UTC)


def wall(
    zone: ZoneInfo, y: int, m: int, d: int, hh: int = 0, mm: int = 0, ss: int = 0, us: int = 0
) -> datetime:
    """A wall-clock time in ``zone`` (the first pass, when the clocks go back)."""
    return datetime(y, m, d, hh, mm, ss, us, tzinfo=zone)


def win(hours: str = "09:00-17:00", days: str | list[str] = "mon-fri") -> Window:
    return Window.model_validate({"days": days, "hours": hours})


T0 = utc(2026, 3, 2, 15)  # Monday 09:00 in Chicago
M = timedelta(minutes=1)
H = timedelta(hours=1)
D = timedelta(days=1)


def step(
    sid: str, delay: timedelta = timedelta(0), *, mail: bool = False, window: Window | None = None
) -> Step:
    return Step(
        id=sid,
        template=f"x/{sid}",
        delay=delay,
        channel=Channel.MAIL if mail else Channel.EMAIL,
        window=window,
    )


COLD = (step("intro"), step("postcard", H, mail=True), step("reminder", D))
WARM = (step("letter", D), step("seminar", 2 * D), step("last-call", D))


def policy(
    *,
    cold: Seq[Step] = COLD,
    warm: Seq[Step] = WARM,
    threshold: int = 8,
    rule: str = "sequence_complete",
    after: int = 4,
    zone: str = "UTC",
    window: Window | None = None,
) -> Policy:
    return Policy(
        sequences={
            Tier.COLD: Sequence(steps=tuple(cold), window=window),
            Tier.WARM: Sequence(steps=tuple(warm), window=window),
        },
        threshold=threshold,
        promote_rule=rule,
        promote_after=after,
        default_zone=zone,
    )


def lead(
    tier: str = "cold",
    *touches: TouchView,
    status: str = "active",
    count: int | None = None,
    since: datetime = T0,
    last: datetime | None = None,
    tz: str = "",
    suppressed: bool = False,
) -> LeadState:
    """A lead whose count and last touch follow from its sent touches unless given."""
    sent = [t.at for t in touches if t.status == "sent"]
    return LeadState(
        tier=tier,
        status=status,
        touch_count=len(sent) if count is None else count,
        tier_since=since,
        last_touch_at=last if last is not None else max(sent, default=None),
        timezone=tz,
        suppressed=suppressed,
        touches=touches,
    )


def sent(tier: str, sid: str, at: datetime) -> TouchView:
    return TouchView(tier, sid, "sent", at)


def touch(tier: str, sid: str, status: str, at: datetime, **kw: datetime) -> TouchView:
    return TouchView(tier, sid, status, at, **kw)


# -- send windows ---------------------------------------------------------------------------------

WEEK = ["mon-sun"]

FIT_WINDOW = [
    # plain weekdays, in the lead's zone
    ("inside the window", wall(CHI, 2026, 3, 4, 10), win(), CHI, wall(CHI, 2026, 3, 4, 10)),
    ("before it opens", wall(CHI, 2026, 3, 4, 7, 15), win(), CHI, wall(CHI, 2026, 3, 4, 9)),
    ("the opening is inside", wall(CHI, 2026, 3, 4, 9), win(), CHI, wall(CHI, 2026, 3, 4, 9)),
    ("the closing is outside", wall(CHI, 2026, 3, 4, 17), win(), CHI, wall(CHI, 2026, 3, 5, 9)),
    ("saturday waits for monday", wall(CHI, 2026, 2, 28, 12), win(), CHI, utc(2026, 3, 2, 15)),
    ("sunday night waits for monday", wall(CHI, 2026, 3, 1, 23, 59), win(), CHI, utc(2026, 3, 2, 15)),
    # a Friday-evening wait across the spring change: Monday 09:00 is CDT, 14:00 UTC not 15:00
    ("friday evening across the change", wall(CHI, 2026, 3, 6, 17, 30), win(), CHI, utc(2026, 3, 9, 14)),
    (
        "weekend-only, all day",
        wall(CHI, 2026, 3, 6, 12),
        win("00:00-24:00", "sat-sun"),
        CHI,
        utc(2026, 3, 7, 6),
    ),
    # windows ending at 24:00
    (
        "the last microsecond before 24:00 is inside",
        wall(LON, 2026, 3, 2, 23, 59, 59, 999999),
        win("18:00-24:00", "mon"),
        LON,
        wall(LON, 2026, 3, 2, 23, 59, 59, 999999),
    ),
    (
        "midnight belongs to the next day",
        wall(LON, 2026, 3, 3, 0),
        win("18:00-24:00", "mon"),
        LON,
        utc(2026, 3, 9, 18),
    ),
    # America/Chicago springs forward: 02:00 CST becomes 03:00 CDT
    (
        "spring: 09:00 stays 09:00 local",
        wall(CHI, 2026, 3, 7, 17, 30),
        win("09:00-17:00", WEEK),
        CHI,
        utc(2026, 3, 8, 14),
    ),
    ("spring: an opening in the gap", utc(2026, 3, 8, 6), win("02:30-05:00", WEEK), CHI, utc(2026, 3, 8, 8)),
    (
        "spring: a window wholly in the gap",
        utc(2026, 3, 8, 5),
        win("02:00-03:00", WEEK),
        CHI,
        utc(2026, 3, 9, 7),
    ),
    (
        "spring: a sunday-only window in the gap waits a week",
        wall(CHI, 2026, 3, 7, 12),
        win("02:15-02:45", "sun"),
        CHI,
        utc(2026, 3, 15, 7, 15),
    ),
    # America/Chicago falls back: 02:00 CDT becomes 01:00 CST; 01:00-02:00 happens twice
    (
        "autumn: 09:00 stays 09:00 local",
        wall(CHI, 2026, 10, 31, 17, 30),
        win("09:00-17:00", WEEK),
        CHI,
        utc(2026, 11, 1, 15),
    ),
    (
        "autumn: the repeated hour opens again",
        utc(2026, 11, 1, 6, 45),
        win("01:00-01:30", WEEK),
        CHI,
        utc(2026, 11, 1, 7),
    ),
    (
        "autumn: inside the second pass",
        utc(2026, 11, 1, 7, 10),
        win("01:00-01:30", WEEK),
        CHI,
        utc(2026, 11, 1, 7, 10),
    ),
    (
        "autumn: the change re-enters a window",
        utc(2026, 11, 1, 6, 45),
        win("00:30-01:30", WEEK),
        CHI,
        utc(2026, 11, 1, 7),
    ),
    # Europe/London springs forward: 01:00 GMT becomes 02:00 BST
    (
        "london spring: an opening in the gap",
        utc(2026, 3, 29, 0, 30),
        win("01:30-03:00", WEEK),
        LON,
        utc(2026, 3, 29, 1),
    ),
    ("london spring: weekdays", wall(LON, 2026, 3, 27, 17, 30), win(), LON, utc(2026, 3, 30, 8)),
    # Europe/London falls back: 02:00 BST becomes 01:00 GMT
    (
        "london autumn: the repeated hour",
        utc(2026, 10, 25, 0, 30),
        win("01:00-01:20", WEEK),
        LON,
        utc(2026, 10, 25, 1),
    ),
    ("london autumn: weekdays", wall(LON, 2026, 10, 23, 18), win(), LON, utc(2026, 10, 26, 9)),
    # one instant, Monday 14:00 UTC, for leads in different zones
    ("chicago, 08:00 local", utc(2026, 3, 2, 14), win(), CHI, utc(2026, 3, 2, 15)),
    ("london, 14:00 local", utc(2026, 3, 2, 14), win(), LON, utc(2026, 3, 2, 14)),
    ("tokyo, 23:00 local", utc(2026, 3, 2, 14), win(), ZoneInfo("Asia/Tokyo"), utc(2026, 3, 3, 0)),
    ("kolkata, 19:30 local", utc(2026, 3, 2, 14), win(), ZoneInfo("Asia/Kolkata"), utc(2026, 3, 3, 3, 30)),
    (
        "lord howe, tuesday 01:00 local",
        utc(2026, 3, 2, 14),
        win(),
        ZoneInfo("Australia/Lord_Howe"),
        utc(2026, 3, 2, 22),
    ),
    ("no window", utc(2026, 3, 1, 3), None, CHI, utc(2026, 3, 1, 3)),
]


@pytest.mark.parametrize(
    ("at", "window", "zone", "expected"), [row[1:] for row in FIT_WINDOW], ids=[row[0] for row in FIT_WINDOW]
)
def test_fit_window(at: datetime, window: Window | None, zone: ZoneInfo, expected: datetime) -> None:
    got = fit_window(at, window, zone)
    assert got == expected
    assert in_window(got, window, zone)


def test_a_window_keeps_its_local_hours_on_both_sides_of_each_change() -> None:
    window = win("09:00-17:00", WEEK)
    for zone, before, after in (
        (CHI, utc(2026, 3, 7, 12), utc(2026, 3, 9, 12)),
        (CHI, utc(2026, 10, 31, 12), utc(2026, 11, 2, 12)),
        (LON, utc(2026, 3, 28, 3), utc(2026, 3, 30, 3)),
        (LON, utc(2026, 10, 24, 3), utc(2026, 10, 26, 3)),
    ):
        for start in (before, after):
            opening = fit_window(start, window, zone)
            local = opening.astimezone(zone)
            assert (local.hour, local.minute) == (9, 0), (zone, start)
            # the last instant inside is 16:59:59.999999 local, and 17:00 is outside
            closing = opening + timedelta(hours=8)
            assert in_window(closing - timedelta(microseconds=1), window, zone)
            assert not in_window(closing, window, zone)


IN_WINDOW = [
    ("opening included", wall(CHI, 2026, 3, 4, 9), win(), CHI, True),
    ("closing excluded", wall(CHI, 2026, 3, 4, 17), win(), CHI, False),
    ("weekend excluded", wall(CHI, 2026, 3, 7, 12), win(), CHI, False),
    (
        "24:00 includes 23:59:59.999999",
        wall(CHI, 2026, 3, 4, 23, 59, 59, 999999),
        win("20:00-24:00"),
        CHI,
        True,
    ),
    ("read in the lead's zone, not in UTC", utc(2026, 3, 4, 16), win("08:00-09:30"), CHI, False),
    ("the same instant, in London", utc(2026, 3, 4, 16), win("15:00-17:00"), LON, True),
    ("the first pass of a repeated hour", utc(2026, 11, 1, 6, 15), win("01:00-01:30", WEEK), CHI, True),
    ("the second pass of a repeated hour", utc(2026, 11, 1, 7, 15), win("01:00-01:30", WEEK), CHI, True),
    ("no window is always open", utc(2026, 3, 7, 3), None, CHI, True),
]


@pytest.mark.parametrize(
    ("at", "window", "zone", "expected"), [row[1:] for row in IN_WINDOW], ids=[row[0] for row in IN_WINDOW]
)
def test_in_window(at: datetime, window: Window | None, zone: ZoneInfo, expected: bool) -> None:
    assert in_window(at, window, zone) is expected


# A lead enrolled on Monday at 06:00 UTC, with a 09:00-17:00 weekday window.
ZONES = [
    ("the lead's own zone", "Europe/London", "Europe/London", utc(2026, 3, 2, 9)),
    ("the default zone for a lead without one", "", "America/Chicago", utc(2026, 3, 2, 15)),
    ("an unknown zone name reads as UTC", "Mars/Olympus", "UTC", utc(2026, 3, 2, 9)),
]


@pytest.mark.parametrize(("tz", "zone", "expected"), [r[1:] for r in ZONES], ids=[r[0] for r in ZONES])
def test_due_times_use_the_leads_zone_or_the_default(tz: str, zone: str, expected: datetime) -> None:
    pol = policy(zone="America/Chicago", window=win())
    state = lead("cold", since=utc(2026, 3, 2, 6), tz=tz)
    assert zone_of(state, pol).key == zone
    got = next_touch(state, pol)
    assert got is not None
    assert got.due_at == expected


# -- next_touch ------------------------------------------------------------------------------------

FRI_EVENING = wall(CHI, 2026, 3, 6, 17, 30)
MON_OPENING = utc(2026, 3, 9, 14)  # 09:00 CDT

NEXT_TOUCH: list[tuple[str, LeadState, Policy, tuple[str, str, datetime, bool] | None]] = [
    (
        "the first step at the tier's start plus its delay",
        lead("cold"),
        policy(),
        ("cold", "intro", T0, False),
    ),
    (
        "a first step's delay counts from entering the tier",
        lead("warm"),
        policy(),
        ("warm", "letter", T0 + D, False),
    ),
    (
        "a later step counts from the previous touch",
        lead("cold", sent("cold", "intro", T0 + 5 * M)),
        policy(),
        ("cold", "postcard", T0 + 65 * M, False),
    ),
    (
        "a touch by hand pushes the next step back",
        lead("cold", sent("cold", "intro", T0), last=T0 + 3 * H, count=2),
        policy(),
        ("cold", "postcard", T0 + 4 * H, False),
    ),
    (
        "entering the tier after the last touch counts from the entry",
        lead("warm", sent("cold", "intro", T0), since=T0 + 2 * D),
        policy(),
        ("warm", "letter", T0 + 3 * D, False),
    ),
    (
        "a due step outside its window moves to the next opening",
        lead("cold", since=FRI_EVENING.astimezone(UTC)),
        policy(zone="America/Chicago", window=win()),
        ("cold", "intro", MON_OPENING, False),
    ),
    (
        "a retry comes back at its retry time",
        lead("cold", touch("cold", "intro", "retry", T0, next_attempt_at=T0 + 10 * M)),
        policy(),
        ("cold", "intro", T0 + 10 * M, True),
    ),
    (
        "a retry without a retry time is due at once",
        lead("cold", touch("cold", "intro", "retry", T0)),
        policy(),
        ("cold", "intro", T0, True),
    ),
    (
        "a retry outside its window waits for the window",
        lead("cold", touch("cold", "intro", "retry", T0, next_attempt_at=FRI_EVENING)),
        policy(zone="America/Chicago", window=win()),
        ("cold", "intro", MON_OPENING, True),
    ),
    (
        "a claim is taken over when its lease runs out",
        lead("cold", touch("cold", "intro", "claimed", T0, lease_until=T0 + 5 * M)),
        policy(),
        ("cold", "intro", T0 + 5 * M, True),
    ),
    (
        "a step cancelled before it left is planned again",
        lead("cold", sent("cold", "intro", T0), touch("cold", "postcard", "cancelled", T0 + H)),
        policy(),
        ("cold", "postcard", T0 + H, False),
    ),
    (
        "a cancelled step the lead has moved past stays behind",
        lead("cold", touch("cold", "intro", "cancelled", T0), sent("cold", "postcard", T0 + H)),
        policy(),
        ("cold", "reminder", T0 + H + D, False),
    ),
    (
        "a skipped step is passed over",
        lead("cold", sent("cold", "intro", T0), touch("cold", "postcard", "skipped", T0 + H)),
        policy(),
        ("cold", "reminder", T0 + D, False),
    ),
    (
        "a letter waiting to be mailed keeps its place",
        lead("cold", sent("cold", "intro", T0), touch("cold", "postcard", "pending", T0 + H)),
        policy(),
        ("cold", "reminder", T0 + D, False),
    ),
    (
        "a step removed from the sequence is ignored",
        lead("cold", sent("cold", "old-offer", T0), sent("cold", "intro", T0 + H)),
        policy(),
        ("cold", "postcard", T0 + 2 * H, False),
    ),
    (
        "a step added before the furthest step is not sent out of order",
        lead("cold", sent("cold", "postcard", T0)),
        policy(),
        ("cold", "reminder", T0 + D, False),
    ),
    (
        "a step added at the end is sent after the others",
        lead(
            "warm",
            sent("warm", "letter", T0),
            sent("warm", "seminar", T0 + D),
            sent("warm", "last-call", T0 + 2 * D),
        ),
        policy(warm=(*WARM, step("bonus", H))),
        ("warm", "bonus", T0 + 2 * D + H, False),
    ),
    (
        "touches in another tier do not move this one",
        lead("warm", sent("cold", "intro", T0), sent("cold", "postcard", T0 + H), since=T0 + H),
        policy(),
        ("warm", "letter", T0 + H + D, False),
    ),
    (
        "a cold lead whose last cold step was skipped goes on with warm",
        lead(
            "cold",
            sent("cold", "intro", T0),
            sent("cold", "postcard", T0 + H),
            touch("cold", "reminder", "skipped", T0 + D),
        ),
        policy(),
        ("warm", "letter", T0 + H + D, False),
    ),
    (
        "a cold lead at the promotion count goes on with warm",
        lead("cold", sent("cold", "intro", T0), count=2, last=T0 + H),
        policy(rule="touches", after=2),
        ("warm", "letter", T0 + H + D, False),
    ),
    (
        "a cold retry is finished before the promotion count moves the lead on",
        lead("cold", touch("cold", "intro", "retry", T0, next_attempt_at=T0 + H), count=2, last=T0),
        policy(rule="touches", after=2),
        ("cold", "intro", T0 + H, True),
    ),
]


@pytest.mark.parametrize(
    ("state", "pol", "expected"), [row[1:] for row in NEXT_TOUCH], ids=[row[0] for row in NEXT_TOUCH]
)
def test_next_touch(state: LeadState, pol: Policy, expected: tuple[str, str, datetime, bool]) -> None:
    got = next_touch(state, pol)
    assert got is not None
    assert (got.tier, got.step.id, got.due_at, got.retry) == expected


NOTHING_NEXT = [
    (
        "the last step is done",
        lead(
            "warm",
            sent("warm", "letter", T0),
            sent("warm", "seminar", T0 + D),
            sent("warm", "last-call", T0 + 2 * D),
        ),
        policy(),
    ),
    ("an empty sequence", lead("warm"), policy(warm=())),
    (
        "an empty cold sequence promotes nobody",
        lead("cold"),
        policy(cold=()),
    ),
    ("a paused lead", lead("cold", status="paused"), policy()),
    ("a flagged lead", lead("cold", status="flagged"), policy()),
    ("an unsubscribed lead", lead("cold", status="unsubscribed"), policy()),
    ("a bounced lead", lead("cold", status="bounced"), policy()),
    ("a converted lead", lead("cold", status="converted"), policy()),
    ("a suppressed address", lead("cold", suppressed=True), policy()),
    ("a step of unknown outcome", lead("cold", touch("cold", "intro", "unknown", T0)), policy()),
    ("a failed step", lead("cold", touch("cold", "intro", "failed", T0)), policy()),
]


@pytest.mark.parametrize(
    ("state", "pol"), [row[1:] for row in NOTHING_NEXT], ids=[row[0] for row in NOTHING_NEXT]
)
def test_nothing_next(state: LeadState, pol: Policy) -> None:
    assert next_touch(state, pol) is None


# -- decide ------------------------------------------------------------------------------------------

LEASE = 5 * M
INTRO = COLD[0]

DECIDE = [
    ("due and the window open: send", lead("cold"), policy(), T0, Send(NextTouch("cold", INTRO, 0, T0))),
    (
        "not yet due: wait for the due time",
        lead("warm"),
        policy(),
        T0,
        Wait(T0 + D, NextTouch("warm", WARM[0], 0, T0 + D)),
    ),
    (
        "due but the window shut: wait for the opening",
        lead("cold", since=T0 - 3 * D),
        policy(zone="America/Chicago", window=win()),
        FRI_EVENING.astimezone(UTC),
        Wait(MON_OPENING, NextTouch("cold", INTRO, 0, MON_OPENING)),
    ),
    (
        "a message on the wire holds the lead",
        lead("cold", touch("cold", "intro", "sending", T0, lease_until=T0 + LEASE)),
        policy(),
        T0 + timedelta(minutes=1),
        Wait(T0 + LEASE),
    ),
    (
        "an overdue message on the wire holds the lead a little longer",
        lead("cold", touch("cold", "intro", "sending", T0, lease_until=T0 + LEASE)),
        policy(),
        T0 + H,
        Wait(T0 + H + LEASE / 10),
    ),
    (
        "a claim in another tier holds the lead until its lease ends",
        lead("warm", touch("cold", "reminder", "claimed", T0, lease_until=T0 + LEASE), since=T0 - 2 * D),
        policy(),
        T0 + timedelta(minutes=1),
        Wait(T0 + LEASE),
    ),
    (
        "a claim whose lease ran out is taken over",
        lead("cold", touch("cold", "intro", "claimed", T0, lease_until=T0 + LEASE)),
        policy(),
        T0 + LEASE,
        Send(NextTouch("cold", INTRO, 0, T0 + LEASE, retry=True)),
    ),
    (
        "a letter waiting to be mailed holds the lead",
        lead("cold", sent("cold", "intro", T0), touch("cold", "postcard", "queued", T0 + H)),
        policy(),
        T0 + 5 * D,
        Idle("step cold/postcard is waiting to be mailed"),
    ),
    (
        "an unknown outcome holds the lead for the operator",
        lead("cold", touch("cold", "intro", "unknown", T0)),
        policy(),
        T0 + D,
        Idle("step cold/intro is unknown: needs the operator"),
    ),
    ("a paused lead gets nothing", lead("cold", status="paused"), policy(), T0, Idle("lead is paused")),
    ("a flagged lead gets nothing", lead("cold", status="flagged"), policy(), T0, Idle("lead is flagged")),
    (
        "an unsubscribed lead gets nothing",
        lead("cold", status="unsubscribed"),
        policy(),
        T0,
        Idle("lead is unsubscribed"),
    ),
    ("a bounced lead gets nothing", lead("cold", status="bounced"), policy(), T0, Idle("lead is bounced")),
    (
        "a suppressed address gets nothing, even if active",
        lead("cold", suppressed=True),
        policy(),
        T0,
        Idle("address is on the suppression list"),
    ),
    (
        "the sequence is finished",
        lead(
            "warm",
            sent("warm", "letter", T0),
            sent("warm", "seminar", T0 + D),
            sent("warm", "last-call", T0 + 2 * D),
        ),
        policy(),
        T0 + 9 * D,
        Idle("sequence finished"),
    ),
    (
        "the clock was set back after a send: wait, do not resend",
        lead("cold", sent("cold", "intro", T0)),
        policy(),
        T0 - H,
        Wait(T0 + H, NextTouch("cold", COLD[1], 1, T0 + H)),
    ),
    (
        "the clock jumped a day ahead: one step at a time, in order",
        lead("cold", sent("cold", "intro", T0)),
        policy(),
        T0 + 2 * D,
        Send(NextTouch("cold", COLD[1], 1, T0 + H)),
    ),
]


@pytest.mark.parametrize(
    ("state", "pol", "now", "expected"), [row[1:] for row in DECIDE], ids=[row[0] for row in DECIDE]
)
def test_decide(state: LeadState, pol: Policy, now: datetime, expected: object) -> None:
    assert decide(state, pol, now=now) == expected


def test_every_stopped_lead_says_why() -> None:
    assert why_not_contactable(lead("cold")) is None
    assert why_not_contactable(lead("cold", status="converted")) == "lead is converted"


# -- apply_touch -------------------------------------------------------------------------------------

AT = T0 + 3 * D

# (name, lead, policy, tier, step) -> (count, tier, tier_since, status, promoted, flagged)
APPLY = [
    ("a touch counts", lead("cold"), policy(), "cold", "intro", (1, "cold", T0, "active", False, False)),
    (
        "finishing the cold sequence promotes to warm from that moment",
        lead("cold", sent("cold", "intro", T0), sent("cold", "postcard", T0 + H)),
        policy(),
        "cold",
        "reminder",
        (3, "warm", AT, "active", True, False),
    ),
    (
        "a skipped step does not stop the sequence finishing",
        lead("cold", sent("cold", "intro", T0), touch("cold", "postcard", "skipped", T0 + H)),
        policy(),
        "cold",
        "reminder",
        (2, "warm", AT, "active", True, False),
    ),
    (
        "a step added before the furthest does not stop it finishing",
        lead("cold", sent("cold", "postcard", T0)),
        policy(),
        "cold",
        "reminder",
        (2, "warm", AT, "active", True, False),
    ),
    (
        "mid-sequence there is no promotion",
        lead("cold", sent("cold", "intro", T0)),
        policy(),
        "cold",
        "postcard",
        (2, "cold", T0, "active", False, False),
    ),
    (
        "the touches rule promotes at the count",
        lead("cold", sent("cold", "intro", T0)),
        policy(rule="touches", after=2),
        "cold",
        "postcard",
        (2, "warm", AT, "active", True, False),
    ),
    (
        "the touches rule below the count does not",
        lead("cold", sent("cold", "intro", T0)),
        policy(rule="touches", after=3),
        "cold",
        "postcard",
        (2, "cold", T0, "active", False, False),
    ),
    (
        "the sequence rule ignores the count",
        lead("cold", sent("cold", "intro", T0), count=6),
        policy(after=2),
        "cold",
        "postcard",
        (7, "cold", T0, "active", False, False),
    ),
    (
        "the first warm touch of a cold lead whose cold steps ended skipped promotes it",
        lead(
            "cold",
            sent("cold", "intro", T0),
            sent("cold", "postcard", T0 + H),
            touch("cold", "reminder", "skipped", T0 + D),
        ),
        policy(),
        "warm",
        "letter",
        (3, "warm", AT, "active", True, False),
    ),
    (
        "a warm touch on a cold lead mid-sequence does not promote it",
        lead("cold", sent("cold", "intro", T0)),
        policy(),
        "warm",
        "letter",
        (2, "cold", T0, "active", False, False),
    ),
    (
        "a touch by hand counts",
        lead("warm", count=3),
        policy(),
        "warm",
        None,
        (4, "warm", T0, "active", False, False),
    ),
    (
        "a touch by hand can promote by count",
        lead("cold", count=3),
        policy(rule="touches", after=4),
        "cold",
        None,
        (4, "warm", AT, "active", True, False),
    ),
    (
        "a touch by hand promotes a lead whose cold sequence is done",
        lead(
            "cold",
            sent("cold", "intro", T0),
            sent("cold", "postcard", T0 + H),
            touch("cold", "reminder", "skipped", T0 + D),
        ),
        policy(),
        "cold",
        None,
        (3, "warm", AT, "active", True, False),
    ),
    (
        "one below the threshold: no flag",
        lead("warm", count=6),
        policy(),
        "warm",
        "letter",
        (7, "warm", T0, "active", False, False),
    ),
    (
        "the threshold flags",
        lead("warm", count=7),
        policy(),
        "warm",
        "letter",
        (8, "warm", T0, "flagged", False, True),
    ),
    (
        "a touch by hand can flag",
        lead("warm", count=7),
        policy(),
        "warm",
        None,
        (8, "warm", T0, "flagged", False, True),
    ),
    (
        "a threshold of one flags the first touch",
        lead("cold"),
        policy(threshold=1),
        "cold",
        "intro",
        (1, "cold", T0, "flagged", False, True),
    ),
    (
        "above a lowered threshold, the next touch flags",
        lead("warm", count=9),
        policy(threshold=5),
        "warm",
        "letter",
        (10, "warm", T0, "flagged", False, True),
    ),
    (
        "promotion and flag on one touch",
        lead("cold", sent("cold", "intro", T0), sent("cold", "postcard", T0 + H), count=7),
        policy(),
        "cold",
        "reminder",
        (8, "warm", AT, "flagged", True, True),
    ),
    (
        "a flagged lead is not flagged again",
        lead("warm", status="flagged", count=8),
        policy(),
        "warm",
        None,
        (9, "warm", T0, "flagged", False, False),
    ),
    (
        "a paused lead counts and is promoted, but not flagged",
        lead("cold", sent("cold", "intro", T0), sent("cold", "postcard", T0 + H), status="paused", count=7),
        policy(),
        "cold",
        "reminder",
        (8, "warm", AT, "paused", True, False),
    ),
    (
        "an unsubscribed lead's last message counts, nothing more",
        lead(
            "cold",
            sent("cold", "intro", T0),
            sent("cold", "postcard", T0 + H),
            status="unsubscribed",
            count=7,
        ),
        policy(),
        "cold",
        "reminder",
        (8, "cold", T0, "unsubscribed", False, False),
    ),
    (
        "a warm lead is not promoted further",
        lead("warm", count=3),
        policy(rule="touches", after=1),
        "warm",
        "letter",
        (4, "warm", T0, "active", False, False),
    ),
]


@pytest.mark.parametrize(
    ("state", "pol", "tier", "sid", "expected"), [row[1:] for row in APPLY], ids=[row[0] for row in APPLY]
)
def test_apply_touch(
    state: LeadState,
    pol: Policy,
    tier: str,
    sid: str | None,
    expected: tuple[int, str, datetime, str, bool, bool],
) -> None:
    after = apply_touch(state, pol, at=AT, tier=tier, step=sid)
    assert (
        after.touch_count,
        after.tier,
        after.tier_since,
        after.status,
        after.promoted,
        after.flagged,
    ) == expected
    assert after.last_touch_at == AT
    if after.flagged:
        assert after.flagged_at == AT
        assert after.flag_reason == f"reached {after.touch_count} touches (threshold {pol.threshold})"
    else:
        assert after.flagged_at is None and after.flag_reason is None


def test_the_last_touch_time_never_goes_back() -> None:
    # the clock was set back an hour: the touch is recorded at its time, the lead keeps the later one
    state = lead("cold", sent("cold", "intro", T0))
    after = apply_touch(state, policy(), at=T0 - H, tier="cold", step="postcard")
    assert after.last_touch_at == T0
    nxt = next_touch(with_touch(state, after, sent("cold", "postcard", T0 - H)), policy())
    assert nxt is not None and (nxt.step.id, nxt.due_at) == ("reminder", T0 + D)


def test_with_touch_carries_the_change_and_the_touch() -> None:
    state = lead("cold", sent("cold", "intro", T0), sent("cold", "postcard", T0 + H))
    after = apply_touch(state, policy(), at=AT, tier="cold", step="reminder")
    new = with_touch(state, after, sent("cold", "reminder", AT))
    assert (new.tier, new.tier_since, new.touch_count, new.last_touch_at) == ("warm", AT, 3, AT)
    assert new.touches[-1] == sent("cold", "reminder", AT)


# -- forecast --------------------------------------------------------------------------------------------


def plan(
    state: LeadState, pol: Policy, now: datetime, days: int = 14
) -> list[tuple[datetime, str, int, str]]:
    fc = forecast(state, pol, now=now, until=now + timedelta(days=days))
    return [
        (
            p.at,
            f"{p.tier}/{p.step.id}",
            p.touch_number,
            ("promotes" if p.promotes else "") + ("flags" if p.flags else ""),
        )
        for p in fc.touches
    ]


def test_forecast_of_a_new_lead_through_promotion_to_the_flag() -> None:
    fc = forecast(lead("cold"), policy(threshold=5), now=T0, until=T0 + 14 * D)
    assert [(p.at, f"{p.tier}/{p.step.id}", p.touch_number, p.promotes, p.flags) for p in fc.touches] == [
        (T0, "cold/intro", 1, False, False),
        (T0 + H, "cold/postcard", 2, False, False),
        (T0 + H + D, "cold/reminder", 3, True, False),
        (T0 + H + 2 * D, "warm/letter", 4, False, False),
        (T0 + H + 4 * D, "warm/seminar", 5, False, True),
    ]
    assert fc.end == "lead is flagged"


def test_forecast_stops_at_its_horizon() -> None:
    fc = forecast(lead("cold"), policy(), now=T0, until=T0 + 2 * H)
    assert [p.step.id for p in fc.touches] == ["intro", "postcard"]
    assert fc.end == ""


def test_forecast_ends_with_the_sequence() -> None:
    state = lead("warm", sent("warm", "letter", T0), sent("warm", "seminar", T0 + D))
    assert plan(state, policy(), T0 + D) == [(T0 + 2 * D, "warm/last-call", 3, "")]
    assert forecast(state, policy(), now=T0 + D, until=T0 + 9 * D).end == "sequence finished"


def test_forecast_puts_an_overdue_step_in_the_next_window() -> None:
    pol = policy(zone="America/Chicago", window=win())
    state = lead("cold", since=T0 - 9 * D)
    assert plan(state, pol, FRI_EVENING.astimezone(UTC), days=3)[0] == (MON_OPENING, "cold/intro", 1, "")


def test_forecast_puts_a_retry_in_its_window() -> None:
    pol = policy(zone="America/Chicago", window=win())
    state = lead("cold", touch("cold", "intro", "retry", T0, next_attempt_at=FRI_EVENING))
    assert plan(state, pol, T0, days=8)[0] == (MON_OPENING, "cold/intro", 1, "")


def test_forecast_takes_a_message_on_the_wire_as_sent_now() -> None:
    now = T0 + timedelta(seconds=2)
    state = lead("cold", touch("cold", "intro", "sending", T0, lease_until=T0 + LEASE))
    assert plan(state, policy(), now, days=1)[0] == (now + H, "cold/postcard", 2, "")


def test_forecast_lists_a_claimed_step_as_leaving_now() -> None:
    now = T0 + timedelta(seconds=2)
    state = lead("cold", touch("cold", "intro", "claimed", T0, lease_until=T0 + LEASE))
    assert plan(state, policy(), now, days=1)[:2] == [
        (now, "cold/intro", 1, ""),
        (now + H, "cold/postcard", 2, ""),
    ]


@pytest.mark.parametrize(
    ("state", "end"),
    [
        (
            lead("cold", sent("cold", "intro", T0), touch("cold", "postcard", "pending", T0 + H)),
            "step cold/postcard is waiting to be mailed",
        ),
        (lead("cold", status="paused"), "lead is paused"),
        (
            lead("cold", touch("cold", "intro", "unknown", T0)),
            "step cold/intro is unknown: needs the operator",
        ),
        (lead("cold", suppressed=True), "address is on the suppression list"),
    ],
    ids=["a letter waiting to be mailed", "paused", "an unknown outcome", "suppressed"],
)
def test_forecast_of_a_lead_that_gets_nothing_says_why(state: LeadState, end: str) -> None:
    fc = forecast(state, policy(), now=T0 + D, until=T0 + 30 * D)
    assert fc.touches == []
    assert fc.end == end


def test_forecast_is_what_deciding_step_by_step_gives() -> None:
    pol = policy(zone="America/Chicago", window=win(), threshold=6)
    state, now = lead("cold", since=T0 - 2 * H), T0 - 2 * H
    decided = []
    for _ in range(20):
        d = decide(state, pol, now=now)
        if isinstance(d, Idle):
            break
        if isinstance(d, Wait):
            now = d.until
            continue
        after = apply_touch(state, pol, at=now, tier=d.touch.tier, step=d.touch.step.id)
        decided.append((now, f"{d.touch.tier}/{d.touch.step.id}", after.touch_count))
        state = with_touch(state, after, sent(d.touch.tier, d.touch.step.id, now))
    fc = forecast(lead("cold", since=T0 - 2 * H), pol, now=T0 - 2 * H, until=T0 + 60 * D)
    assert [(p.at, f"{p.tier}/{p.step.id}", p.touch_number) for p in fc.touches] == decided
    assert len(decided) == 6


# -- policy ---------------------------------------------------------------------------------------------


def test_the_fingerprint_changes_with_anything_that_changes_a_plan() -> None:
    base = policy()
    assert base.fingerprint() == policy().fingerprint()
    slower = (COLD[0], COLD[1].model_copy(update={"delay": 2 * H}), COLD[2])
    for changed in (
        policy(threshold=9),
        policy(rule="touches"),
        policy(after=5),
        policy(zone="Europe/London"),
        policy(window=win()),
        policy(cold=slower),
    ):
        assert changed.fingerprint() != base.fingerprint()


def test_policy_from_settings(tmp_path: Path) -> None:
    path = tmp_path / "campaignd.toml"
    path.write_text(
        """
timezone = "Europe/London"
[followup]
threshold = 5
[promotion]
rule = "touches"
after_touches = 3
[dispatch]
lease = "10m"
[sequences.cold]
steps = [{ template = "cold/01-intro", delay = "1h" }]
"""
    )
    pol = Policy.from_settings(load_settings(path, environ={}, dotenv=None))
    assert (pol.threshold, pol.promote_rule, pol.promote_after, pol.default_zone, pol.lease) == (
        5,
        "touches",
        3,
        "Europe/London",
        10 * M,
    )
    assert [s.id for s in pol.sequence("cold").steps] == ["01-intro"]
    assert pol.sequence("warm").steps == ()
    assert pol.sequence("no-such-tier").steps == ()


def test_a_lead_with_other_touches_keeps_every_other_field() -> None:
    # Every field set away from its default, so a field the copy forgot would show.
    lead = LeadState(
        tier="warm",
        status="paused",
        touch_count=3,
        tier_since=datetime(2026, 1, 5, tzinfo=UTC),
        last_touch_at=datetime(2026, 2, 5, tzinfo=UTC),
        timezone="Europe/London",
        suppressed=True,
        touches=(TouchView("cold", "a", "sent", datetime(2026, 1, 1, tzinfo=UTC)),),
    )
    assert len(fields(LeadState)) == 8, "a new field: give it a value here and copy it in with_touches"
    touches = (TouchView("warm", "b", "retry", datetime(2026, 2, 1, tzinfo=UTC)),)
    assert lead.with_touches(touches) == replace(lead, touches=touches)
