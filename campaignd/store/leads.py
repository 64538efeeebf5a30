"""Lead queries: importing, reading, changes made by hand, and the suppression list."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from campaignd import sequences as core
from campaignd.exceptions import CampaigndError, DatabaseError, UnknownLead
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
        self,
        rows: Sequence[LeadInput],
        *,
        tier: str,
        now: datetime,
        dry_run: bool = False,
        opted_out: Collection[str] = (),
    ) -> UpsertCounts:
        """Insert new leads and update the contact fields of known ones, in one transaction.

        An import never resets a known lead's tier, status, touch count or history, and
        a new lead whose address is suppressed arrives already unsubscribed or bounced.
        Rows are matched on the normalised email; within ``rows`` the last one wins.
        With ``dry_run`` everything is worked out and nothing is written.

        :raises DatabaseError: when the database refuses the write; nothing of ``rows`` is
            written then.
        :param opted_out: addresses among ``rows`` whose source says they opted out of
            email: they go on the suppression list (as unsubscribed) and their leads stop,
            new or known. A known lead stopped this way counts as updated.
        """
        counts = UpsertCounts()
        latest: dict[str, LeadInput] = {}
        for row in rows:
            latest[row.email] = row
        unique = list(latest.values())
        opted = frozenset(opted_out)
        try:
            with self.engine.begin() as conn:
                for start in range(0, len(unique), CHUNK):
                    self._upsert_chunk(conn, unique[start : start + CHUNK], tier, now, counts, opted)
                if dry_run:
                    conn.rollback()
        except sa.exc.OperationalError as exc:  # locked past the busy timeout, disk full, gone away
            raise DatabaseError(f"the database refused the write: {exc.orig}") from None
        return counts

    def _upsert_chunk(
        self,
        conn: Connection,
        rows: list[LeadInput],
        tier: str,
        now: datetime,
        counts: UpsertCounts,
        opted_out: frozenset[str] = frozenset(),
    ) -> None:
        # The import's hot path: a million rows pass through here. Rows are read and written
        # with plain SQL over the driver, executemany on SQLite and one statement over arrays
        # on PostgreSQL, the constant values converted once: SQLAlchemy's per-row parameter
        # processing made these inserts five times slower (16,000 rows/s against 85,000).
        dialect = conn.dialect
        to_time = leads_t.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
        try:
            stamp = to_time(now) if to_time else now
        except ValueError as exc:  # a naive datetime: refused as by any other write of the store
            raise sa.exc.StatementError(str(exc), "INSERT INTO leads", None, exc) from None
        # PostgreSQL gets JSON text and casts it in SQL; SQLite gets what its JSON type binds.
        to_json: Callable[[Any], Any] = (
            json.dumps
            if self.is_postgres
            else leads_t.c.custom.type.dialect_impl(dialect).bind_processor(dialect) or json.dumps
        )
        empty_json = to_json({})
        contact = operator.attrgetter(*CONTACT_FIELDS)
        opt_out_detail = "opted out in an imported lead file"

        def select_by_email(columns: str, table: str, emails: list[str]) -> list[Any]:
            # Raw SQL over the tables' own column names: no per-call compiling of hundreds
            # of placeholders.
            params: tuple[Any, ...]
            if self.is_postgres:
                sql, params = f"SELECT {columns} FROM {table} WHERE email = ANY(%b)", (emails,)  # noqa: S608
            else:
                marks = ", ".join("?" * len(emails))
                sql, params = f"SELECT {columns} FROM {table} WHERE email IN ({marks})", tuple(emails)  # noqa: S608
            return list(conn.exec_driver_sql(sql, params))

        def array_sql(name: str, sql_type: str) -> str:
            # Sent in binary: psycopg quotes text arrays one element at a time, ten times slower.
            return f"%({name})b::{sql_type}[]"

        emails = [r.email for r in rows]
        # email -> (id, custom as stored, the contact fields in CONTACT_FIELDS order)
        existing = {
            r[1]: (r[0], r[2], tuple(r[3:]))
            for r in select_by_email(f"id, email, custom, {', '.join(CONTACT_FIELDS)}", "leads", emails)
        }
        suppressed: dict[str, str] = {
            email: reason for email, reason in select_by_email("email, reason", "suppressions", emails)
        }
        newly = {e for e in emails if e in opted_out and e not in suppressed}
        if newly:
            conn.execute(
                self._insert(suppressions_t).on_conflict_do_nothing(index_elements=["email"]),
                [
                    {
                        "email": e,
                        "reason": SuppressionReason.UNSUBSCRIBED.value,
                        "detail": opt_out_detail,
                        "created_at": now,
                    }
                    for e in sorted(newly)
                ],
            )

        fresh: list[LeadInput] = []
        stop: list[int] = []
        updates: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for row in rows:
            old = existing.get(row.email)
            if old is None:
                fresh.append(row)
                continue
            lead_id, stored_custom, stored = old
            new = contact(row)
            changes: dict[str, Any] = {}
            if new != stored:
                # Blank cells never erase what is stored.
                changes = {
                    f: v for f, v, was in zip(CONTACT_FIELDS, new, stored, strict=True) if v and v != was
                }
            if row.custom:
                # Custom fields merge. PostgreSQL hands JSON back decoded, SQLite as text.
                was_custom = json.loads(stored_custom) if isinstance(stored_custom, str) else stored_custom
                was_custom = was_custom or {}
                merged = {**was_custom, **row.custom}
                if merged != was_custom:
                    changes["custom"] = to_json(merged)
            if changes:
                updates.setdefault(tuple(changes), []).append((*changes.values(), lead_id))
            if row.email in newly:
                stop.append(lead_id)
            if changes or row.email in newly:
                counts.updated += 1
            else:
                counts.unchanged += 1

        if fresh:
            names = ("email", *CONTACT_FIELDS, "custom", "tier", "status")
            values = []
            for row in fresh:
                reason = suppressed.get(row.email)
                if reason is not None:
                    counts.suppressed += 1
                elif row.email in newly:
                    reason = SuppressionReason.UNSUBSCRIBED.value
                status = LeadStatus.ACTIVE.value
                if reason is not None:
                    status = (
                        LeadStatus.BOUNCED.value
                        if reason == SuppressionReason.BOUNCED
                        else LeadStatus.UNSUBSCRIBED.value
                    )
                custom = to_json(row.custom) if row.custom else empty_json
                values.append((row.email, *contact(row), custom, row.tier or tier, status))
            # A new lead is due at once: the next dispatch pass plans its first step.
            head = (
                f"INSERT INTO leads ({', '.join(names)}, "
                "touch_count, tier_since, next_due_at, created_at, updated_at)"
            )
            if self.is_postgres:
                # ON CONFLICT: another import may add the same address at the same moment;
                # those rows are read again below and become updates.
                arrays = ", ".join(array_sql(n, "json" if n == "custom" else "varchar") for n in names)
                result = conn.exec_driver_sql(
                    f"{head} SELECT {', '.join('u.' + n for n in names)}, 0, %(now)s, "  # noqa: S608 - the table's own column names
                    "CASE WHEN u.status = %(active)s THEN %(now)s END, %(now)s, %(now)s "
                    f"FROM unnest({arrays}) AS u({', '.join(names)}) "
                    "ON CONFLICT (email) DO NOTHING RETURNING email",
                    {
                        **{
                            n: list(column)
                            for n, column in zip(names, zip(*values, strict=True), strict=True)
                        },
                        "now": stamp,
                        "active": LeadStatus.ACTIVE.value,
                    },
                )
                inserted = set(result.scalars())
            else:
                conn.exec_driver_sql(
                    f"{head} VALUES ({', '.join('?' * (len(names) + 5))})",
                    [
                        (*v, 0, stamp, stamp if v[-1] == LeadStatus.ACTIVE.value else None, stamp, stamp)
                        for v in values
                    ],
                )
                inserted = {v[0] for v in values}
            counts.inserted += len(inserted)
            taken = [row for row in fresh if row.email not in inserted]
            if taken:
                self._upsert_chunk(conn, taken, tier, now, counts)
                stopped = [r.email for r in taken if r.email in newly]
                if stopped:
                    stop += [r[0] for r in select_by_email("id", "leads", stopped)]

        # Each group of rows changing the same columns is one statement.
        for keys, rows_params in updates.items():
            if self.is_postgres:
                columns = list(zip(*rows_params, strict=True))
                arrays = ", ".join(array_sql(k, "json" if k == "custom" else "varchar") for k in keys)
                conn.exec_driver_sql(
                    f"UPDATE leads SET {', '.join(f'{k} = u.{k}' for k in keys)}, updated_at = %(now)s "  # noqa: S608 - the table's own column names
                    f"FROM unnest({arrays}, %(b_id)s::bigint[]) AS u({', '.join(keys)}, b_id) "
                    "WHERE leads.id = u.b_id",
                    {
                        **{k: list(column) for k, column in zip(keys, columns, strict=False)},
                        "b_id": list(columns[-1]),
                        "now": stamp,
                    },
                )
            else:
                conn.exec_driver_sql(
                    f"UPDATE leads SET {', '.join(f'{k} = ?' for k in keys)}, updated_at = ? WHERE id = ?",  # noqa: S608 - the table's own column names
                    [(*p[:-1], stamp, p[-1]) for p in rows_params],
                )
        for lead_id in stop:
            self._stop_suppressed_lead(
                conn, lead_id, SuppressionReason.UNSUBSCRIBED, opt_out_detail, now, new=True
            )

    # -- reading -------------------------------------------------------------------------------

    def get_lead(self, email: str) -> LeadRecord:
        """The lead with this address; raises :class:`UnknownLead` if there is none."""
        with self.reader.connect() as conn:
            row = conn.execute(sa.select(leads_t).where(leads_t.c.email == email.strip().lower())).first()
        if row is None:
            raise UnknownLead(f"no lead with the address {email!r}")
        return lead_record(row)

    def find_lead_by_email(self, email: str) -> LeadRecord | None:
        with self.reader.connect() as conn:
            row = conn.execute(sa.select(leads_t).where(leads_t.c.email == email.strip().lower())).first()
        return None if row is None else lead_record(row)

    def find_lead(self, lead_id: int) -> LeadRecord | None:
        with self.reader.connect() as conn:
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
        with self.reader.connect() as conn:
            result = conn.execution_options(yield_per=1000).execute(query)
            for row in result:
                yield lead_record(row)

    def count_leads(self) -> int:
        with self.reader.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(leads_t)).scalar_one())

    def touches_for(self, lead_id: int) -> list[TouchRecord]:
        """A lead's touches, oldest first."""
        with self.reader.connect() as conn:
            rows = conn.execute(
                sa.select(touches_t)
                .where(touches_t.c.lead_id == lead_id)
                .order_by(sa.func.coalesce(touches_t.c.sent_at, touches_t.c.created_at), touches_t.c.id)
            )
            return [touch_record(r) for r in rows]

    def events_for(self, lead_id: int) -> list[EventRecord]:
        """What happened to a lead besides touches (promoted, flagged, ...), oldest first."""
        with self.reader.connect() as conn:
            rows = conn.execute(
                sa.select(events_t)
                .where(events_t.c.lead_id == lead_id)
                .order_by(events_t.c.at, events_t.c.id)
            )
            return [EventRecord(r.id, r.lead_id, r.kind, r.at, r.detail) for r in rows]

    def lead_state(self, lead: LeadRecord) -> core.LeadState:
        with self.reader.connect() as conn:
            return self._states(conn, [lead.id])[lead.id]

    def lead_states(self, leads: Sequence[LeadRecord]) -> dict[int, core.LeadState]:
        with self.reader.connect() as conn:
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
        with self.reader.connect() as conn:
            rows = conn.execute(sa.select(suppressions_t).order_by(suppressions_t.c.created_at))
            return [SuppressionRecord(r.email, r.reason, r.detail, r.created_at) for r in rows]

    def is_suppressed(self, email: str) -> bool:
        with self.reader.connect() as conn:
            found = conn.execute(
                sa.select(suppressions_t.c.email).where(suppressions_t.c.email == email.strip().lower())
            ).first()
        return found is not None
