"""The dispatcher's hot statements, run on the driver's own cursor.

Every message that leaves costs one transaction: record the answer before it, mark it
as leaving. Building and executing a statement through SQLAlchemy costs several times
what the database spends running it, so the few statements of that transaction are
plain SQL, written once for both databases, and run on the DBAPI cursor of the
connection that SQLAlchemy opened the transaction on (so they share it with anything
else the transaction does). Time stamps go through the column type's own processors,
so what is stored is exactly what the rest of the store writes and reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

from campaignd import sequences as core
from campaignd.models import LeadStatus, TouchStatus, UTCDateTime
from campaignd.store.records import LeadRecord

_CHUNK = 512
"""Most ids (or addresses) in one ``IN`` list when reading many."""

TIMESTAMPS = frozenset(
    {
        "created_at",
        "updated_at",
        "sent_at",
        "lease_until",
        "next_attempt_at",
        "tier_since",
        "last_touch_at",
        "next_due_at",
        "flagged_at",
    }
)
"""Columns of ``leads`` and ``touches`` written here that hold a time stamp."""


class Settling(NamedTuple):
    """A touch whose answer is being recorded, as the recording needs it."""

    id: int
    lead_id: int
    tier: str
    step: str
    status: str
    attempts: int
    message_id: str | None


class Settled(NamedTuple):
    touches: dict[int, Settling]
    """The touches asked for that exist, by id."""
    states: dict[int, core.LeadState]
    """Their leads as the decision core sees them, by lead id."""
    emails: dict[int, str]


_LEADS = """
SELECT l.id, l.email, l.tier, l.status, l.touch_count, l.tier_since, l.last_touch_at,
       l.timezone, s.email
FROM leads l LEFT JOIN suppressions s ON s.email = l.email
WHERE l.id IN (SELECT lead_id FROM touches WHERE id {ids})
ORDER BY l.id
"""

_TOUCHES = """
SELECT id, lead_id, tier, step, status, attempts, message_id, created_at, sent_at,
       lease_until, next_attempt_at
FROM touches
WHERE lead_id IN (SELECT lead_id FROM touches WHERE id {ids}) AND step IS NOT NULL
ORDER BY id
"""

_MARK = """
UPDATE touches
SET status = :sending, attempts = attempts + 1, lease_until = :lease_until, updated_at = :now
WHERE id {ids} AND {status} = :claimed AND claimed_by = :worker
RETURNING id
"""
"""Without statistics SQLite would rather walk the (status, lease) index over every claimed
touch than look up the few ids: ``+status`` keeps that index out of the choice."""


_LEAD_COLUMNS = LeadRecord.__slots__
_LEAD_STAMPS = tuple(i for i, name in enumerate(_LEAD_COLUMNS) if name in TIMESTAMPS | {"converted_at"})
_LEAD_CUSTOM = _LEAD_COLUMNS.index("custom")

# The column names are the read model's own fields; every value is a parameter.
_DUE = f"""
SELECT {", ".join(_LEAD_COLUMNS)}
FROM leads
WHERE status = :active AND next_due_at <= :now
ORDER BY next_due_at, id
LIMIT :limit
"""  # noqa: S608

_LEAD_TOUCHES = """
SELECT lead_id, tier, step, status, created_at, sent_at, lease_until, next_attempt_at
FROM touches
WHERE lead_id {ids} AND step IS NOT NULL
ORDER BY id
"""

_SUPPRESSED = "SELECT email FROM suppressions WHERE email {ids}"

_CLAIM = """
INSERT INTO touches (lead_id, tier, step, channel, template, status, attempts, claimed_by,
                     lease_until, created_at, updated_at)
VALUES (:lead_id, :tier, :step, :channel, :template, :claimed, 0, :worker, :lease_until, :now, :now)
ON CONFLICT (lead_id, tier, step) DO UPDATE SET
    status = excluded.status,
    claimed_by = excluded.claimed_by,
    lease_until = excluded.lease_until,
    attempts = CASE WHEN touches.status = :cancelled THEN 0 ELSE touches.attempts END,
    updated_at = excluded.updated_at
WHERE touches.status = :retry
   OR touches.status = :cancelled
   OR (touches.status = :claimed AND touches.lease_until <= :now)
