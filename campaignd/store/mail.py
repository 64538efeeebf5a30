"""Direct-mail queries: pieces waiting for print, print batches, confirming and cancelling them.

A piece is a touch of a ``mail`` step. It waits as ``pending`` until a batch takes it;
the batch's export then records it as ``queued`` with the batch's id (or counts it at
once, ``sent``, when pieces count at export), and confirming the batch counts every
queued piece through the decision core, exactly as a sent email counts. Cancelling a
batch gives its pieces back to the dispatcher as due (``retry``).

A batch is first reserved (``exporting``), while its files are written outside any
transaction; one transaction then checks that every piece in the files is still
waiting, records them and marks the batch ``exported``, or nothing at all. Batches that
were being exported when their process died are found by the next export and marked
``failed``; their pieces never left ``pending``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from campaignd import sequences as core
from campaignd.config import Channel
from campaignd.exceptions import CampaigndError
from campaignd.models import LeadStatus, TouchStatus
from campaignd.store.base import CHUNK, StoreBase, leads_t, print_batches_t, suppressions_t, touches_t
from campaignd.store.records import LeadRecord, Recorded, lead_record

EXPORT_LOCK_CLASS = 0x63706274
"""With the schema's name, the PostgreSQL advisory lock that lets one export run at a time
across the daemons of one installation (installations in other schemas of the same
database have locks of their own)."""


class BatchStatus(StrEnum):
    EXPORTING = "exporting"
    """Reserved; its files are being written. No touch points at it yet."""
    EXPORTED = "exported"
    """Its folder is complete and its pieces are recorded; waiting to be confirmed mailed."""
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    """The export did not finish (an error, or the process stopped); nothing was recorded."""


@dataclass(frozen=True, slots=True)
class PieceRecord:
    """A direct-mail piece waiting for a print batch, with its lead as it is now."""

    touch_id: int
    tier: str
    step: str
    template: str | None
    waiting_since: datetime
    lead: LeadRecord


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: int
    status: str
    pieces: int
    pages: int
    path: str
    detail: str
    created_at: datetime
    exported_at: datetime | None
    confirmed_at: datetime | None
    cancelled_at: datetime | None


@dataclass(frozen=True, slots=True)
class BatchPiece:
    """A piece recorded in a batch, as ``mail show`` lists it."""

    touch_id: int
    lead_id: int
    email: str
    name: str
    tier: str
    step: str
    status: str
    sent_at: datetime | None


@dataclass(frozen=True, slots=True)
class MailStatus:
    """Direct mail at a glance, for ``status`` and ``mail batches``."""

    waiting: int
    waiting_since: datetime | None
    exported_batches: int
    exported_pieces: int
    """Pieces in exported batches not yet confirmed mailed (and not yet counted)."""
    skipped_for_address: int
    """``mail`` steps skipped because the lead had no complete postal address."""


@dataclass(frozen=True, slots=True)
class Confirmed:
    """What confirming a batch did."""

    batch: BatchRecord
    counted: list[Recorded]
    already: bool = False


class StalePieces(Exception):
    """Pieces in a batch's files are no longer waiting (a lead stopped while it was written)."""

    def __init__(self, touch_ids: Sequence[int]) -> None:
        self.touch_ids = list(touch_ids)
        super().__init__(f"{len(self.touch_ids)} pieces are no longer waiting")


def _batch(row: Any) -> BatchRecord:
    m = row._mapping
    return BatchRecord(**{f: m[f] for f in BatchRecord.__slots__})


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), CHUNK):
        yield list(ids[start : start + CHUNK])


