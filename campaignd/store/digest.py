"""Digest queries: flagged leads, their timelines, the period's totals and digest runs.

A digest lists the leads that are flagged now and whose flag was raised in its period
``(start, end]``; a converted or unflagged lead drops out, and a lead flagged again later
is listed again (its flag time is new). Reading takes a barrier first (SQLite's write
lock; on PostgreSQL a SHARE lock on ``leads``, which waits for every transaction already
writing leads to commit), so a flag written with a time inside the period is never
committed just after the digest read past it.

Digest runs make each scheduled digest exactly-once: a run is recorded (``pending``) under
the schedule's unique fire time before anything is built, committed as ``sending`` just
before the message leaves, and settled with each recipient's answer. See
:class:`campaignd.models.DigestRun` for the statuses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parseaddr
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from campaignd.digest import BEGINNING, Digest, DigestLead, TimelineEntry, Totals
from campaignd.models import EventKind, LeadStatus, TouchStatus, UTCDateTime
from campaignd.store.base import CHUNK, StoreBase, digest_runs_t, events_t, leads_t, touches_t


class RunStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    PARTIAL = "partial"
    RETRY = "retry"
    FAILED = "failed"
    UNKNOWN = "unknown"
    EMPTY = "empty"


class RunKind(StrEnum):
    SCHEDULED = "scheduled"
    MANUAL = "manual"


class Delivery(StrEnum):
    """What became of the digest for one recipient."""

    SENT = "sent"
    REFUSED = "refused"
    """Refused for good by the recipient's server; not tried again."""
    RETRY = "retry"
    """Not delivered for a temporary reason; tried again."""
    FAILED = "failed"
    """Still not delivered when the attempts ran out."""
    UNKNOWN = "unknown"
    """May or may not have been delivered; never resent by itself."""


_LEAD_COLUMNS = (
    "id",
    "email",
    "first_name",
    "last_name",
    "company",
    "phone",
    "address_line1",
    "address_line2",
    "city",
    "region",
    "postal_code",
    "country",
    "timezone",
    "tier",
    "touch_count",
    "flagged_at",
    "flag_reason",
    "last_touch_at",
)
"""The lead columns a digest shows: every field of :class:`DigestLead` but its timeline."""

SETTLED = frozenset({Delivery.SENT, Delivery.REFUSED, Delivery.FAILED, Delivery.UNKNOWN})

STOPPED_DETAIL = (
    "campaignd stopped while this digest was being sent; it may or may not have arrived "
    "(ask the recipients; 'campaignd digest --since DATE --send' sends it again by hand)"
)


@dataclass(frozen=True, slots=True)
class DigestRunRecord:
    id: int
    kind: str
    scheduled_for: datetime | None
    period_start: datetime
    period_end: datetime
    status: str
    leads: int
    recipients: tuple[str, ...]
    deliveries: Mapping[str, str]
    attempts: int
    next_attempt_at: datetime | None
    lease_until: datetime | None
    message_id: str | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None

    def to_try(self) -> list[str]:
        """The recipients still to be tried: neither sent to, refused, failed nor unknown."""
        return [r for r in self.recipients if self.deliveries.get(address_of(r)) not in SETTLED]


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """One recipient's answer to one attempt."""

    address: str
    delivery: Delivery
    detail: str = ""


def _run(row: Any) -> DigestRunRecord:
    return DigestRunRecord(
        id=row.id,
        kind=row.kind,
        scheduled_for=row.scheduled_for,
        period_start=row.period_start,
        period_end=row.period_end,
        status=row.status,
        leads=row.leads,
        recipients=tuple(_split_recipients(row.recipients)),
        deliveries=dict(row.deliveries or {}),
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        lease_until=row.lease_until,
        message_id=row.message_id,
        error=row.error,
        created_at=row.created_at,
        finished_at=row.finished_at,
    )


