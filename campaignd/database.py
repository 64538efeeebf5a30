"""The database connection: engines, migrations and the one-daemon-per-SQLite-file lock.

Owns how campaignd connects (SQLite pragmas, PostgreSQL pooling), running the Alembic
migrations shipped in ``campaignd/migrations``, and telling whether a database is at the
latest revision. Queries live in ``store.py``, not here.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine, make_url

from campaignd.exceptions import AlreadyRunning, DatabaseError, DatabaseNotAtHead

logger = logging.getLogger(__name__)


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
            # Writers queue on the busy timeout instead of failing on lock upgrades.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

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
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("campaignd") / "migrations"))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config(sa.create_engine("sqlite://")))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except sa.exc.OperationalError as exc:
        raise DatabaseError(f"cannot open the database: {exc.orig}") from None


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the latest revision; returns (before, after)."""
    before = current_revision(engine)
    command.upgrade(alembic_config(engine), "head")
    return before, head_revision()


def require_head(engine: Engine) -> None:
    """Refuse to work on a database whose schema is not the one this version expects."""
    current, head = current_revision(engine), head_revision()
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
