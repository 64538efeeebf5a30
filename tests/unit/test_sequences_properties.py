"""The decision core's invariants, held by hypothesis over generated inputs and histories.

Two kinds of proof:

- properties of the pure functions over arbitrary inputs (send windows in zones with
  daylight-saving changes, decisions over arbitrary touch histories, what a touch changes,
  forecasts);
- a state machine that drives one lead through arbitrary events (time moving forwards and,
  as a misset system clock does, backwards; sends that succeed, fail for now, fail for good,
  or whose daemon dies mid-send; touches by hand; unsubscribes; pauses and resumes; print
  batches; configuration changes) through :class:`MemoryStore`, a row-for-row model of what
  the store's ``claim``, ``mark_sending``, ``record`` and lead queries do around the core,
  and checks every invariant after every event.

The fast variants run in CI; ``pytest -m slow`` runs the long ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from campaignd import sequences as core
from campaignd.config import Channel, Sequence, Step, Tier, Window

M = timedelta(minutes=1)
H = timedelta(hours=1)
D = timedelta(days=1)
LEASE = 5 * M
MAX_ATTEMPTS = 3
BACKOFF = M
BACKOFF_MAX = H

FAST = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(FAST, max_examples=2000, stateful_step_count=120)


@pytest.fixture(scope="session")
def long_run(pytestconfig: pytest.Config) -> None:
    """Long variants run only when asked for with ``-m slow``."""
    if "slow" not in (pytestconfig.option.markexpr or ""):
        pytest.skip("a long variant: run it with -m slow")


def utc(y: int, m: int, d: int, hh: int = 0) -> datetime:
    return datetime(y, m, d, hh, tzinfo=UTC)


# -- strategies ----------------------------------------------------------------------------------

ZONES = [
    "UTC",
    "America/Chicago",
    "Europe/London",
    "Europe/Dublin",  # negative daylight saving in the tz database
    "Australia/Lord_Howe",  # a 30-minute change
    "America/Santiago",  # changes at midnight
    "Asia/Kolkata",  # no change, a half-hour offset
    "Pacific/Apia",  # skipped a whole day in December 2011
]
zones = st.sampled_from(ZONES)

# Instants near daylight-saving changes of those zones (and Apia's missing day).
CHANGES = [
    utc(2026, 3, 8, 8),
    utc(2026, 11, 1, 7),
    utc(2026, 3, 29, 1),
    utc(2026, 10, 25, 1),
    utc(2026, 4, 4, 15),
    utc(2026, 10, 3, 16),
    utc(2026, 4, 5, 3),
    utc(2026, 9, 6, 4),
    utc(2011, 12, 30, 10),
]
instants = st.builds(
    lambda base, minutes, micro: base + timedelta(minutes=minutes, microseconds=micro),
    st.sampled_from(CHANGES),
    st.integers(-5 * 24 * 60, 5 * 24 * 60),
    st.sampled_from([0, 0, 0, 1, 999_999]),
)

# Minutes of the day, with the hours around daylight-saving changes drawn more often.
minutes_of_day = st.one_of(
    st.sampled_from([0, 30, 60, 75, 90, 120, 135, 150, 180, 540, 1020, 1410]),
    st.integers(0, 24 * 60 - 1),
)


@st.composite
def windows(draw: st.DrawFn) -> Window:
    days = sorted(draw(st.sets(st.integers(0, 6), min_size=1)))
    start = draw(minutes_of_day)
    end = draw(st.one_of(st.just(24 * 60), st.integers(start + 1, 24 * 60)))
    hours = f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
    return Window.model_validate({"days": days, "hours": hours})


maybe_window = st.one_of(st.none(), st.none(), windows())
delays = st.one_of(
    st.sampled_from([timedelta(0), M, 5 * M, H, 90 * M, D, 2 * D, 3 * D]),
    st.integers(0, 4 * 24 * 60).map(lambda n: n * M),
)


@st.composite
def sequences(draw: st.DrawFn, tier: str, ids: tuple[str, ...] | None = None) -> Sequence:
    """A sequence for ``tier``; with ``ids``, the same steps with new delays and windows."""
    count = st.sampled_from([2, 3, 4, 1, 0])
    names = ids if ids is not None else tuple(f"{tier[0]}{i}" for i in range(draw(count)))
    steps = tuple(
        Step(
            id=name,
            template=f"{tier}/{name}",
            delay=draw(delays),
            channel=Channel.MAIL if name.endswith(("1", "3")) else Channel.EMAIL,
            window=draw(maybe_window),
        )
        for name in names
    )
    return Sequence(steps=steps, window=draw(maybe_window))


@st.composite
def policies(draw: st.DrawFn, like: core.Policy | None = None) -> core.Policy:
    """A policy; with ``like``, a changed configuration of the same steps."""

    def ids(tier: Tier) -> tuple[str, ...] | None:
        return None if like is None else tuple(s.id for s in like.sequence(tier).steps)

    return core.Policy(
        sequences={
            Tier.COLD: draw(sequences("cold", ids(Tier.COLD))),
            Tier.WARM: draw(sequences("warm", ids(Tier.WARM))),
        },
        threshold=draw(st.sampled_from([5, 8, 3, 12, 1, 2])),
        promote_rule=draw(st.sampled_from(["sequence_complete", "touches"])),
        promote_after=draw(st.integers(1, 6)),
        default_zone=draw(zones),
        lease=LEASE,
    )


STATUSES = [
    "sent",
    "sent",
    "sent",
    "sending",
    "claimed",
    "retry",
    "unknown",
    "failed",
    "cancelled",
    "skipped",
    "pending",
    "queued",
]


@st.composite
def lead_states(draw: st.DrawFn, pol: core.Policy) -> core.LeadState:
    """An arbitrary lead with an arbitrary history of touches of ``pol``'s steps."""
    tier = draw(st.sampled_from(["cold", "cold", "warm", "hot"]))
    since = draw(instants)
    touches = []
    for t in (Tier.COLD, Tier.WARM):
        for s in pol.sequence(t).steps:
            if draw(st.booleans()):
                at = since + draw(st.integers(-3 * 24 * 60, 6 * 24 * 60)) * M
                touches.append(
                    core.TouchView(
                        t.value,
                        s.id,
                        draw(st.sampled_from(STATUSES)),
                        at,
                        lease_until=at + draw(st.sampled_from([timedelta(0), LEASE, H])),
                        next_attempt_at=at + draw(st.sampled_from([M, H, D])),
                    )
                )
    order = draw(st.permutations(touches))
    sent_times = [t.at for t in order if t.status == "sent"]
    return core.LeadState(
        tier=tier,
        status=draw(
            st.sampled_from(["active", "active", "active", "paused", "flagged", "unsubscribed", "bounced"])
        ),
        touch_count=len(sent_times) + draw(st.integers(0, 3)),
        tier_since=since,
        last_touch_at=max(sent_times, default=None),
        timezone=draw(st.sampled_from(["", *ZONES])),
        suppressed=draw(st.booleans()) and draw(st.booleans()),
        touches=tuple(order),
    )


