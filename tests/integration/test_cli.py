"""The command line through its real entry point, as a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.factories import REPO, write_config

EXAMPLE_LEADS = REPO / "examples" / "leads.csv"


def campaignd(
    *args: str,
    config: Path | None = None,
    env: dict[str, str] | None = None,
    input: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    full_env.update(env or {})
    full_env.pop("JOURNAL_STREAM", None)
    cmd = [sys.executable, "-m", "campaignd"]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, env=full_env, input=input, cwd=cwd, timeout=120
    )


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    path = write_config(tmp_path, db_url=db_url if db_url.startswith("postgresql") else "")
    assert campaignd("db", "upgrade", config=path).returncode == 0
    return path


def test_config_check_accepts_the_shipped_configs() -> None:
    for name in ("campaignd.toml", "demo.toml"):
        result = campaignd("config", "check", config=REPO / "config" / name)
        assert result.returncode == 0, result.stderr
        assert "configuration valid" in result.stdout


def test_config_errors_name_file_key_and_reason_without_traceback(tmp_path: Path) -> None:
    path = write_config(tmp_path, extra='[smtp]\nhots = "x"\n')
    text = (
        path.read_text().replace('delay = "1h"', 'delay = "1 hour"').replace("threshold = 5", "threshold = 0")
    )
    path.write_text(text)
    result = campaignd("config", "check", config=path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path}: smtp.hots: unknown setting" in result.stderr
    assert f"{path}: sequences.cold.steps[1].delay: '1 hour' is not a duration" in result.stderr
    assert f"{path}: followup.threshold:" in result.stderr


def test_config_error_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = campaignd("config", "check", config=path, env={"CAMPAIGND_SMTP__PORT": "many"})
    assert result.returncode == 2
    assert "environment CAMPAIGND_SMTP__PORT: smtp.port:" in result.stderr


def test_secret_in_the_toml_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, extra='[smtp]\npassword = "hunter2"\n')
    result = campaignd("config", "check", config=path)
    assert result.returncode == 2
    assert "smtp.password: secrets must not be written in the config file" in result.stderr
    assert "CAMPAIGND_SMTP__PASSWORD" in result.stderr


def test_config_show_redacts_secrets(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    env = {
        "CAMPAIGND_SMTP__PASSWORD": "hunter2",
        "CAMPAIGND_DATABASE__URL": "postgresql+psycopg://app:s3cret@db.internal/campaignd",
    }
    result = campaignd("config", "show", config=path, env=env)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "s3cret" not in result.stdout
    assert 'password = "***"' in result.stdout
    assert "app:***@db.internal" in result.stdout


def test_commands_refuse_a_database_that_is_not_upgraded(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = campaignd("leads", "list", config=path)
    assert result.returncode == 1
    assert "run 'campaignd db upgrade' first" in result.stderr
    result = campaignd("db", "current", config=path)
    assert result.returncode == 1 and "empty" in result.stdout
    result = campaignd("run", "--once", config=path)
    assert result.returncode == 1 and "campaignd db upgrade" in result.stderr
    assert campaignd("db", "upgrade", config=path).returncode == 0
    again = campaignd("db", "upgrade", config=path)
    assert again.returncode == 0 and "already at revision" in again.stdout


def test_import_reports_bad_rows_with_line_numbers(config: Path) -> None:
    result = campaignd("leads", "import", str(EXAMPLE_LEADS), config=config)
    assert result.returncode == 0, result.stderr
    assert f"{EXAMPLE_LEADS}: line 9:" in result.stderr
    assert "7 inserted" in result.stdout and "1 rejected" in result.stdout
    assert "ignored columns: Lead Source" in result.stdout
    again = campaignd("leads", "import", str(EXAMPLE_LEADS), config=config)
    assert "7 unchanged" in again.stdout


def test_lead_commands(config: Path) -> None:
    assert campaignd("leads", "import", str(EXAMPLE_LEADS), config=config).returncode == 0
    listing = json.loads(campaignd("leads", "list", "--json", config=config).stdout)
    assert len(listing) == 7
    warm = json.loads(campaignd("leads", "list", "--tier", "warm", "--json", config=config).stdout)
    assert {lead["email"] for lead in warm} == {
        "daniel.wu@wu-accounting.example",
        "emma.schulz@schulz-architects.example",
    }
    email = "maria.gonzalez@lakeview-dental.example"

    assert campaignd("leads", "set-tier", email, "warm", config=config).returncode == 0
    assert campaignd("leads", "pause", email, config=config).returncode == 0
    refused = campaignd("leads", "pause", email, config=config)
    assert refused.returncode == 1 and "is paused" in refused.stderr
    assert campaignd("leads", "resume", email, config=config).returncode == 0
    logged = campaignd(
        "touches", "log", email, "--channel", "call", "--note", "asked for a quote", config=config
    )
    assert logged.returncode == 0 and "touch 1 of 5" in logged.stdout
    assert campaignd("leads", "flag", email, "--reason", "wants a proposal", config=config).returncode == 0
    shown = json.loads(campaignd("leads", "show", email, "--json", config=config).stdout)
    assert shown["tier"] == "warm" and shown["status"] == "flagged"
    assert shown["flag_reason"] == "wants a proposal" and shown["touch_count"] == 1
    assert [(t["channel"], t["note"]) for t in shown["touches"]] == [("call", "asked for a quote")]
    assert campaignd("leads", "unflag", email, config=config).returncode == 0
    text = campaignd("leads", "show", email, config=config).stdout
    assert "status         active" in text and "asked for a quote" in text

    assert campaignd("leads", "unsubscribe", email, config=config).returncode == 0
    shown = json.loads(campaignd("leads", "show", email, "--json", config=config).stdout)
    assert shown["status"] == "unsubscribed" and shown["suppressed"] is True
    listed = campaignd("suppression", "list", config=config).stdout
    assert email in listed and "unsubscribed" in listed

    # Back only by two deliberate acts: off the suppression list (with a reason), then resumed.
    refused = campaignd("leads", "resume", email, config=config)
    assert refused.returncode == 1 and "on the suppression list" in refused.stderr
    removed = campaignd("suppression", "remove", email, "--reason", "asked to hear from us", config=config)
    assert removed.returncode == 0 and f"leads resume {email}" in removed.stdout
    assert campaignd("leads", "resume", email, config=config).returncode == 0
    assert json.loads(campaignd("leads", "show", email, "--json", config=config).stdout)["status"] == "active"

    missing = campaignd("leads", "show", "nobody@example.com", config=config)
    assert missing.returncode == 1 and "no lead with the address" in missing.stderr


def test_suppression_add_and_remove_with_a_reason(config: Path) -> None:
    assert campaignd("suppression", "add", "Block@Example.com", config=config).returncode == 0
    assert "block@example.com" in campaignd("suppression", "list", config=config).stdout
    removed = campaignd(
        "suppression",
        "remove",
        "block@example.com",
        config=config,
        input="customer asked to hear from us again\n",
    )
    assert removed.returncode == 0, removed.stderr
    assert "removed from the suppression list" in removed.stdout
    assert "customer asked to hear from us again" in removed.stderr  # logged
    assert "0 suppressed" in campaignd("suppression", "list", config=config).stdout


def test_run_once_writes_the_outbox_and_status_and_plan_show_it(config: Path, tmp_path: Path) -> None:
    assert campaignd("leads", "import", str(EXAMPLE_LEADS), config=config).returncode == 0
    result = campaignd("run", "--once", config=config)
    assert result.returncode == 0, result.stderr
    outbox = tmp_path / "state" / "outbox" / "new"
    files = sorted(outbox.iterdir())
    assert len(files) == 5  # the five cold leads get their intro; warm leads start after a day
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in files[0].read_bytes()
    status = campaignd("status", config=config)
    assert status.returncode == 0
    assert "sent (24h):       5" in status.stdout
    data = json.loads(campaignd("status", "--json", config=config).stdout)
    assert data["touches_by_status"] == {"sent": 5}
    plan = json.loads(campaignd("plan", "--days", "30", "--json", config=config).stdout)
    maria = [t for t in plan["touches"] if t["email"] == "maria.gonzalez@lakeview-dental.example"]
    assert [t["step"] for t in maria] == ["02-postcard", "03-reminder", "01-sales-letter", "02-seminar"]
    assert maria[-1]["flags"] is True and maria[1]["promotes"] is True
    text = campaignd("plan", "--lead", "maria.gonzalez@lakeview-dental.example", config=config).stdout
    assert "→ FLAG for sales" in text


def test_a_second_daemon_on_the_same_sqlite_file_refuses_to_start(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    assert campaignd("db", "upgrade", config=path).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    first = subprocess.Popen(
        [sys.executable, "-m", "campaignd", "--config", str(path), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lock = tmp_path / "state" / "campaignd.db.lock"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (lock.exists() and lock.read_text().startswith("pid")):
            time.sleep(0.1)
        second = campaignd("run", "--once", config=path)
        assert second.returncode == 1
        assert "another campaignd daemon" in second.stderr and "one daemon per database file" in second.stderr
    finally:
        first.terminate()
        _, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    assert "campaignd stopped" in err
