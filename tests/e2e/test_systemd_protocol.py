"""The daemon under a service manager: sd_notify over a real socket, signals, the watchdog.

A test plays systemd: it binds the notify socket, starts ``campaignd run`` with
``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC``) set, and reads what the daemon says.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
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

SEQUENCES = '[sequences.cold]\nsteps = [{ template = "cold/01-intro", delay = "0s" }]\n'
UNIT_STOP_TIMEOUT = 30  # TimeoutStopSec= in systemd/campaignd.service


@dataclass
class Note:
    at: float
    fields: dict[str, str]


class NotifySocket:
    """The service manager's end of the sd_notify protocol."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.notes: list[Note] = []

    def drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.notes.append(Note(time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60, after: int = 0) -> int:
        """Index of the first note from ``after`` on that sets ``key`` (to ``value``)."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            for i, note in enumerate(self.notes[after:], start=after):
                if key in note.fields and (value is None or note.fields[key] == value):
                    return i
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key}={value} notification; got {[n.fields for n in self.notes]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def prepare(tmp_path: Path, *, leads: int, extra: str = "") -> tuple[Path, sa.Engine]:
    config = write_config(tmp_path, sequences=SEQUENCES, extra=extra)
    engine = create_engine(f"sqlite:///{tmp_path / 'state' / 'campaignd.db'}")
    upgrade(engine)
    Store(engine=engine).upsert_leads(
        [LeadInput(email=f"lead{n}@example.com") for n in range(leads)], tier="cold", now=utcnow()
    )
    return config, engine


def test_ready_status_reload_and_stop(tmp_path: Path, notify: NotifySocket) -> None:
    config, engine = prepare(tmp_path, leads=3, extra='[dispatch]\ninterval = "1s"\n')
    good = config.read_text()
    daemon = Daemon(config, env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        ready = notify.wait_for("READY", "1")
        assert "campaignd started" in daemon.log  # ready only once everything checked out
        status = notify.wait_for("STATUS", after=ready + 1)
        assert "sent" in notify.notes[status].fields["STATUS"]
        # A good reload: RELOADING=1 with the monotonic time, then READY=1 again.
        config.write_text(good.replace("threshold = 5", "threshold = 6"))
        daemon.signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", "1", after=ready + 1)
        assert int(notify.notes[reloading].fields["MONOTONIC_USEC"]) > 0
        back = notify.wait_for("READY", "1", after=reloading)
        assert notify.notes[back].fields.get("STATUS") == "reloaded"
        # A bad reload keeps the running configuration and says so.
        config.write_text(good.replace('interval = "1s"', 'interval = "whenever"'))
        daemon.signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", "1", after=back + 1)
        kept = notify.wait_for("READY", "1", after=reloading)
        assert "reload failed" in notify.notes[kept].fields["STATUS"]
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0
    notify.wait_for("STOPPING", "1")
    engine.dispose()


def test_a_broken_config_never_reports_ready(tmp_path: Path, notify: NotifySocket) -> None:
    config, engine = prepare(tmp_path, leads=1)
    config.write_text(config.read_text().replace("threshold = 5", "threshold = 0"))
    daemon = Daemon(config, env={"NOTIFY_SOCKET": str(notify.path)})
    assert daemon.wait() == 2
    assert "followup.threshold" in daemon.log
    with pytest.raises(AssertionError):
        notify.wait_for("READY", "1", timeout=1)
    engine.dispose()


def test_sigterm_during_a_batch_exits_0_in_time_with_every_touch_recorded(
    tmp_path: Path, notify: NotifySocket
) -> None:
    with SmtpServer() as smtpd:
        smtpd.faults.stall_data = 0.2  # a slow relay: the batch takes a while
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
        config, engine = prepare(tmp_path, leads=100, extra=extra)
        daemon = Daemon(config, env={"NOTIFY_SOCKET": str(notify.path)})
        daemon.wait_for("sent cold/01-intro", count=4)
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = daemon.wait(timeout=UNIT_STOP_TIMEOUT)
        took = time.monotonic() - started
        received = {r.recipients[0] for r in smtpd.received}
    assert code == 0
    assert took < UNIT_STOP_TIMEOUT
    notify.wait_for("STOPPING", "1")
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("select l.email, t.status from touches t join leads l on l.id = t.lead_id")
        ).all()
    engine.dispose()
    # Whatever went out is recorded as sent; nothing is left on the wire; the rest was
    # given back untouched and goes out after the restart.
    assert {email for email, status in rows if status == "sent"} == received
    assert {status for _, status in rows} <= {"sent", "claimed"}
    assert 0 < len(received) < 100


def test_the_watchdog_stops_when_the_dispatch_loop_is_stuck(tmp_path: Path, notify: NotifySocket) -> None:
    config, engine = prepare(
        tmp_path, leads=5, extra='[dispatch]\ninterval = "1s"\n\n[database]\nbusy_timeout = "60s"\n'
    )
    db = tmp_path / "state" / "campaignd.db"
    daemon = Daemon(config, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"})
    try:
        notify.wait_for("READY", "1")
        first = notify.wait_for("WATCHDOG", "1")
        notify.wait_for("WATCHDOG", "1", after=first + 1)  # pings keep coming while all is well
        # Another writer holds the database: the dispatch pass hangs inside it.
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            time.sleep(6)  # longer than the stall limit (3 intervals, 2 watchdog periods)
            notify.drain()
            mark = len(notify.notes)
            time.sleep(4)
            notify.drain()
            pings = [n for n in notify.notes[mark:] if n.fields.get("WATCHDOG") == "1"]
            assert pings == [], "the watchdog kept pinging while the loop was stuck"
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        # Unstuck: pings resume (systemd would have restarted it by now; here it recovers).
        notify.wait_for("WATCHDOG", "1", after=len(notify.notes), timeout=30)
    finally:
        assert daemon.stop() == 0
    engine.dispose()
