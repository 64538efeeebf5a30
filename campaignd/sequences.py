"""The decision core: what happens next to a lead, and when.

Pure functions over plain data: which step of its tier's sequence a lead gets next,
when it is due (the previous touch plus the step's delay, moved into the step's send
window in the lead's own time zone), and what a touch changes (the count, promotion
from cold to warm, flagging for sales follow-up).

This module never reads the clock and never does I/O: callers pass ``now``. It imports
nothing from the database, SMTP or scheduler modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from campaignd.config import Sequence, Settings, Step, Tier, Window

# Touch statuses as the core sees them (kept as strings so the core has no model import).
SLOT_TAKEN = frozenset({"sent", "sending", "unknown", "failed", "cancelled", "skipped", "pending", "queued"})
HOLDING = frozenset({"unknown", "failed"})
"""Statuses that stop a lead's drip until the operator has looked at them."""
IN_PRINT = frozenset({"pending", "queued"})
"""A letter not yet mailed: the next step waits, since its delay counts from the mailing."""
ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class Policy:
    """The parts of the configuration the core decides with."""

    sequences: Mapping[Tier, Sequence]
    threshold: int = 8
    promote_rule: str = "sequence_complete"
    promote_after: int = 4
    default_zone: str = "UTC"
    lease: timedelta = timedelta(minutes=5)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            sequences=dict(settings.sequences),
            threshold=settings.followup.threshold,
            promote_rule=settings.promotion.rule,
            promote_after=settings.promotion.after_touches,
            default_zone=settings.timezone,
            lease=settings.dispatch.lease,
        )

    def sequence(self, tier: str) -> Sequence:
        try:
            return self.sequences.get(Tier(tier), _EMPTY)
        except ValueError:
            return _EMPTY

    def fingerprint(self) -> str:
        """Changes whenever a change of config could change any lead's plan."""
        parts = [f"{self.threshold}|{self.promote_rule}|{self.promote_after}|{self.default_zone}"]
        for tier in sorted(self.sequences):
            parts.append(f"{tier}:{self.sequences[tier].model_dump_json()}")
        return "\n".join(parts)


_EMPTY = Sequence()


@dataclass(frozen=True, slots=True)
class TouchView:
    """A recorded touch, as the core needs to see it."""

    tier: str
    step: str | None
    status: str
    at: datetime
    lease_until: datetime | None = None
    next_attempt_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LeadState:
    """A lead as the core needs to see it."""

    tier: str
    status: str
    touch_count: int
    tier_since: datetime
    last_touch_at: datetime | None = None
    timezone: str = ""
    suppressed: bool = False
    touches: tuple[TouchView, ...] = ()


@dataclass(frozen=True, slots=True)
class NextTouch:
    """The step a lead gets next and when."""

    tier: str
    step: Step
    index: int
    due_at: datetime
    retry: bool = False


# -- decisions -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Claim the step now."""

    touch: NextTouch


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to send before ``until``; the step that comes then is ``touch``."""

    until: datetime
    touch: NextTouch | None = None


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing more to send: the sequence is finished, or the lead is not active.

    :param reason: why, in words for ``status`` and logs.
    """

    reason: str


Decision = Send | Wait | Idle


def zone_of(lead: LeadState, policy: Policy) -> ZoneInfo:
    return _zone(lead.timezone or policy.default_zone)


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError):
        return ZoneInfo("UTC")


def why_not_contactable(lead: LeadState) -> str | None:
    """The reason a lead must get nothing automated, or None if it may be contacted."""
    if lead.suppressed:
        return "address is on the suppression list"
    if lead.status != ACTIVE:
        return f"lead is {lead.status}"
    for touch in lead.touches:
        if touch.status in HOLDING and touch.step is not None:
            return f"step {touch.tier}/{touch.step} is {touch.status}: needs the operator"
    return None


