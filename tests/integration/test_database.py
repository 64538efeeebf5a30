"""Migrations, engine settings and time handling on the real databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

from campaignd import database
from campaignd.exceptions import DatabaseNotAtHead
from campaignd.store import LeadInput, Store


def test_upgrade_from_an_empty_database_reaches_head(db_url: str) -> None:
    engine = database.create_engine(db_url)
    with pytest.raises(DatabaseNotAtHead, match="campaignd db upgrade"):
        database.require_head(engine)
    before, after = database.upgrade(engine)
    # The revision every command checks for is the newest migration.
    assert before is None and after == database.head_revision() == database.SCHEMA_REVISION
    assert database.stamped_revision(engine) == database.current_revision(engine) == after
    database.require_head(engine)
    assert database.upgrade(engine) == (after, after)  # idempotent
    engine.dispose()


def test_the_migrations_match_the_models(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []


def test_sqlite_uses_wal_and_a_busy_timeout(tmp_path: object) -> None:
    engine = database.create_engine(f"sqlite:///{tmp_path}/x.db", busy_timeout_s=7)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 7000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_times_are_stored_in_utc_and_come_back_aware(store: Store) -> None:
    chicago_noon = datetime(2026, 7, 1, 12, 0, tzinfo=timezone(timedelta(hours=-5)))
    store.upsert_leads([LeadInput(email="a@example.com")], tier="cold", now=chicago_noon)
    lead = store.get_lead("a@example.com")
    assert lead.created_at == chicago_noon
    assert lead.created_at.tzinfo == UTC
    assert lead.created_at.hour == 17


def test_naive_datetimes_are_refused(store: Store) -> None:
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        store.upsert_leads([LeadInput(email="a@example.com")], tier="cold", now=datetime(2026, 1, 1))


def test_the_database_refuses_a_second_touch_of_the_same_step(store: Store) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    store.upsert_leads([LeadInput(email="a@example.com")], tier="cold", now=now)
    lead = store.get_lead("a@example.com")
    row = {
        "lead_id": lead.id,
        "tier": "cold",
        "step": "01-intro",
        "channel": "email",
        "status": "sent",
        "attempts": 1,
        "created_at": now,
        "updated_at": now,
    }
    touches = sa.table("touches", *(sa.column(k) for k in row))
    with store.engine.begin() as conn:
        conn.execute(sa.insert(touches).values(row))
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(sa.insert(touches).values(row))
    # touches made by hand have no step and never collide
    manual = {**row, "step": None, "channel": "call"}
    with store.engine.begin() as conn:
        conn.execute(sa.insert(touches).values(manual))
        conn.execute(sa.insert(touches).values(manual))


def test_suppression_outlives_the_lead_row(store: Store) -> None:
    from campaignd.models import SuppressionReason

    now = datetime(2026, 1, 1, tzinfo=UTC)
    store.upsert_leads([LeadInput(email="a@example.com")], tier="cold", now=now)
    store.suppress("a@example.com", reason=SuppressionReason.UNSUBSCRIBED, detail="", now=now)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM leads")
    assert store.is_suppressed("a@example.com")
    counts = store.upsert_leads([LeadInput(email="a@example.com")], tier="cold", now=now)
    assert counts.inserted == 1 and counts.suppressed == 1
    assert store.get_lead("a@example.com").status == "unsubscribed"
