"""The hot path's own statements: time stamps written and read exactly as SQLAlchemy does,
and the plans SQLite picks for them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from campaignd.database import create_engine, upgrade
from campaignd.models import UTCDateTime
from campaignd.store.hot import HotStatements, read_sqlite_stamp, sqlite_stamp

_STAMP = UTCDateTime().dialect_impl(sqlite.dialect())
_BIND = _STAMP.bind_processor(sqlite.dialect())
_READ = _STAMP.result_processor(sqlite.dialect(), None)

aware = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(9998, 12, 30),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-6)), timezone(timedelta(hours=5, minutes=30))]),
)


@given(aware)
def test_a_stamp_is_stored_as_sqlalchemy_stores_it(value: datetime) -> None:
    assert _BIND is not None
    assert sqlite_stamp(value) == _BIND(value)


@given(aware)
def test_a_stored_stamp_reads_back_as_the_same_instant_in_utc(value: datetime) -> None:
    assert _BIND is not None and _READ is not None
    stored = _BIND(value)
    assert read_sqlite_stamp(stored) == _READ(stored) == value
    assert read_sqlite_stamp(stored).tzinfo is UTC  # type: ignore[union-attr]


def test_none_passes_through_and_naive_time_is_refused() -> None:
    assert sqlite_stamp(None) is None
    assert read_sqlite_stamp(None) is None
    with pytest.raises(ValueError, match="naive datetime"):
        sqlite_stamp(datetime(2026, 1, 1, 12, 0))


def test_marking_looks_touches_up_by_id_not_by_status(tmp_path: Path) -> None:
    # Without statistics SQLite preferred the (status, lease) index, walking every claimed
    # touch of the batch for each mark: the hot path's cost grew with the batch.
    engine = create_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    upgrade(engine)
    hot = HotStatements(engine.dialect)
    sql = hot._text(hot._mark, 4)
    params = {"sending": "sending", "claimed": "claimed", "worker": "w", "lease_until": "x", "now": "x"}
    params |= {f"i{n}": n for n in range(4)}
    with engine.connect() as conn:
        plan = " ".join(str(row) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params))
    engine.dispose()
    assert "PRIMARY KEY" in plan
    assert "ix_touches_status_lease" not in plan
