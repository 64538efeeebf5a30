"""What every group of queries shares: the engine, the tables and a few small writes.

The query groups (``leads``, ``dispatch``, ``reports``, ...) are mixins over
:class:`StoreBase`; :class:`campaignd.store.Store` combines them. Only this package builds
SQL or opens transactions.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from campaignd import sequences as core
from campaignd.database import READ_ONLY
from campaignd.models import (
    DigestRun,
    EventKind,
    Lead,
    LeadEvent,
    LeadStatus,
    Meta,
    PrintBatch,
    Suppression,
    SuppressionReason,
    Touch,
    TouchStatus,
)
from campaignd.store.hot import HotStatements

leads_t: sa.Table = Lead.__table__  # type: ignore[attr-defined]
touches_t: sa.Table = Touch.__table__  # type: ignore[attr-defined]
suppressions_t: sa.Table = Suppression.__table__  # type: ignore[attr-defined]
events_t: sa.Table = LeadEvent.__table__  # type: ignore[attr-defined]
digest_runs_t: sa.Table = DigestRun.__table__  # type: ignore[attr-defined]
print_batches_t: sa.Table = PrintBatch.__table__  # type: ignore[attr-defined]
meta_t: sa.Table = Meta.__table__  # type: ignore[attr-defined]

CHUNK = 500
"""Rows per ``IN (...)`` list: well under SQLite's and PostgreSQL's parameter limits."""


class StoreBase:
    """The engine and the writes several query groups need.

    :param engine: a SQLAlchemy engine from :func:`campaignd.database.create_engine`.
    """

    def __init__(self, *, engine: Engine) -> None:
        self.engine = engine
        """Transactions that write (``self.engine.begin()``)."""
        self.reader = engine.execution_options(**{READ_ONLY: True})
        """Connections that only read (``self.reader.connect()``): no write lock on SQLite."""
        self.is_postgres = engine.dialect.name == "postgresql"
        self._hot = HotStatements(engine.dialect)
        self._sending: Connection | None = None
        """The connection the senders' transactions run on during a dispatch pass."""

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self.is_postgres else sqlite.insert)(table)

    def _lock_leads(self, conn: Connection, lead_ids: Sequence[int]) -> None:
        """Serialise writers of these leads (PostgreSQL; SQLite has one writer anyway)."""
        if self.is_postgres and lead_ids:
            conn.execute(
                sa.select(leads_t.c.id)
                .where(leads_t.c.id.in_(sorted(lead_ids)))
                .order_by(leads_t.c.id)
                .with_for_update()
            ).all()

    def _states(self, conn: Connection, lead_ids: Sequence[int]) -> dict[int, core.LeadState]:
        """The decision core's view of these leads, read in ``conn``'s transaction."""
        if not lead_ids:
            return {}
        out: dict[int, core.LeadState] = {}
        for start in range(0, len(lead_ids), CHUNK):
            out.update(self._states_chunk(conn, lead_ids[start : start + CHUNK]))
        return out

    def _states_chunk(self, conn: Connection, lead_ids: Sequence[int]) -> dict[int, core.LeadState]:
        rows = conn.execute(
            sa.select(
                leads_t.c.id,
                leads_t.c.email,
                leads_t.c.tier,
                leads_t.c.status,
                leads_t.c.touch_count,
                leads_t.c.tier_since,
                leads_t.c.last_touch_at,
                leads_t.c.timezone,
            ).where(leads_t.c.id.in_(lead_ids))
        ).all()
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
            .where(touches_t.c.lead_id.in_(lead_ids), touches_t.c.step.is_not(None))
            .order_by(touches_t.c.id)
        ):
            touches.setdefault(t.lead_id, []).append(
                core.TouchView(
                    t.tier, t.step, t.status, t.sent_at or t.created_at, t.lease_until, t.next_attempt_at
                )
            )
        suppressed = set(
            conn.execute(
                sa.select(suppressions_t.c.email).where(suppressions_t.c.email.in_([r.email for r in rows]))
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

    def _event(self, conn: Connection, lead_id: int, kind: EventKind, at: datetime, detail: str = "") -> None:
        conn.execute(sa.insert(events_t).values(lead_id=lead_id, kind=kind.value, at=at, detail=detail))

    def _events(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        if rows:
            conn.execute(sa.insert(events_t), rows)

    def _suppress(
        self, conn: Connection, email: str, reason: SuppressionReason, detail: str, now: datetime
    ) -> bool:
        stmt = (
            self._insert(suppressions_t)
            .values(email=email, reason=reason.value, detail=detail, created_at=now)
            .on_conflict_do_nothing(index_elements=["email"])
            .returning(suppressions_t.c.email)
        )
        # RETURNING, not rowcount: psycopg reports -1 for ON CONFLICT DO NOTHING.
        return conn.execute(stmt).first() is not None

    def _stop_suppressed_lead(
        self,
        conn: Connection,
        lead_id: int,
        reason: SuppressionReason,
        detail: str,
        now: datetime,
        *,
        new: bool,
    ) -> None:
        status = LeadStatus.BOUNCED if reason == SuppressionReason.BOUNCED else LeadStatus.UNSUBSCRIBED
        conn.execute(
            sa.update(leads_t)
            .where(leads_t.c.id == lead_id, leads_t.c.status.notin_([LeadStatus.CONVERTED.value]))
            .values(status=status.value, next_due_at=None, next_step=None, updated_at=now)
        )
        self._cancel_pending(conn, [lead_id], now, f"address {reason.value}")
        if new:
            kind = {
                SuppressionReason.BOUNCED: EventKind.BOUNCED,
                SuppressionReason.UNSUBSCRIBED: EventKind.UNSUBSCRIBED,
            }.get(reason, EventKind.SUPPRESSED)
            self._event(conn, lead_id, kind, now, detail)

    def _cancel_pending(self, conn: Connection, lead_ids: Sequence[int], now: datetime, why: str) -> int:
        """Cancel work for these leads that has not started to leave.

        A ``sending`` touch may be on the wire and is left alone; so is a direct-mail piece
        already exported to the print shop (``queued``): it is paper now.
        """
        result = conn.execute(
            sa.update(touches_t)
            .where(
                touches_t.c.lead_id.in_(lead_ids),
                touches_t.c.status.in_(
                    [TouchStatus.CLAIMED.value, TouchStatus.RETRY.value, TouchStatus.PENDING.value]
                ),
            )
            .values(status=TouchStatus.CANCELLED.value, error=why, lease_until=None, updated_at=now)
        )
        return int(result.rowcount)

    def _write_after(self, conn: Connection, lead_id: int, after: core.AfterTouch, *, now: datetime) -> None:
        """Write what a touch did to its lead; the next dispatch pass plans its next step."""
        values: dict[str, Any] = {
            "touch_count": after.touch_count,
            "tier": after.tier,
            "tier_since": after.tier_since,
            "status": after.status,
            "last_touch_at": after.last_touch_at,
            "updated_at": now,
            "next_step": None,
            "next_due_at": now if after.status == LeadStatus.ACTIVE else None,
        }
        if after.flagged:
            values |= {"flagged_at": after.flagged_at, "flag_reason": after.flag_reason}
        conn.execute(sa.update(leads_t).where(leads_t.c.id == lead_id).values(values))
        self._events(conn, after_events(lead_id, after))


def after_events(lead_id: int, after: core.AfterTouch) -> list[dict[str, Any]]:
    """The lead events a touch caused (promotion, flag), as rows for ``lead_events``."""
    rows = []
    if after.promoted:
        rows.append(
            {
                "lead_id": lead_id,
                "kind": EventKind.PROMOTED.value,
                "at": after.last_touch_at,
                "detail": "cold to warm",
            }
        )
    if after.flagged:
        rows.append(
            {
                "lead_id": lead_id,
                "kind": EventKind.FLAGGED.value,
                "at": after.flagged_at,
                "detail": after.flag_reason or "",
            }
        )
    return rows