def _split_recipients(text: str) -> list[str]:
    """Recipients are stored one per line: a display name may hold a comma."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _reached_anyone(deliveries: Mapping[str, str]) -> bool:
    return any(v in (Delivery.SENT, Delivery.UNKNOWN) for v in deliveries.values())


class DigestQueries(StoreBase):
    """What the flagged-lead digest reads, and the record of digests sent."""

    # -- reading a digest --------------------------------------------------------------------------

    def read_digest(self, *, start: datetime, end: datetime) -> Digest:
        """The leads flagged in ``(start, end]`` that are still flagged, newest flag first,
        each with its touch timeline, and the period's totals.

        Only the list of leads is read behind the barrier; timelines follow in short
        transactions of a few hundred leads each, so that a digest of thousands of leads
        never holds up the dispatcher's writes for long.
        """
        with self.engine.begin() as conn:
            if self.is_postgres:
                # A barrier: wait for every transaction already writing leads (a flag, a
                # conversion) to commit, so none lands inside the period after this read.
                conn.exec_driver_sql("LOCK TABLE leads IN SHARE MODE")
            rows = conn.execute(
                sa.select(*(leads_t.c[name] for name in _LEAD_COLUMNS))
                .where(
                    leads_t.c.status == LeadStatus.FLAGGED.value,
                    leads_t.c.flagged_at > start,
                    leads_t.c.flagged_at <= end,
                )
                .order_by(leads_t.c.flagged_at.desc(), leads_t.c.id.desc())
            ).all()
        with self.reader.connect() as conn:
            totals = self._totals(conn, start, end)
        timelines: dict[int, list[TimelineEntry]] = {}
        ids = [r.id for r in rows]
        for begin in range(0, len(ids), CHUNK):
            with self.reader.connect() as conn:
                timelines.update(self._timelines(conn, ids[begin : begin + CHUNK]))
        leads = tuple(
            DigestLead(
                **{name: getattr(r, name) for name in _LEAD_COLUMNS if name != "flag_reason"},
                flag_reason=r.flag_reason or "",
                timeline=tuple(timelines.get(r.id, ())),
            )
            for r in rows
        )
        return Digest(start=start, end=end, leads=leads, totals=totals)

    def _timelines(self, conn: Connection, lead_ids: Sequence[int]) -> dict[int, list[TimelineEntry]]:
        """The touches that counted (sent, by any channel or by hand), oldest first."""
        out: dict[int, list[TimelineEntry]] = {}
        at = sa.type_coerce(sa.func.coalesce(touches_t.c.sent_at, touches_t.c.created_at), UTCDateTime())
        query = (
            sa.select(
                touches_t.c.lead_id,
                at.label("at"),
                touches_t.c.channel,
                touches_t.c.tier,
                touches_t.c.step,
                touches_t.c.template,
                touches_t.c.note,
            )
            .where(touches_t.c.lead_id.in_(lead_ids), touches_t.c.status == TouchStatus.SENT.value)
            .order_by(touches_t.c.lead_id, at, touches_t.c.id)
        )
        for lead_id, *entry in conn.execute(query):
            out.setdefault(lead_id, []).append(TimelineEntry(*entry))
        return out

    def _totals(self, conn: Connection, start: datetime, end: datetime) -> Totals:
        sent = conn.execute(
            sa.select(sa.func.count(sa.distinct(touches_t.c.lead_id)), sa.func.count()).where(
                touches_t.c.status == TouchStatus.SENT.value,
                touches_t.c.sent_at > start,
                touches_t.c.sent_at <= end,
            )
        ).one()
        kinds = [
            EventKind.PROMOTED,
            EventKind.FLAGGED,
            EventKind.CONVERTED,
            EventKind.UNSUBSCRIBED,
            EventKind.BOUNCED,
        ]
        events: dict[str, int] = dict(
            conn.execute(
                sa.select(events_t.c.kind, sa.func.count())
                .where(
                    events_t.c.kind.in_([k.value for k in kinds]),
                    events_t.c.at > start,
                    events_t.c.at <= end,
                )
                .group_by(events_t.c.kind)
            ).all()
        )
        failed = conn.execute(
            sa.select(sa.func.count()).where(
                touches_t.c.status.in_([TouchStatus.FAILED.value, TouchStatus.UNKNOWN.value]),
                touches_t.c.updated_at > start,
                touches_t.c.updated_at <= end,
            )
        ).scalar_one()
        return Totals(
            contacted=int(sent[0]),
            touches=int(sent[1]),
            promoted=int(events.get(EventKind.PROMOTED.value, 0)),
            flagged=int(events.get(EventKind.FLAGGED.value, 0)),
            converted=int(events.get(EventKind.CONVERTED.value, 0)),
            unsubscribed=int(events.get(EventKind.UNSUBSCRIBED.value, 0)),
            bounced=int(events.get(EventKind.BOUNCED.value, 0)),
            failed=int(failed),
        )

    # -- digest runs ----------------------------------------------------------------------------------

    def scheduled_period_start(self, *, before: datetime) -> datetime:
        """Where the scheduled digest firing at ``before`` starts: the end of the latest
        earlier scheduled digest that reached anyone (or may have), else the beginning."""
        with self.reader.connect() as conn:
            return self._covered_until(conn, before)

    def _covered_until(self, conn: Connection, before: datetime) -> datetime:
        end: datetime | None = conn.execute(
            sa.select(sa.func.max(digest_runs_t.c.period_end)).where(
                digest_runs_t.c.kind == RunKind.SCHEDULED.value,
                digest_runs_t.c.scheduled_for < before,
                digest_runs_t.c.status != RunStatus.FAILED.value,
            )
        ).scalar()
        if end is None:
            return BEGINNING
        # Aggregates bypass the column type: SQLite hands back a naive UTC value.
        return end if end.tzinfo is not None else end.replace(tzinfo=BEGINNING.tzinfo)

    def begin_scheduled_run(
        self, *, fire: datetime, now: datetime, recipients: Sequence[str], lease: timedelta
    ) -> DigestRunRecord | None:
        """Record the scheduled digest for ``fire``, or None when it (or a later one) already is.

        Its period runs from where the previous scheduled digest ended to ``fire``. An
        earlier digest still waiting to retry that has reached nobody is given up, and its
        leads move into this one, so they are sent once, here.
        """
        try:
            with self.engine.begin() as conn:
                later = conn.execute(
                    sa.select(digest_runs_t.c.id).where(digest_runs_t.c.scheduled_for >= fire).limit(1)
                ).first()
                if later is not None:
                    return None
                waiting = conn.execute(
                    sa.select(digest_runs_t.c.id, digest_runs_t.c.deliveries).where(
                        digest_runs_t.c.kind == RunKind.SCHEDULED.value,
                        digest_runs_t.c.status == RunStatus.RETRY.value,
                    )
                ).all()
                superseded = [r.id for r in waiting if not _reached_anyone(r.deliveries or {})]
                if superseded:
                    conn.execute(
                        sa.update(digest_runs_t)
                        # Only if it still waits: another daemon may have just taken it.
                        .where(
                            digest_runs_t.c.id.in_(superseded),
                            digest_runs_t.c.status == RunStatus.RETRY.value,
                        )
                        .values(
                            status=RunStatus.FAILED.value,
                            next_attempt_at=None,
                            error=sa.func.coalesce(digest_runs_t.c.error + "\n", "")
                            + "given up: its leads are in the next scheduled digest",
                            finished_at=now,
                        )
                    )
                start = self._covered_until(conn, fire)
                run_id = conn.execute(
                    sa.insert(digest_runs_t)
                    .values(
                        kind=RunKind.SCHEDULED.value,
                        scheduled_for=fire,
                        period_start=start,
                        period_end=fire,
                        status=RunStatus.PENDING.value,
                        recipients="\n".join(recipients),
                        deliveries={},
                        lease_until=now + lease,
                        created_at=now,
                    )
                    .returning(digest_runs_t.c.id)
                ).scalar_one()
        except sa.exc.IntegrityError:
            # Another daemon on the same database recorded it first.
            return None
        return self.get_digest_run(run_id)

    def begin_manual_run(
        self, *, start: datetime, end: datetime, now: datetime, recipients: Sequence[str], lease: timedelta
    ) -> DigestRunRecord:
        """Record a digest sent by hand; it never changes what a scheduled digest covers."""
        with self.engine.begin() as conn:
            run_id = conn.execute(
                sa.insert(digest_runs_t)
                .values(
                    kind=RunKind.MANUAL.value,
                    period_start=start,
                    period_end=end,
                    status=RunStatus.PENDING.value,
                    recipients="\n".join(recipients),
                    deliveries={},
                    lease_until=now + lease,
                    created_at=now,
                )
                .returning(digest_runs_t.c.id)
            ).scalar_one()
        run = self.get_digest_run(run_id)
        assert run is not None
        return run

    def claim_digest_retry(self, run_id: int, *, now: datetime, lease: timedelta) -> DigestRunRecord | None:
        """Take a run that waits to retry and is due; None when it is not (any more)."""
        with self.engine.begin() as conn:
            taken = conn.execute(
                sa.update(digest_runs_t)
                .where(
                    digest_runs_t.c.id == run_id,
                    digest_runs_t.c.status == RunStatus.RETRY.value,
                    digest_runs_t.c.next_attempt_at <= now,
                )
                .values(status=RunStatus.PENDING.value, lease_until=now + lease)
            ).rowcount
        return self.get_digest_run(run_id) if taken else None

    def settle_unsent(
        self, run_id: int, *, status: RunStatus, now: datetime, error: str | None = None
    ) -> None:
        """Close a run that never left: ``empty`` (nothing was flagged, and empty digests are
        not sent) or ``failed`` (it could not be built)."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(digest_runs_t)
                .where(digest_runs_t.c.id == run_id, digest_runs_t.c.status == RunStatus.PENDING.value)
                .values(
                    status=status.value,
                    leads=0,
                    error=error,
                    lease_until=None,
                    next_attempt_at=None,
                    finished_at=now,
                )
            )

    def mark_digest_sending(
        self, run_id: int, *, now: datetime, lease: timedelta, leads: int, message_id: str
    ) -> bool:
        """Commit that the digest is about to leave. Only when this returns True may it be sent."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    sa.update(digest_runs_t)
                    .where(digest_runs_t.c.id == run_id, digest_runs_t.c.status == RunStatus.PENDING.value)
                    .values(
                        status=RunStatus.SENDING.value,
                        attempts=digest_runs_t.c.attempts + 1,
                        leads=leads,
                        message_id=message_id,
                        lease_until=now + lease,
                    )
                ).rowcount
            )

    def finish_digest_attempt(
        self,
        run_id: int,
        results: Sequence[AttemptResult],
        *,
        now: datetime,
        max_attempts: int,
        backoff: timedelta,
        backoff_max: timedelta,
    ) -> DigestRunRecord:
        """Record each recipient's answer and settle the run's status.

        A recipient whose server was unavailable is tried again with exponential backoff
        until ``max_attempts``; a refusal is final; an unknown outcome is never retried.
        """
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(digest_runs_t).where(digest_runs_t.c.id == run_id)).one()
            deliveries: dict[str, str] = dict(row.deliveries or {})
            problems = [p for p in (row.error or "").split("\n") if p]
            for r in results:
                deliveries[r.address] = r.delivery.value
                if r.delivery != Delivery.SENT and r.detail:
                    problems.append(f"{r.address}: {r.detail}")
            values: dict[str, Any] = {"lease_until": None, "next_attempt_at": None}
            waiting = [a for a, d in deliveries.items() if d == Delivery.RETRY]
            if waiting and row.attempts < max_attempts:
                delay = min(backoff * (2 ** max(row.attempts - 1, 0)), backoff_max)
                values |= {"status": RunStatus.RETRY.value, "next_attempt_at": now + delay}
            else:
                for address in waiting:
                    deliveries[address] = Delivery.FAILED.value
                values |= {"status": _final_status(deliveries).value, "finished_at": now}
            values |= {"deliveries": deliveries, "error": "\n".join(problems[-20:]) or None}
            conn.execute(sa.update(digest_runs_t).where(digest_runs_t.c.id == run_id).values(values))
        run = self.get_digest_run(run_id)
        assert run is not None
        return run

    def recover_digest_runs(self, *, now: datetime, exclusive: bool) -> list[DigestRunRecord]:
        """Settle runs whose sender stopped: returns those that were on the wire (now unknown).

        A run that was ``sending`` becomes ``unknown`` and is never resent by itself; one
        still ``pending`` had sent nothing and is tried again (a scheduled run) or failed
        (a run by hand, whose command is gone).

        :param exclusive: True when this daemon alone sends scheduled digests on this
            database (SQLite): its runs left over are orphaned whatever their lease. Runs
            by hand, and every run on a shared database, wait for their lease to run out.
        """
        stale = digest_runs_t.c.lease_until < now
        if exclusive:
            stale = sa.or_(stale, digest_runs_t.c.kind == RunKind.SCHEDULED.value)
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(digest_runs_t).where(
                    digest_runs_t.c.status.in_([RunStatus.PENDING.value, RunStatus.SENDING.value]), stale
                )
            ).all()
            orphans: list[int] = []
            for row in rows:
                deliveries = dict(row.deliveries or {})
                if row.status == RunStatus.SENDING.value:
                    for recipient in _split_recipients(row.recipients):
                        address = address_of(recipient)
                        if deliveries.get(address) not in SETTLED:
                            deliveries[address] = Delivery.UNKNOWN.value
                    values: dict[str, Any] = {
                        "status": _final_status(deliveries).value,
                        "deliveries": deliveries,
                        "error": STOPPED_DETAIL,
                        "finished_at": now,
                    }
                    orphans.append(row.id)
                elif row.kind == RunKind.SCHEDULED.value:
                    values = {"status": RunStatus.RETRY.value, "next_attempt_at": now}
                else:
                    values = {
                        "status": RunStatus.FAILED.value,
                        "error": "the command stopped before the digest was sent",
                        "finished_at": now,
                    }
                conn.execute(
                    sa.update(digest_runs_t)
                    .where(digest_runs_t.c.id == row.id, digest_runs_t.c.status == row.status)
                    .values(lease_until=None, **values)
                )
        return [run for run in (self.get_digest_run(i) for i in orphans) if run is not None]

    def due_digest_retries(self, *, now: datetime) -> list[DigestRunRecord]:
        with self.reader.connect() as conn:
            rows = conn.execute(
                sa.select(digest_runs_t)
                .where(
                    digest_runs_t.c.status == RunStatus.RETRY.value,
                    digest_runs_t.c.next_attempt_at <= now,
                )
                .order_by(digest_runs_t.c.scheduled_for)
            ).all()
        return [_run(r) for r in rows]

    def next_digest_wakeup(self) -> datetime | None:
        """When a run next needs looking at: a retry falls due, or a stopped sender's lease
        runs out."""
        with self.reader.connect() as conn:
            retry = conn.execute(
                sa.select(sa.func.min(digest_runs_t.c.next_attempt_at)).where(
                    digest_runs_t.c.status == RunStatus.RETRY.value
                )
            ).scalar()
            lease = conn.execute(
                sa.select(sa.func.min(digest_runs_t.c.lease_until)).where(
                    digest_runs_t.c.status.in_([RunStatus.PENDING.value, RunStatus.SENDING.value])
                )
            ).scalar()
        times = [
            t if t.tzinfo is not None else t.replace(tzinfo=BEGINNING.tzinfo) for t in (retry, lease) if t
        ]
        return min(times) if times else None

    def get_digest_run(self, run_id: int) -> DigestRunRecord | None:
        with self.reader.connect() as conn:
            row = conn.execute(sa.select(digest_runs_t).where(digest_runs_t.c.id == run_id)).first()
        return None if row is None else _run(row)

    def digest_runs(self, *, limit: int = 20, kind: str | None = None) -> list[DigestRunRecord]:
        """The latest digest runs, newest first."""
        query = sa.select(digest_runs_t).order_by(
            digest_runs_t.c.created_at.desc(), digest_runs_t.c.id.desc()
        )
        if kind:
            query = query.where(digest_runs_t.c.kind == kind)
        with self.reader.connect() as conn:
            return [_run(r) for r in conn.execute(query.limit(limit))]


def address_of(recipient: str) -> str:
    """The bare address of a recipient as configured (``Sales <s@x.com>`` gives ``s@x.com``)."""
    return parseaddr(recipient)[1]


def _final_status(deliveries: Mapping[str, str]) -> RunStatus:
    values = list(deliveries.values())
    sent = values.count(Delivery.SENT.value)
    if values and sent == len(values):
        return RunStatus.SENT
    if sent:
        return RunStatus.PARTIAL
    if Delivery.UNKNOWN.value in values:
        return RunStatus.UNKNOWN
    return RunStatus.FAILED