class MailQueries(StoreBase):
    """Collecting waiting pieces into print batches, confirming and cancelling them."""

    # -- one export at a time ---------------------------------------------------------------

    @contextmanager
    def export_lock(self) -> Iterator[bool]:
        """Hold the database's export lock while the block runs; yields False when another
        daemon holds it. On SQLite the caller's file lock is enough (one host)."""
        if not self.is_postgres:
            yield True
            return
        with self.engine.connect() as conn:
            key = (sa.literal(EXPORT_LOCK_CLASS), sa.func.hashtext(sa.func.current_schema()))
            got = bool(conn.execute(sa.select(sa.func.pg_try_advisory_lock(*key))).scalar())
            # The lock belongs to the session, not the transaction: end the transaction so
            # the connection does not sit idle in one for the whole export.
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.execute(sa.select(sa.func.pg_advisory_unlock(*key)))
                    conn.commit()

    # -- waiting pieces -------------------------------------------------------------------------

    def waiting_pieces(self, *, limit: int) -> list[PieceRecord]:
        """The oldest ``limit`` pieces waiting for a print batch, with their leads."""
        query = (
            sa.select(
                touches_t.c.id.label("touch_id"),
                touches_t.c.tier.label("touch_tier"),
                touches_t.c.step,
                touches_t.c.template,
                touches_t.c.updated_at.label("waiting_since"),
                leads_t,
            )
            .join(leads_t, leads_t.c.id == touches_t.c.lead_id)
            .where(touches_t.c.status == TouchStatus.PENDING.value, touches_t.c.batch_id.is_(None))
            .order_by(touches_t.c.updated_at, touches_t.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [
                PieceRecord(r.touch_id, r.touch_tier, r.step, r.template, r.waiting_since, lead_record(r))
                for r in conn.execute(query)
            ]

    def mail_status(self) -> MailStatus:
        with self.engine.connect() as conn:
            waiting = conn.execute(
                sa.select(sa.func.count(), sa.func.min(touches_t.c.updated_at)).where(
                    touches_t.c.status == TouchStatus.PENDING.value, touches_t.c.batch_id.is_(None)
                )
            ).one()
            exported = conn.execute(
                sa.select(sa.func.count()).where(print_batches_t.c.status == BatchStatus.EXPORTED.value)
            ).scalar_one()
            queued = conn.execute(
                sa.select(sa.func.count()).where(touches_t.c.status == TouchStatus.QUEUED.value)
            ).scalar_one()
            skipped = conn.execute(
                sa.select(sa.func.count()).where(
                    touches_t.c.status == TouchStatus.SKIPPED.value,
                    touches_t.c.channel == Channel.MAIL.value,
                )
            ).scalar_one()
        since = waiting[1]
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)  # aggregates bypass the column type
        return MailStatus(int(waiting[0]), since, int(exported), int(queued), int(skipped))

    # -- exporting -----------------------------------------------------------------------------

    def begin_batch(self, *, now: datetime, detail: str) -> int:
        """Reserve a batch number for an export about to write its files."""
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    sa.insert(print_batches_t)
                    .values(status=BatchStatus.EXPORTING.value, detail=detail, created_at=now)
                    .returning(print_batches_t.c.id)
                ).scalar_one()
            )

    def finish_batch(
        self,
        batch_id: int,
        *,
        placed: Sequence[int],
        pages: int,
        path: str,
        detail: str,
        now: datetime,
        count: bool,
        policy: core.Policy,
        back_to_dispatch: Sequence[tuple[int, str]] = (),
        failed: Sequence[tuple[int, str]] = (),
        dropped: Sequence[tuple[int, str]] = (),
    ) -> list[Recorded]:
        """Record a batch whose files are complete, in one transaction.

        :param placed: the touches of the pieces in the files, in order. Every one must
            still be waiting, or nothing is recorded and :class:`StalePieces` names those
            that are not (the files must then be made again without them).
        :param count: count the pieces now (``sent``) instead of at confirmation (``queued``).
        :param back_to_dispatch: pieces the dispatcher must look at again (the lead's
            address is no longer complete): due again at once.
        :param failed: pieces that could not be made (a template error for this lead):
            ``failed`` with the reason, for the operator.
        :param dropped: pieces whose step left the configuration: ``cancelled``, and the
            lead goes on with its sequence.
        :returns: what counting did (promotions, flags), when ``count``.
        """
        counted: list[Recorded] = []
        with self.engine.begin() as conn:
            self._lock_batch(conn, batch_id)
            rows = {
                r.id: r
                for ids in _chunks(placed)
                for r in conn.execute(sa.select(touches_t).where(touches_t.c.id.in_(ids)))
            }
            stale = [
                t
                for t in placed
                if t not in rows
                or rows[t].status != TouchStatus.PENDING.value
                or rows[t].batch_id is not None
            ]
            if stale:
                raise StalePieces(stale)
            if count:
                counted = self._count(
                    conn, [rows[t] for t in placed], policy=policy, now=now, batch_id=batch_id
                )
            else:
                for ids in _chunks(placed):
                    conn.execute(
                        sa.update(touches_t)
                        .where(touches_t.c.id.in_(ids))
                        .values(
                            status=TouchStatus.QUEUED.value, batch_id=batch_id, error=None, updated_at=now
                        )
                    )
            self._settle(conn, back_to_dispatch, failed, dropped, now)
            conn.execute(
                sa.update(print_batches_t)
                .where(print_batches_t.c.id == batch_id)
                .values(
                    status=BatchStatus.EXPORTED.value,
                    pieces=len(placed),
                    pages=pages,
                    path=path,
                    detail=detail,
                    exported_at=now,
                )
            )
        return counted

    def drop_batch(
        self,
        batch_id: int,
        *,
        now: datetime,
        back_to_dispatch: Sequence[tuple[int, str]] = (),
        failed: Sequence[tuple[int, str]] = (),
        dropped: Sequence[tuple[int, str]] = (),
    ) -> None:
        """Give up a reserved batch that ended up with no pieces: settle the pieces that
        could not go in it and delete the reservation (no files were published)."""
        with self.engine.begin() as conn:
            self._settle(conn, back_to_dispatch, failed, dropped, now)
            conn.execute(
                sa.delete(print_batches_t).where(
                    print_batches_t.c.id == batch_id,
                    print_batches_t.c.status == BatchStatus.EXPORTING.value,
                )
            )

    def fail_batch(self, batch_id: int, *, detail: str) -> None:
        """Mark a reserved batch ``failed``: its export stopped; its pieces still wait."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(print_batches_t)
                .where(
                    print_batches_t.c.id == batch_id,
                    print_batches_t.c.status == BatchStatus.EXPORTING.value,
                )
                .values(status=BatchStatus.FAILED.value, detail=detail)
            )

    def unfinished_exports(self) -> list[BatchRecord]:
        """Batches reserved by an export that never finished (call with the export lock held)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(print_batches_t)
                .where(print_batches_t.c.status == BatchStatus.EXPORTING.value)
                .order_by(print_batches_t.c.id)
            )
            return [_batch(r) for r in rows]

    def settle_pieces(
        self,
        *,
        now: datetime,
        back_to_dispatch: Sequence[tuple[int, str]] = (),
        failed: Sequence[tuple[int, str]] = (),
        dropped: Sequence[tuple[int, str]] = (),
    ) -> None:
        """Move waiting pieces on that will not go into a batch (see :meth:`finish_batch`)."""
        with self.engine.begin() as conn:
            self._settle(conn, back_to_dispatch, failed, dropped, now)

    def _settle(
        self,
        conn: Connection,
        back_to_dispatch: Sequence[tuple[int, str]],
        failed: Sequence[tuple[int, str]],
        dropped: Sequence[tuple[int, str]],
        now: datetime,
    ) -> None:
        """Move pieces that did not go into a batch on; only pieces still waiting are touched."""
        for items, status, lead_due in (
            (back_to_dispatch, TouchStatus.RETRY, True),
            (failed, TouchStatus.FAILED, False),
            (dropped, TouchStatus.CANCELLED, True),
        ):
            if not items:
                continue
            params = [
                {"b_id": touch_id, "b_error": reason, "b_next": now if status == TouchStatus.RETRY else None}
                for touch_id, reason in items
            ]
            conn.execute(
                sa.update(touches_t)
                .where(
                    touches_t.c.id == sa.bindparam("b_id"),
                    touches_t.c.status == TouchStatus.PENDING.value,
                    touches_t.c.batch_id.is_(None),
                )
                .values(
                    status=status.value,
                    error=sa.bindparam("b_error"),
                    next_attempt_at=sa.bindparam("b_next"),
                    lease_until=None,
                    updated_at=now,
                ),
                params,
            )
            for ids in _chunks(self._leads_of(conn, [t for t, _ in items])):
                conn.execute(
                    sa.update(leads_t)
                    .where(leads_t.c.id.in_(ids), leads_t.c.status == LeadStatus.ACTIVE.value)
                    .values(next_step=None, next_due_at=now if lead_due else None, updated_at=now)
                )

    def _leads_of(self, conn: Connection, touch_ids: Sequence[int]) -> list[int]:
        out: set[int] = set()
        for ids in _chunks(touch_ids):
            out.update(conn.execute(sa.select(touches_t.c.lead_id).where(touches_t.c.id.in_(ids))).scalars())
        return sorted(out)

    def _count(
        self, conn: Connection, touches: Sequence[Any], *, policy: core.Policy, now: datetime, batch_id: int
    ) -> list[Recorded]:
        """Count mailed pieces as touches, through the decision core, as a sent email counts."""
        lead_ids = sorted({t.lead_id for t in touches})
        self._lock_leads(conn, lead_ids)
        states = self._states(conn, lead_ids)
        emails: dict[int, str] = {}
        for ids in _chunks(lead_ids):
            rows = conn.execute(sa.select(leads_t.c.id, leads_t.c.email).where(leads_t.c.id.in_(ids)))
            emails.update({r.id: r.email for r in rows})
        out: list[Recorded] = []
        touch_updates: list[dict[str, Any]] = []
        for t in touches:
            state = states[t.lead_id]
            after = core.apply_touch(state, policy, at=now, tier=t.tier, step=t.step)
            states[t.lead_id] = core.with_touch(state, after, core.TouchView(t.tier, t.step, "sent", now))
            self._write_after(conn, t.lead_id, after, now=now)
            touch_updates.append({"b_id": t.id})
            out.append(
                Recorded(
                    t.id,
                    emails[t.lead_id],
                    t.tier,
                    t.step,
                    "sent",
                    after.touch_count,
                    after.promoted,
                    after.flagged,
                )
            )
        if touch_updates:
            conn.execute(
                sa.update(touches_t)
                .where(touches_t.c.id == sa.bindparam("b_id"))
                .values(
                    status=TouchStatus.SENT.value,
                    batch_id=batch_id,
                    sent_at=now,
                    error=None,
                    lease_until=None,
                    updated_at=now,
                ),
                touch_updates,
            )
        return out

    def _lock_batch(self, conn: Connection, batch_id: int) -> Any:
        """The batch row, locked against a concurrent confirm or cancel (PostgreSQL)."""
        query = sa.select(print_batches_t).where(print_batches_t.c.id == batch_id)
        if self.is_postgres:
            query = query.with_for_update()
        return conn.execute(query).first()

    # -- reading batches ---------------------------------------------------------------------------

    def batches(self, *, limit: int = 50) -> list[BatchRecord]:
        """The most recent batches, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(print_batches_t).order_by(print_batches_t.c.id.desc()).limit(limit))
            return [_batch(r) for r in rows]

    def get_batch(self, batch_id: int) -> BatchRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(print_batches_t).where(print_batches_t.c.id == batch_id)).first()
        if row is None:
            raise CampaigndError(f"there is no print batch {batch_id} ('campaignd mail batches' lists them)")
        return _batch(row)

    def batch_pieces(self, batch_id: int) -> list[BatchPiece]:
        """The pieces recorded in a batch, in touch order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    touches_t.c.id,
                    touches_t.c.lead_id,
                    touches_t.c.tier,
                    touches_t.c.step,
                    touches_t.c.status,
                    touches_t.c.sent_at,
                    leads_t.c.email,
                    leads_t.c.first_name,
                    leads_t.c.last_name,
                )
                .join(leads_t, leads_t.c.id == touches_t.c.lead_id)
                .where(touches_t.c.batch_id == batch_id)
                .order_by(touches_t.c.id)
            )
            return [
                BatchPiece(
                    r.id,
                    r.lead_id,
                    r.email,
                    f"{r.first_name} {r.last_name}".strip(),
                    r.tier,
                    r.step or "",
                    r.status,
                    r.sent_at,
                )
                for r in rows
            ]

    # -- after the export -------------------------------------------------------------------------------

    def confirm_batch(self, batch_id: int, *, now: datetime, policy: core.Policy) -> Confirmed:
        """The batch was handed to the post: count each of its pieces as a touch, once."""
        with self.engine.begin() as conn:
            row = self._lock_batch(conn, batch_id)
            if row is None:
                raise CampaigndError(
                    f"there is no print batch {batch_id} ('campaignd mail batches' lists them)"
                )
            batch = _batch(row)
            if batch.status == BatchStatus.CONFIRMED:
                return Confirmed(batch, [], already=True)
            if batch.status != BatchStatus.EXPORTED:
                raise CampaigndError(
                    f"print batch {batch_id} is {batch.status}; "
                    "only an exported batch can be confirmed mailed"
                )
            touches = list(
                conn.execute(
                    sa.select(touches_t)
                    .where(touches_t.c.batch_id == batch_id, touches_t.c.status == TouchStatus.QUEUED.value)
                    .order_by(touches_t.c.id)
                )
            )
            counted = self._count(conn, touches, policy=policy, now=now, batch_id=batch_id)
            conn.execute(
                sa.update(print_batches_t)
                .where(print_batches_t.c.id == batch_id)
                .values(status=BatchStatus.CONFIRMED.value, confirmed_at=now)
            )
        return Confirmed(self.get_batch(batch_id), counted)

    def cancel_batch(self, batch_id: int, *, now: datetime) -> tuple[BatchRecord, int, int]:
        """The batch will not be mailed: its pieces go back to the dispatcher, due now.

        Pieces of leads that stopped meanwhile (unsubscribed, paused, flagged) are
        cancelled instead. A batch whose pieces were already counted cannot be cancelled:
        touch counts never go down.

        :returns: the batch, how many pieces are due again, how many were cancelled.
        """
        with self.engine.begin() as conn:
            row = self._lock_batch(conn, batch_id)
            if row is None:
                raise CampaigndError(
                    f"there is no print batch {batch_id} ('campaignd mail batches' lists them)"
                )
            batch = _batch(row)
            if batch.status != BatchStatus.EXPORTED:
                raise CampaigndError(
                    f"print batch {batch_id} is {batch.status}; only an exported batch that is not yet "
                    "confirmed mailed can be cancelled"
                )
            touches = list(
                conn.execute(
                    sa.select(touches_t.c.id, touches_t.c.lead_id, touches_t.c.status).where(
                        touches_t.c.batch_id == batch_id
                    )
                )
            )
            if any(t.status == TouchStatus.SENT.value for t in touches):
                raise CampaigndError(
                    f"the pieces of print batch {batch_id} were counted as touches when it was exported "
                    '(print.count_at = "export"), and touch counts never go down, so it cannot be '
                    "cancelled; if it was not mailed, log what happens instead by hand "
                    "('campaignd touches log')"
                )
            lead_ids = sorted({t.lead_id for t in touches})
            self._lock_leads(conn, lead_ids)
            active: set[int] = set()
            for ids in _chunks(lead_ids):
                active.update(
                    conn.execute(
                        sa.select(leads_t.c.id)
                        .outerjoin(suppressions_t, suppressions_t.c.email == leads_t.c.email)
                        .where(
                            leads_t.c.id.in_(ids),
                            leads_t.c.status == LeadStatus.ACTIVE.value,
                            suppressions_t.c.email.is_(None),
                        )
                    ).scalars()
                )
            again = [t.id for t in touches if t.status == TouchStatus.QUEUED.value and t.lead_id in active]
            stopped = [
                t.id for t in touches if t.status == TouchStatus.QUEUED.value and t.lead_id not in active
            ]
            for ids in _chunks(again):
                conn.execute(
                    sa.update(touches_t)
                    .where(touches_t.c.id.in_(ids))
                    .values(
                        status=TouchStatus.RETRY.value,
                        batch_id=None,
                        next_attempt_at=now,
                        error=f"print batch {batch_id} was cancelled",
                        updated_at=now,
                    )
                )
            for ids in _chunks(stopped):
                conn.execute(
                    sa.update(touches_t)
                    .where(touches_t.c.id.in_(ids))
                    .values(
                        status=TouchStatus.CANCELLED.value,
                        batch_id=None,
                        error=f"print batch {batch_id} was cancelled; the lead has stopped",
                        updated_at=now,
                    )
                )
            due_again = set(again)
            for ids in _chunks(sorted({t.lead_id for t in touches if t.id in due_again})):
                conn.execute(
                    sa.update(leads_t)
                    .where(leads_t.c.id.in_(ids))
                    .values(next_step=None, next_due_at=now, updated_at=now)
                )
            conn.execute(
                sa.update(print_batches_t)
                .where(print_batches_t.c.id == batch_id)
                .values(status=BatchStatus.CANCELLED.value, cancelled_at=now)
            )
        return self.get_batch(batch_id), len(again), len(stopped)