def next_touch(lead: LeadState, policy: Policy) -> NextTouch | None:
    """The next step for ``lead`` and when it falls due, or None when nothing is left.

    The next step is the one after the furthest step already touched in the lead's
    tier (so a step added to the start of a sequence later is not sent out of order).
    A step waiting for a retry comes back at its retry time. The due time is the
    previous touch (or entering the tier) plus the step's delay, moved into the step's
    send window in the lead's time zone.
    """
    if why_not_contactable(lead) is not None:
        return None
    sequence = policy.sequence(lead.tier)
    steps = sequence.steps
    if not steps:
        return None
    index_of = {step.id: i for i, step in enumerate(steps)}
    furthest = -1
    for touch in lead.touches:
        if touch.tier != lead.tier or touch.step is None or touch.step not in index_of:
            continue
        i = index_of[touch.step]
        if touch.status == "retry":
            due = touch.next_attempt_at or touch.at
            return NextTouch(lead.tier, steps[i], i, due, retry=True)
        if touch.status == "claimed":
            # Claimed by a daemon: due again (to be taken over) when its lease runs out.
            return NextTouch(lead.tier, steps[i], i, touch.lease_until or touch.at, retry=True)
        if touch.status in SLOT_TAKEN:
            furthest = max(furthest, i)
    index = furthest + 1
    if index >= len(steps):
        return None
    step = steps[index]
    anchor = lead.tier_since
    if lead.last_touch_at is not None and lead.last_touch_at > anchor:
        anchor = lead.last_touch_at
    due = fit_window(anchor + step.delay, sequence.window_for(step), zone_of(lead, policy))
    return NextTouch(lead.tier, step, index, due)


def decide(lead: LeadState, policy: Policy, *, now: datetime) -> Decision:
    """What the dispatcher does with ``lead`` at ``now``: send a step, wait, or nothing."""
    reason = why_not_contactable(lead)
    if reason is not None:
        return Idle(reason)
    for sending in lead.touches:
        if sending.status == "sending":
            # A message to this lead is on the wire (or its daemon died sending it): nothing
            # else may go out until its answer is recorded or it is declared unknown.
            return Wait(max(sending.lease_until or now, now + policy.lease / 10))
        if sending.status in IN_PRINT and sending.step is not None:
            # Planned again when its print batch is mailed (or cancelled).
            return Idle(f"step {sending.tier}/{sending.step} is waiting to be mailed")
    touch = next_touch(lead, policy)
    if touch is None:
        return Idle("sequence finished")
    if touch.due_at > now:
        return Wait(touch.due_at, touch)
    window = policy.sequence(touch.tier).window_for(touch.step)
    opening = fit_window(now, window, zone_of(lead, policy))
    if opening > now:
        # Due, but the window is shut (the daemon was down, or a retry fell outside it).
        return Wait(opening, replace(touch, due_at=opening))
    return Send(touch)


# -- after a touch ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AfterTouch:
    """What one touch changes on its lead."""

    touch_count: int
    tier: str
    tier_since: datetime
    status: str
    last_touch_at: datetime
    flagged_at: datetime | None = None
    flag_reason: str | None = None
    promoted: bool = False
    flagged: bool = False


def apply_touch(lead: LeadState, policy: Policy, *, at: datetime, tier: str, step: str | None) -> AfterTouch:
    """Count a touch made at ``at`` and decide promotion and flagging.

    ``step`` is None for a touch made by hand (a call, a meeting, a letter). The lead's
    own touches must not yet include this one.
    """
    count = lead.touch_count + 1
    last = at if lead.last_touch_at is None or at > lead.last_touch_at else lead.last_touch_at
    new_tier, tier_since, promoted = lead.tier, lead.tier_since, False
    if lead.tier == Tier.COLD and lead.status in (ACTIVE, "paused"):
        done = {t.step for t in lead.touches if t.tier == Tier.COLD and t.status == "sent"}
        if step is not None and tier == Tier.COLD:
            done.add(step)
        cold_steps = [s.id for s in policy.sequence(Tier.COLD).steps]
        complete = bool(cold_steps) and all(s in done for s in cold_steps)
        by_count = policy.promote_rule == "touches" and count >= policy.promote_after
        if complete or by_count:
            new_tier, tier_since, promoted = Tier.WARM.value, at, True
    status, flagged_at, flag_reason, flagged = lead.status, None, None, False
    if lead.status == ACTIVE and count >= policy.threshold:
        status, flagged_at, flagged = "flagged", at, True
        flag_reason = f"reached {count} touches (threshold {policy.threshold})"
    return AfterTouch(
        touch_count=count,
        tier=new_tier,
        tier_since=tier_since,
        status=status,
        last_touch_at=last,
        flagged_at=flagged_at,
        flag_reason=flag_reason,
        promoted=promoted,
        flagged=flagged,
    )