def zone(lead: core.LeadState | LeadRow, pol: core.Policy) -> ZoneInfo:
    return ZoneInfo(lead.timezone or pol.default_zone)


def step_of(pol: core.Policy, tier: str, sid: str) -> tuple[int, Step]:
    steps = pol.sequence(tier).steps
    index = next(i for i, s in enumerate(steps) if s.id == sid)
    return index, steps[index]


# -- send windows ------------------------------------------------------------------------------------


def check_first_opening(at: datetime, window: Window, tz: ZoneInfo) -> None:
    """``fit_window`` gives the first instant at or after ``at`` inside ``window``.

    Window edges are whole minutes of wall time and offsets are whole minutes, so the wall
    clock can only enter a window on a whole UTC minute: checking ``at`` and every whole
    minute up to the answer proves nothing earlier is inside.
    """
    got = core.fit_window(at, window, tz)
    assert got >= at
    assert core.in_window(got, window, tz)
    assert got - at < timedelta(days=16)
    if got == at:
        return
    assert not core.in_window(at, window, tz)
    probe = at.replace(second=0, microsecond=0) + M
    while probe < got:
        assert not core.in_window(probe, window, tz), f"{probe} is inside and earlier than {got}"
        probe += M


@FAST
@given(at=instants, window=windows(), tz=zones)
def test_fit_window_gives_the_first_instant_inside(at: datetime, window: Window, tz: str) -> None:
    check_first_opening(at, window, ZoneInfo(tz))


@pytest.mark.slow
@SLOW
@given(at=instants, window=windows(), tz=zones)
def test_fit_window_gives_the_first_instant_inside_long(
    long_run: None, at: datetime, window: Window, tz: str
) -> None:
    check_first_opening(at, window, ZoneInfo(tz))


@FAST
@given(at=instants, window=windows(), tz=zones)
def test_a_window_keeps_its_wall_clock_hours(at: datetime, window: Window, tz: str) -> None:
    """Inside a window means inside its local hours on one of its local weekdays, whatever the offset."""
    local = core.fit_window(at, window, ZoneInfo(tz)).astimezone(ZoneInfo(tz))
    start, end = window.hours
    assert local.weekday() in window.days
    assert start <= local.time()
    assert end == end.max or local.time() < end


# -- decisions over arbitrary histories ------------------------------------------------------------------


def check_decision(state: core.LeadState, pol: core.Policy, now: datetime) -> None:
    decision = core.decide(state, pol, now=now)
    if core.why_not_contactable(state) is not None:
        assert isinstance(decision, core.Idle)
        assert core.next_touch(state, pol) is None
        return
    if isinstance(decision, core.Wait):
        # every wait moves forward: the dispatcher never spins on a lead
        assert decision.until > now
        return
    if isinstance(decision, core.Idle):
        return
    nt = decision.touch
    _, step = step_of(pol, nt.tier, nt.step.id)
    assert core.in_window(now, pol.sequence(nt.tier).window_for(step), zone(state, pol))
    assert nt.due_at <= now
    # nothing else is under way for this lead
    for t in state.touches:
        assert t.status != "sending"
        assert not (t.status == "claimed" and t.lease_until is not None and t.lease_until > now)
        assert t.status not in core.IN_PRINT
    mine = [t for t in state.touches if (t.tier, t.step) == (nt.tier, nt.step.id)]
    # never a step the lead has moved past
    assert all(t.status in ("retry", "claimed", "cancelled") for t in mine)
    if not nt.retry:
        anchor = max([state.tier_since, *([state.last_touch_at] if state.last_touch_at else [])])
        assert now >= anchor + step.delay
    else:
        [started] = [t for t in mine if t.status in core.OPEN]
        assert now >= (
            (started.next_attempt_at if started.status == "retry" else started.lease_until) or started.at
        )
    if nt.tier != state.tier:
        # only a cold lead that has done what promotes it goes on with warm
        assert (state.tier, nt.tier) == ("cold", "warm")
        by_count = pol.promote_rule == "touches" and state.touch_count >= pol.promote_after
        assert by_count or finished(pol, state, "cold")


