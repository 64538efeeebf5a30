"""Opt-out queries: what the unsubscribe endpoint reads and writes, in batches.

The endpoint checks a link against the lead it names, then records the opt-out. Both
take many requests per transaction with a handful of set-based statements, so that a
burst of unsubscribes costs a few short transactions and never starves the dispatcher
of the database. Recording an opt-out does what :meth:`LeadQueries.suppress` does: the
address goes on the suppression list, the lead is marked, its pending work is cancelled
and an ``unsubscribed`` event is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from campaignd.models import EventKind, LeadStatus, SuppressionReason
from campaignd.store.base import CHUNK, StoreBase, leads_t, suppressions_t

_STOPPED = {LeadStatus.UNSUBSCRIBED.value, LeadStatus.BOUNCED.value, LeadStatus.CONVERTED.value}


@dataclass(frozen=True, slots=True)
class OptOutTarget:
    """The lead an unsubscribe link names, as the endpoint needs it."""

    lead_id: int
    email: str
    status: str
    suppressed: bool

    @property
    def opted_out(self) -> bool:
        """True when nothing more is sent to this address."""
        return self.suppressed or self.status in (LeadStatus.UNSUBSCRIBED, LeadStatus.BOUNCED)


@dataclass(frozen=True, slots=True)
class OptOut:
    """One opt-out to record.

    :param lead_id: the lead the verified link named.
    :param email: the address the link was signed for.
    :param at: when the request arrived.
    :param detail: how it arrived (``one-click``, ``unsubscribe page``), kept with the suppression.
    """

    lead_id: int
    email: str
    at: datetime
    detail: str


class OptOutQueries(StoreBase):
    def optout_targets(self, lead_ids: Sequence[int]) -> dict[int, OptOutTarget]:
        """The leads with these ids (missing ids are left out) and whether each is suppressed."""
        ids = sorted(set(lead_ids))
        out: dict[int, OptOutTarget] = {}
        with self.reader.connect() as conn:
            for start in range(0, len(ids), CHUNK):
                rows = conn.execute(
                    sa.select(
                        leads_t.c.id, leads_t.c.email, leads_t.c.status, suppressions_t.c.email.label("s")
                    )
                    .select_from(leads_t.outerjoin(suppressions_t, suppressions_t.c.email == leads_t.c.email))
                    .where(leads_t.c.id.in_(ids[start : start + CHUNK]))
                )
                for r in rows:
                    out[r.id] = OptOutTarget(r.id, r.email, r.status, r.s is not None)
        return out

    def record_optouts(self, optouts: Sequence[OptOut]) -> list[bool]:
        """Record these opt-outs in one transaction; True for each that was new.

        A repeated opt-out (a second click, a provider retrying, the same link twice in
        one batch) changes nothing and records no second event. Work already ``sending``
        is on the wire and cannot be recalled; direct mail already exported to the print
        shop is paper. A bounced lead stays bounced; a converted one stays converted.
        """
        if not optouts:
            return []
        first: dict[str, OptOut] = {}
        for o in optouts:
            first.setdefault(_norm(o.email), o)
        lead_ids = sorted({o.lead_id for o in optouts})
        with self.engine.begin() as conn:
            # Lock the leads first, in id order: a dispatcher claiming one of them either
            # finishes before us (and its claim is cancelled below) or skips it.
            self._lock_leads(conn, lead_ids)
            emails = list(first)
            added: set[str] = set()
            for start in range(0, len(emails), CHUNK):
                added |= self._add_suppressions(conn, [first[e] for e in emails[start : start + CHUNK]])
            leads: dict[int, Any] = {}
            for start in range(0, len(lead_ids), CHUNK):
                chunk = lead_ids[start : start + CHUNK]
                query = sa.select(leads_t.c.id, leads_t.c.email, leads_t.c.status).where(
                    leads_t.c.id.in_(chunk)
                )
                leads.update((r.id, r) for r in conn.execute(query))
            # Stop the lead the link named, if it still has the address the link was signed
            # for and is not stopped already.
            stop: dict[int, OptOut] = {}
            for email, o in first.items():
                lead = leads.get(o.lead_id)
                if (
                    lead is not None
                    and lead.email == email
                    and (email in added or lead.status not in _STOPPED)
                ):
                    stop[lead.id] = o
            if stop:
                self._stop_leads(conn, stop, added)
        answers, seen = [], set()
        for o in optouts:
            email = _norm(o.email)
            answers.append(email in added and email not in seen)
            seen.add(email)
        return answers

    def _add_suppressions(self, conn: Connection, optouts: list[OptOut]) -> set[str]:
        """Put these addresses on the list; returns those that were not on it yet."""
        # RETURNING, not rowcount: with psycopg an INSERT .. ON CONFLICT DO NOTHING reports
        # a rowcount of -1, which would count every repeated click as a new opt-out.
        rows = [
            {
                "email": _norm(o.email),
                "reason": SuppressionReason.UNSUBSCRIBED.value,
                "detail": o.detail,
                "created_at": o.at,
            }
            for o in optouts
        ]
        # One statement compiled once (SQLAlchemy batches the rows into multi-row INSERTs).
        stmt = (
            self._insert(suppressions_t)
            .on_conflict_do_nothing(index_elements=["email"])
            .returning(suppressions_t.c.email)
        )
        return set(conn.execute(stmt, rows).scalars())

    def _stop_leads(self, conn: Connection, stop: dict[int, OptOut], added: set[str]) -> None:
        """The batch form of ``_stop_suppressed_lead``: mark, cancel what is not leaving, record."""
        now = max(o.at for o in stop.values())
        ids = sorted(stop)
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            conn.execute(
                sa.update(leads_t)
                .where(leads_t.c.id.in_(chunk), leads_t.c.status != LeadStatus.CONVERTED.value)
                .values(
                    status=LeadStatus.UNSUBSCRIBED.value, next_due_at=None, next_step=None, updated_at=now
                )
            )
            self._cancel_pending(conn, chunk, now, f"address {SuppressionReason.UNSUBSCRIBED.value}")
        self._events(
            conn,
            [
                {"lead_id": lead_id, "kind": EventKind.UNSUBSCRIBED.value, "at": o.at, "detail": o.detail}
                for lead_id, o in stop.items()
                if _norm(o.email) in added
            ],
        )

    def ping(self) -> None:
        """Raise if the database cannot answer a trivial query."""
        with self.reader.connect() as conn:
            conn.execute(sa.select(1)).scalar_one()


def _norm(email: str) -> str:
    return email.strip().lower()