def with_touch(lead: LeadState, after: AfterTouch, touch: TouchView) -> LeadState:
    """The lead as it is once ``touch`` is recorded and ``after`` applied."""
    return replace(
        lead,
        touch_count=after.touch_count,
        tier=after.tier,
        tier_since=after.tier_since,
        status=after.status,
        last_touch_at=after.last_touch_at,
        touches=(*lead.touches, touch),
    )


# -- send windows ------------------------------------------------------------------------------


def in_window(at: datetime, window: Window | None, zone: ZoneInfo) -> bool:
    if window is None:
        return True
    local = at.astimezone(zone)
    start, end = window.hours
    return (
        local.weekday() in window.days and start <= local.time() and (end == time.max or local.time() < end)
    )


def fit_window(at: datetime, window: Window | None, zone: ZoneInfo) -> datetime:
    """The first instant at or after ``at`` that lies inside ``window`` in ``zone``.

    Works on wall-clock times in the zone, so a window of 09:00-17:00 stays 09:00-17:00
    local across daylight-saving changes; an opening that falls in a DST gap moves to
    the first valid instant after it.
    """
    if window is None or in_window(at, window, zone):
        return at
    local = at.astimezone(zone)
    start = window.hours[0]
    day: date = local.date()
    for _ in range(8):
        if day.weekday() in window.days:
            opening = _local_instant(day, start, zone)
            if opening > at and in_window(opening, window, zone):
                return opening
        day += timedelta(days=1)
    # A window that never opens is rejected by config validation; stay safe anyway.
    raise ValueError(f"send window {window.describe()} never opens")


def _local_instant(day: date, wall: time, zone: ZoneInfo) -> datetime:
    naive = datetime.combine(day, wall)
    aware = naive.replace(tzinfo=zone)
    utc = aware.astimezone(UTC)
    # In a spring-forward gap the wall time does not exist: round-tripping yields a
    # different wall time, which is the first valid instant after the gap.
    return utc


# -- forecast -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedTouch:
    """One entry of a forecast."""

    at: datetime
    tier: str
    step: Step
    touch_number: int
    promotes: bool = False
    flags: bool = False


@dataclass(slots=True)
class Forecast:
    touches: list[PlannedTouch] = field(default_factory=list)
    end: str = ""


def forecast(lead: LeadState, policy: Policy, *, now: datetime, until: datetime) -> Forecast:
    """Which steps ``lead`` will get between ``now`` and ``until`` if all goes to plan.

    Uses the same decisions as the dispatcher, assuming every send succeeds at its due
    time (or at ``now`` if it is overdue).
    """
    out = Forecast()
    state = lead
    for _ in range(1000):
        reason = why_not_contactable(state)
        if reason is not None:
            out.end = reason
            return out
        touch = next_touch(state, policy)
        if touch is None:
            out.end = "sequence finished"
            return out
        at = touch.due_at
        if at < now:
            window = policy.sequence(touch.tier).window_for(touch.step)
            at = fit_window(now, window, zone_of(state, policy))
        if at > until:
            out.end = ""
            return out
        after = apply_touch(state, policy, at=at, tier=touch.tier, step=touch.step.id)
        out.touches.append(
            PlannedTouch(at, touch.tier, touch.step, after.touch_count, after.promoted, after.flagged)
        )
        settled = [t for t in state.touches if not (t.tier == touch.tier and t.step == touch.step.id)]
        state = replace(state, touches=tuple(settled))
        state = with_touch(state, after, TouchView(touch.tier, touch.step.id, "sent", at))
    return out
