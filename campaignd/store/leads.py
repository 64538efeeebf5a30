"""Lead queries: importing, reading, changes made by hand, and the suppression list."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from campaignd import sequences as core
from campaignd.exceptions import CampaigndError, UnknownLead
from campaignd.models import EventKind, LeadStatus, SuppressionReason, TouchStatus
from campaignd.store.base import CHUNK, StoreBase, events_t, leads_t, suppressions_t, touches_t
from campaignd.store.records import (
    EventRecord,
    LeadInput,
    LeadRecord,
    SuppressionRecord,
    TouchRecord,
    UpsertCounts,
    lead_record,
    touch_record,
)

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

_STATUS_EVENT = {
    LeadStatus.FLAGGED: EventKind.FLAGGED,
    LeadStatus.CONVERTED: EventKind.CONVERTED,
    LeadStatus.PAUSED: EventKind.PAUSED,
}


class LeadQueries(StoreBase):
    # -- import ------------------------------------------------------------------------------

    def upsert_leads(
        self, rows: Sequence[LeadInput], *, tier: str, now: datetime, dry_run: bool = False
    ) -> UpsertCounts:
        """Insert new leads and update the contact fields of known ones, in one transaction.

        An import never resets a known lead's tier, status, touch count or history, and
        a new lead whose address is suppressed arrives already unsubscribed or bounced.
        Rows are matched on the normalised email; within ``rows`` the last one wins.
        With ``dry_run`` everything is worked out and nothing is written.
        """
        counts = UpsertCounts()
        latest: dict[str, LeadInput] = {}
        for row in rows:
            latest[row.email] = row
        emails = list(latest)
        with self.engine.begin() as conn:
            for start in range(0, len(emails), CHUNK):
                chunk = emails[start : start + CHUNK]
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

    # -- reading -------------------------------------------------------------------------------

    def get_lead(self, email: str) -> LeadRecord:
        """The lead with this address; raises :class:`UnknownLead` if there is none."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(leads_t).where(leads_t.c.email == email.strip().lower())).first()
        if row is None:
            raise UnknownLead(f"no lead with the address {email!r}")
        return lead_record(row)

    def find_lead(self, lead_id: int) -> LeadRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(leads_t).where(leads_t.c.id == lead_id)).first()
        return None if row is None else lead_record(row)

    def list_leads(
        self,
        *,
        tier: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        active_only: bool = False,
    ) -> Iterator[LeadRecord]:
        """Leads in id order, streamed (safe for a million rows)."""
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
                yield lead_record(row)

    def count_leads(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(leads_t)).scalar_one())

    def touches_for(self, lead_id: int) -> list[TouchRecord]:
        """A lead's touches, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(touches_t)
                .where(touches_t.c.lead_id == lead_id)
                .order_by(sa.func.coalesce(touches_t.c.sent_at, touches_t.c.created_at), touches_t.c.id)
            )
            return [touch_record(r) for r in rows]

    def events_for(self, lead_id: int) -> list[EventRecord]:
        """What happened to a lead besides touches (promoted, flagged, ...), oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(events_t)
                .where(events_t.c.lead_id == lead_id)
                .order_by(events_t.c.at, events_t.c.id)
            )
            return [EventRecord(r.id, r.lead_id, r.kind, r.at, r.detail) for r in rows]

    def lead_state(self, lead: LeadRecord) -> core.LeadState:
        with self.engine.connect() as conn:
            return self._states(conn, [lead.id])[lead.id]

    def lead_states(self, leads: Sequence[LeadRecord]) -> dict[int, core.LeadState]:
        with self.engine.connect() as conn:
            return self._states(conn, [lead.id for lead in leads])

    # -- changes by hand ------------------------------------------------------------------------

    def set_tier(self, email: str, tier: str, *, now: datetime) -> LeadRecord:
        """Move a lead to ``tier``; its sequence for that tier starts now."""
        lead = self.get_lead(email)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(leads_t)
                .where(leads_t.c.id == lead.id)
                .values(tier=tier, tier_since=now, next_step=None, next_due_at=now, updated_at=now)
            )
            if tier != lead.tier:
                self._event(conn, lead.id, EventKind.TIER_CHANGED, now, f"{lead.tier} to {tier} by hand")
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
        """Change a lead's status by hand; work not yet leaving is cancelled when it stops.

        :param expect: statuses the lead must be in for the change to make sense.
        """
        lead = self.get_lead(email)
        if expect is not None and lead.status not in {s.value for s in expect}:
            allowed = ", ".join(s.value for s in expect)
            raise CampaigndError(
                f"{lead.email} is {lead.status}; this applies only to leads that are {allowed}"
            )
        if status == LeadStatus.ACTIVE and self.is_suppressed(lead.email):
            raise CampaigndError(
                f"{lead.email} is on the suppression list; take it off first "
                "('campaignd suppression remove') if it may really be contacted again"
            )
        values: dict[str, Any] = {"status": status.value, "updated_at": now}
        if status == LeadStatus.FLAGGED:
            values |= {"flagged_at": now, "flag_reason": reason or "flagged by hand"}
        if status == LeadStatus.CONVERTED:
            values |= {"converted_at": now}
        if status == LeadStatus.ACTIVE:
            values |= {"next_due_at": now, "next_step": None}
            if lead.status == LeadStatus.FLAGGED:
                values |= {"flagged_at": None, "flag_reason": None}
        else:
            values |= {"next_due_at": None, "next_step": None}
        with self.engine.begin() as conn:
            conn.execute(sa.update(leads_t).where(leads_t.c.id == lead.id).values(values))
            if status != LeadStatus.ACTIVE:
                self._cancel_pending(conn, [lead.id], now, f"lead {status.value}")
            kind = _STATUS_EVENT.get(status)
            if status == LeadStatus.ACTIVE:
                kind = EventKind.UNFLAGGED if lead.status == LeadStatus.FLAGGED else EventKind.RESUMED
            if kind is not None:
                self._event(conn, lead.id, kind, now, reason or "by hand")
        return self.get_lead(email)

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

    # -- suppression -----------------------------------------------------------------------------

    def suppress(self, email: str, *, reason: SuppressionReason, detail: str, now: datetime) -> bool:
        """Put an address on the suppression list and stop its lead at once.

        Every step not yet leaving is cancelled, direct mail not yet exported included.
        Returns False when the address was already suppressed.
        """
        email = email.strip().lower()
        with self.engine.begin() as conn:
            added = self._suppress(conn, email, reason, detail, now)
            lead_id = conn.execute(sa.select(leads_t.c.id).where(leads_t.c.email == email)).scalar()
            if lead_id is not None:
                self._stop_suppressed_lead(conn, lead_id, reason, detail, now, new=added)
        return added

    def unsuppress(self, email: str, *, now: datetime, reason: str) -> SuppressionRecord | None:
        """Take an address off the list. The lead stays as it is: resuming it is a separate act."""
        email = email.strip().lower()
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(suppressions_t).where(suppressions_t.c.email == email)).first()
            if row is None:
                return None
            conn.execute(sa.delete(suppressions_t).where(suppressions_t.c.email == email))
            lead_id = conn.execute(sa.select(leads_t.c.id).where(leads_t.c.email == email)).scalar()
            if lead_id is not None:
                self._event(conn, lead_id, EventKind.UNSUPPRESSED, now, reason)
        return SuppressionRecord(row.email, row.reason, row.detail, row.created_at)

    def suppressions(self) -> list[SuppressionRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(suppressions_t).order_by(suppressions_t.c.created_at))
            return [SuppressionRecord(r.email, r.reason, r.detail, r.created_at) for r in rows]

    def is_suppressed(self, email: str) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(suppressions_t.c.email).where(suppressions_t.c.email == email.strip().lower())
            ).first()
        return found is not None