def finished(pol: core.Policy, state: core.LeadState, tier: str) -> bool:
    """Whether nothing of ``tier``'s sequence is left for ``state``: no work under way and
    the last step behind the lead."""
    steps = pol.sequence(tier).steps
    index = {s.id: i for i, s in enumerate(steps)}
    mine = [t for t in state.touches if t.tier == tier and t.step in index]
    if any(t.status in ("retry", "claimed") for t in mine):
        return False
    behind = [index[t.step] for t in mine if t.step is not None and t.status in core.SETTLED]
    return bool(steps) and max(behind, default=-1) == len(steps) - 1


@FAST
@given(data=st.data(), pol=policies(), now=instants)
def test_decide_sends_only_a_due_step_inside_its_window(
    data: st.DataObject, pol: core.Policy, now: datetime
) -> None:
    check_decision(data.draw(lead_states(pol)), pol, now)


@pytest.mark.slow
@SLOW
@given(data=st.data(), pol=policies(), now=instants)
def test_decide_sends_only_a_due_step_inside_its_window_long(
    long_run: None, data: st.DataObject, pol: core.Policy, now: datetime
) -> None:
    check_decision(data.draw(lead_states(pol)), pol, now)


@FAST
@given(data=st.data(), pol=policies(), at=instants, by_hand=st.booleans())
def test_a_touch_counts_once_and_flags_at_the_threshold(
    data: st.DataObject, pol: core.Policy, at: datetime, by_hand: bool
) -> None:
    state = data.draw(lead_states(pol))
    nt = None if by_hand else core.next_touch(state, pol)
    tier, sid = (state.tier, None) if nt is None else (nt.tier, nt.step.id)
    after = core.apply_touch(state, pol, at=at, tier=tier, step=sid)
    assert after.touch_count == state.touch_count + 1
    assert after.last_touch_at == max(at, state.last_touch_at or at)
    assert after.flagged == (state.status == "active" and after.touch_count >= pol.threshold)
    assert after.status == ("flagged" if after.flagged else state.status)
    assert (after.flagged_at, after.flag_reason is not None) == (
        (at, True) if after.flagged else (None, False)
    )
    if after.promoted:
        assert (state.tier, after.tier, after.tier_since) == ("cold", "warm", at)
        assert state.status in ("active", "paused")
    else:
        assert (after.tier, after.tier_since) == (state.tier, state.tier_since)


@FAST
@given(data=st.data(), pol=policies(), now=instants, days=st.integers(1, 40))
def test_a_forecast_is_in_order_inside_windows_and_flags_at_most_once(
    data: st.DataObject, pol: core.Policy, now: datetime, days: int
) -> None:
    state = data.draw(lead_states(pol))
    fc = core.forecast(state, pol, now=now, until=now + days * D)
    if core.why_not_contactable(state) is not None:
        assert fc.touches == []
        return
    seen: set[tuple[str, str]] = set()
    previous = now
    for n, planned in enumerate(fc.touches):
        assert previous <= planned.at <= now + days * D
        previous = planned.at
        key = (planned.tier, planned.step.id)
        assert key not in seen
        seen.add(key)
        leaving_now = planned.at == now and any(
            (t.tier, t.step, t.status) == (*key, "claimed") for t in state.touches
        )
        if not leaving_now:
            window = pol.sequence(planned.tier).window_for(planned.step)
            assert core.in_window(planned.at, window, zone(state, pol))
        if n:
            assert planned.touch_number == fc.touches[n - 1].touch_number + 1
        assert not planned.flags or n == len(fc.touches) - 1


# -- the store, row for row ---------------------------------------------------------------------------


@dataclass
class Row:
    """A row of ``touches``."""

    id: int
    tier: str
    step: str | None
    status: str
    created_at: datetime
    sent_at: datetime | None = None
    lease_until: datetime | None = None
    next_attempt_at: datetime | None = None
    attempts: int = 0
    claimed_by: str | None = None


@dataclass
class LeadRow:
    """The columns of ``leads`` the dispatch queries read and write."""

    tier: str
    status: str
    touch_count: int
    tier_since: datetime
    timezone: str
    next_due_at: datetime | None
    last_touch_at: datetime | None = None
    next_step: str | None = None
    flagged_at: datetime | None = None
    flag_reason: str | None = None


