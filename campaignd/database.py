"""The database connection: engines, migrations and the one-daemon-per-SQLite-file lock.

Owns how campaignd connects (SQLite pragmas, PostgreSQL pooling), running the Alembic
migrations shipped in ``campaignd/migrations``, and telling whether a database is at the
latest revision. Queries live in ``store.py``, not here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from campaignd.exceptions import AlreadyRunning, DatabaseError, DatabaseNotAtHead

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported where migrations are handled, not here: most commands never need
# it, and it is a good share of the command line's start-up time.

logger = logging.getLogger(__name__)

READ_ONLY = "campaignd_read_only"
"""Execution option for connections that only read: on SQLite they need no write lock."""


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def create_engine(url: str, *, busy_timeout_s: float = 10.0, pool_size: int = 5) -> Engine:
    """An engine for ``url``; SQLite files get WAL, a busy timeout and foreign keys."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise DatabaseError(f"the database URL is not valid: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
            # SQLite's own locking is the arbiter; pysqlite's implicit BEGIN is switched
            # off below so that "BEGIN IMMEDIATE" takes the write lock up front.
            poolclass=sa.pool.QueuePool if path else sa.pool.StaticPool,
        )

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            if path is not None:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # Writers take the write lock up front, so they queue on the busy timeout
            # instead of failing on a lock upgrade; readers (``READ_ONLY``) take none and
            # never wait behind a writer.
            statement = "BEGIN" if conn.get_execution_options().get(READ_ONLY, False) else "BEGIN IMMEDIATE"
            # On the driver's connection (this runs for every transaction), with its errors
            # (a locked database) raised as SQLAlchemy raises every other statement's.
            try:
                conn.connection.dbapi_connection.execute(statement)  # type: ignore[union-attr]
            except sqlite3.Error as exc:
                raise sa.exc.DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc

        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        return sa.create_engine(parsed, pool_size=pool_size, pool_pre_ping=True, pool_recycle=1800)
    except ModuleNotFoundError as exc:
        raise DatabaseError(
            f"the database driver is not installed ({exc.name}); for PostgreSQL install "
            "campaignd with the 'postgres' extra: pip install 'campaignd[postgres]'"
        ) from None


# -- migrations ------------------------------------------------------------------------


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("campaignd") / "migrations"))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(sa.create_engine("sqlite://")))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except sa.exc.OperationalError as exc:
        raise DatabaseError(f"cannot open the database: {exc.orig}") from None


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the latest revision; returns (before, after)."""
    from alembic import command

    before = current_revision(engine)
    command.upgrade(alembic_config(engine), "head")
    return before, head_revision()


SCHEMA_REVISION = "0001"
"""The migration this version of campaignd works with: the newest in ``migrations/``
(a test holds them equal). Known here so that every command can check the database
without loading Alembic."""


def stamped_revision(engine: Engine) -> str | None:
    """The revision the database is stamped with, read directly (no Alembic)."""
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except sa.exc.OperationalError as exc:
        raise DatabaseError(f"cannot open the database: {exc.orig}") from None


def require_head(engine: Engine) -> None:
    """Refuse to work on a database whose schema is not the one this version expects."""
    current, head = stamped_revision(engine), SCHEMA_REVISION
    if current != head:
        state = "is empty" if current is None else f"is at revision {current}"
        raise DatabaseNotAtHead(
            f"the database {state}, this version of campaignd needs revision {head}; "
            "run 'campaignd db upgrade' first"
        )


# -- one daemon per SQLite file ----------------------------------------------------------


@contextmanager
def daemon_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock for the lifetime of a daemon on an SQLite file.

    SQLite cannot arbitrate several dispatchers safely, so a second daemon on the same
    file refuses to start. The kernel drops the lock when the process dies, so a crash
    never leaves a stale lock behind. PostgreSQL needs no lock: claims are row-level.
    """
    path = sqlite_path(url)
    if path is None:
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fh: IO[str] = lock_path.open("a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise AlreadyRunning(
                f"another campaignd daemon ({holder}) is already running on {path}; "
                "SQLite allows one daemon per database file (use PostgreSQL to run several)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fh.close()


# -- moving to another database ----------------------------------------------------------


def copy_database(
    source: Engine, target: Engine, *, batch: int = 5000, progress: Callable[[str, int], None] | None = None
) -> dict[str, int]:
    """Copy everything from ``source`` into the empty database ``target`` (e.g. SQLite to
    PostgreSQL), keeping every id, so touches, events and batches still point at their
    leads. The target is migrated first; it must hold no rows.

    :returns: the number of rows copied per table.
    :raises DatabaseError: when the source is not at head or the target is not empty.
    """
    from sqlmodel import SQLModel

    import campaignd.models  # noqa: F401  (registers every table)

    require_head(source)
    upgrade(target)
    tables = SQLModel.metadata.sorted_tables
    with target.connect() as conn:
        busy = [
            t.name for t in tables if conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
        ]
    if busy:
        raise DatabaseError(
            f"the target database is not empty (rows in {', '.join(busy)}); copy into a new one"
        )
    copied: dict[str, int] = {}
    with source.connect() as src, target.begin() as dst:
        for table in tables:
            count = 0
            result = src.execution_options(yield_per=batch).execute(sa.select(table))
            for part in result.partitions(batch):
                dst.execute(sa.insert(table), [dict(row._mapping) for row in part])
                count += len(part)
                if progress is not None:
                    progress(table.name, count)
            copied[table.name] = count
        if dst.dialect.name == "postgresql":
            # Ids were copied as they are: move each sequence past the highest one.
            for table in tables:
                pk = list(table.primary_key.columns)
                if (
                    len(pk) == 1
                    and isinstance(pk[0].type, sa.Integer)
                    and pk[0].autoincrement in (True, "auto")
                ):
                    dst.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{table.name}', '{pk[0].name}'), "  # noqa: S608
                        f"COALESCE(MAX({pk[0].name}), 1), MAX({pk[0].name}) IS NOT NULL) FROM {table.name}"
                    )
    return copied
