"""The daemon's main job, as a process: a real SMTP server, the real database and CLI.

Each lead must get its tier's steps in order with the right templates; counts, promotion
and flagging must happen at the right touch; suppressed and unsubscribed leads get nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import drop_pg_schema, pg_schema_url
from tests.e2e.proc import Daemon
from tests.factories import REPO, write_config
from tests.smtp import SmtpServer

SEQUENCES = """
[sequences.cold]
steps = [
  { template = "cold/01-intro", delay = "0s" },
  { template = "cold/03-reminder", delay = "2s" },
]

[sequences.warm]
steps = [
  { template = "warm/01-sales-letter", delay = "2s" },
  { template = "warm/02-seminar", delay = "2s", event = "winter-seminar" },
  { template = "warm/03-last-call", delay = "2s" },
]
"""
COLD = [
    "maria.gonzalez@lakeview-dental.example",
    "tom.becker@becker-bakery.example",
    "liam.oconnor@oconnor-legal.example",
]
WARM = ["daniel.wu@wu-accounting.example", "emma.schulz@schulz-architects.example"]
SUPPRESSED = "aisha.khan@northside-fitness.example"
UNSUBSCRIBED = "sophie.martin@martin-florals.example"
COLD_STEPS = ["cold/01-intro", "cold/03-reminder"]
WARM_STEPS = ["warm/01-sales-letter", "warm/02-seminar", "warm/03-last-call"]


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    return subprocess.run(
        [sys.executable, "-m", "campaignd", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        yield ""
        return
    schema, url = pg_schema_url()
    try:
        yield url
    finally:
        drop_pg_schema(schema)


def test_each_lead_gets_its_tier_sequence_then_promotion_and_flag(tmp_path: Path, database: str) -> None:
    with SmtpServer() as smtpd:
        extra = f"""
[dispatch]
interval = "1s"

[smtp]
host = "127.0.0.1"
port = {smtpd.port}
tls = "none"
connections = 2
timeout = "5s"
"""
        config = write_config(tmp_path, db_url=database, threshold=5, sequences=SEQUENCES, extra=extra)
        assert cli(config, "db", "upgrade").returncode == 0
        imported = cli(config, "leads", "import", str(REPO / "examples" / "leads.csv"))
        assert imported.returncode == 0, imported.stderr
        assert cli(config, "suppression", "add", SUPPRESSED, "--reason", "asked by phone").returncode == 0
        assert cli(config, "leads", "unsubscribe", UNSUBSCRIBED).returncode == 0

        daemon = Daemon(config)
        try:
            daemon.wait_for("campaignd started")
            # cold leads: 2 cold steps + 3 warm steps; warm leads: 3 warm steps
            smtpd.wait_for(len(COLD) * 5 + len(WARM) * 3, timeout=90)
            daemon.wait_for("flagged liam.oconnor", timeout=30)
        finally:
            assert daemon.stop() == 0
        assert "Traceback" not in daemon.log

    received = smtpd.by_recipient()
    assert SUPPRESSED not in received and UNSUBSCRIBED not in received
    for email in COLD:
        assert received[email] == COLD_STEPS + WARM_STEPS
    for email in WARM:
        assert received[email] == WARM_STEPS
    assert len(smtpd.received) == len(COLD) * 5 + len(WARM) * 3  # nothing twice

    for email in COLD + WARM:
        shown = json.loads(cli(config, "leads", "show", email, "--json").stdout)
        sent = [t for t in shown["touches"] if t["status"] == "sent"]
        assert shown["touch_count"] == len(sent) == len(received[email])
        assert shown["tier"] == "warm"
        if email in COLD:
            # promoted when the cold sequence completed (2nd touch), flagged at the 5th
            assert shown["tier_since"] == sent[1]["sent_at"]
            assert shown["status"] == "flagged"
            assert shown["flagged_at"] == sent[4]["sent_at"]
            assert shown["flag_reason"] == "reached 5 touches (threshold 5)"
        else:
            assert shown["status"] == "active"
            assert shown["next_step"] is None  # sequence finished, not flagged
    # the Message-ID of every received message is the one recorded on its touch
    url = database or f"sqlite:///{tmp_path / 'state' / 'campaignd.db'}"
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        recorded = set(
            conn.execute(sa.text("select message_id from touches where status = 'sent'")).scalars()
        )
    engine.dispose()
    assert recorded == {r.message_id for r in smtpd.received}

    status = json.loads(cli(config, "status", "--json").stdout)
    assert status["unknown"] == [] and status["failed"] == []
    assert status["touches_by_status"] == {"sent": len(smtpd.received)}
