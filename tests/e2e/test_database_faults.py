"""The database misbehaving under a running daemon: it backs off, reports, and resumes
without losing or doubling anything.

- SQLite locked by another writer for longer than the busy timeout;
- PostgreSQL restarted under the daemon (with ``pg_ctlcluster``);
- the disk of the state directory full (a small tmpfs mounted for the test).
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
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
steps = [{ template = "cold/01-intro", delay = "0s" }]
"""
LEADS = 200


def fill(url: str, leads: int = LEADS) -> sa.Engine:
    engine = create_engine(url)
    upgrade(engine)
    Store(engine=engine).upsert_leads(
        [LeadInput(email=f"lead{n}@example.com") for n in range(leads)], tier="cold", now=utcnow()
    )
    return engine


def counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("select status, count(*) from touches group by status")).all())


def wait_until(predicate: object, timeout: float, what: str, daemon: Daemon | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            log = daemon.log[-4000:] if daemon is not None else ""
            raise AssertionError(f"timed out waiting for {what}\n{log}")
        time.sleep(0.2)


def smtp_extra(port: int, **dispatch: str) -> str:
    lines = "\n".join(f"{k} = {v}" for k, v in {"interval": '"1s"', "batch_size": "20", **dispatch}.items())
    return f"""
[dispatch]
{lines}

[smtp]
host = "127.0.0.1"
port = {port}
tls = "none"
connections = 2
timeout = "2s"
"""


def test_sqlite_locked_longer_than_the_busy_timeout(tmp_path: Path) -> None:
    with SmtpServer() as smtpd:
        smtpd.faults.stall_data = 0.01
        config = write_config(
            tmp_path,
            sequences=SEQUENCES,
            extra=smtp_extra(smtpd.port) + '\n[database]\nbusy_timeout = "1s"\n',
        )
        db = tmp_path / "state" / "campaignd.db"
        engine = fill(f"sqlite:///{db}")
        daemon = Daemon(config)
        try:
            daemon.wait_for("sent cold/01-intro", timeout=60, count=10)
            # Another program takes the write lock for four busy timeouts.
            other = sqlite3.connect(db, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            time.sleep(4)
            other.execute("ROLLBACK")
            other.close()
            wait_until(lambda: counts(engine).get("sent", 0) == LEADS, 60, "every lead to be sent", daemon)
            assert daemon.proc.poll() is None, "the daemon died"
        finally:
            assert daemon.stop() == 0
        log = daemon.log
    assert "database is locked" in log
    assert Counter(r.recipients[0] for r in smtpd.received).most_common(1)[0][1] == 1
    assert len(smtpd.received) == LEADS
    assert counts(engine) == {"sent": LEADS}
    engine.dispose()


@pytest.fixture
def own_cluster() -> Iterator[tuple[list[str], str]]:
    """A PostgreSQL cluster of this test's own, made with Debian's cluster tools, so that
    restarting it disturbs no other test. Yields the cluster (version, name) and its URL."""
    if not shutil.which("pg_createcluster") or not Path("/etc/postgresql").is_dir():
        if os.environ.get("CI"):
            pytest.fail("Debian's PostgreSQL cluster tools are needed to restart a server in CI")
        pytest.skip("pg_createcluster not available")
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    cluster = [version, f"campaignd-test-{os.getpid()}"]
    port = free_port()
    made = subprocess.run(
        ["pg_createcluster", "-p", str(port), "--start", *cluster, "--", "--auth=trust"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert made.returncode == 0, made.stderr
        yield cluster, f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(["pg_dropcluster", "--stop", *cluster], capture_output=True, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.postgres
def test_postgresql_restarted_under_the_daemon(tmp_path: Path, own_cluster: tuple[list[str], str]) -> None:
    cluster, url = own_cluster
    with SmtpServer() as smtpd:
        smtpd.faults.stall_data = 0.01
        config = write_config(tmp_path, db_url=url, sequences=SEQUENCES, extra=smtp_extra(smtpd.port))
        engine = fill(url, leads=400)
        daemon = Daemon(config)
        try:
            daemon.wait_for("sent cold/01-intro", timeout=60, count=20)
            restarted = subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "restart"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert restarted.returncode == 0, restarted.stderr
            engine.dispose()

            def settled() -> bool:
                try:
                    c = counts(engine)
                except sa.exc.OperationalError:
                    return False
                return c.get("sent", 0) + c.get("unknown", 0) == 400 and sum(c.values()) == 400

            wait_until(settled, 120, "every lead to be settled", daemon)
            assert daemon.proc.poll() is None, "the daemon died"
        finally:
            assert daemon.stop() == 0
        received = list(smtpd.received)
    final = counts(engine)
    engine.dispose()
    # The outage was reported and waited out, not passed over in silence.
    assert "recording answers failed" in daemon.log or "dispatch pass failed" in daemon.log
    assert Counter(r.recipients[0] for r in received).most_common(1)[0][1] == 1, "sent twice"
    # Messages on the wire at the moment the server went away may be ambiguous; no more.
    assert final.get("unknown", 0) <= 2
    assert final["sent"] <= len(received) <= final["sent"] + final.get("unknown", 0)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        # Larger than SQLite's WAL checkpoint threshold (1,000 pages, 4 MB): below it the
        # log could never be checkpointed back into the database on any disk.
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs for the disk-full test: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_the_state_directory_disk_full(tmp_path: Path, small_disk: Path) -> None:
    state = small_disk / "state"
    config = write_config(
        tmp_path, sequences=SEQUENCES, extra='[dispatch]\ninterval = "1s"\nbatch_size = 20\n'
    )
    config.write_text(
        config.read_text().replace(f'state_dir = "{tmp_path / "state"}"', f'state_dir = "{state}"')
    )
    engine = fill(f"sqlite:///{state / 'campaignd.db'}")
    outbox = state / "outbox" / "new"
    daemon = Daemon(config)
    filler = small_disk / "filler"
    try:
        daemon.wait_for("sent cold/01-intro", timeout=60, count=5)
        # Fill the disk to the last byte.
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (65536, 4096, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)
        wait_until(
            lambda: "disk is full" in daemon.log or "No space left on device" in daemon.log,
            60,
            "the daemon to notice the full disk",
            daemon,
        )
        time.sleep(3)
        assert daemon.proc.poll() is None, "the daemon died"
        filler.unlink()
        wait_until(lambda: counts(engine).get("sent", 0) == LEADS, 120, "every lead to be sent", daemon)
    finally:
        assert daemon.stop() == 0
    files = sorted(outbox.iterdir())
    recipients = Counter(
        line.split(b":", 1)[1].strip()
        for f in files
        for line in f.read_bytes().splitlines()
        if line.startswith(b"To:")
    )
    assert len(files) == LEADS and max(recipients.values()) == 1
    assert counts(engine) == {"sent": LEADS}
    # No half-written message is left where a reader would see it.
    assert list((state / "outbox" / "tmp").iterdir()) == []
    engine.dispose()