"""
"""Only work that never left may be taken again: a retry that is due, a claim whose
daemon let its lease run out, or a step cancelled before it left (planned again after
its lead was resumed; it starts afresh)."""

_CLAIMED = """
SELECT id, lead_id, attempts
FROM touches
WHERE lead_id {ids} AND status = :claimed AND claimed_by = :worker AND lease_until = :lease_until
"""


class Due(NamedTuple):
    """A due lead, as claiming reads it."""

    lead: LeadRecord
    state: core.LeadState


class HotStatements:
    """The record-and-mark transaction's statements for one database dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.postgres = dialect.name == "postgresql"
        self._bind: Callable[[Any], Any]
        self._read: Callable[[Any], Any]
        if self.postgres:
            # The type as this dialect runs it (generic DateTime has no processors of its own).
            stamp = UTCDateTime().dialect_impl(dialect)
            self._bind = stamp.bind_processor(dialect) or _same
            self._read = stamp.result_processor(dialect, None) or _same
        else:
            self._bind, self._read = sqlite_stamp, read_sqlite_stamp
        self._sql: dict[tuple[str, int], str] = {}
        self._mark = _MARK.replace("{status}", "status" if self.postgres else "+status")
        self._updates: dict[tuple[str, tuple[str, ...]], str] = {}
        events = "INSERT INTO lead_events (lead_id, kind, at, detail) VALUES (:l, :k, :a, :d)"
        self._events_sql = self._styled(events)

    # -- statements ----------------------------------------------------------------------

    def _styled(self, sql: str) -> str:
        """``sql`` with its ``:name`` parameters in the driver's style (sqlite3 takes them as
        they are; psycopg wants ``%(name)s``)."""
        return re.sub(r":(\w+)", r"%(\1)s", sql) if self.postgres else sql

    def _text(self, template: str, count: int) -> str:
        """``template`` in the driver's parameter style, with ``{ids}`` as ``count`` ids.

        The ids go as a list of parameters, not as one array: on PostgreSQL a prepared
        statement with an array parameter gets a generic plan that scans the table.
        """
        sql = self._sql.get((template, count))
        if sql is None:
            sql = self._styled(template.format(ids=f"IN ({', '.join(f':i{n}' for n in range(count))})"))
            self._sql[(template, count)] = sql
        return sql

    @staticmethod
    def _ids(ids: Sequence[Any], params: dict[str, Any]) -> dict[str, Any]:
        params.update({f"i{n}": value for n, value in enumerate(ids)})
        return params

    def _many(
        self, conn: Connection, template: str, values: Sequence[Any], params: dict[str, Any] | None = None
    ) -> list[Any]:
        """The rows of ``template`` for every value, asked for in chunks.

        Each chunk is padded (with its last value again) to a power of two, so a handful
        of statement texts serve every batch size.
        """
        cur = _cursor(conn)
        rows: list[Any] = []
        try:
            for start in range(0, len(values), _CHUNK):
                chunk = list(values[start : start + _CHUNK])
                size = 1 << (len(chunk) - 1).bit_length()
                chunk += [chunk[-1]] * (size - len(chunk))
                cur.execute(self._text(template, size), self._ids(chunk, dict(params or {})))
                rows += cur.fetchall()
        finally:
            cur.close()
        return rows

    def _update_text(self, table: sa.Table, keys: tuple[str, ...]) -> str:
        sql = self._updates.get((table.name, keys))
        if sql is None:
            unknown = [key for key in keys if key not in table.c]
            if unknown:
                raise ValueError(f"{table.name} has no column {', '.join(unknown)}")
            assignments = ", ".join(f"{key} = :{key}" for key in keys)
            # Names checked against the table just above; every value is a parameter.
            sql = self._styled(f"UPDATE {table.name} SET {assignments} WHERE id = :b_id")  # noqa: S608
            self._updates[(table.name, keys)] = sql
        return sql

    def sqlite_wait(self, conn: Connection, wait: bool) -> None:
        """Let transactions on this SQLite connection wait for the write lock (up to the busy
        timeout it was opened with), or not at all."""
        dbapi = conn.connection.dbapi_connection
        info = conn.connection.info
        if "busy_timeout" not in info:
            info["busy_timeout"] = dbapi.execute("PRAGMA busy_timeout").fetchone()[0]  # type: ignore[union-attr]
        dbapi.execute(f"PRAGMA busy_timeout = {int(info['busy_timeout']) if wait else 0}")  # type: ignore[union-attr]

    def pipeline(self, conn: Connection, *, enabled: bool = True) -> AbstractContextManager[Any]:
        """On PostgreSQL, send the transaction's statements without waiting for each answer
        (psycopg's pipeline mode): the server is asked only when a result is read, so the
        writes and the mark that follows them cost one round trip together."""
        if not (self.postgres and enabled):
            return nullcontext()
        return conn.connection.dbapi_connection.pipeline()  # type: ignore[union-attr,no-any-return]

    def _view(
        self, tier: str, step: str, status: str, created: Any, sent: Any, lease: Any, retry: Any
    ) -> core.TouchView:
        """A touch as the core sees it, from its stored columns."""
        read = self._read
        return core.TouchView(
            tier, step, status, read(sent) if sent is not None else read(created), read(lease), read(retry)
        )

    # -- claiming --------------------------------------------------------------------------------

    def due(self, conn: Connection, *, now: datetime, limit: int) -> list[Due]:
        """The leads due at ``now``, earliest first, with their state for the core.

        Locked for the transaction on PostgreSQL, skipping those another daemon holds.
        """
        read = self._read
        sql = self._styled(_DUE) + (" FOR UPDATE SKIP LOCKED" if self.postgres else "")
        cur = _cursor(conn)
        try:
            cur.execute(sql, {"active": LeadStatus.ACTIVE.value, "now": self._bind(now), "limit": limit})
            rows = [list(row) for row in cur.fetchall()]
        finally:
            cur.close()
        if not rows:
            return []
        for row in rows:
            for i in _LEAD_STAMPS:
                if row[i] is not None:
                    row[i] = read(row[i])
            if isinstance(row[_LEAD_CUSTOM], str):
                row[_LEAD_CUSTOM] = json.loads(row[_LEAD_CUSTOM])
        leads = [LeadRecord(*row) for row in rows]
        views: dict[int, list[core.TouchView]] = {}
        for lead_id, tier, step, status, created, sent, lease, retry in self._many(
            conn, _LEAD_TOUCHES, [lead.id for lead in leads]
        ):
            views.setdefault(lead_id, []).append(self._view(tier, step, status, created, sent, lease, retry))
        suppressed = {row[0] for row in self._many(conn, _SUPPRESSED, [lead.email for lead in leads])}
        return [
            Due(
                lead,
                core.LeadState(
                    tier=lead.tier,
                    status=lead.status,
                    touch_count=lead.touch_count,
                    tier_since=lead.tier_since,
                    last_touch_at=lead.last_touch_at,
                    timezone=lead.timezone,
                    suppressed=lead.email in suppressed,
                    touches=tuple(views.get(lead.id, ())),
                ),
            )
            for lead in leads
        ]

    def claim(
        self,
        conn: Connection,
        wanted: Sequence[tuple[int, core.NextTouch]],
        *,
        worker: str,
        lease_until: datetime,
        now: datetime,
    ) -> dict[int, tuple[int, int]]:
        """Create or take over the touches of ``wanted`` (lead id, step) for ``worker``.

        :returns: lead id -> (touch id, attempts so far) for every touch now claimed; a
            lead missing from it had its slot taken (by another daemon, or already sent).
        """
        if not wanted:
            return {}
        fixed = {
            "claimed": TouchStatus.CLAIMED.value,
            "cancelled": TouchStatus.CANCELLED.value,
            "retry": TouchStatus.RETRY.value,
            "worker": worker,
            "lease_until": self._bind(lease_until),
            "now": self._bind(now),
        }
        params = [
            {
                "lead_id": lead_id,
                "tier": nt.tier,
                "step": nt.step.id,
                "channel": nt.step.channel.value,
                "template": nt.step.template,
                **fixed,
            }
            for lead_id, nt in wanted
        ]
        cur = _cursor(conn)
        try:
            cur.executemany(self._styled(_CLAIM), params)
        finally:
            cur.close()
        fixed = {key: fixed[key] for key in ("claimed", "worker", "lease_until")}
        rows = self._many(conn, _CLAIMED, [lead_id for lead_id, _ in wanted], fixed)
        return {lead_id: (touch_id, attempts) for touch_id, lead_id, attempts in rows}

    # -- the transaction's steps ---------------------------------------------------------------

    def settling(self, conn: Connection, touch_ids: Sequence[int]) -> Settled:
        """The touches being settled and their leads as the core sees them, in two queries.

        The leads are locked for the transaction on PostgreSQL, so a concurrent change by
        hand (an unsubscribe, a manual touch) is either seen here or waits for this.
        """
        read = self._read
        # Both are sent before either is read (one round trip in a pipeline); the server
        # runs them in order, so the touches are read once their leads are locked.
        leads_cur, touches_cur = _cursor(conn), _cursor(conn)
        try:
            leads_sql = self._text(_LEADS, len(touch_ids))
            if self.postgres:
                leads_sql += " FOR UPDATE OF l"
            leads_cur.execute(leads_sql, self._ids(touch_ids, {}))
            touches_cur.execute(self._text(_TOUCHES, len(touch_ids)), self._ids(touch_ids, {}))
            leads = leads_cur.fetchall()
            touch_rows = touches_cur.fetchall()
        finally:
            leads_cur.close()
            touches_cur.close()
        wanted = set(touch_ids)
        settling: dict[int, Settling] = {}
        views: dict[int, list[core.TouchView]] = {}
        for tid, lead_id, tier, step, status, attempts, msg_id, created, sent, lease, retry in touch_rows:
            if tid in wanted:
                settling[tid] = Settling(tid, lead_id, tier, step, status, attempts, msg_id)
            views.setdefault(lead_id, []).append(self._view(tier, step, status, created, sent, lease, retry))
        states = {
            lead_id: core.LeadState(
                tier=tier,
                status=status,
                touch_count=count,
                tier_since=read(since),
                last_touch_at=read(last),
                timezone=zone,
                suppressed=suppressed is not None,
                touches=tuple(views.get(lead_id, ())),
            )
            for lead_id, _, tier, status, count, since, last, zone, suppressed in leads
        }
        return Settled(settling, states, {row[0]: row[1] for row in leads})

    def update(self, conn: Connection, table: sa.Table, rows: Iterable[dict[str, Any]]) -> None:
        """Update rows of ``table`` by ``b_id``, one executemany per set of changed columns."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            keys = tuple(sorted(key for key in row if key != "b_id"))
            groups.setdefault(keys, []).append(row)
        if not groups:
            return
        bind = self._bind
        # Most stamps of a transaction are one and the same "now": convert each once.
        stored: dict[Any, Any] = {None: None}
        cur = _cursor(conn)
        try:
            for keys, params in groups.items():
                stamps = [key for key in keys if key in TIMESTAMPS]
                for row in params:
                    for key in stamps:
                        value = row[key]
                        converted = stored.get(value, _MISSING)
                        if converted is _MISSING:
                            converted = stored[value] = bind(value)
                        row[key] = converted
                cur.executemany(self._update_text(table, keys), params)
        finally:
            cur.close()

    def insert_events(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Add ``lead_events`` rows (``lead_id``, ``kind``, ``at``, ``detail``)."""
        if not rows:
            return
        bind = self._bind
        params = [
            {"l": row["lead_id"], "k": row["kind"], "a": bind(row["at"]), "d": row["detail"]} for row in rows
        ]
        cur = _cursor(conn)
        try:
            cur.executemany(self._events_sql, params)
        finally:
            cur.close()

    def mark_sending(
        self, conn: Connection, touch_ids: Sequence[int], *, worker: str, lease_until: datetime, now: datetime
    ) -> set[int]:
        """Mark claimed touches as leaving; returns those that were still ours to send."""
        params = {
            "worker": worker,
            "lease_until": self._bind(lease_until),
            "now": self._bind(now),
            "sending": TouchStatus.SENDING.value,
            "claimed": TouchStatus.CLAIMED.value,
        }
        cur = _cursor(conn)
        try:
            cur.execute(self._text(self._mark, len(touch_ids)), self._ids(touch_ids, params))
            return {row[0] for row in cur.fetchall()}
        finally:
            cur.close()


def sqlite_stamp(value: datetime | None) -> str | None:
    """A time stamp as SQLite stores it (naive UTC text, as SQLAlchemy's DateTime writes it)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r} given to the database; use UTC")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def read_sqlite_stamp(value: str | None) -> datetime | None:
    """The time stamp SQLite holds as text, in UTC."""
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _cursor(conn: Connection) -> Any:
    return conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]


_MISSING = object()


def _same(value: Any) -> Any:
    return value