@dataclass
class MemoryStore:
    """What the store does around the core for one lead, modelled on ``store/dispatch.py``
    (``claim``, ``mark_sending``, ``release``, ``record``, ``recover_in_flight``,
    ``retry_touches``, ``replan_if_changed``) and ``store/leads.py`` / ``store/base.py``
    (``set_status``, ``set_tier``, ``suppress``, ``log_manual_touch``, ``_cancel_pending``,
    ``_states``).

    The claim takes a slot over when it is a due retry, a claim whose lease has run out
    (``lease_until <= now``) or a step cancelled before it left; the print-batch methods
    (``export_print_batch``, ``confirm_mailed``, ``cancel_print_batch``) follow
    ``store/mail.py``: a letter waits (pending), goes into a batch (queued), and counts
    when the batch is mailed, or at export.
    """

    lead: LeadRow
    rows: list[Row] = field(default_factory=list)
    suppressed: bool = False
    plan: str | None = None
    writes: int = 0
    """How many times the lead's plan (``next_due_at``) was written."""
    conflicts: int = 0
    """Claims the core asked for and the unique key refused."""

    # -- reading, as ``_states`` does ---------------------------------------------------------

    def state(self) -> core.LeadState:
        return core.LeadState(
            tier=self.lead.tier,
            status=self.lead.status,
            touch_count=self.lead.touch_count,
            tier_since=self.lead.tier_since,
            last_touch_at=self.lead.last_touch_at,
            timezone=self.lead.timezone,
            suppressed=self.suppressed,
            touches=tuple(
                core.TouchView(
                    r.tier, r.step, r.status, r.sent_at or r.created_at, r.lease_until, r.next_attempt_at
                )
                for r in self.rows
                if r.step is not None
            ),
        )

    def snapshot(self) -> MemoryStore:
        return replace(self, lead=replace(self.lead), rows=[replace(r) for r in self.rows])

    def row(self, tier: str, step: str) -> Row | None:
        return next((r for r in self.rows if (r.tier, r.step) == (tier, step)), None)

    def _plan(self, step: str | None, due: datetime | None) -> None:
        self.lead.next_step, self.lead.next_due_at = step, due
        self.writes += 1

    # -- dispatch ---------------------------------------------------------------------------------

    def replan_if_changed(self, fingerprint: str, *, now: datetime) -> None:
        if self.plan != fingerprint:
            self.plan = fingerprint
            if self.lead.status == "active":
                self._plan(None, now)

    def claim(self, *, policy: core.Policy, now: datetime, worker: str) -> Row | None:
        lead = self.lead
        if lead.status != "active" or lead.next_due_at is None or lead.next_due_at > now:
            return None
        decision = core.decide(self.state(), policy, now=now)
        if isinstance(decision, core.Wait):
            self._plan(decision.touch.step.id if decision.touch else None, decision.until)
            return None
        if isinstance(decision, core.Idle):
            self._plan(None, None)
            return None
        nt = decision.touch
        lease_until = now + policy.lease
        row = self.row(nt.tier, nt.step.id)
        if row is None:
            row = Row(
                len(self.rows) + 1,
                nt.tier,
                nt.step.id,
                "claimed",
                now,
                claimed_by=worker,
                lease_until=lease_until,
            )
            self.rows.append(row)
        elif row.status in ("retry", "cancelled") or (
            row.status == "claimed" and row.lease_until is not None and row.lease_until <= now
        ):
            row.status, row.claimed_by, row.lease_until = "claimed", worker, lease_until
        else:
            self.conflicts += 1
            self._plan(None, now + policy.lease)
            return None
        self._plan(nt.step.id, lease_until)
        return row

    def mark_sending(self, row: Row, *, worker: str, now: datetime) -> bool:
        if row.status != "claimed" or row.claimed_by != worker:
            return False
        row.status, row.attempts, row.lease_until = "sending", row.attempts + 1, now + LEASE
        return True

    def release(self, row: Row, *, worker: str, now: datetime) -> None:
        if row.status == "claimed" and row.claimed_by == worker:
            row.lease_until = now
            self._plan(self.lead.next_step, now)

    def record(self, row: Row, outcome: str, *, policy: core.Policy, now: datetime) -> core.AfterTouch | None:
        """Record one answer; returns what it did to the lead when it counted a touch."""
        allowed = {"sending"} | (
            {"claimed"} if outcome in ("render", "rejected", "skipped", "pending") else set()
        )
        if row.status not in allowed:
            return None
        assert row.step is not None
        base = replace(
            self.state(),
            touches=tuple(t for t in self.state().touches if (t.tier, t.step) != (row.tier, row.step)),
        )
        row.lease_until, row.next_attempt_at = None, None
        if outcome == "sent":
            return self._count(row, base, policy, now)
        if outcome == "temporary" and row.attempts < MAX_ATTEMPTS:
            retry_at = now + min(BACKOFF * (2 ** max(row.attempts - 1, 0)), BACKOFF_MAX)
            row.status, row.next_attempt_at = "retry", retry_at
            self._plan(row.step, retry_at)
        elif outcome == "unavailable":
            retry_at = now + 30 * timedelta(seconds=1)
            row.status, row.next_attempt_at, row.attempts = "retry", retry_at, max(row.attempts - 1, 0)
            self._plan(row.step, retry_at)
        elif outcome == "permanent":
            self._stop(now, "bounced")
            row.status = "failed"
        elif outcome in ("skipped", "pending"):
            row.status = outcome
            new = replace(base, touches=(*base.touches, core.TouchView(row.tier, row.step, outcome, now)))
            nxt = core.next_touch(new, policy) if outcome == "skipped" else None
            self._plan(nxt.step.id if nxt else None, nxt.due_at if nxt else None)
        else:
            row.status = "unknown" if outcome == "unknown" else "failed"
            self._plan(None, None)
        return None

    def _count(self, row: Row, base: core.LeadState, policy: core.Policy, at: datetime) -> core.AfterTouch:
        assert row.step is not None
        after = core.apply_touch(base, policy, at=at, tier=row.tier, step=row.step)
        new = core.with_touch(base, after, core.TouchView(row.tier, row.step, "sent", at))
        nxt = core.next_touch(new, policy)
        row.status, row.sent_at = "sent", at
        self._write(after)
        self._plan(nxt.step.id if nxt else None, nxt.due_at if nxt else None)
        return after

    def _write(self, after: core.AfterTouch) -> None:
        lead = self.lead
        lead.touch_count, lead.tier, lead.tier_since = after.touch_count, after.tier, after.tier_since
        lead.status, lead.last_touch_at = after.status, after.last_touch_at
        if after.flagged:
            lead.flagged_at, lead.flag_reason = after.flagged_at, after.flag_reason

    def recover_in_flight(self, *, now: datetime) -> None:
        """At start-up (SQLite: the only daemon): whatever was on the wire becomes unknown,
        and claims of the process that is gone are given back at once."""
        stuck = [r for r in self.rows if r.status == "sending"]
        for r in stuck:
            r.status, r.lease_until = "unknown", None
        if stuck:
            self._plan(None, None)
        held = [r for r in self.rows if r.status == "claimed" and r.lease_until and r.lease_until > now]
        if held and self.lead.status == "active":
            self._plan(self.lead.next_step, now)
        for r in held:
            r.lease_until = now

    def retry_touches(self, *, now: datetime) -> list[Row]:
        rows = [r for r in self.rows if r.status in ("unknown", "failed") and r.step is not None]
        for r in rows:
            r.status, r.next_attempt_at, r.attempts = "retry", now, 0
        if rows:
            self._plan(self.lead.next_step, now)
        return rows

    # -- leads by hand -------------------------------------------------------------------------------

    def _cancel_pending(self) -> None:
        for r in self.rows:
            if r.status in ("claimed", "retry", "pending"):
                r.status, r.lease_until = "cancelled", None

    def _stop(self, now: datetime, status: str) -> None:
        self.suppressed = True
        self.lead.status = status
        self._plan(None, None)
        self._cancel_pending()

    def set_status(self, status: str, *, now: datetime) -> None:
        self.lead.status = status
        if status == "active":
            self._plan(None, now)
        else:
            self._plan(None, None)
            self._cancel_pending()

    def set_tier(self, tier: str, *, now: datetime) -> None:
        self.lead.tier, self.lead.tier_since = tier, now
        self._plan(None, now)

    def unsubscribe(self, *, now: datetime) -> None:
        self._stop(now, "unsubscribed")

    def log_manual_touch(self, *, at: datetime, policy: core.Policy) -> core.AfterTouch:
        state = self.state()
        after = core.apply_touch(state, policy, at=at, tier=state.tier, step=None)
        self.rows.append(Row(len(self.rows) + 1, state.tier, None, "sent", at, sent_at=at))
        self._write(after)
        self._plan(None, at if after.status == "active" else None)
        return after

    # -- direct mail, as ``store/mail.py`` does it -------------------------------------------------

    def export_print_batch(
        self, *, policy: core.Policy, now: datetime, count: bool
    ) -> list[tuple[MemoryStore, core.AfterTouch]]:
        """``finish_batch``: waiting letters go into a batch, and count now when the pieces
        count at export (``count``) rather than when the batch is confirmed mailed."""
        out = []
        for r in self.rows:
            if r.status == "pending":
                if count:
                    before = self.snapshot()
                    out.append((before, self._mailed(r, policy, now)))
                else:
                    r.status = "queued"
        return out

    def confirm_mailed(
        self, *, policy: core.Policy, now: datetime
    ) -> list[tuple[MemoryStore, core.AfterTouch]]:
        """``confirm_batch``: the batch was handed to the post; each piece counts now."""
        out = []
        for r in self.rows:
            if r.status == "queued":
                before = self.snapshot()
                out.append((before, self._mailed(r, policy, now)))
        return out

    def _mailed(self, row: Row, policy: core.Policy, now: datetime) -> core.AfterTouch:
        """``_count``: the piece counts like a sent email; the next pass plans what follows."""
        assert row.step is not None
        after = core.apply_touch(self.state(), policy, at=now, tier=row.tier, step=row.step)
        row.status, row.sent_at, row.lease_until = "sent", now, None
        self._write(after)
        self._plan(None, now if after.status == "active" else None)
        return after

    def cancel_print_batch(self, *, now: datetime) -> None:
        """``cancel_batch``: the batch will not be mailed; its letters are due again, or
        cancelled when their lead has stopped."""
        queued = [r for r in self.rows if r.status == "queued"]
        going_on = self.lead.status == "active" and not self.suppressed
        for r in queued:
            if going_on:
                r.status, r.next_attempt_at = "retry", now
            else:
                r.status = "cancelled"
        if queued and going_on:
            self._plan(None, now)


