"""No step is ever sent twice and no touch is lost, whatever moment the daemon is killed.

The daemon runs as a real process against a real SMTP server and is killed with SIGKILL
at random moments while it sends, then restarted, until all work is done. Afterwards what
the server received and what the database says must agree.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from campaignd.clock import utcnow
from campaignd.database import create_engine, upgrade
from campaignd.store import LeadInput, Store
from tests.e2e.proc import Daemon
from tests.factories import write_config
from tests.smtp import SmtpServer

SEQUENCES = """
[sequences.cold]
steps = [
  { template = "cold/01-intro", delay = "0s" },
  { template = "cold/03-reminder", delay = "0s" },
]
"""
CONNECTIONS = 3
_MSG_ID = re.compile(r"<campaignd\.(\d+)\.\d+@")


@dataclass
class Snapshot:
    by_status: dict[str, int]
    unknown_ids: set[int]
    settled: bool
    """Every lead has all its steps sent, or is held by an unknown touch."""


def snapshot(engine: sa.Engine, steps: int) -> Snapshot:
    with engine.connect() as conn:
        by_status = dict(conn.execute(sa.text("select status, count(*) from touches group by status")).all())
        unknown = set(conn.execute(sa.text("select id from touches where status = 'unknown'")).scalars())
        open_leads = conn.execute(
            sa.text(
                "select count(*) from leads l where "
                "(select count(*) from touches t where t.lead_id = l.id and t.status = 'sent') < :steps "
                "and not exists (select 1 from touches t where t.lead_id = l.id and t.status = 'unknown')"
            ),
            {"steps": steps},
        ).scalar_one()
    return Snapshot(by_status, unknown, open_leads == 0)


def run_crash_loop(tmp_path: Path, *, leads: int, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    with SmtpServer() as smtpd:
        # A little latency per message, as a real relay has, so that kills land mid-batch
        # (and there is work left for every kill: at most about 200 messages a second).
        smtpd.faults.stall_data = 0.02
        extra = f"""
[dispatch]
interval = "1s"
batch_size = 50

[smtp]
host = "127.0.0.1"
port = {smtpd.port}
tls = "none"
connections = {CONNECTIONS}
timeout = "5s"
"""
        config = write_config(tmp_path, sequences=SEQUENCES, extra=extra, threshold=10)
        url = f"sqlite:///{tmp_path / 'state' / 'campaignd.db'}"
        engine = create_engine(url)
        upgrade(engine)
        Store(engine=engine).upsert_leads(
            [LeadInput(email=f"lead{n}@example.com", first_name=f"Lead{n}") for n in range(leads)],
            tier="cold",
            now=utcnow(),
        )
        killed = 0
        on_the_wire = 0
        deadline = time.monotonic() + 600
        while True:
            assert time.monotonic() < deadline, "the crash loop did not finish"
            before = snapshot(engine, 2)
            if before.settled:
                break
            daemon = Daemon(config)
            try:
                daemon.wait_for("campaignd started", timeout=60)
                if killed < kills:
                    # Kill at a random moment once it is sending.
                    seen = len(smtpd.received)
                    waited = time.monotonic()
                    while len(smtpd.received) == seen and time.monotonic() - waited < 10:
                        time.sleep(0.005)
                    time.sleep(rng.uniform(0.0, 0.4))
                    daemon.kill()
                    killed += 1
                else:
                    # Let the last run finish the work, then stop it cleanly.
                    while not snapshot(engine, 2).settled and time.monotonic() < deadline:
                        time.sleep(0.2)
                    assert daemon.stop() == 0
            finally:
                if daemon.proc.poll() is None:
                    daemon.kill()
            after = snapshot(engine, 2)
            # What the previous kill left on the wire became 'unknown' at this start, and
            # nothing else did: claimed work was given back and sent normally.
            assert len(after.unknown_ids - before.unknown_ids) == on_the_wire
            # Only what was really on the wire can be ambiguous: at most one message per
            # connection, never a claimed batch.
            on_the_wire = after.by_status.get("sending", 0)
            assert on_the_wire <= CONNECTIONS, (after.by_status, daemon.log[-3000:])
        assert "Traceback" not in daemon.log

        received = list(smtpd.received)

    pairs = [(r.recipients[0], r.step) for r in received]
    assert len(pairs) == len(set(pairs)), "a lead received a step twice"
    received_touch_ids = {int(_MSG_ID.search(r.message_id).group(1)) for r in received}  # type: ignore[union-attr]
    with engine.connect() as conn:
        touches = {
            row.id: row
            for row in conn.execute(sa.text("select id, lead_id, status, message_id from touches"))
        }
        counts = dict(conn.execute(sa.text("select id, touch_count from leads")).all())
    engine.dispose()
    sent = {i for i, t in touches.items() if t.status == "sent"}
    unknown = {i for i, t in touches.items() if t.status == "unknown"}
    # Every step recorded as sent was delivered; everything delivered is recorded as sent,
    # or as unknown when the daemon died between the relay's answer and the record.
    assert sent <= received_touch_ids
    assert received_touch_ids <= sent | unknown
    assert set(touches) == sent | unknown  # nothing left claimed, sending or lost
    # Touch counts equal the sent touches.
    per_lead: dict[int, int] = {}
    for i in sent:
        per_lead[touches[i].lead_id] = per_lead.get(touches[i].lead_id, 0) + 1
    assert {lead: per_lead.get(lead, 0) for lead in counts} == counts
    assert killed == kills


def test_killing_the_daemon_while_it_sends_never_sends_a_step_twice(tmp_path: Path) -> None:
    run_crash_loop(tmp_path, leads=400, kills=8, seed=1)


@pytest.mark.slow
def test_killing_the_daemon_many_times_never_sends_a_step_twice(tmp_path: Path) -> None:
    run_crash_loop(tmp_path, leads=1500, kills=40, seed=2)
