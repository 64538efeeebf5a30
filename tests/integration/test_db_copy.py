"""Moving from SQLite to PostgreSQL: ``campaignd db copy`` keeps every row and every id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from campaignd.database import copy_database, create_engine, upgrade
from campaignd.exceptions import DatabaseError
from campaignd.models import SuppressionReason
from campaignd.sequences import Policy
from campaignd.store import LeadInput, Store
from tests.conftest import drop_pg_schema, pg_schema_url
from tests.factories import make_settings

pytestmark = pytest.mark.postgres
T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)


def test_everything_is_copied_with_its_ids_and_the_sequences_continue(tmp_path: Path) -> None:
    source = create_engine(f"sqlite:///{tmp_path / 'campaignd.db'}")
    upgrade(source)
    store = Store(engine=source)
    store.upsert_leads(
        [LeadInput(email=f"lead{n}@example.com", first_name="Zoë", custom={"n": n}) for n in range(30)],
        tier="cold",
        now=T0,
    )
    policy = Policy.from_settings(make_settings(tmp_path))
    store.log_manual_touch("lead3@example.com", channel="call", note="left a voicemail", at=T0, policy=policy)
    store.suppress("lead4@example.com", reason=SuppressionReason.UNSUBSCRIBED, detail="by mail", now=T0)
    schema, url = pg_schema_url()
    target = create_engine(url)
    try:
        copied = copy_database(source, target)
        assert copied["leads"] == 30 and copied["touches"] == 1 and copied["suppressions"] == 1
        assert copied["lead_events"] == 1
        moved = Store(engine=target)
        lead = moved.get_lead("lead3@example.com")
        assert lead.id == store.get_lead("lead3@example.com").id
        assert lead.touch_count == 1 and lead.first_name == "Zoë" and lead.custom == {"n": 3}
        assert lead.created_at == T0
        [touch] = moved.touches_for(lead.id)
        assert touch.note == "left a voicemail"
        assert moved.is_suppressed("lead4@example.com")
        # New rows get fresh ids after the copied ones.
        moved.upsert_leads([LeadInput(email="new@example.com")], tier="cold", now=T0 + timedelta(days=1))
        assert moved.get_lead("new@example.com").id == 31
        # A second copy into a database that has rows is refused.
        with pytest.raises(DatabaseError, match="not empty"):
            copy_database(source, target)
    finally:
        target.dispose()
        source.dispose()
        drop_pg_schema(schema)


def test_the_cli_copies_and_says_what_next(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.factories import write_config

    config = write_config(tmp_path)
    env_free = {"PATH": "/usr/bin:/bin"}
    assert (
        subprocess.run(
            [sys.executable, "-m", "campaignd", "-c", str(config), "db", "upgrade"],
            capture_output=True,
            env=env_free,
            timeout=60,
        ).returncode
        == 0
    )
    schema, url = pg_schema_url()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "campaignd", "-c", str(config), "db", "copy", "--to", url],
            capture_output=True,
            text=True,
            env=env_free,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "copied 0 rows" in done.stdout and "CAMPAIGND_DATABASE__URL" in done.stdout
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("select version_num from alembic_version").scalar() is not None
        engine.dispose()
    finally:
        drop_pg_schema(schema)