def check_claim(before: MemoryStore, row: Row, pol: core.Policy, now: datetime) -> None:
    """What must hold of every step the store claims: the lead may be contacted, the step is
    inside its window, not before its delay or retry time, and no earlier step was skipped."""
    assert row.step is not None
    lead = before.lead
    assert lead.status == "active" and not before.suppressed
    index, step = step_of(pol, row.tier, row.step)
    assert core.in_window(now, pol.sequence(row.tier).window_for(step), zone(lead, pol)), "outside its window"
    previous = before.row(row.tier, row.step)
    fresh = previous is None or previous.status == "cancelled"
    if fresh:
        touched = [r.sent_at for r in before.rows if r.status == "sent" and r.sent_at is not None]
        anchor = max([lead.tier_since, *touched])
        assert now >= anchor + step.delay, "before its delay"
        # no step skipped: every earlier step of the sequence was sent (or skipped on purpose)
        for earlier in pol.sequence(row.tier).steps[:index]:
            found = before.row(row.tier, earlier.id)
            assert found is not None and found.status in ("sent", "skipped"), f"{earlier.id} was skipped"
    elif previous is not None and previous.status == "retry":
        assert previous.next_attempt_at is not None and now >= previous.next_attempt_at
    else:
        assert previous is not None and previous.status == "claimed"
        assert previous.lease_until is not None and now >= previous.lease_until, "a live claim taken over"
    by_count = pol.promote_rule == "touches" and lead.touch_count >= pol.promote_after
    if row.tier == lead.tier:
        assert not (lead.tier == "cold" and fresh and by_count), "a cold step after the promotion count"
    else:
        assert (lead.tier, row.tier) == ("cold", "warm")
        assert by_count or cold_finished(pol, before.rows), "warm before the cold sequence finished"


def cold_finished(pol: core.Policy, rows: list[Row]) -> bool:
    steps = pol.sequence("cold").steps
    settled = {r.step for r in rows if r.tier == "cold" and r.status in core.SETTLED}
    return bool(steps) and all(s.id in settled for s in steps)


