"""Dispatch queries: planning, claiming, marking as leaving, and recording answers.

Claiming is written for several daemons sharing one PostgreSQL database: due leads are
locked with ``FOR UPDATE SKIP LOCKED``, and the unique (lead, tier, step) key on touches
makes a second touch of one step impossible whatever the timing. Every write that
depends on a decision (what is due, what a touch does to its lead) asks the pure core in
``sequences.py`` inside the same transaction, so a decision and its write can never be
split by another writer.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from campaignd import sequences as core
from campaignd.models import LeadStatus, SuppressionReason, TouchStatus
from campaignd.store.base import (
    StoreBase,
    after_events,
    leads_t,
    meta_t,
    touches_t,
)
from campaignd.store.records import (
    Claim,
    ClaimPass,
    LeadRecord,
    Recorded,
    Result,
    TouchRecord,
    touch_record,
)

logger = logging.getLogger(__name__)

UNKNOWN_DETAIL = (
    "the daemon stopped while this message was being sent; it may or may not have been "
    "delivered (check, then 'campaignd touches retry ID' to resend)"
)


def _locked(exc: sa.exc.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds the lock (SQLITE_BUSY)."""
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_BUSY if code is not None else "locked" in str(exc.orig)


class DispatchQueries(StoreBase):
    # -- plan bookkeeping ------------------------------------------------------------------------

    def replan_if_changed(self, fingerprint: str, *, now: datetime) -> int:
        """When the sequences or rules changed, make every active lead due for re-planning.

        Several daemons may start at once on one database: the fingerprint row is
        written with an upsert, so they never trip over each other.
        """
        with self.engine.begin() as conn:
            old = conn.execute(sa.select(meta_t.c.value).where(meta_t.c.key == "plan")).scalar()
            if old == fingerprint:
                return 0
            result = conn.execute(
                sa.update(leads_t)
                .where(leads_t.c.status == LeadStatus.ACTIVE.value)
                .values(next_step=None, next_due_at=now)
            )
            stmt = self._insert(meta_t).values(key="plan", value=fingerprint)
            conn.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": fingerprint}))
            return int(result.rowcount)

    # -- crash recovery ----------------------------------------------------------------------------

    def recover_in_flight(self, *, now: datetime, exclusive: bool) -> list[TouchRecord]:
        """Settle the work of daemons that died: what was on the wire becomes ``unknown``.

        :param exclusive: True when this daemon is the only one on the database (SQLite,
            at start-up): every ``sending`` touch is then orphaned, and work that was only
            claimed is given back at once instead of after its lease. Otherwise only
            touches whose lease has run out are orphaned; claims expire by themselves.
        :returns: the touches now ``unknown``.
        """
        cond = [touches_t.c.status == TouchStatus.SENDING.value]
        if not exclusive:
            cond.append(touches_t.c.lease_until < now)
        with self.engine.begin() as conn:
            rows = [touch_record(r) for r in conn.execute(sa.select(touches_t).where(*cond))]
            if rows:
                ids = [r.id for r in rows]
                conn.execute(
                    sa.update(touches_t)
                    .where(touches_t.c.id.in_(ids), touches_t.c.status == TouchStatus.SENDING.value)
                    .values(
                        status=TouchStatus.UNKNOWN.value,
                        error=UNKNOWN_DETAIL,
                        lease_until=None,
                        updated_at=now,
                    )
                )
                conn.execute(
                    sa.update(leads_t)
                    .where(leads_t.c.id.in_({r.lead_id for r in rows}))
                    .values(next_due_at=None, next_step=None, updated_at=now)
                )
            if exclusive:
                # Claims still under lease belong to a process that is gone (ours never
                # outlive a pass); released ones already carry their own due time.
                held = sa.and_(touches_t.c.status == TouchStatus.CLAIMED.value, touches_t.c.lease_until > now)
                conn.execute(
                    sa.update(leads_t)
                    .where(
                        leads_t.c.id.in_(sa.select(touches_t.c.lead_id).where(held)),
                        leads_t.c.status == LeadStatus.ACTIVE.value,
                    )
                    .values(next_due_at=now)
                )
                conn.execute(sa.update(touches_t).where(held).values(lease_until=now, updated_at=now))
        return rows

    # -- claiming ---------------------------------------------------------------------------------

    def claim(self, *, policy: core.Policy, now: datetime, limit: int, worker: str) -> ClaimPass:
        """Claim up to ``limit`` due steps for ``worker`` under a lease.

        Leads that turn out not to be due (not yet, window shut, sequence finished) are
        rescheduled in the same transaction, so every pass makes progress.
        """
        lease_until = now + policy.lease
        with self.engine.begin() as conn:
            due = self._hot.due(conn, now=now, limit=limit)
            if not due:
                return ClaimPass([], 0)
            wanted: list[tuple[LeadRecord, core.NextTouch]] = []
            reschedule: list[dict[str, Any]] = []
            for lead, state in due:
                decision = core.decide(state, policy, now=now)
                if isinstance(decision, core.Send):
                    wanted.append((lead, decision.touch))
                elif isinstance(decision, core.Wait):
                    step = decision.touch.step.id if decision.touch else None
                    reschedule.append({"b_id": lead.id, "next_step": step, "next_due_at": decision.until})
                else:
                    reschedule.append({"b_id": lead.id, "next_step": None, "next_due_at": None})
            taken = self._hot.claim(
                conn,
                [(lead.id, nt) for lead, nt in wanted],
                worker=worker,
                lease_until=lease_until,
                now=now,
            )
            claims: list[Claim] = []
            for lead, nt in wanted:
                hit = taken.get(lead.id)
                if hit is None:
                    # The slot is taken after all (another daemon, a stale plan): look
                    # again on the next pass rather than guess.
                    reschedule.append({"b_id": lead.id, "next_step": None, "next_due_at": lease_until})
                    continue
                touch_id, attempts = hit
                claims.append(Claim(touch_id, lead, nt.tier, nt.step.id, attempts))
                reschedule.append({"b_id": lead.id, "next_step": nt.step.id, "next_due_at": lease_until})
            self._hot.update(conn, leads_t, reschedule)
        return ClaimPass(claims, len(due) - len(claims))

    def mark_sending(
        self, touch_ids: Sequence[int], *, worker: str, now: datetime, lease: timedelta
    ) -> set[int]:
        """Commit that these touches are about to leave. Only what this returns may be sent."""
        if not touch_ids:
            return set()
        with self.engine.begin() as conn:
            return self._mark_sending(conn, touch_ids, worker=worker, now=now, lease=lease)

    def _mark_sending(
        self, conn: Connection, touch_ids: Sequence[int], *, worker: str, now: datetime, lease: timedelta
    ) -> set[int]:
        return self._hot.mark_sending(conn, touch_ids, worker=worker, lease_until=now + lease, now=now)

    def advance(
        self,
        results: Sequence[Result],
        leaving: Sequence[int],
        *,
        worker: str,
        policy: core.Policy,
        now: datetime,
        lease: timedelta,
        max_attempts: int,
        backoff: timedelta,
        backoff_max: timedelta,
        wait: bool = True,
    ) -> tuple[list[Recorded], set[int]] | None:
        """Record answers and mark the next messages as leaving, in one transaction.

        A sender that just got an answer usually has its next message ready: settling the
        one and marking the other together halves the commits on the hot path without
        weakening either promise (the answer is durable before anything else happens,
        and nothing leaves before its mark is durable).

        :param wait: False: give up at once, doing nothing and returning None, rather than
            wait for anything. On SQLite the transaction is a few hundred microseconds of
            work on a local file, and the one thing it can wait for is the write lock held
            by another writer; the dispatcher runs it so on its event loop, which spares a
            thread hand-off per commit, and again in a thread when it gives up. On
            PostgreSQL every statement waits for the server: always None.
        """
        if not wait and self.is_postgres:
            return None
        conn = self._sender_connection()
        try:
            if not wait:
                self._hot.sqlite_wait(conn, False)
            try:
                transaction = conn.begin()
            except sa.exc.OperationalError as exc:
                if wait or not _locked(exc):
                    raise
                return None
            finally:
                if not wait:
                    # The write lock is held (or was not to be had): the connection waits
                    # as usual again, for whatever runs on it next.
                    self._hot.sqlite_wait(conn, True)
            # A hard bounce also suppresses the address through statements that read
            # each answer as they go: that rare transaction runs without the pipeline.
            bounced = any(result.outcome == "permanent" for result in results)
            with transaction, self._hot.pipeline(conn, enabled=not bounced):
                recorded = self._record(
                    conn,
                    results,
                    policy=policy,
                    now=now,
                    max_attempts=max_attempts,
                    backoff=backoff,
                    backoff_max=backoff_max,
                )
                marked = (
                    self._mark_sending(conn, leaving, worker=worker, now=now, lease=lease)
                    if leaving
                    else set()
                )
        except Exception:
            # The connection may be what failed (the server restarted): the next
            # transaction starts on a fresh one. One that may have been left not waiting
            # for locks is not given back to the pool for others.
            if not wait and self._sending is not None:
                self._sending.invalidate()
            self.end_sending()
            raise
        return recorded, marked

    def _sender_connection(self) -> Connection:
        """The connection the senders' transactions run on, kept from one to the next:
        checking one out of the pool costs round trips (a ping, a reset) each time."""
        conn = self._sending
        if conn is None or conn.closed or conn.invalidated:
            conn = self._sending = self.engine.connect()
        return conn

    def end_sending(self) -> None:
        """Give the senders' connection back to the pool (at the end of each pass)."""
        conn, self._sending = self._sending, None
        if conn is not None:
            conn.close()

    def release(
        self, touch_ids: Sequence[int], *, worker: str, now: datetime, retry_at: datetime | None = None
    ) -> int:
        """Give back claimed work that never started to leave (on shutdown, or when its
        channel went down), due again at ``retry_at`` (default: at once)."""
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
                conn.execute(
                    sa.update(leads_t).where(leads_t.c.id.in_(rows)).values(next_due_at=retry_at or now)
                )
            return len(rows)

    # -- recording answers -----------------------------------------------------------------------

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
        """Record what happened to claimed touches, and what each answer does to its lead.

        ``sent`` counts the touch (promotion, flag) and plans the next step;
        ``temporary`` schedules a retry with exponential backoff until ``max_attempts``;
        ``permanent`` fails the touch and suppresses the address (a hard bounce);
        ``rejected`` and ``render`` fail the touch only; ``unknown`` holds the lead for the
        operator; ``skipped`` moves on to the next step; ``pending`` leaves a direct-mail
        piece waiting for its print batch.
        """
        if not results:
            return []
        with self.engine.begin() as conn:
            return self._record(
                conn,
                results,
                policy=policy,
                now=now,
                max_attempts=max_attempts,
                backoff=backoff,
                backoff_max=backoff_max,
            )

    def _record(
        self,
        conn: Connection,
        results: Sequence[Result],
        *,
        policy: core.Policy,
        now: datetime,
        max_attempts: int,
        backoff: timedelta,
        backoff_max: timedelta,
    ) -> list[Recorded]:
        if not results:
            return []
        by_id = {r.touch_id: r for r in results}
        out: list[Recorded] = []
        touch_rows, states, emails = self._hot.settling(conn, list(by_id))
        touch_updates: list[dict[str, Any]] = []
        lead_updates: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for touch_id, result in by_id.items():
            t = touch_rows.get(touch_id)
            # Work that never reached a channel (it could not be rendered) or that no
            # wire was involved in (a letter queued for print) may come from 'claimed'.
            allowed = {TouchStatus.SENDING.value}
            if result.outcome in ("render", "rejected", "skipped", "pending"):
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
            # The lead as the core sees it without this touch, which is being settled.
            base = state.with_touches(
                tuple(v for v in state.touches if not (v.tier == t.tier and v.step == t.step))
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
            outcome = result.outcome
            if result.channel:
                upd["channel"] = result.channel
            if outcome == "sent":
                after = core.apply_touch(base, policy, at=now, tier=t.tier, step=t.step)
                new_state = core.with_touch(base, after, core.TouchView(t.tier, t.step, "sent", now))
                nxt = core.next_touch(new_state, policy)
                upd |= {"status": TouchStatus.SENT.value, "sent_at": now, "error": None}
                lead_upd: dict[str, Any] = {
                    "b_id": t.lead_id,
                    "touch_count": after.touch_count,
                    "tier": after.tier,
                    "tier_since": after.tier_since,
                    "status": after.status,
                    "last_touch_at": after.last_touch_at,
                    "next_step": nxt.step.id if nxt else None,
                    "next_due_at": nxt.due_at if nxt else None,
                    "updated_at": now,
                }
                if after.flagged:
                    lead_upd |= {"flagged_at": after.flagged_at, "flag_reason": after.flag_reason}
                lead_updates.append(lead_upd)
                events += after_events(t.lead_id, after)
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
            elif outcome == "temporary" and t.attempts < max_attempts:
                delay = min(backoff * (2 ** max(t.attempts - 1, 0)), backoff_max)
                retry_at = now + delay
                upd |= {"status": TouchStatus.RETRY.value, "next_attempt_at": retry_at}
                lead_updates.append(
                    {"b_id": t.lead_id, "next_step": t.step, "next_due_at": retry_at, "updated_at": now}
                )
                out.append(
                    Recorded(t.id, email, t.tier, t.step, "retry", retry_at=retry_at, detail=result.detail)
                )
            elif outcome == "unavailable":
                # The channel was down: this message was never tried, so no attempt is spent.
                retry_at = now + (result.retry_after or timedelta(seconds=30))
                upd |= {
                    "status": TouchStatus.RETRY.value,
                    "next_attempt_at": retry_at,
                    "attempts": max(t.attempts - 1, 0),
                }
                lead_updates.append(
                    {"b_id": t.lead_id, "next_step": t.step, "next_due_at": retry_at, "updated_at": now}
                )
                out.append(
                    Recorded(
                        t.id,
                        email,
                        t.tier,
                        t.step,
                        "unavailable",
                        retry_at=retry_at,
                        detail=result.detail,
                    )
                )
            elif outcome == "permanent":
                upd |= {"status": TouchStatus.FAILED.value}
                added = self._suppress(conn, email, SuppressionReason.BOUNCED, result.detail, now)
                self._stop_suppressed_lead(
                    conn, t.lead_id, SuppressionReason.BOUNCED, result.detail, now, new=added
                )
                out.append(Recorded(t.id, email, t.tier, t.step, "bounced", detail=result.detail))
            elif outcome in ("skipped", "pending"):
                status = TouchStatus.SKIPPED if outcome == "skipped" else TouchStatus.PENDING
                new_state = replace(
                    base, touches=(*base.touches, core.TouchView(t.tier, t.step, status.value, now))
                )
                nxt = core.next_touch(new_state, policy) if outcome == "skipped" else None
                upd |= {"status": status.value}
                lead_updates.append(
                    {
                        "b_id": t.lead_id,
                        "next_step": nxt.step.id if nxt else None,
                        "next_due_at": nxt.due_at if nxt else None,
                        "updated_at": now,
                    }
                )
                states[t.lead_id] = new_state
                out.append(Recorded(t.id, email, t.tier, t.step, status.value, detail=result.detail))
            else:
                status = TouchStatus.UNKNOWN if outcome == "unknown" else TouchStatus.FAILED
                upd |= {"status": status.value}
                lead_updates.append(
                    {"b_id": t.lead_id, "next_step": None, "next_due_at": None, "updated_at": now}
                )
                out.append(Recorded(t.id, email, t.tier, t.step, status.value, detail=result.detail))
            touch_updates.append(upd)
        self._hot.update(conn, touches_t, touch_updates)
        self._hot.update(conn, leads_t, lead_updates)
        self._hot.insert_events(conn, events)
        return out

    def retry_touches(self, touch_ids: Sequence[int], *, now: datetime) -> list[TouchRecord]:
        """Re-queue ``unknown`` or ``failed`` touches after the operator has checked them."""
        with self.engine.begin() as conn:
            rows = [
                touch_record(r)
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

    def settle_touches(
        self, touch_ids: Sequence[int], *, outcome: str, note: str, policy: core.Policy, now: datetime
    ) -> list[Recorded]:
        """Settle ``unknown`` or ``failed`` touches by hand, after the operator has checked them.

        ``sent``: the message did arrive (the relay's log says so); it counts as a touch,
        with promotion and flagging as usual. ``skipped``: it did not, and is not to be
        sent again; the lead's sequence goes on with the next step. Either way the lead's
        drip, held by the touch, resumes.
        """
        if outcome not in ("sent", "skipped"):
            raise ValueError(f"a touch is settled by hand as sent or skipped, not {outcome}")
        with self.engine.begin() as conn:
            ids = [
                row.id
                for row in conn.execute(
                    sa.update(touches_t)
                    .where(
                        touches_t.c.id.in_(touch_ids),
                        touches_t.c.status.in_([TouchStatus.UNKNOWN.value, TouchStatus.FAILED.value]),
                        touches_t.c.step.is_not(None),
                    )
                    .values(status=TouchStatus.SENDING.value)
                    .returning(touches_t.c.id)
                )
            ]
            detail = f"settled by hand as {outcome}" + (f": {note}" if note else "")
            if ids:
                conn.execute(sa.update(touches_t).where(touches_t.c.id.in_(ids)).values(note=detail))
            return self._record(
                conn,
                [Result(i, outcome, detail=detail) for i in ids],
                policy=policy,
                now=now,
                max_attempts=1,
                backoff=timedelta(0),
                backoff_max=timedelta(0),
            )

    def get_touch(self, touch_id: int) -> TouchRecord | None:
        with self.reader.connect() as conn:
            row = conn.execute(sa.select(touches_t).where(touches_t.c.id == touch_id)).first()
        return None if row is None else touch_record(row)
