"""Shared fixtures: a fresh database per test (SQLite file and the real PostgreSQL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from campaignd.database import create_engine, upgrade
from campaignd.store import Store

PG_URL = os.environ.get("CAMPAIGND_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long variants of the proofs (marked ``slow``) run only when asked for with ``-m slow``."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="a long variant: run it with -m slow")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own CAMPAIGND_* settings must never leak into a test."""
    for key in list(os.environ):
        if key.startswith("CAMPAIGND_") and key != "CAMPAIGND_TEST_PG_URL":
            monkeypatch.delenv(key)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


_PG_CHECKED: list[bool] = []


def require_postgres() -> None:
    """Skip when no PostgreSQL server is reachable, except in CI, where that is a failure."""
    if not _PG_CHECKED:
        try:
            eng = sa.create_engine(PG_URL)
            with eng.connect():
                pass
            eng.dispose()
            _PG_CHECKED.append(True)
        except sa.exc.OperationalError:
            _PG_CHECKED.append(False)
    if not _PG_CHECKED[0]:
        message = f"PostgreSQL is not reachable at {PG_URL}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must run the PostgreSQL tests)")
        pytest.skip(message)


def pg_schema_url() -> tuple[str, str]:
    """A fresh schema in the test database, and a URL whose connections use it."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    admin.dispose()
    sep = "&" if "?" in PG_URL else "?"
    return schema, f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


def drop_pg_schema(schema: str) -> None:
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL for an empty database, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'campaignd.db'}"
        return
    schema, url = pg_schema_url()
    try:
        yield url
    finally:
        drop_pg_schema(schema)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A migrated database at the latest revision."""
    eng = create_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def store(engine: Engine) -> Store:
    return Store(engine=engine)
