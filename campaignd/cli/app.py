"""The root of the command line: global options, the shared state, output helpers.

Every command module (``daemon``, ``setup``, ``leads``, ``templates``, ...) registers its
commands on :data:`app`. No business logic lives in the CLI: commands build
:class:`Settings` once, wire the objects and print results. Every ``CampaigndError`` is
printed as its message, without a traceback, and the command exits non-zero.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer

from campaignd import __version__, database
from campaignd.config import Settings, find_config, load_settings, parse_duration
from campaignd.exceptions import CampaigndError, ConfigError
from campaignd.logs import setup_logging
from campaignd.store import Store

app = typer.Typer(
    name="campaignd",
    help="Email and direct-mail drip campaigns that hand warm leads to sales.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

logger = logging.getLogger("campaignd.cli")


@dataclass
class State:
    config: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    _settings: Settings | None = None
    _store: Store | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(find_config(self.config), overrides=self.overrides)
        return self._settings

    def reload(self) -> Settings:
        return load_settings(find_config(self.config), overrides=self.overrides)

    def store(self, *, require_head: bool = True) -> Store:
        if self._store is None:
            s = self.settings()
            engine = database.create_engine(
                s.database_url, busy_timeout_s=s.database.busy_timeout.total_seconds()
            )
            if require_head:
                database.require_head(engine)
            self._store = Store(engine=engine)
        return self._store


STATE = State()


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"campaignd {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="CAMPAIGND_CONFIG",
            show_envvar=True,
            help="The TOML config file (default: ./campaignd.toml, then /etc/campaignd/campaignd.toml).",
        ),
    ] = None,
    log_level: Annotated[
        LogLevel | None,
        typer.Option(
            "--log-level",
            help="Override [logging] level from the config.",
            case_sensitive=False,
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    STATE.config = config
    STATE.overrides = {"logging": {"level": log_level.value}} if log_level else {}
    level = log_level.value if log_level else "INFO"
    with contextlib.suppress(CampaigndError):  # reported by the command that needs the settings
        level = STATE.settings().logging.level
    setup_logging(level, journal=bool(os.environ.get("JOURNAL_STREAM")))


def out(text: str = "") -> None:
    typer.echo(text)


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=_json_default, ensure_ascii=False))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def fmt_time(value: datetime | None, zone: str | None = None) -> str:
    if value is None:
        return "-"
    if zone:
        value = value.astimezone(ZoneInfo(zone))
    return value.strftime("%Y-%m-%d %H:%M %Z").strip()


def parse_duration_option(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def main() -> None:
    """The ``campaignd`` console script."""
    try:
        app(prog_name="campaignd")
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        sys.exit(2)
    except CampaigndError as exc:
        typer.echo(str(exc), err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
