"""The decision core: what happens next to a lead, and when.

Pure functions over plain data: which step of its tier's sequence a lead gets next,
when it is due (the previous touch plus the step's delay, moved into the step's send
window in the lead's own time zone), and what a touch changes (the count, promotion
from cold to warm, flagging for sales follow-up).

This module never reads the clock and never does I/O: callers pass ``now``. It works
only from recorded times (when a touch was made, when a lease or a retry runs out), so a
system clock that steps back or forward can delay a step but never resend or skip one.
It imports nothing from the database, SMTP or scheduler modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from campaignd.config import Sequence, Settings, Step, Tier, Window

# Touch statuses as the core sees them (kept as strings so the core has no model import).
SETTLED = frozenset({"sent", "sending", "unknown", "failed", "skipped", "pending", "queued"})
"""Statuses that put a step behind its lead: the sequence goes on after it. A ``cancelled``
step is not among them: it never left (the lead was paused or stopped first), so it is
planned again once the lead is active again."""
OPEN = frozenset({"claimed", "retry"})
"""Work started and not finished: it comes before anything new."""
HOLDING = frozenset({"unknown", "failed"})
"""Statuses that stop a lead's drip until the operator has looked at them."""
IN_PRINT = frozenset({"pending", "queued"})
"""A letter not yet mailed: the next step waits, since its delay counts from the mailing."""
ACTIVE = "active"
PAUSED = "paused"


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

    def with_touches(self, touches: tuple[TouchView, ...]) -> LeadState:
        """This lead with ``touches`` instead of its own (``dataclasses.replace`` without the
        cost of looking its fields up, on the dispatcher's hot path)."""
        return LeadState(
            self.tier,
            self.status,
            self.touch_count,
            self.tier_since,
            self.last_touch_at,
            self.timezone,
            self.suppressed,
            touches,
        )


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

    Work already started comes first: a step waiting for a retry comes back at its retry
    time, and a claim whose lease ran out (its daemon died) when the lease ends. Otherwise
    the next step is the one after the furthest step the lead has moved past in its tier
    (so a step added to the start of a sequence later is not sent out of order; a step
    cancelled before it left is planned again). It is due at the previous touch (or
    entering the tier, if later) plus the step's delay. Every due time is moved into the
    step's send window in the lead's time zone.

    A cold lead that has done what promotes it (finished its cold sequence, or reached
    ``promote_after`` touches with the ``touches`` rule) without a touch having promoted it
    yet, because its last cold steps were skipped, or its count was reached while it was
    not active, continues with the warm sequence; that touch promotes it.
    """
    if why_not_contactable(lead) is not None:
        return None
    touch = _next_in(lead, policy, lead.tier)
    started = touch is not None and touch.retry
    if lead.tier == Tier.COLD and not started and _promotion_due(lead, policy, lead.touch_count):
        return _next_in(lead, policy, Tier.WARM.value)
    return touch


def decide(lead: LeadState, policy: Policy, *, now: datetime) -> Decision:
    """What the dispatcher does with ``lead`` at ``now``: send a step, wait, or nothing."""
    reason = why_not_contactable(lead)
    if reason is not None:
        return Idle(reason)
    for held in lead.touches:
        if held.status == "sending":
            # A message to this lead is on the wire (or its daemon died sending it): nothing
            # else may go out until its answer is recorded or it is declared unknown.
            return Wait(max(held.lease_until or now, now + policy.lease / 10))
        if held.status == "claimed" and held.lease_until is not None and held.lease_until > now:
            # A pass (here or in another daemon) is about to send this lead a step.
            return Wait(held.lease_until)
        if held.status in IN_PRINT and held.step is not None:
            # Planned again when its print batch is mailed (or cancelled).
            return Idle(f"step {held.tier}/{held.step} is waiting to be mailed")
    touch = next_touch(lead, policy)
    if touch is None:
        return Idle("sequence finished")
    if touch.due_at > now:
        return Wait(touch.due_at, touch)
    window = policy.sequence(touch.tier).window_for(touch.step)
    opening = fit_window(now, window, zone_of(lead, policy))
    if opening > now:
        # Due, but the window is shut (the daemon was down, or the clock was set back).
        return Wait(opening, replace(touch, due_at=opening))
    return Send(touch)


def _next_in(lead: LeadState, policy: Policy, tier: str) -> NextTouch | None:
    """The next step of ``tier``'s sequence for ``lead``, ignoring whether it may be sent."""
    sequence = policy.sequence(tier)
    found = _cursor(lead, sequence, tier)
    if found is None:
        return None
    index, started = found
    step = sequence.steps[index]
    zone = zone_of(lead, policy)
    window = sequence.window_for(step)
    if started is not None:
        if started.status == "retry":
            due = started.next_attempt_at or started.at
        else:
            due = started.lease_until or started.at
        return NextTouch(tier, step, index, fit_window(due, window, zone), retry=True)
    anchor = lead.tier_since
    if lead.last_touch_at is not None and lead.last_touch_at > anchor:
        anchor = lead.last_touch_at
    return NextTouch(tier, step, index, fit_window(anchor + step.delay, window, zone))


