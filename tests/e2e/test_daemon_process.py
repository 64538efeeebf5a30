"""The daemon as a process: start-up checks, signals and reload, with the local outbox."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.e2e.proc import Daemon
from tests.factories import REPO, write_config

FAST = """
[dispatch]
interval = "1s"
"""
SEQUENCES = """
[sequences.cold]
steps = [
  { template = "cold/01-intro", delay = "0s" },
  { template = "cold/03-reminder", delay = "2s" },
]
"""


def prepare(tmp_path: Path, **kwargs: object) -> Path:
    config = write_config(tmp_path, extra=FAST, sequences=SEQUENCES, **kwargs)
    for args in (["db", "upgrade"], ["leads", "import", str(REPO / "examples" / "leads.csv")]):
        done = subprocess.run(
            [sys.executable, "-m", "campaignd", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    return config


def outbox(tmp_path: Path) -> list[Path]:
    new = tmp_path / "state" / "outbox" / "new"
    return sorted(new.iterdir()) if new.exists() else []


def test_sigterm_stops_cleanly_with_everything_recorded(tmp_path: Path) -> None:
    config = prepare(tmp_path)
    daemon = Daemon(config)
    daemon.wait_for("campaignd started")
    daemon.wait_for("sent cold/03-reminder", count=5)
    assert daemon.stop() == 0
    assert "campaignd stopped" in daemon.log
    assert len(outbox(tmp_path)) == 10
    status = subprocess.run(
        [sys.executable, "-m", "campaignd", "--config", str(config), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert '"sent": 10' in status.stdout


def test_a_broken_template_stops_start_up_before_anything_is_sent(tmp_path: Path) -> None:
    import shutil

    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    (templates / "cold" / "03-reminder.html.j2").write_text(
        "{% extends 'base.html.j2' %}\n{% block body %}\n"
        "<p>{{ lead.first_name | nosuchfilter }}</p>\n"
        "{% endblock %}\n"
    )
    config = prepare(tmp_path)
    config.write_text(config.read_text().replace(str(REPO / "templates"), str(templates)))
    daemon = Daemon(config)
    code = daemon.wait()
    assert code == 1
    assert f"{templates}/cold/03-reminder.html.j2: line 3:" in daemon.log
    assert "nosuchfilter" in daemon.log
    assert outbox(tmp_path) == []


def test_sighup_keeps_the_running_config_when_the_new_one_is_broken(tmp_path: Path) -> None:
    config = prepare(tmp_path)
    good = config.read_text()
    daemon = Daemon(config)
    try:
        daemon.wait_for("campaignd started")
        config.write_text(good.replace('interval = "1s"', 'interval = "soon"'))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("reload failed, keeping the running configuration")
        assert "dispatch.interval" in daemon.log
        # still running and sending with the old configuration
        daemon.wait_for("sent cold/03-reminder", count=5)
        config.write_text(good.replace("threshold = 5", "threshold = 6"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("reloaded")
    finally:
        assert daemon.stop() == 0