def check_counted(
    before: MemoryStore, store: MemoryStore, after: core.AfterTouch, pol: core.Policy, at: datetime
) -> None:
    """What must hold of every counted touch: the count goes up by one, the flag comes exactly
    when an active lead reaches the threshold, promotion exactly when a cold lead has done
    what promotes it."""
    was, lead = before.lead, store.lead
    assert lead.touch_count == was.touch_count + 1
    should_flag = was.status == "active" and lead.touch_count >= pol.threshold
    newly = was.status != "flagged" and lead.status == "flagged"
    assert newly == should_flag == after.flagged
    if newly:
        assert lead.flagged_at == at
        assert lead.flag_reason == f"reached {lead.touch_count} touches (threshold {pol.threshold})"
    by_count = pol.promote_rule == "touches" and lead.touch_count >= pol.promote_after
    promote = (
        was.tier == "cold"
        and was.status in ("active", "paused")
        and (by_count or cold_finished(pol, store.rows))
    )
    assert (was.tier == "cold" and lead.tier == "warm") == promote == after.promoted
    if promote:
        assert lead.tier_since == at


# -- the dispatcher over the model, as it runs when every send succeeds on time -------------------------

Planned = tuple[datetime, str, str, int, bool, bool]


def dispatched(store: MemoryStore, policy: core.Policy, now: datetime, until: datetime) -> list[Planned]:
    """What the dispatcher sends from ``now`` to ``until`` if every send succeeds at once and
    passes run exactly when the store has planned them."""
    s = store.snapshot()
    out: list[Planned] = []

    def sent(row: Row, at: datetime, *, listed: bool = True) -> None:
        before = s.snapshot()
        after = s.record(row, "sent", policy=policy, now=at)
        assert after is not None
        check_counted(before, s, after, policy, at)
        if listed:
            assert row.step is not None
            out.append((at, row.tier, row.step, after.touch_count, after.promoted, after.flagged))

    # work under way finishes first: the answer to a message on the wire, then a live claim
    for row in [r for r in s.rows if r.status == "sending"]:
        sent(row, now, listed=False)
    for row in [r for r in s.rows if r.status == "claimed" and r.lease_until and r.lease_until > now]:
        assert row.claimed_by is not None
        if s.lead.status == "active" and s.mark_sending(row, worker=row.claimed_by, now=now):
            sent(row, now)
    at = now
    for _ in range(500):
        due = s.lead.next_due_at
        if s.lead.status != "active" or due is None:
            break
        at = max(at, due)
        if at > until:
            break
        before = s.snapshot()
        claimed = s.claim(policy=policy, now=at, worker="ticker")
        assert s.conflicts == 0, "the core planned a step whose slot the store cannot take"
        if claimed is not None:
            check_claim(before, claimed, policy, at)
            assert s.mark_sending(claimed, worker="ticker", now=at)
            sent(claimed, at)
        elif s.lead.status == "active" and s.lead.next_due_at is not None:
            assert s.lead.next_due_at > at, f"the dispatcher made no progress at {at}"
    return out


def forecast_of(state: core.LeadState, policy: core.Policy, now: datetime, until: datetime) -> list[Planned]:
    fc = core.forecast(state, policy, now=now, until=until)
    return [(p.at, p.tier, p.step.id, p.touch_number, p.promotes, p.flags) for p in fc.touches]


# -- the state machine -----------------------------------------------------------------------------------

# Answers drawn in about the proportions a campaign sees them: mostly sent.
ANSWERS = ["sent"] * 8 + [
    "temporary",
    "temporary",
    "unavailable",
    "rejected",
    "unknown",
    "skipped",
    "pending",
]
ANSWERS_AND_BOUNCES = [*ANSWERS, "permanent"]
OUTCOMES = [
    *ANSWERS_AND_BOUNCES,
    "render",
    "hold",  # the pass claims, then other things happen before it sends
    "in_flight",  # the message leaves, then other things happen before its answer
]
SETTLED_FOR_GOOD = {"sent", "unknown", "pending", "skipped", "permanent", "rejected"}
"""Answers after which the step must never leave again, unless the operator re-queues it."""
HORIZON = 21 * D