def _cursor(lead: LeadState, sequence: Sequence, tier: str) -> tuple[int, TouchView | None] | None:
    """Where ``lead`` stands in ``sequence``: the index of its next step, and the touch that
    started that step if it is open work (a retry or a claim); None when nothing is left."""
    index_of = {step.id: i for i, step in enumerate(sequence.steps)}
    furthest = -1
    started: tuple[int, TouchView] | None = None
    for touch in lead.touches:
        i = index_of.get(touch.step) if touch.step is not None and touch.tier == tier else None
        if i is None:
            continue
        if touch.status in OPEN:
            if started is None or i < started[0]:
                started = (i, touch)
        elif touch.status in SETTLED:
            furthest = max(furthest, i)
    if started is not None:
        return started
    if furthest + 1 >= len(sequence.steps):
        return None
    return furthest + 1, None


def _promotion_due(lead: LeadState, policy: Policy, count: int) -> bool:
    """Whether a cold lead with ``count`` touches has done what promotes it to warm."""
    if lead.tier != Tier.COLD:
        return False
    if policy.promote_rule == "touches" and count >= policy.promote_after:
        return True
    # Finished when nothing of the cold sequence is left; an empty cold sequence promotes
    # nobody (those leads wait for the operator rather than getting warm letters unasked).
    cold = policy.sequence(Tier.COLD.value)
    return bool(cold.steps) and _cursor(lead, cold, Tier.COLD.value) is None


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
    own touches must not yet include this one as sent.

    A cold lead (active or paused) is promoted when this touch finishes its cold sequence,
    or brings it to ``promote_after`` touches under the ``touches`` rule. An active lead
    is flagged for sales follow-up by the touch that brings its count to the threshold;
    a paused lead is not (the operator's hold wins): it is flagged by its next touch once
    resumed. A flagged lead is not flagged again.
    """
    count = lead.touch_count + 1
    last = at if lead.last_touch_at is None or at > lead.last_touch_at else lead.last_touch_at
    new_tier, tier_since, promoted = lead.tier, lead.tier_since, False
    if lead.tier == Tier.COLD and lead.status in (ACTIVE, PAUSED):
        done = lead if step is None else lead.with_touches((*lead.touches, TouchView(tier, step, "sent", at)))
        if _promotion_due(done, policy, count):
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
    return LeadState(
        tier=after.tier,
        status=after.status,
        touch_count=after.touch_count,
        tier_since=after.tier_since,
        last_touch_at=after.last_touch_at,
        timezone=lead.timezone,
        suppressed=lead.suppressed,
        touches=(*lead.touches, touch),
    )


# -- send windows ------------------------------------------------------------------------------

_SEARCH_DAYS = 16
"""How far ahead a window's next opening is looked for: two weeks cover a window open on
one weekday only whose one opening falls in a daylight-saving gap."""


def in_window(at: datetime, window: Window | None, zone: ZoneInfo) -> bool:
    """Whether ``at`` lies inside ``window``, read on the wall clock of ``zone``."""
    if window is None:
        return True
    local = at.astimezone(zone)
    start, end = window.hours
    wall = local.time()
    return local.weekday() in window.days and start <= wall and (end == time.max or wall < end)


def fit_window(at: datetime, window: Window | None, zone: ZoneInfo) -> datetime:
    """The first instant at or after ``at`` that lies inside ``window`` in ``zone``.

    Works on wall-clock times in the zone, so a window of 09:00-17:00 stays 09:00-17:00
    local across daylight-saving changes. An opening that falls in a spring-forward gap
    moves to the first valid instant, the end of the gap; when the clocks go back, a
    window covering the repeated hour is open in both of its passes.
    """
    if window is None or in_window(at, window, zone):
        return at
    start = window.hours[0]
    first = at.astimezone(zone).date()
    found: list[datetime] = []
    for offset in range(_SEARCH_DAYS + 1):
        day = first + timedelta(days=offset)
        if day.weekday() in window.days:
            found += [c for c in _entries(day, start, zone) if c > at and in_window(c, window, zone)]
        if found and offset > 0:
            # Looked one day past the first entry found: where the clocks go back across
            # midnight, the next day's first minutes come before this day's last ones.
            return min(found)
    if found:
        return min(found)
    # A window that never opens is rejected by config validation; stay safe anyway.
    raise ValueError(f"send window {window.describe()} never opens")


def _entries(day: date, start: time, zone: ZoneInfo) -> list[datetime]:
    """The instants of ``day`` at which the wall clock can enter a window opening at ``start``.

    The clock reaches ``start`` once, twice (the hour repeated when the clocks go back) or
    never (a spring-forward gap); and it may jump into a window when the offset changes,
    which is how an opening inside a gap becomes the end of the gap.
    """
    # Every instant whose wall-clock date is ``day`` lies in [earliest midnight, latest next midnight].
    lo = _wall(day, time(0), zone, 1)
    hi = _wall(day + timedelta(days=1), time(0), zone, 0)
    change = _offset_change(lo, hi, zone)
    if change is None:
        return [_wall(day, start, zone, 0)]
    return [_wall(day, start, zone, 0), _wall(day, start, zone, 1), change]


def _wall(day: date, wall: time, zone: ZoneInfo, fold: int) -> datetime:
    """The UTC instant of ``wall`` on ``day`` in ``zone``.

    ``fold`` picks the first (0) or second (1) pass of a repeated wall time; for a wall
    time in a gap, 0 reads it with the offset before the change and 1 with the one after
    (PEP 495), giving instants on either side of the gap.
    """
    return datetime.combine(day, wall, tzinfo=zone).replace(fold=fold).astimezone(UTC)


def _offset_change(lo: datetime, hi: datetime, zone: ZoneInfo) -> datetime | None:
    """The instant in (lo, hi] at which ``zone``'s UTC offset changes, if it does.

    Offsets change on whole seconds, so a bisection over whole seconds finds it exactly.
    """
    before = lo.astimezone(zone).utcoffset()
    if hi.astimezone(zone).utcoffset() == before:
        return None
    low, high = int(lo.timestamp()), int(hi.timestamp()) + 1
    while high - low > 1:
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, UTC).astimezone(zone).utcoffset() == before:
            low = mid
        else:
            high = mid
    return datetime.fromtimestamp(high, UTC)


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

    Makes the dispatcher's decisions in turn, assuming every send succeeds at once when
    it is due (or at ``now``, or at its window's next opening, if it is overdue). Work
    already under way finishes first: a message on the wire is taken as sent now (and is
    not listed: it has left); a step claimed by a running pass is listed as sent now.
    ``end`` says why nothing follows the last entry, or is empty when ``until`` came first.
    """
    out = Forecast()
    state = lead
    for touch in lead.touches:
        if touch.status == "sending" and touch.step is not None:
            state, _ = _settle(state, policy, touch.tier, touch.step, now)
    for touch in lead.touches:
        if (
            touch.status == "claimed"
            and touch.step is not None
            and touch.lease_until is not None
            and touch.lease_until > now
            and why_not_contactable(state) is None
        ):
            step = _step(policy, touch.tier, touch.step)
            if step is not None and now <= until:
                state, after = _settle(state, policy, touch.tier, touch.step, now)
                out.touches.append(
                    PlannedTouch(now, touch.tier, step, after.touch_count, after.promoted, after.flagged)
                )
    cursor = now
    for _ in range(1000):
        reason = why_not_contactable(state)
        if reason is None:
            reason = next(
                (
                    f"step {t.tier}/{t.step} is waiting to be mailed"
                    for t in state.touches
                    if t.status in IN_PRINT and t.step is not None
                ),
                None,
            )
        if reason is not None:
            out.end = reason
            return out
        nxt = next_touch(state, policy)
        if nxt is None:
            out.end = "sequence finished"
            return out
        at = nxt.due_at
        if at < cursor:
            window = policy.sequence(nxt.tier).window_for(nxt.step)
            at = fit_window(cursor, window, zone_of(state, policy))
        if at > until:
            out.end = ""
            return out
        state, after = _settle(state, policy, nxt.tier, nxt.step.id, at)
        out.touches.append(
            PlannedTouch(at, nxt.tier, nxt.step, after.touch_count, after.promoted, after.flagged)
        )
        cursor = at
    return out


def _settle(
    state: LeadState, policy: Policy, tier: str, step: str, at: datetime
) -> tuple[LeadState, AfterTouch]:
    """The lead once step ``tier/step`` is recorded sent at ``at``, as the store records it."""
    base = state.with_touches(tuple(t for t in state.touches if not (t.tier == tier and t.step == step)))
    after = apply_touch(base, policy, at=at, tier=tier, step=step)
    return with_touch(base, after, TouchView(tier, step, "sent", at)), after


def _step(policy: Policy, tier: str, step_id: str) -> Step | None:
    return next((s for s in policy.sequence(tier).steps if s.id == step_id), None)
