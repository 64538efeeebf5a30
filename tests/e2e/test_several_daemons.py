"""Three daemons share one PostgreSQL database: each step is delivered exactly once.

The work is spread across all three, and killing one mid-run loses nothing: its claimed
but unsent work is taken over by the others once its lease runs out, never sent twice.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from campaignd.clock import utcnow
from campaignd.database import create_engine, upgrade
from campaignd.store import LeadInput, Store
from tests.conftest import drop_pg_schema, pg_schema_url
from tests.e2e.proc import Daemon
from tests.factories import write_config
from tests.smtp import SmtpServer

pytestmark = pytest.mark.postgres

SEQUENCES = """
[sequences.cold]
steps = [{ template = "cold/01-intro", delay = "0s" }]
"""
CONNECTIONS = 2
_MSG_ID = re.compile(r"<campaignd\.(\d+)\.\d+@")


def run_three_daemons(tmp_path: Path, *, leads: int) -> None:
    schema, url = pg_schema_url()
    try:
        with SmtpServer() as smtpd:
            smtpd.faults.stall_data = 0.002
            extra = f"""
[dispatch]
interval = "1s"
batch_size = 100
lease = "15s"

[smtp]
host = "127.0.0.1"
port = {smtpd.port}
tls = "none"
connections = {CONNECTIONS}
timeout = "2s"
"""
            config = write_config(tmp_path, db_url=url, sequences=SEQUENCES, extra=extra)
            engine = create_engine(url)
            upgrade(engine)
            Store(engine=engine).upsert_leads(
                [LeadInput(email=f"lead{n}@example.com", first_name=f"Lead{n}") for n in range(leads)],
                tier="cold",
                now=utcnow(),
            )
            daemons = [Daemon(config) for _ in range(3)]
            try:
                for daemon in daemons:
                    daemon.wait_for("campaignd started", timeout=60)
                # Kill one daemon while it is in the middle of its work.
                victim = daemons[0]
                victim.wait_for("sent cold/01-intro", timeout=60, count=50)
                victim.kill()
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    with engine.connect() as conn:
                        open_work = conn.execute(
                            sa.text("select count(*) from touches where status not in ('sent', 'unknown')")
                        ).scalar_one()
                        done = conn.execute(sa.text("select count(*) from touches")).scalar_one()
                    if done == leads and open_work == 0:
                        break
                    time.sleep(0.5)
                for daemon in daemons[1:]:
                    assert daemon.stop() == 0
            finally:
                for daemon in daemons:
                    if daemon.proc.poll() is None:
                        daemon.kill()
            received = list(smtpd.received)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("select id, status, claimed_by from touches")).all()
        engine.dispose()
    finally:
        drop_pg_schema(schema)

    recipients = [r.recipients[0] for r in received]
    duplicates = [r for r, n in Counter(recipients).items() if n > 1]
    assert duplicates == [], "sent twice"
    assert len(rows) == leads
    sent = {r.id for r in rows if r.status == "sent"}
    unknown = {r.id for r in rows if r.status == "unknown"}
    assert sent | unknown == {r.id for r in rows}, "work left over"
    # Only what the killed daemon had on the wire can be unknown.
    assert len(unknown) <= CONNECTIONS
    received_ids = {int(_MSG_ID.search(r.message_id).group(1)) for r in received}  # type: ignore[union-attr]
    assert sent <= received_ids <= sent | unknown
    # The work was spread across all three daemons (the killed one included).
    pids = Counter(r.claimed_by.split(":")[1] for r in rows if r.status == "sent")
    assert {str(d.proc.pid) for d in daemons} <= set(pids), pids


def test_three_daemons_share_the_work_and_a_killed_one_loses_nothing(tmp_path: Path) -> None:
    run_three_daemons(tmp_path, leads=2000)


@pytest.mark.slow
def test_three_daemons_share_a_large_backlog(tmp_path: Path) -> None:
    run_three_daemons(tmp_path, leads=10000)
