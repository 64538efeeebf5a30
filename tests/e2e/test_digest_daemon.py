"""The flagged-lead digest from the daemon as a process, read back from a real SMTP server.

The daemon runs with a digest schedule seconds apart. Every flagged lead must arrive in
exactly one digest — across a stop and a restart, with the digests missed while it was
down caught up once — and a lead flagged again by hand arrives again, once.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import subprocess
import sys
import time
from collections import Counter
from email import message_from_bytes, policy
from pathlib import Path

from campaignd.config import load_settings
from campaignd.database import create_engine
from campaignd.digest import BEGINNING
from campaignd.store import Store
from tests.e2e.proc import Daemon
from tests.factories import REPO, write_config
from tests.smtp import Received, SmtpServer

SEQUENCES = """
[sequences.cold]
steps = [
  { template = "cold/01-intro", delay = "0s" },
  { template = "cold/03-reminder", delay = "1s" },
]

[sequences.warm]
steps = [
  { template = "warm/01-sales-letter", delay = "0s" },
  { template = "warm/03-last-call", delay = "1s" },
]
"""
LEADS = {
    "maria.gonzalez@lakeview-dental.example",
    "tom.becker@becker-bakery.example",
    "aisha.khan@northside-fitness.example",
    "liam.oconnor@oconnor-legal.example",
    "sophie.martin@martin-florals.example",
    "daniel.wu@wu-accounting.example",
    "emma.schulz@schulz-architects.example",
}
SALES = "sales@harborhome.example"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    env.pop("JOURNAL_STREAM", None)
    done = subprocess.run(
        [sys.executable, "-m", "campaignd", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done


def digests(smtpd: SmtpServer) -> list[Received]:
    return [m for m in smtpd.received if m.message.get("X-Campaignd-Digest")]


def listed(received: Received) -> list[str]:
    msg = message_from_bytes(received.data, policy=policy.default)
    for part in msg.walk():
        if part.get_content_type() == "text/csv":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return [r["email"] for r in csv.DictReader(io.StringIO(payload.decode("utf-8-sig")))]
    return []


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)


def test_the_daemon_sends_each_flag_in_exactly_one_digest(tmp_path: Path) -> None:
    with SmtpServer() as smtpd:
        extra = f"""
[dispatch]
interval = "1s"

[smtp]
host = "127.0.0.1"
port = {smtpd.port}
tls = "none"
timeout = "5s"

[digest]
schedule = "*/4 * * * * *"
recipients = ["Sales Team <{SALES}>"]
"""
        config = write_config(tmp_path, threshold=2, sequences=SEQUENCES, extra=extra)
        cli(config, "db", "upgrade")
        cli(config, "leads", "import", str(REPO / "examples" / "leads.csv"))

        def seen() -> Counter[str]:
            return Counter(email for d in digests(smtpd) for email in listed(d))

        daemon = Daemon(config)
        try:
            daemon.wait_for("campaignd started")
            assert "flagged-lead digest to Sales Team <sales@harborhome.example>" in daemon.log
            wait_until(lambda: set(seen()) == LEADS, 60, "every flagged lead in a digest")
            daemon.wait_for("sent the digest of")
        finally:
            assert daemon.stop() == 0
        sent_before = len(digests(smtpd))
        assert all(m.recipients == (SALES,) for m in digests(smtpd))
        msg = message_from_bytes(digests(smtpd)[0].data, policy=policy.default)
        assert msg["To"] == f"Sales Team <{SALES}>"
        assert re.fullmatch(r"\d+ leads? to call — \w{3} \d{1,2} \w{3}", str(msg["Subject"]))

        # Down for a few schedules; then one lead is flagged again by hand: a new flag.
        time.sleep(9)
        maria = "maria.gonzalez@lakeview-dental.example"
        cli(config, "leads", "unflag", maria)
        cli(config, "leads", "flag", maria, "--reason", "asked for a call back")
        restarted = Daemon(config)
        try:
            restarted.wait_for("campaignd started")
            wait_until(lambda: seen()[maria] == 2, 30, "the new flag in a digest")
            time.sleep(9)  # more schedules pass, with nothing new to send
        finally:
            assert restarted.stop() == 0

    counts = seen()
    assert counts == Counter({**dict.fromkeys(LEADS, 1), maria: 2}), counts
    after = digests(smtpd)[sent_before:]
    assert [listed(d) for d in after] == [[maria]]  # nothing sent twice across the restart
    assert len({d.message_id for d in digests(smtpd)}) == len(digests(smtpd))

    settings = load_settings(config, environ={}, dotenv=None)
    engine = create_engine(settings.database_url)
    try:
        runs = Store(engine=engine).digest_runs(limit=1000, kind="scheduled")
    finally:
        engine.dispose()
    scheduled = sorted(runs, key=lambda r: r.period_end)
    assert {r.status for r in scheduled} <= {"sent", "empty"}
    assert scheduled[0].period_start == BEGINNING  # the first covers everything before it
    for earlier, later in itertools.pairwise(scheduled):
        assert later.period_start == earlier.period_end  # contiguous: no gap, no overlap
    assert sum(r.status == "sent" for r in scheduled) == len(digests(smtpd))
    assert len({r.scheduled_for for r in scheduled}) == len(scheduled)
