"""Settings: validation that names the file, the key and the reason; secrets; precedence.

``load_settings`` is what ``campaignd config check`` and every command call; the last tests
run ``campaignd config`` through its real entry point, where a config error must never be
a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from campaignd.config import Settings, load_settings
from campaignd.exceptions import ConfigError, Problem
from tests.factories import REPO, write_config

PG_WITH_PASSWORD = "postgresql+psycopg://app:s3cret@db.internal/campaignd"
SIGNING_KEY = "k" * 40


def _toml(tmp_path: Path, text: str, name: str = "campaignd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _load(path: Path | None, environ: dict[str, str] | None = None, dotenv: Path | None = None) -> Settings:
    return load_settings(path, environ=environ or {}, dotenv=dotenv)


def _problems(
    path: Path | None, environ: dict[str, str] | None = None, dotenv: Path | None = None
) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        _load(path, environ, dotenv)
    return [str(p) for p in caught.value.problems]


# -- valid configurations ----------------------------------------------------------------------------


def test_defaults_alone_are_a_valid_configuration() -> None:
    settings = _load(None)
    assert settings.smtp.host == "" and settings.followup.threshold == 8
    assert settings.database_url.startswith("sqlite:///")


@pytest.mark.parametrize("name", ["campaignd.toml", "demo.toml"])
def test_the_shipped_configs_are_valid(name: str) -> None:
    settings = _load(REPO / "config" / name)
    assert settings.sequences


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'state_dir = "state"\ntemplates = "../templates"\n')
    settings = _load(path)
    assert settings.state_dir == tmp_path / "state"
    assert settings.templates == tmp_path.parent / "templates"


def test_under_systemd_the_state_directory_comes_from_state_directory(tmp_path: Path) -> None:
    settings = _load(_toml(tmp_path, ""), {"STATE_DIRECTORY": "/var/lib/campaignd:/var/lib/other"})
    assert settings.state_dir == Path("/var/lib/campaignd")


# -- each problem with its file, key and reason ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[smtp]\nhots = "relay"\n', "smtp.hots: unknown setting (check the spelling)"),
        ('[smpt]\nhost = "relay"\n', "smpt: unknown setting (check the spelling)"),
        ('[smtp]\nport = "many"\n', "smtp.port: Input should be a valid integer"),
        ("[smtp]\nport = 70000\n", "smtp.port: Input should be less than or equal to 65535"),
        ('[smtp]\ntls = "ssl"\n', "smtp.tls: Input should be 'none', 'starttls' or 'implicit'"),
        ("[followup]\nthreshold = 0\n", "followup.threshold: Input should be greater than or equal to 1"),
        ('[dispatch]\ninterval = "5 minutes"\n', "dispatch.interval: '5 minutes' is not a duration"),
        ('timezone = "Mars/Olympus"\n', "timezone: unknown time zone 'Mars/Olympus'"),
        ('[sender]\nfrom_address = "hello"\n', "sender.from_address: 'hello' is not an email address"),
        (
            '[sequences.lukewarm]\nsteps = [{ template = "cold/01-intro" }]\n',
            "sequences.lukewarm: sequences are named by tier: cold, warm or hot",
        ),
        (
            '[sequences.cold]\nsteps = [{ template = "cold/01-intro", delay = "1 day" }]\n',
            "sequences.cold.steps[0].delay: '1 day' is not a duration",
        ),
        (
            '[sequences.cold]\nsteps = [{ template = "../secrets" }]\n',
            "sequences.cold.steps[0].template: a template is a path inside the templates folder",
        ),
        (
            '[sequences.cold]\nsteps = [{ template = "cold/a" }, { template = "other/a" }]\n',
            "sequences.cold: two steps share the id 'a'; give each an explicit 'id'",
        ),
        (
            '[sequences.cold]\nsteps = [{ template = "cold/a", window = { hours = "17:00-09:00" } }]\n',
            "sequences.cold.steps[0].window.hours: '17:00-09:00': the window must end after it starts",
        ),
        (
            '[sequences.cold]\nwindow = { days = ["mon-fry"] }\nsteps = []\n',
            "sequences.cold.window.days: 'mon-fry' is not a weekday or a range like 'mon-fri'",
        ),
        (
            '[smtp]\ntimeout = "2m"\n[dispatch]\nlease = "5m"\n',
            "dispatch.lease: must be at least 6 × smtp.timeout (12m)",
        ),
    ],
)
def test_each_problem_names_the_file_the_key_and_the_reason(tmp_path: Path, text: str, problem: str) -> None:
    path = _toml(tmp_path, text)
    problems = _problems(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: {problem}")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[smtp]\nhots = "x"\nport = "many"\n[followup]\nthreshold = 0\n')
    with pytest.raises(ConfigError) as caught:
        _load(path)
    assert caught.value.problems == [
        Problem(str(path), "followup.threshold", "Input should be greater than or equal to 1"),
        Problem(
            str(path), "smtp.port", "Input should be a valid integer, unable to parse string as an integer"
        ),
        Problem(str(path), "smtp.hots", "unknown setting (check the spelling)"),
    ]
    assert str(caught.value).splitlines() == [
        "3 configuration problem(s):",
        f"  {path}: followup.threshold: Input should be greater than or equal to 1",
        f"  {path}: smtp.port: Input should be a valid integer, unable to parse string as an integer",
        f"  {path}: smtp.hots: unknown setting (check the spelling)",
    ]


def test_a_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[smtp]\nhost = "relay\nport = 25\n')
    assert _problems(path) == [f"{path}: not valid TOML: Illegal character '\\n' (at line 2, column 14)"]


def test_a_missing_config_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    assert _problems(tmp_path / "nowhere.toml") == [f"{tmp_path / 'nowhere.toml'}: file not found"]


def test_a_directory_given_as_the_config_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    assert _problems(tmp_path / "conf.d") == [f"{tmp_path / 'conf.d'}: is a directory, not a file"]


def test_a_config_file_that_is_not_utf8_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "campaignd.toml"
    path.write_bytes('timezone = "Europe/Zürich"\n'.encode("cp1252"))
    [problem] = _problems(path)
    assert problem.startswith(f"{path}: not valid TOML: the file is not UTF-8 text")


# -- secrets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "variable"),
    [
        ('[smtp]\npassword = "hunter2"\n', "smtp.password", "CAMPAIGND_SMTP__PASSWORD"),
        ('smtp = { password = "hunter2" }\n', "smtp.password", "CAMPAIGND_SMTP__PASSWORD"),
        (
            f'[unsubscribe]\nsecret_key = "{SIGNING_KEY}"\n',
            "unsubscribe.secret_key",
            "CAMPAIGND_UNSUBSCRIBE__SECRET_KEY",
        ),
        (
            f'[unsubscribe]\nprevious_secret_key = "{SIGNING_KEY}"\n',
            "unsubscribe.previous_secret_key",
            "CAMPAIGND_UNSUBSCRIBE__PREVIOUS_SECRET_KEY",
        ),
        (f'[database]\nurl = "{PG_WITH_PASSWORD}"\n', "database.url", "CAMPAIGND_DATABASE__URL"),
    ],
)  # fmt: skip
def test_secrets_in_the_config_file_are_refused(tmp_path: Path, text: str, key: str, variable: str) -> None:
    path = _toml(tmp_path, text)
    [problem] = _problems(path)
    assert problem.startswith(f"{path}: {key}: ")
    assert variable in problem
    assert "hunter2" not in problem and "s3cret" not in problem and SIGNING_KEY not in problem


def test_a_database_url_without_a_password_may_be_in_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[database]\nurl = "postgresql+psycopg://campaignd@/campaignd"\n')
    assert _load(path).database_url == "postgresql+psycopg://campaignd@/campaignd"


def test_a_secret_in_the_file_is_reported_with_the_other_problems(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[smtp]\npassword = "hunter2"\nport = "many"\n')
    problems = _problems(path)
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}: smtp.password: secrets must not be written in the config file")
    assert problems[1].startswith(f"{path}: smtp.port: ")


def test_a_database_password_in_the_url_query_is_a_secret_too(tmp_path: Path) -> None:
    url = "postgresql+psycopg://app@db.internal/campaignd?sslmode=require&password=s3cret"
    [problem] = _problems(_toml(tmp_path, f'[database]\nurl = "{url}"\n'))
    assert "database.url: a database URL with a password is a secret" in problem
    shown = _load(None, {"CAMPAIGND_DATABASE__URL": url}).redacted()["database"]["url"]
    assert "s3cret" not in shown and "sslmode=require" in shown


def test_secrets_from_the_environment_are_used_and_redacted(tmp_path: Path) -> None:
    environ = {
        "CAMPAIGND_SMTP__PASSWORD": "hunter2",
        "CAMPAIGND_DATABASE__URL": PG_WITH_PASSWORD,
        "CAMPAIGND_UNSUBSCRIBE__SECRET_KEY": SIGNING_KEY,
    }
    settings = _load(_toml(tmp_path, '[smtp]\nhost = "relay.example.com"\n'), environ)
    assert settings.smtp.password.get_secret_value() == "hunter2"
    assert settings.database_url == PG_WITH_PASSWORD
    shown = settings.redacted()
    assert shown["smtp"]["password"] == "***"
    assert shown["unsubscribe"]["secret_key"] == "***"
    assert shown["database"]["url"] == "postgresql+psycopg://app:***@db.internal/campaignd"
    everything = json.dumps(shown) + repr(settings) + str(settings) + settings.model_dump_json()
    for secret in ("hunter2", "s3cret", SIGNING_KEY):
        assert secret not in everything


# -- environment and .env ----------------------------------------------------------------------------


def test_the_environment_overrides_the_file_and_dotenv_fills_in(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[smtp]\nhost = "from-file"\nport = 25\n[followup]\nthreshold = 6\n')
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "CAMPAIGND_SMTP__HOST=from-dotenv\nCAMPAIGND_SMTP__USERNAME=mailer\nCAMPAIGND_SMTP__PORT=2525\n"
    )
    settings = _load(path, {"CAMPAIGND_SMTP__HOST": "from-environment"}, dotenv)
    assert settings.smtp.host == "from-environment"  # environment > .env > file
    assert settings.smtp.username == "mailer" and settings.smtp.port == 2525  # .env > file
    assert settings.followup.threshold == 6  # the file, where nothing overrides it


def test_environment_values_can_be_json_lists_and_tables(tmp_path: Path) -> None:
    environ = {
        "CAMPAIGND_DIGEST__RECIPIENTS": '["sales@example.com", "Boss <boss@example.com>"]',
        "CAMPAIGND_CAMPAIGN": '{"offer": {"headline": "10% off"}}',
    }
    settings = _load(_toml(tmp_path, ""), environ)
    assert settings.digest.recipients == ("sales@example.com", "Boss <boss@example.com>")
    assert settings.campaign == {"offer": {"headline": "10% off"}}


def test_the_config_path_variable_is_not_taken_for_a_setting(tmp_path: Path) -> None:
    path = _toml(tmp_path, "")
    assert _load(path, {"CAMPAIGND_CONFIG": str(path)}).config_path == path


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    environ = {"CAMPAIGND_SMTP__PORT": "many", "CAMPAIGND_DISPATCH__BATHC_SIZE": "10"}
    assert sorted(_problems(_toml(tmp_path, ""), environ)) == [
        "environment CAMPAIGND_DISPATCH__BATHC_SIZE: dispatch.bathc_size: unknown setting "
        "(check the spelling)",
        "environment CAMPAIGND_SMTP__PORT: smtp.port: Input should be a valid integer, unable to parse "
        "string as an integer",
    ]


def test_a_bad_value_from_the_dotenv_file_names_that_file(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("CAMPAIGND_SMTP__PORT=many\n")
    [problem] = _problems(_toml(tmp_path, ""), {}, dotenv)
    assert problem.startswith(f"{dotenv}: CAMPAIGND_SMTP__PORT: smtp.port: ")


def test_the_duration_notation_round_trips_through_config_show(tmp_path: Path) -> None:
    settings = _load(_toml(tmp_path, '[dispatch]\ninterval = "1h30m"\nretry_backoff = 90\n'))
    assert settings.dispatch.interval == timedelta(minutes=90)
    shown = settings.redacted()["dispatch"]
    assert (shown["interval"], shown["retry_backoff"]) == ("1h30m", "1m30s")


# -- through the real entry point -------------------------------------------------------------------------


def _campaignd(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    full.pop("JOURNAL_STREAM", None)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "campaignd", *args],
        capture_output=True,
        text=True,
        env=full,
        cwd=cwd,
        timeout=120,
    )


def test_config_check_prints_every_problem_and_no_traceback(tmp_path: Path) -> None:
    path = write_config(tmp_path, extra='[smtp]\nhots = "x"\n')
    path.write_text(path.read_text().replace("threshold = 5", "threshold = 0"))
    result = _campaignd("--config", str(path), "config", "check", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "2 configuration problem(s):",
        f"  {path}: followup.threshold: Input should be greater than or equal to 1",
        f"  {path}: smtp.hots: unknown setting (check the spelling)",
    ]

    path.write_text('[smtp]\nhost = "relay\n')
    broken = _campaignd("--config", str(path), "config", "check", cwd=tmp_path)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert f"{path}: not valid TOML: " in broken.stderr and "(at line 2, column 14)" in broken.stderr


def test_config_show_reads_secrets_from_dotenv_and_redacts_them(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    (tmp_path / ".env").write_text(
        f"CAMPAIGND_SMTP__PASSWORD=hunter2\nCAMPAIGND_UNSUBSCRIBE__SECRET_KEY={SIGNING_KEY}\n"
    )
    result = _campaignd("--config", str(path), "config", "show", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["smtp"]["password"] == "***" and shown["unsubscribe"]["secret_key"] == "***"
    assert "hunter2" not in result.stdout and SIGNING_KEY not in result.stdout
    assert shown["sender"]["from_address"] == "hello@harborhome.example"