class LeadLife(RuleBasedStateMachine):
    """One lead, one daemon (SQLite), the store modelled row for row, the core deciding."""

    def __init__(self) -> None:
        super().__init__()
        self.store: MemoryStore | None = None

    # -- set-up --------------------------------------------------------------------------------------

    @initialize(
        pol=policies(),
        tz=st.sampled_from(["", *ZONES]),
        start=instants,
        tier=st.sampled_from(["cold", "cold", "warm"]),
    )
    def enrol(self, pol: core.Policy, tz: str, start: datetime, tier: str) -> None:
        self.policy = pol
        self.now = start
        self.worker = "daemon-1"
        self.store = MemoryStore(LeadRow(tier, "active", 0, start, tz, next_due_at=start))
        self.store.replan_if_changed(pol.fingerprint(), now=start)
        self.held: Row | None = None
        self.in_flight: Row | None = None
        self.highest_count = 0
        self.added = 0
        self.unflagged = 0
        self.flags = 0
        self.left: dict[tuple[str, str], str] = {}
        """Per step, the last answer to a message that left (or 'requeued' by the operator)."""
        self.back_at_write: int | None = None
        """The store's plan-write count when the clock last stepped back."""

    @property
    def s(self) -> MemoryStore:
        assert self.store is not None
        return self.store

    # -- time -------------------------------------------------------------------------------------------

    @rule(
        by=st.one_of(
            st.sampled_from([M, 5 * M, H, 6 * H, D, 3 * D]), st.integers(1, 3 * 24 * 60).map(lambda n: n * M)
        )
    )
    def time_passes(self, by: timedelta) -> None:
        self.now += by

    @rule(step=st.sampled_from([-H, D, -D, -5 * M, H]))
    def system_clock_steps(self, step: timedelta) -> None:
        """The system clock is set back or jumps ahead (NTP, a misset clock, a restored VM)."""
        self.now += step
        if step < timedelta(0):
            self.back_at_write = self.s.writes

    # -- the dispatcher -------------------------------------------------------------------------------------

    @precondition(lambda self: self.held is None and self.in_flight is None)
    @rule(outcome=st.sampled_from(OUTCOMES), on_time=st.booleans())
    def dispatch_pass(self, outcome: str, on_time: bool) -> None:
        due = self.s.lead.next_due_at
        if on_time and due is not None and due > self.now:
            self.now = due  # the ticker wakes when the store planned
        row = self.claim()
        if row is None:
            return
        if outcome == "hold":
            self.held = row
        elif outcome == "render":
            self.answer(row, "render")
        elif self.mark(row):
            if outcome == "in_flight":
                self.in_flight = row
            else:
                self.answer(row, outcome)

    @precondition(lambda self: self.held is None and self.in_flight is None)
    @rule(outcomes=st.lists(st.sampled_from(ANSWERS), min_size=1, max_size=8))
    def daemon_runs_a_while(self, outcomes: list[str]) -> None:
        """Passes at the times the store planned, each claim answered in turn."""
        for outcome in outcomes:
            self.dispatch_pass(outcome, on_time=True)

    # A daemon spends most of its life sending: give that more turns than the rarer events.
    daemon_keeps_running = daemon_runs_a_while
    daemon_runs_on = daemon_runs_a_while

    @precondition(lambda self: self.held is not None)
    @rule(outcome=st.sampled_from(ANSWERS_AND_BOUNCES))
    def held_claim_goes_on(self, outcome: str) -> None:
        row, self.held = self.held, None
        assert row is not None
        if self.mark(row):
            self.answer(row, outcome)

    @precondition(lambda self: self.in_flight is not None)
    @rule(outcome=st.sampled_from(ANSWERS_AND_BOUNCES))
    def answer_arrives(self, outcome: str) -> None:
        row, self.in_flight = self.in_flight, None
        assert row is not None
        self.answer(row, outcome)

    @precondition(lambda self: self.held is not None and self.in_flight is None)
    @rule()
    def daemon_stops_cleanly(self) -> None:
        """SIGTERM: claimed work that never started to leave is given back."""
        row, self.held = self.held, None
        assert row is not None
        self.s.release(row, worker=self.worker, now=self.now)

    @rule()
    def daemon_dies_and_restarts(self) -> None:
        """A crash: a message on the wire becomes unknown; claims wait for their lease."""
        self.held = self.in_flight = None
        self.worker = f"daemon-{int(self.worker.split('-')[1]) + 1}"
        self.s.recover_in_flight(now=self.now)

    def claim(self) -> Row | None:
        for r in self.s.rows:
            if (
                r.step is not None
                and r.status in ("cancelled", "retry")
                and self.left.get((r.tier, r.step)) == "pending"
            ):
                # a letter taken back before its batch was mailed (the lead stopped, or the
                # batch was cancelled) never reached anyone
                self.left[(r.tier, r.step)] = "never mailed"
        before = self.s.snapshot()
        row = self.s.claim(policy=self.policy, now=self.now, worker=self.worker)
        assert self.s.conflicts == 0, "the core planned a step whose slot the store cannot take"
        if row is not None:
            note(f"claimed {row.tier}/{row.step} at {self.now}")
            check_claim(before, row, self.policy, self.now)
        return row

    def mark(self, row: Row) -> bool:
        if not self.s.mark_sending(row, worker=self.worker, now=self.now):
            return False
        assert row.step is not None
        previous = self.left.get((row.tier, row.step))
        assert previous not in SETTLED_FOR_GOOD, f"{row.tier}/{row.step} leaves again after {previous!r}"
        return True

    def answer(self, row: Row, outcome: str) -> None:
        assert row.step is not None
        if outcome == "pending" and step_of(self.policy, row.tier, row.step)[1].channel != Channel.MAIL:
            outcome = "sent"  # only letters wait for print
        before = self.s.snapshot()
        was = row.status
        after = self.s.record(row, outcome, policy=self.policy, now=self.now)
        if was == "sending":
            self.left[(row.tier, row.step)] = outcome
        if after is not None:
            self.counted(before, after)

    # -- people ----------------------------------------------------------------------------------------------

    @rule(really=st.sampled_from([False, True]))
    def touch_by_hand(self, really: bool) -> None:
        if not really:
            return
        before = self.s.snapshot()
        after = self.s.log_manual_touch(at=self.now, policy=self.policy)
        self.counted(before, after)

    @precondition(lambda self: self.store is not None and self.store.lead.status == "active")
    @rule(really=st.sampled_from([False, True]))
    def pause(self, really: bool) -> None:
        if really:
            self.s.set_status("paused", now=self.now)

    @precondition(
        lambda self: (
            self.store is not None and self.store.lead.status == "paused" and not self.store.suppressed
        )
    )
    @rule()
    def resume(self) -> None:
        self.s.set_status("active", now=self.now)

    @precondition(lambda self: self.store is not None and self.store.lead.status == "active")
    @rule(by=st.sampled_from([M, H, D, 7 * D]))
    def paused_for_a_while(self, by: timedelta) -> None:
        """Paused while a step is claimed, waiting for a retry or for print, then resumed."""
        self.s.set_status("paused", now=self.now)
        self.now += by
        self.s.set_status("active", now=self.now)

    @precondition(lambda self: self.store is not None and self.store.lead.status == "flagged")
    @rule()
    def sales_gives_the_lead_back(self) -> None:
        """``leads unflag``: back to marketing; the next touch flags it again."""
        self.unflagged += 1
        self.s.set_status("active", now=self.now)
        self.s.lead.flagged_at = self.s.lead.flag_reason = None

    @precondition(lambda self: self.store is not None and not self.store.suppressed)
    @rule(really=st.sampled_from([False, False, False, True]))
    def unsubscribe(self, really: bool) -> None:
        # drawn as rarely as a real unsubscribe: it ends the lead's story
        if really:
            self.s.unsubscribe(now=self.now)

    @rule(tier=st.sampled_from(["cold", "warm", "hot"]), really=st.sampled_from([False, False, True]))
    def operator_moves_the_lead(self, tier: str, really: bool) -> None:
        """``leads set-tier``: the lead starts that tier's sequence now."""
        if really:
            self.s.set_tier(tier, now=self.now)

    @rule()
    def operator_requeues_unknown_and_failed(self) -> None:
        for row in self.s.retry_touches(now=self.now):
            assert row.step is not None
            self.left[(row.tier, row.step)] = "requeued"

    @rule(count_at_export=st.booleans())
    def print_batch_is_exported(self, count_at_export: bool) -> None:
        for before, after in self.s.export_print_batch(
            policy=self.policy, now=self.now, count=count_at_export
        ):
            self.counted(before, after)

    @rule()
    def print_batch_is_mailed(self) -> None:
        for before, after in self.s.confirm_mailed(policy=self.policy, now=self.now):
            self.counted(before, after)

    @rule()
    def print_batch_is_cancelled(self) -> None:
        self.s.cancel_print_batch(now=self.now)

    @rule(data=st.data())
    def configuration_changes(self, data: st.DataObject) -> None:
        """Delays, windows, threshold, promotion and default zone change; the steps stay."""
        self.policy = data.draw(policies(like=self.policy))
        self.s.replan_if_changed(self.policy.fingerprint(), now=self.now)

    @precondition(lambda self: self.store is not None and self.added < 3)
    @rule(tier=st.sampled_from([Tier.COLD, Tier.WARM]), delay=delays, window=maybe_window)
    def a_step_is_added_at_the_end(self, tier: Tier, delay: timedelta, window: Window | None) -> None:
        self.added += 1
        old = self.policy.sequence(tier)
        sid = f"{tier.value[0]}{len(old.steps)}x{self.added}"
        new = Step(id=sid, template=f"{tier.value}/{sid}", delay=delay, window=window)
        sequences = {**self.policy.sequences, tier: old.model_copy(update={"steps": (*old.steps, new)})}
        self.policy = replace(self.policy, sequences=sequences)
        self.s.replan_if_changed(self.policy.fingerprint(), now=self.now)

    # -- what must hold when a step is claimed, and when a touch counts ----------------------------------

    def counted(self, before: MemoryStore, after: core.AfterTouch) -> None:
        note(f"touch {self.s.lead.touch_count} counted at {self.now}")
        check_counted(before, self.s, after, self.policy, self.now)
        self.flags += after.flagged

    # -- what must hold after every event ---------------------------------------------------------------

    @invariant()
    def counts_are_the_touches_and_never_go_down(self) -> None:
        if self.store is None:
            return
        counted = sum(1 for r in self.s.rows if r.status == "sent")
        assert self.s.lead.touch_count == counted
        assert counted >= self.highest_count
        self.highest_count = counted

    @invariant()
    def one_touch_per_step(self) -> None:
        if self.store is None:
            return
        keys = [(r.tier, r.step) for r in self.s.rows if r.step is not None]
        assert len(keys) == len(set(keys))
        for tier_step in keys:
            assert sum(1 for r in self.s.rows if (r.tier, r.step) == tier_step and r.status == "sent") <= 1

    @invariant()
    def flagged_once_and_for_good(self) -> None:
        if self.store is None:
            return
        # once per hand-over to sales: again only after sales gave the lead back
        assert self.flags <= self.unflagged + 1
        if self.s.lead.status == "flagged":
            assert self.flags == self.unflagged + 1

    @invariant()
    def stopped_leads_get_nothing(self) -> None:
        if self.store is None:
            return
        state = self.s.state()
        if state.status == "active" and not state.suppressed:
            return
        assert isinstance(core.decide(state, self.policy, now=self.now), core.Idle)
        assert core.next_touch(state, self.policy) is None
        assert core.forecast(state, self.policy, now=self.now, until=self.now + HORIZON).touches == []

    def plan_is_fresh(self) -> bool:
        """False while the store's plan was written before the clock last stepped back: it
        may then wait longer than the core would now (late, never early or twice)."""
        return self.back_at_write is None or self.back_at_write != self.s.writes

    @invariant()
    def the_store_never_plans_later_than_the_core(self) -> None:
        if self.store is None or not self.plan_is_fresh():
            return
        decision = core.decide(self.s.state(), self.policy, now=self.now)
        due = self.s.lead.next_due_at
        if isinstance(decision, core.Send):
            assert due is not None and due <= self.now, "a due step the store would not look at"
        elif isinstance(decision, core.Wait):
            assert due is not None and due <= decision.until, "the store would look too late"

    @invariant()
    def the_forecast_is_what_the_dispatcher_does(self) -> None:
        if self.store is None or not self.plan_is_fresh():
            return
        until = self.now + HORIZON
        expected = dispatched(self.s, self.policy, self.now, until)
        assert forecast_of(self.s.state(), self.policy, self.now, until) == expected


LeadLife.TestCase.settings = settings(FAST, max_examples=150)
TestLeadLife = LeadLife.TestCase


@pytest.mark.slow
def test_lead_life_long(long_run: None) -> None:
    run_state_machine_as_test(LeadLife, settings=settings(SLOW, max_examples=1500))
