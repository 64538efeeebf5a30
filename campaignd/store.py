"""Store: every query campaignd runs, with methods named for what they mean.

The only module that builds SQL or opens transactions. It returns plain read models
(frozen dataclasses), never live ORM rows. Where a write depends on a decision (what a
touch does to a lead, what is due), it asks the pure core in ``sequences.py`` inside the
same transaction, so a decision and its write can never be split by another writer.

Claiming is written for several daemons sharing one PostgreSQL database: due leads are
locked with ``FOR UPDATE SKIP LOCKED``, and the unique (lead, tier, step) key on touches
makes a second touch of one step impossible whatever the timing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from campaignd import sequences as core
from campaignd.exceptions import CampaigndError, UnknownLead
from campaignd.models import Lead, LeadStatus, Meta, Suppression, SuppressionReason, Touch, TouchStatus

logger = logging.getLogger(__name__)

leads_t: sa.Table = Lead.__table__  # type: ignore[attr-defined]
touches_t: sa.Table = Touch.__table__  # type: ignore[attr-defined]
suppressions_t: sa.Table = Suppression.__table__  # type: ignore[attr-defined]
meta_t: sa.Table = Meta.__table__  # type: ignore[attr-defined]

CONTACT_FIELDS = (
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
)
_CHUNK = 500


# -- read models -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeadRecord:
    id: int
    email: str
    first_name: str
    last_name: str
    company: str
    phone: str
    address_line1: str
    address_line2: str
    city: str
    region: str
    postal_code: str
    country: str
    timezone: str
    tier: str
    status: str
    touch_count: int
    tier_since: datetime
    last_touch_at: datetime | None
    next_step: str | None
    next_due_at: datetime | None
    flagged_at: datetime | None
    flag_reason: str | None
    custom: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}".strip()

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class TouchRecord:
    id: int
    lead_id: int
    tier: str
    step: str | None
    channel: str
    template: str | None
    status: str
    attempts: int
    message_id: str | None
    error: str | None
    note: str | None
    created_at: datetime
    sent_at: datetime | None
    next_attempt_at: datetime | None
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class SuppressionRecord:
    email: str
    reason: str
    detail: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class LeadInput:
    """One validated lead from an import: contact fields only, never state."""

    email: str
    first_name: str = ""
    last_name: str = ""
    company: str = ""
    phone: str = ""
    address_line1: str = ""
    address_line2: str = ""
    city: str = ""
    region: str = ""
    postal_code: str = ""
    country: str = ""
    timezone: str = ""
    tier: str | None = None
    custom: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class UpsertCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    suppressed: int = 0
    """Of the inserted, how many arrived already suppressed (kept that way)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A step claimed for sending by this daemon."""

    touch_id: int
    lead: LeadRecord
    tier: str
    step: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Result:
    """What happened to one claimed touch, as the dispatcher reports it."""

    touch_id: int
    outcome: str  # "sent" | "temporary" | "permanent" | "rejected" | "unknown" | "skipped"
    detail: str = ""
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    """What recording one result did, for the log."""

    touch_id: int
    email: str
    tier: str
    step: str
    status: str
    touch_count: int = 0
    promoted: bool = False
    flagged: bool = False
    retry_at: datetime | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ClaimPass:
    claims: list[Claim]
    planned: int
    """Leads looked at that were not due after all (rescheduled or finished)."""


@dataclass(frozen=True, slots=True)
class StatusReport:
    by_tier_status: dict[tuple[str, str], int]
    due_now: int
    next_due_at: datetime | None
    sent_last_day: int
    touches_by_status: dict[str, int]
    unknown: list[tuple[TouchRecord, str]]
    failed: list[tuple[TouchRecord, str]]
    flagged_recent: list[LeadRecord]
    suppressed: int


class Store:
    """All reads and writes of the lead database.

    :param engine: a SQLAlchemy engine from :func:`campaignd.database.create_engine`.
    """

    def __init__(self, *, engine: Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self.is_postgres else sqlite.insert)(table)

    # -- leads: import -------------------------------------------------------------------

    def upsert_leads(
        self, rows: Sequence[LeadInput], *, tier: str, now: datetime, dry_run: bool = False
    ) -> UpsertCounts:
        """Insert new leads and update the contact fields of known ones.

        An import never resets a known lead's tier, status, touch count or history, and
        a new lead whose address is suppressed arrives already unsubscribed or bounced.
        Rows are matched on the normalised email; within ``rows`` the last one wins.
        """
        counts = UpsertCounts()
        latest: dict[str, LeadInput] = {}
        for row in rows:
            latest[row.email] = row
        emails = list(latest)
        with self.engine.begin() as conn:
            for start in range(0, len(emails), _CHUNK):
                chunk = emails[start : start + _CHUNK]
                self._upsert_chunk(conn, [latest[e] for e in chunk], tier, now, counts)
            if dry_run:
                conn.rollback()
        return counts

    def _upsert_chunk(
        self, conn: Connection, rows: list[LeadInput], tier: str, now: datetime, counts: UpsertCounts
    ) -> None:
        emails = [r.email for r in rows]
        cols = [leads_t.c.id, leads_t.c.email, leads_t.c.custom] + [leads_t.c[f] for f in CONTACT_FIELDS]
        existing = {r.email: r for r in conn.execute(sa.select(*cols).where(leads_t.c.email.in_(emails)))}
        suppressed = dict(
            conn.execute(
                sa.select(suppressions_t.c.email, suppressions_t.c.reason).where(
                    suppressions_t.c.email.in_(emails)
                )
            ).all()
        )
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for row in rows:
            old = existing.get(row.email)
            if old is None:
                status = LeadStatus.ACTIVE.value
                if row.email in suppressed:
                    counts.suppressed += 1
                    status = (
                        LeadStatus.BOUNCED.value
                        if suppressed[row.email] == SuppressionReason.BOUNCED
                        else LeadStatus.UNSUBSCRIBED.value
                    )
                inserts.append(
                    {
                        "email": row.email,
                        **{f: getattr(row, f) for f in CONTACT_FIELDS},
                        "custom": row.custom,
                        "tier": row.tier or tier,
                        "status": status,
                        "touch_count": 0,
                        "tier_since": now,
                        # Due at once: the next dispatch pass plans it with the core.
                        "next_due_at": now if status == LeadStatus.ACTIVE else None,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
                continue
            # Blank cells never erase what is stored; custom fields merge.
            changes = {
                f: getattr(row, f)
                for f in CONTACT_FIELDS
                if getattr(row, f) and getattr(row, f) != getattr(old, f)
            }
            merged_custom = {**(old.custom or {}), **row.custom}
            if merged_custom != (old.custom or {}):
                changes["custom"] = merged_custom
            if changes:
                updates.append({"b_id": old.id, **changes})
            else:
                counts.unchanged += 1
        if inserts:
            conn.execute(sa.insert(leads_t), inserts)
            counts.inserted += len(inserts)
        # Group updates by the set of changed columns so each group is one executemany.
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for upd in updates:
            groups.setdefault(tuple(sorted(k for k in upd if k != "b_id")), []).append(upd)
        for keys, params in groups.items():
            values: dict[str, Any] = {k: sa.bindparam(k) for k in keys}
            values["updated_at"] = now
            conn.execute(
                sa.update(leads_t).where(leads_t.c.id == sa.bindparam("b_id")).values(values),
                params,
            )
            counts.updated += len(params)

    # -- leads: reading ----------------------------------------------------------------------

    def get_lead(self, email: str) -> LeadRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(leads_t).where(leads_t.c.email == email.strip().lower())).first()
        if row is None:
            raise UnknownLead(f"no lead with the address {email!r}")
        return _lead(row)

    def find_lead(self, lead_id: int) -> LeadRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(leads_t).where(leads_t.c.id == lead_id)).first()
        return None if row is None else _lead(row)

    def list_leads(
        self,
        *,
        tier: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        active_only: bool = False,
    ) -> Iterator[LeadRecord]:
        query = sa.select(leads_t).order_by(leads_t.c.id)
        if tier:
            query = query.where(leads_t.c.tier == tier)
        if status:
            query = query.where(leads_t.c.status == status)
        if active_only:
            query = query.where(leads_t.c.status == LeadStatus.ACTIVE.value)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=1000).execute(query)
            for row in result:
                yield _lead(row)

    def count_leads(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(leads_t)).scalar_one())

    def touches_for(self, lead_id: int) -> list[TouchRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(touches_t)
                .where(touches_t.c.lead_id == lead_id)
                .order_by(sa.func.coalesce(touches_t.c.sent_at, touches_t.c.created_at), touches_t.c.id)
            )
            return [_touch(r) for r in rows]

    def lead_state(self, lead: LeadRecord) -> core.LeadState:
        with self.engine.connect() as conn:
            return self._states(conn, [lead.id])[lead.id]

    def lead_states(self, leads: Sequence[LeadRecord]) -> dict[int, core.LeadState]:
        with self.engine.connect() as conn:
            return self._states(conn, [lead.id for lead in leads])

    def _states(self, conn: Connection, lead_ids: Sequence[int]) -> dict[int, core.LeadState]:
        if not lead_ids:
            return {}
        rows = conn.execute(sa.select(leads_t).where(leads_t.c.id.in_(lead_ids))).all()
        touches: dict[int, list[core.TouchView]] = {}
        for t in conn.execute(
            sa.select(
                touches_t.c.lead_id,
                touches_t.c.tier,
                touches_t.c.step,
                touches_t.c.status,
                touches_t.c.created_at,
                touches_t.c.sent_at,
                touches_t.c.lease_until,
                touches_t.c.next_attempt_at,
            )
            .where(touches_t.c.lead_id.in_(lead_ids))
            .order_by(touches_t.c.id)
        ):
            touches.setdefault(t.lead_id, []).append(
                core.TouchView(
                    t.tier, t.step, t.status, t.sent_at or t.created_at, t.lease_until, t.next_attempt_at
                )
            )
        emails = [r.email for r in rows]
        suppressed = set(
            conn.execute(
                sa.select(suppressions_t.c.email).where(suppressions_t.c.email.in_(emails))
            ).scalars()
        )
        return {
            r.id: core.LeadState(
                tier=r.tier,
                status=r.status,
                touch_count=r.touch_count,
                tier_since=r.tier_since,
                last_touch_at=r.last_touch_at,
                timezone=r.timezone,
                suppressed=r.email in suppressed,
                touches=tuple(touches.get(r.id, ())),
            )
            for r in rows
        }

    # -- leads: changes by hand ---------------------------------------------------------------

    def set_tier(self, email: str, tier: str, *, now: datetime) -> LeadRecord:
        """Move a lead to ``tier``; its sequence for that tier starts now."""
        lead = self.get_lead(email)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(leads_t)
                .where(leads_t.c.id == lead.id)
                .values(tier=tier, tier_since=now, next_step=None, next_due_at=now, updated_at=now)
            )
        return self.get_lead(email)

    def set_status(
        self,
        email: str,
        status: LeadStatus,
        *,
        now: datetime,
        reason: str | None = None,
        expect: Iterable[LeadStatus] | None = None,
    ) -> LeadRecord:
        """Change a lead's status; pending claimed work for it is cancelled when it stops.

        :param expect: statuses the lead must be in for the change to make sense.
        """
        lead = self.get_lead(email)
        if expect is not None and lead.status not in {s.value for s in expect}:
            allowed = ", ".join(s.value for s in expect)
            raise CampaigndError(
                f"{lead.email} is {lead.status}; this applies only to leads that are {allowed}"
            )
        values: dict[str, Any] = {"status": status.value, "updated_at": now}
        if status == LeadStatus.FLAGGED:
            values |= {"flagged_at": now, "flag_reason": reason or "flagged by hand"}
        if status == LeadStatus.ACTIVE:
            values |= {"next_due_at": now, "next_step": None}
            if lead.status == LeadStatus.FLAGGED:
                values |= {"flagged_at": None, "flag_reason": None}
        else:
            values |= {"next_due_at": None}
        with self.engine.begin() as conn:
            conn.execute(sa.update(leads_t).where(leads_t.c.id == lead.id).values(values))
            if status != LeadStatus.ACTIVE:
                self._cancel_pending(conn, [lead.id], now, f"lead {status.value}")
        return self.get_lead(email)

    def _cancel_pending(self, conn: Connection, lead_ids: list[int], now: datetime, why: str) -> None:
        # Only work that has not started to leave: a 'sending' touch may be on the wire.
        conn.execute(
            sa.update(touches_t)
            .where(
                touches_t.c.lead_id.in_(lead_ids),
                touches_t.c.status.in_([TouchStatus.CLAIMED.value, TouchStatus.RETRY.value]),
            )
            .values(status=TouchStatus.CANCELLED.value, error=why, lease_until=None, updated_at=now)
        )

    def log_manual_touch(
        self, email: str, *, channel: str, note: str, at: datetime, policy: core.Policy
    ) -> tuple[LeadRecord, core.AfterTouch]:
        """Record a touch made by hand (a call, a meeting, a letter); it counts like any other."""
        lead = self.get_lead(email)
        with self.engine.begin() as conn:
            self._lock_leads(conn, [lead.id])
            state = self._states(conn, [lead.id])[lead.id]
            after = core.apply_touch(state, policy, at=at, tier=state.tier, step=None)
            conn.execute(
                sa.insert(touches_t).values(
                    lead_id=lead.id,
                    tier=state.tier,
                    step=None,
                    channel=channel,
                    template=None,
                    status=TouchStatus.SENT.value,
                    attempts=0,
                    note=note,
                    created_at=at,
                    sent_at=at,
                    updated_at=at,
                )
            )
            self._write_after(conn, lead.id, after, now=at)
        return self.get_lead(email), after

    def _write_after(self, conn: Connection, lead_id: int, after: core.AfterTouch, *, now: datetime) -> None:
        values: dict[str, Any] = {
            "touch_count": after.touch_count,
            "tier": after.tier,
            "tier_since": after.tier_since,
            "status": after.status,
            "last_touch_at": after.last_touch_at,
            "updated_at": now,
            # Re-planned by the next dispatch pass.
            "next_step": None,
            "next_due_at": now if after.status == LeadStatus.ACTIVE else None,
        }
        if after.flagged:
            values |= {"flagged_at": after.flagged_at, "flag_reason": after.flag_reason}
        conn.execute(sa.update(leads_t).where(leads_t.c.id == lead_id).values(values))

    def _lock_leads(self, conn: Connection, lead_ids: list[int]) -> None:
        if self.is_postgres and lead_ids:
            conn.execute(
                sa.select(leads_t.c.id)
                .where(leads_t.c.id.in_(lead_ids))
                .order_by(leads_t.c.id)
                .with_for_update()
            ).all()

    # -- suppression --------------------------------------------------------------------------

    def suppress(self, email: str, *, reason: SuppressionReason, detail: str, now: datetime) -> bool:
        """Put an address on the suppression list; stop its lead. False if already there."""
        email = email.strip().lower()
        with self.engine.begin() as conn:
            added = self._suppress(conn, email, reason, detail, now)
            lead_id = conn.execute(sa.select(leads_t.c.id).where(leads_t.c.email == email)).scalar()
            if lead_id is not None:
                status = (
                    LeadStatus.BOUNCED if reason == SuppressionReason.BOUNCED else LeadStatus.UNSUBSCRIBED
                )
                conn.execute(
                    sa.update(leads_t)
                    .where(leads_t.c.id == lead_id, leads_t.c.status.notin_([LeadStatus.CONVERTED.value]))
                    .values(status=status.value, next_due_at=None, updated_at=now)
                )
                self._cancel_pending(conn, [lead_id], now, f"address {reason.value}")
        return added

    def _suppress(
        self, conn: Connection, email: str, reason: SuppressionReason, detail: str, now: datetime
    ) -> bool:
        stmt = (
            self._insert(suppressions_t)
            .values(email=email, reason=reason.value, detail=detail, created_at=now)
            .on_conflict_do_nothing(index_elements=["email"])
        )
        return bool(conn.execute(stmt).rowcount)

    def unsuppress(self, email: str) -> SuppressionRecord | None:
        """Take an address off the list. The lead stays as it is: resuming it is a separate act."""
        email = email.strip().lower()
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(suppressions_t).where(suppressions_t.c.email == email)).first()
            if row is None:
                return None
            conn.execute(sa.delete(suppressions_t).where(suppressions_t.c.email == email))
        return SuppressionRecord(row.email, row.reason, row.detail, row.created_at)

    def suppressions(self) -> list[SuppressionRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(suppressions_t).order_by(suppressions_t.c.created_at))
            return [SuppressionRecord(r.email, r.reason, r.detail, r.created_at) for r in rows]

    def is_suppressed(self, email: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    sa.select(suppressions_t.c.email).where(suppressions_t.c.email == email.strip().lower())
                ).first()
                is not None
            )

    # -- plan bookkeeping ----------------------------------------------------------------------

    def replan_if_changed(self, fingerprint: str, *, now: datetime) -> int:
        """When the sequences or rules changed, make every active lead due for re-planning."""
        with self.engine.begin() as conn:
            old = conn.execute(sa.select(meta_t.c.value).where(meta_t.c.key == "plan")).scalar()
            if old == fingerprint:
                return 0
            result = conn.execute(
                sa.update(leads_t)
                .where(leads_t.c.status == LeadStatus.ACTIVE.value)
                .values(next_step=None, next_due_at=now)
            )
            if old is None:
                conn.execute(sa.insert(meta_t).values(key="plan", value=fingerprint))
            else:
                conn.execute(sa.update(meta_t).where(meta_t.c.key == "plan").values(value=fingerprint))
            return int(result.rowcount)

    # -- dispatch ---------------------------------------------------------------------------------

    def recover_in_flight(self, *, now: datetime, exclusive: bool) -> list[TouchRecord]:
        """Mark touches that were on the wire when a daemon died as ``unknown``.

        :param exclusive: True when this daemon is the only one on the database (SQLite):
            then every ``sending`` touch is orphaned. Otherwise only those whose lease has
            run out are.
        """
        cond = [touches_t.c.status == TouchStatus.SENDING.value]
        if not exclusive:
            cond.append(touches_t.c.lease_until < now)
        with self.engine.begin() as conn:
            rows = [_touch(r) for r in conn.execute(sa.select(touches_t).where(*cond))]
            if rows:
                ids = [r.id for r in rows]
                conn.execute(
                    sa.update(touches_t)
                    .where(touches_t.c.id.in_(ids), touches_t.c.status == TouchStatus.SENDING.value)
                    .values(
                        status=TouchStatus.UNKNOWN.value,
                        error="the daemon stopped while this message was being sent; it may or may "
                        "not have been delivered (check, then 'campaignd touches retry ID' to resend)",
                        lease_until=None,
                        updated_at=now,
                    )
                )
                conn.execute(
                    sa.update(leads_t)
                    .where(leads_t.c.id.in_({r.lead_id for r in rows}))
                    .values(next_due_at=None, next_step=None, updated_at=now)
                )
        return rows

    def claim(self, *, policy: core.Policy, now: datetime, limit: int, worker: str) -> ClaimPass:
        """Claim up to ``limit`` due steps for ``worker`` under a lease.

        Leads that turn out not to be due (not yet, window shut, sequence finished) are
        rescheduled in the same transaction, so every pass makes progress.
        """
        lease_until = now + policy.lease
        with self.engine.begin() as conn:
            query = (
                sa.select(leads_t)
                .where(leads_t.c.status == LeadStatus.ACTIVE.value, leads_t.c.next_due_at <= now)
                .order_by(leads_t.c.next_due_at, leads_t.c.id)
                .limit(limit)
            )
            if self.is_postgres:
                query = query.with_for_update(skip_locked=True, of=leads_t)
            leads = {r.id: _lead(r) for r in conn.execute(query)}
            if not leads:
                return ClaimPass([], 0)
            states = self._states(conn, list(leads))
            wanted: list[tuple[LeadRecord, core.NextTouch]] = []
            reschedule: list[dict[str, Any]] = []
            for lead_id, lead in leads.items():
                decision = core.decide(states[lead_id], policy, now=now)
                if isinstance(decision, core.Send):
                    wanted.append((lead, decision.touch))
                elif isinstance(decision, core.Wait):
                    step = decision.touch.step.id if decision.touch else None
                    reschedule.append({"b_id": lead_id, "b_step": step, "b_due": decision.until})
                else:
                    reschedule.append({"b_id": lead_id, "b_step": None, "b_due": None})
            claims: list[Claim] = []
            if wanted:
                rows = [
                    {
                        "lead_id": lead.id,
                        "tier": nt.tier,
                        "step": nt.step.id,
                        "channel": nt.step.channel.value,
                        "template": nt.step.template,
                        "status": TouchStatus.CLAIMED.value,
                        "attempts": 0,
                        "claimed_by": worker,
                        "lease_until": lease_until,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for lead, nt in wanted
                ]
                excluded = sa.table("excluded", sa.column("claimed_by"), sa.column("lease_until"))
                stmt = (
                    self._insert(touches_t)
                    .values(rows)
                    .on_conflict_do_update(
                        index_elements=["lead_id", "tier", "step"],
                        set_={
                            "status": TouchStatus.CLAIMED.value,
                            "claimed_by": excluded.c.claimed_by,
                            "lease_until": excluded.c.lease_until,
                            "updated_at": now,
                        },
                        where=sa.or_(
                            touches_t.c.status == TouchStatus.RETRY.value,
                            sa.and_(
                                touches_t.c.status == TouchStatus.CLAIMED.value,
                                touches_t.c.lease_until < now,
                            ),
                        ),
                    )
                    .returning(touches_t.c.id, touches_t.c.lead_id, touches_t.c.attempts)
                )
                got = {r.lead_id: r for r in conn.execute(stmt)}
                for lead, nt in wanted:
                    hit = got.get(lead.id)
                    if hit is None:
                        # The slot is taken after all (another daemon, a stale plan):
                        # look again on the next pass rather than guess.
                        reschedule.append({"b_id": lead.id, "b_step": None, "b_due": now + policy.lease})
                        continue
                    claims.append(Claim(hit.id, lead, nt.tier, nt.step.id, hit.attempts))
                    reschedule.append({"b_id": lead.id, "b_step": nt.step.id, "b_due": lease_until})
            if reschedule:
                conn.execute(
                    sa.update(leads_t)
                    .where(leads_t.c.id == sa.bindparam("b_id"))
                    .values(next_step=sa.bindparam("b_step"), next_due_at=sa.bindparam("b_due")),
                    reschedule,
                )
        return ClaimPass(claims, len(leads) - len(claims))

    def mark_sending(
        self, touch_ids: Sequence[int], *, worker: str, now: datetime, lease: timedelta
    ) -> set[int]:
        """Commit that these touches are about to leave. Only what this returns may be sent."""
        if not touch_ids:
            return set()
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.update(touches_t)
                .where(
                    touches_t.c.id.in_(touch_ids),
                    touches_t.c.status == TouchStatus.CLAIMED.value,
                    touches_t.c.claimed_by == worker,
                )
                .values(
                    status=TouchStatus.SENDING.value,
                    attempts=touches_t.c.attempts + 1,
                    lease_until=now + lease,
                    updated_at=now,
                )
                .returning(touches_t.c.id)
            )
            return set(rows.scalars())

    def release(self, touch_ids: Sequence[int], *, worker: str, now: datetime) -> int:
        """Give back claimed work that never started to leave (on shutdown)."""
        if not touch_ids:
            return 0
        with self.engine.begin() as conn:
            rows = (
                conn.execute(
                    sa.update(touches_t)
                    .where(
                        touches_t.c.id.in_(touch_ids),
                        touches_t.c.status == TouchStatus.CLAIMED.value,
                        touches_t.c.claimed_by == worker,
                    )
                    .values(lease_until=now, updated_at=now)
                    .returning(touches_t.c.lead_id)
                )
                .scalars()
                .all()
            )
            if rows:
                conn.execute(sa.update(leads_t).where(leads_t.c.id.in_(rows)).values(next_due_at=now))
            return len(rows)

    def record(
        self,
        results: Sequence[Result],
        *,
        policy: core.Policy,
        now: datetime,
        max_attempts: int,
        backoff: timedelta,
        backoff_max: timedelta,
    ) -> list[Recorded]:
        """Record what happened to touches that were ``sending``, and what it does to their leads."""
        if not results:
            return []
        by_id = {r.touch_id: r for r in results}
        out: list[Recorded] = []
        with self.engine.begin() as conn:
            touch_rows = {
                t.id: t for t in conn.execute(sa.select(touches_t).where(touches_t.c.id.in_(list(by_id))))
            }
            lead_ids = sorted({t.lead_id for t in touch_rows.values()})
            self._lock_leads(conn, lead_ids)
            states = self._states(conn, lead_ids)
            emails = dict(
                conn.execute(sa.select(leads_t.c.id, leads_t.c.email).where(leads_t.c.id.in_(lead_ids))).all()
            )
            touch_updates: list[dict[str, Any]] = []
            lead_updates: list[dict[str, Any]] = []
            for touch_id, result in by_id.items():
                t = touch_rows.get(touch_id)
                # A result for work that never left (rendering failed) may come from 'claimed'.
                allowed = {TouchStatus.SENDING.value}
                if result.outcome in ("rejected", "skipped"):
                    allowed.add(TouchStatus.CLAIMED.value)
                if t is None or t.status not in allowed:
                    logger.warning(
                        "touch %s is %s, not sending; result %s ignored",
                        touch_id,
                        t.status if t else "missing",
                        result.outcome,
                    )
                    continue
                state = states[t.lead_id]
                others = tuple(v for v in state.touches if not (v.tier == t.tier and v.step == t.step))
                base = core.LeadState(
                    tier=state.tier,
                    status=state.status,
                    touch_count=state.touch_count,
                    tier_since=state.tier_since,
                    last_touch_at=state.last_touch_at,
                    timezone=state.timezone,
                    suppressed=state.suppressed,
                    touches=others,
                )
                email = emails[t.lead_id]
                upd: dict[str, Any] = {
                    "b_id": t.id,
                    "lease_until": None,
                    "updated_at": now,
                    "error": result.detail or None,
                    "next_attempt_at": None,
                    "message_id": result.message_id or t.message_id,
                    "sent_at": None,
                }
                if result.outcome == "sent":
                    after = core.apply_touch(base, policy, at=now, tier=t.tier, step=t.step)
                    new_state = core.with_touch(base, after, core.TouchView(t.tier, t.step, "sent", now))
                    nxt = core.next_touch(new_state, policy)
                    upd |= {"status": TouchStatus.SENT.value, "sent_at": now, "error": None}
                    lead_upd = {
                        "b_id": t.lead_id,
                        "touch_count": after.touch_count,
                        "tier": after.tier,
                        "tier_since": after.tier_since,
                        "status": after.status,
                        "last_touch_at": after.last_touch_at,
                        "flagged_at": after.flagged_at if after.flagged else None,
                        "flag_reason": after.flag_reason if after.flagged else None,
                        "next_step": nxt.step.id if nxt else None,
                        "next_due_at": nxt.due_at if nxt else None,
                        "updated_at": now,
                    }
                    if not after.flagged:
                        lead_upd.pop("flagged_at")
                        lead_upd.pop("flag_reason")
                    lead_updates.append(lead_upd)
                    states[t.lead_id] = new_state
                    out.append(
                        Recorded(
                            t.id,
                            email,
                            t.tier,
                            t.step,
                            "sent",
                            after.touch_count,
                            after.promoted,
                            after.flagged,
                        )
                    )
                elif result.outcome == "temporary" and t.attempts < max_attempts:
                    delay = min(backoff * (2 ** max(t.attempts - 1, 0)), backoff_max)
                    retry_at = now + delay
                    upd |= {"status": TouchStatus.RETRY.value, "next_attempt_at": retry_at}
                    lead_updates.append(
                        {"b_id": t.lead_id, "next_step": t.step, "next_due_at": retry_at, "updated_at": now}
                    )
                    out.append(
                        Recorded(
                            t.id, email, t.tier, t.step, "retry", retry_at=retry_at, detail=result.detail
                        )
                    )
                elif result.outcome == "permanent":
                    upd |= {"status": TouchStatus.FAILED.value}
                    self._suppress(conn, email, SuppressionReason.BOUNCED, result.detail, now)
                    lead_updates.append(
                        {
                            "b_id": t.lead_id,
                            "status": LeadStatus.BOUNCED.value,
                            "next_step": None,
                            "next_due_at": None,
                            "updated_at": now,
                        }
                    )
                    out.append(Recorded(t.id, email, t.tier, t.step, "bounced", detail=result.detail))
                elif result.outcome == "skipped":
                    upd |= {"status": "skipped"}
                    new_state = core.LeadState(
                        **{
                            **_state_dict(base),
                            "touches": (*base.touches, core.TouchView(t.tier, t.step, "skipped", now)),
                        }
                    )
                    nxt = core.next_touch(new_state, policy)
                    lead_updates.append(
                        {
                            "b_id": t.lead_id,
                            "next_step": nxt.step.id if nxt else None,
                            "next_due_at": nxt.due_at if nxt else None,
                            "updated_at": now,
                        }
                    )
                    out.append(Recorded(t.id, email, t.tier, t.step, "skipped", detail=result.detail))
                else:
                    status = TouchStatus.UNKNOWN if result.outcome == "unknown" else TouchStatus.FAILED
                    upd |= {"status": status.value}
                    lead_updates.append(
                        {"b_id": t.lead_id, "next_step": None, "next_due_at": None, "updated_at": now}
                    )
                    out.append(Recorded(t.id, email, t.tier, t.step, status.value, detail=result.detail))
                touch_updates.append(upd)
            _executemany_update(conn, touches_t, touch_updates)
            _executemany_update(conn, leads_t, lead_updates)
        return out

    def retry_touches(self, touch_ids: Sequence[int], *, now: datetime) -> list[TouchRecord]:
        """Re-queue ``unknown`` or ``failed`` touches after the operator has checked them."""
        with self.engine.begin() as conn:
            rows = [
                _touch(r)
                for r in conn.execute(
                    sa.select(touches_t).where(
                        touches_t.c.id.in_(touch_ids),
                        touches_t.c.status.in_([TouchStatus.UNKNOWN.value, TouchStatus.FAILED.value]),
                        touches_t.c.step.is_not(None),
                    )
                )
            ]
            if rows:
                conn.execute(
                    sa.update(touches_t)
                    .where(touches_t.c.id.in_([r.id for r in rows]))
                    .values(status=TouchStatus.RETRY.value, next_attempt_at=now, attempts=0, updated_at=now)
                )
                conn.execute(
                    sa.update(leads_t)
                    .where(leads_t.c.id.in_({r.lead_id for r in rows}))
                    .values(next_due_at=now, updated_at=now)
                )
        return rows

    def get_touch(self, touch_id: int) -> TouchRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(touches_t).where(touches_t.c.id == touch_id)).first()
        return None if row is None else _touch(row)

    # -- seeing what it does ---------------------------------------------------------------------

    def status_report(self, *, now: datetime, recent: timedelta = timedelta(days=1)) -> StatusReport:
        since = now - recent
        with self.engine.connect() as conn:
            by = {
                (r.tier, r.status): r.n
                for r in conn.execute(
                    sa.select(leads_t.c.tier, leads_t.c.status, sa.func.count().label("n")).group_by(
                        leads_t.c.tier, leads_t.c.status
                    )
                )
            }
            active_due = [leads_t.c.status == LeadStatus.ACTIVE.value, leads_t.c.next_due_at.is_not(None)]
            due_now = conn.execute(
                sa.select(sa.func.count()).where(*active_due, leads_t.c.next_due_at <= now)
            ).scalar_one()
            next_due = conn.execute(
                sa.select(sa.func.min(leads_t.c.next_due_at)).where(*active_due, leads_t.c.next_due_at > now)
            ).scalar()
            if next_due is not None and next_due.tzinfo is None:
                from datetime import UTC

                next_due = next_due.replace(tzinfo=UTC)
            sent = conn.execute(
                sa.select(sa.func.count()).where(
                    touches_t.c.status == TouchStatus.SENT.value, touches_t.c.sent_at >= since
                )
            ).scalar_one()
            touch_status: dict[str, int] = {
                r[0]: int(r[1])
                for r in conn.execute(
                    sa.select(touches_t.c.status, sa.func.count()).group_by(touches_t.c.status)
                )
            }

            def attention(status: TouchStatus) -> list[tuple[TouchRecord, str]]:
                rows = conn.execute(
                    sa.select(touches_t, leads_t.c.email.label("lead_email"))
                    .join(leads_t, leads_t.c.id == touches_t.c.lead_id)
                    .where(touches_t.c.status == status.value)
                    .order_by(touches_t.c.id)
                    .limit(200)
                )
                return [(_touch(r), r.lead_email) for r in rows]

            flagged = [
                _lead(r)
                for r in conn.execute(
                    sa.select(leads_t)
                    .where(leads_t.c.flagged_at >= since, leads_t.c.status == LeadStatus.FLAGGED.value)
                    .order_by(leads_t.c.flagged_at.desc())
                    .limit(200)
                )
            ]
            suppressed = conn.execute(sa.select(sa.func.count()).select_from(suppressions_t)).scalar_one()
            return StatusReport(
                by_tier_status=by,
                due_now=int(due_now),
                next_due_at=next_due,
                sent_last_day=int(sent),
                touches_by_status={k: int(v) for k, v in touch_status.items()},
                unknown=attention(TouchStatus.UNKNOWN),
                failed=attention(TouchStatus.FAILED),
                flagged_recent=flagged,
                suppressed=int(suppressed),
            )


def _executemany_update(conn: Connection, table: sa.Table, params: list[dict[str, Any]]) -> None:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for p in params:
        groups.setdefault(tuple(sorted(k for k in p if k != "b_id")), []).append(p)
    for keys, rows in groups.items():
        conn.execute(
            sa.update(table)
            .where(table.c.id == sa.bindparam("b_id"))
            .values({k: sa.bindparam(k) for k in keys}),
            rows,
        )


def _state_dict(state: core.LeadState) -> dict[str, Any]:
    return {f: getattr(state, f) for f in state.__slots__}


def _lead(row: Any) -> LeadRecord:
    m = row._mapping
    return LeadRecord(**{f: m[f] for f in LeadRecord.__slots__})


def _touch(row: Any) -> TouchRecord:
    m = row._mapping
    return TouchRecord(**{f: m[f] for f in TouchRecord.__slots__})
