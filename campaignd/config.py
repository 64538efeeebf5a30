"""Settings: the one typed configuration object, built once at the edge.

Owns reading the TOML file, the environment and ``.env``; validating all of it;
reporting every problem with its file, key and reason; and redacting secrets when
the effective configuration is printed. Nothing deeper in the package reads
``os.environ``: the CLI builds :class:`Settings` with :func:`load_settings` and
passes it down.

Precedence, highest first: environment, ``.env``, the TOML file, defaults.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tomllib
from datetime import time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from campaignd.exceptions import ConfigError, Problem

ENV_PREFIX = "CAMPAIGND_"
DEFAULT_CONFIG_PATHS = (Path("campaignd.toml"), Path("/etc/campaignd/campaignd.toml"))

# -- small value types ------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+)\s*(w|d|h|m|s)", re.IGNORECASE)
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: object) -> timedelta:
    """Parse ``45s``, ``2h``, ``3d``, ``1w`` or a combination (``1h30m``) into a timedelta.

    A bare number is seconds. Raises ValueError with a readable reason otherwise.
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '45s', '2h', '3d' or '1w'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return timedelta(seconds=value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as '45s', '2h', '3d' or '1w'")
    text = value.strip().replace(" ", "")
    if text.isdigit():
        return timedelta(seconds=int(text))
    pos, total = 0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(
            f"{value!r} is not a duration: use a number and a unit, such as '45s', '2h', "
            "'3d' or '1w' (units: w, d, h, m, s)"
        )
    return timedelta(seconds=total)


def format_duration(value: timedelta) -> str:
    """Render a timedelta back in the config's own notation (``1d2h``)."""
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in _UNIT_SECONDS.items():
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]


def _parse_zone(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected an IANA time zone name such as 'Europe/London'")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}; use an IANA name such as 'America/Chicago'") from None
    return value


TimeZoneName = Annotated[str, BeforeValidator(_parse_zone)]

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _parse_days(value: object) -> tuple[int, ...]:
    """Turn ``["mon-fri", "sun"]`` or ``"mon-fri"`` into sorted ISO weekday indexes (0=Mon)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError("expected weekdays such as ['mon-fri'] or ['mon', 'wed', 'fri']")
    days: set[int] = set()
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= 6:
            days.add(item)
            continue
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a weekday")
        for part in item.lower().split(","):
            part = part.strip()
            first, _, last = part.partition("-")
            first, last = first[:3], (last or first)[:3]
            if first not in WEEKDAYS or last not in WEEKDAYS:
                raise ValueError(f"{part!r} is not a weekday or a range like 'mon-fri'")
            a, b = WEEKDAYS.index(first), WEEKDAYS.index(last)
            span = range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)]
            days.update(span)
    return tuple(sorted(days))


def _parse_hours(value: object) -> tuple[time, time]:
    """Turn ``"09:00-17:30"`` into (start, end); end is exclusive, ``24:00`` allowed."""
    if isinstance(value, list | tuple) and len(value) == 2:
        value = f"{value[0]}-{value[1]}"
    if not isinstance(value, str) or "-" not in value:
        raise ValueError("expected hours such as '09:00-17:00'")
    start_text, end_text = (p.strip() for p in value.split("-", 1))

    def one(text: str) -> time:
        match = re.fullmatch(r"(\d{1,2})(?::(\d{2}))?", text)
        if not match:
            raise ValueError(f"{text!r} is not a time of day such as '09:00'")
        hour, minute = int(match.group(1)), int(match.group(2) or 0)
        if hour == 24 and minute == 0:
            return time.max
        if hour > 23 or minute > 59:
            raise ValueError(f"{text!r} is not a time of day")
        return time(hour, minute)

    start, end = one(start_text), one(end_text)
    if start >= end:
        raise ValueError(f"{value!r}: the window must end after it starts, on the same day")
    return start, end


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=False)


class Window(_Strict):
    """When a step may be sent, in the lead's own time zone."""

    days: Annotated[tuple[int, ...], BeforeValidator(_parse_days)] = tuple(range(7))
    hours: Annotated[tuple[time, time], BeforeValidator(_parse_hours)] = (time(0), time.max)

    def describe(self) -> str:
        names = ",".join(WEEKDAYS[d] for d in self.days)
        end = "24:00" if self.hours[1] == time.max else self.hours[1].strftime("%H:%M")
        return f"{names} {self.hours[0].strftime('%H:%M')}-{end}"


class Channel(StrEnum):
    EMAIL = "email"
    MAIL = "mail"


class Tier(StrEnum):
    COLD = "cold"
    WARM = "warm"
    HOT = "hot"


_STEP_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class Step(_Strict):
    """One touch in a tier's sequence."""

    id: str = ""
    channel: Channel = Channel.EMAIL
    template: str
    delay: Duration = timedelta(0)
    window: Window | None = None

    @model_validator(mode="after")
    def _default_id(self) -> Step:
        if not self.id:
            object.__setattr__(self, "id", self.template.rsplit("/", 1)[-1].lower())
        if not _STEP_ID.match(self.id):
            raise ValueError(
                f"step id {self.id!r} must be lower-case letters, digits, '-' or '_' "
                "(it identifies the step forever: never reuse or rename one that has been sent)"
            )
        return self

    @field_validator("template")
    @classmethod
    def _template_name(cls, value: str) -> str:
        value = value.strip()
        if not value or value.startswith("/") or ".." in value.split("/"):
            raise ValueError("a template is a path inside the templates folder, such as 'cold/01-intro'")
        return value


class Sequence(_Strict):
    """The ordered steps of one tier."""

    steps: tuple[Step, ...] = ()
    window: Window | None = None
    """Default send window for steps that do not set their own."""

    @model_validator(mode="after")
    def _unique_ids(self) -> Sequence:
        seen: set[str] = set()
        for step in self.steps:
            if step.id in seen:
                raise ValueError(f"two steps share the id {step.id!r}; give each an explicit 'id'")
            seen.add(step.id)
        return self

    def window_for(self, step: Step) -> Window | None:
        return step.window or self.window


class Sender(_Strict):
    from_name: str = "campaignd"
    from_address: str = "campaignd@localhost"
    reply_to: str = ""
    postal_address: str = ""
    """The business's postal address; required in every marketing email."""

    @field_validator("from_address", "reply_to")
    @classmethod
    def _address(cls, value: str) -> str:
        if value and ("@" not in value or any(c in value for c in "\r\n\0 <>")):
            raise ValueError(f"{value!r} is not an email address")
        return value

    @field_validator("from_name", "postal_address")
    @classmethod
    def _no_controls(cls, value: str) -> str:
        if "\0" in value:
            raise ValueError("contains a NUL character")
        return value.strip()


class FollowUp(_Strict):
    threshold: int = Field(default=8, ge=1, le=1000)
    """Touches after which a lead is flagged for personal sales follow-up."""


class Promotion(_Strict):
    rule: Literal["sequence_complete", "touches"] = "sequence_complete"
    after_touches: int = Field(default=4, ge=1, le=1000)
    """With ``rule = "touches"``: promote a cold lead to warm after this many touches."""


class TlsMode(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class Smtp(_Strict):
    host: str = ""
    """The relay; empty means write every message into the local outbox instead."""
    port: int = Field(default=587, ge=1, le=65535)
    tls: TlsMode = TlsMode.STARTTLS
    username: str = ""
    password: SecretStr = SecretStr("")
    connections: int = Field(default=4, ge=1, le=64)
    rate: float = Field(default=0, ge=0)
    """Messages per second across all connections; 0 means as fast as the relay takes them."""
    timeout: Duration = timedelta(seconds=30)
    helo_name: str = ""


class Outbox(_Strict):
    path: Path = Path("outbox")
    """Maildir that receives every email when no relay is set (relative to the state directory)."""


class PrintSettings(_Strict):
    path: Path = Path("print")
    """Where direct-mail pieces are written for the print shop (relative to the state directory)."""


class Dispatch(_Strict):
    interval: Duration = timedelta(seconds=30)
    batch_size: int = Field(default=500, ge=1, le=100_000)
    lease: Duration = timedelta(minutes=5)
    """How long claimed work stays with one daemon before another may take it over."""
    max_attempts: int = Field(default=5, ge=1, le=100)
    retry_backoff: Duration = timedelta(minutes=1)
    retry_backoff_max: Duration = timedelta(hours=6)
    stop_timeout: Duration = timedelta(seconds=20)


class Database(_Strict):
    url: SecretStr = SecretStr("")
    """Empty means an SQLite file ``campaignd.db`` in the state directory."""
    busy_timeout: Duration = timedelta(seconds=10)


class Unsubscribe(_Strict):
    base_url: str = "http://localhost:8025"
    """Public URL under which the unsubscribe endpoint is reachable."""
    mailto: str = ""
    secret_key: SecretStr = SecretStr("")
    previous_secret_key: SecretStr = SecretStr("")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")


class DigestSettings(_Strict):
    """The flagged-lead digest the sales side reviews."""

    schedule: str = "0 8 * * mon-fri"
    """When the daemon sends it: a cron expression (minute hour day month weekday)."""
    timezone: TimeZoneName | None = None
    """The schedule's time zone; the business's ``timezone`` when unset."""
    recipients: tuple[str, ...] = ()
    """Who receives it; no recipients, no scheduled digest."""
    send_empty: bool = False
    """Send a digest even when no lead was flagged since the last one."""


class Logging(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


SECRET_KEYS = ("smtp.password", "unsubscribe.secret_key", "unsubscribe.previous_secret_key")


class Settings(_Strict):
    """Everything campaignd is configured with."""

    config_path: Path | None = Field(default=None, exclude=True)
    state_dir: Path = Path("var")
    templates: Path = Path("templates")
    timezone: TimeZoneName = "UTC"
    """Time zone for leads that have none, and for schedules."""
    sender: Sender = Sender()
    database: Database = Database()
    followup: FollowUp = FollowUp()
    promotion: Promotion = Promotion()
    dispatch: Dispatch = Dispatch()
    smtp: Smtp = Smtp()
    outbox: Outbox = Outbox()
    print: PrintSettings = PrintSettings()
    unsubscribe: Unsubscribe = Unsubscribe()
    digest: DigestSettings = DigestSettings()
    logging: Logging = Logging()
    campaign: dict[str, Any] = {}
    """Free-form data for templates: offers, seminar dates, booking links."""
    sequences: dict[Tier, Sequence] = {}

    # -- derived -----------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        url = self.database.url.get_secret_value()
        return url or f"sqlite:///{self.state_dir / 'campaignd.db'}"

    @property
    def outbox_dir(self) -> Path:
        return self.state_dir / self.outbox.path

    @property
    def print_dir(self) -> Path:
        return self.state_dir / self.print.path

    def sequence(self, tier: Tier | str) -> Sequence:
        return self.sequences.get(Tier(tier), Sequence())

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets replaced by ``***``."""
        data = self.model_dump(mode="json", exclude={"config_path"})
        for dotted in SECRET_KEYS:
            section, key = dotted.split(".")
            if data[section][key]:
                data[section][key] = "***"
        data["database"]["url"] = _redact_url(self.database.url.get_secret_value())
        return data


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


# -- loading -------------------------------------------------------------------------------


def find_config(explicit: Path | None) -> Path | None:
    """The config file to read: ``--config``/``CAMPAIGND_CONFIG``, else the first default found."""
    if explicit is not None:
        return explicit
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.is_file():
            return candidate
    return None


def load_settings(
    path: Path | None,
    *,
    environ: dict[str, str] | None = None,
    dotenv: Path | None = Path(".env"),
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from a TOML file, ``.env`` and the environment.

    :param path: the TOML file, or None for defaults only.
    :param environ: the environment (``os.environ`` when None).
    :param dotenv: a ``.env`` file read when it exists; the real environment wins over it.
    :param overrides: values from the command line, above everything else.
    :raises ConfigError: listing every problem with its file, key and reason.
    """
    env = dict(os.environ if environ is None else environ)
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([Problem(source, "", "file not found")]) from None
        except PermissionError:
            raise ConfigError([Problem(source, "", "permission denied")]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([Problem(source, "", f"not valid TOML: {exc}")]) from None

    problems = [
        Problem(
            source,
            dotted,
            "secrets must not be written in the config file; set "
            f"{env_name(dotted)} in the environment or the .env file instead",
        )
        for dotted in SECRET_KEYS
        if _dig(data, dotted)
    ]
    db_url = _dig(data, "database.url")
    if isinstance(db_url, str) and urlsplit(db_url).password:
        problems.append(
            Problem(
                source,
                "database.url",
                "a database URL with a password is a "
                f"secret; set {env_name('database.url')} in the environment instead",
            )
        )

    dotenv_env: dict[str, str] = {}
    if dotenv is not None and dotenv.is_file():
        dotenv_env = {k: v for k, v in dotenv_values(dotenv).items() if v is not None}
    merged_env = {**dotenv_env, **env}
    env_keys = {k for k in merged_env if k.startswith(ENV_PREFIX)}
    env_keys.discard(ENV_PREFIX + "CONFIG")

    base = path.parent if path else Path.cwd()
    data = _resolve_paths(data, base, merged_env)
    if problems:
        raise ConfigError(problems)
    data = _deep_merge(data, _env_overrides(merged_env, env_keys))
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_problem(err, source, env_keys) for err in exc.errors()]) from None
    return settings.model_copy(update={"config_path": path})


def _env_overrides(env: dict[str, str], env_keys: set[str]) -> dict[str, Any]:
    """``CAMPAIGND_SMTP__HOST=x`` becomes ``{"smtp": {"host": "x"}}``.

    Values that look like JSON lists or tables (``[...]``, ``{...}``) are decoded as JSON.
    """
    out: dict[str, Any] = {}
    for key in sorted(env_keys):
        path = key[len(ENV_PREFIX) :].lower().split("__")
        value: Any = env[key]
        if isinstance(value, str) and value[:1] in "[{":
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value
    return out


def env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.replace(".", "__").upper()


def _dig(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_paths(data: dict[str, Any], base: Path, env: dict[str, str]) -> dict[str, Any]:
    """Relative paths in the file are relative to the file; the state directory defaults
    to ``$STATE_DIRECTORY`` under systemd, else ``./var``."""
    data = dict(data)
    if isinstance(data.get("templates"), str):
        data["templates"] = os.path.normpath(base / data["templates"])
    elif "templates" not in data:
        data["templates"] = os.path.normpath(
            base / "templates" if (base / "templates").is_dir() else base.parent / "templates"
        )
    if isinstance(data.get("state_dir"), str):
        data["state_dir"] = os.path.normpath(base / data["state_dir"])
    elif "state_dir" not in data:
        state = env.get("STATE_DIRECTORY", "").split(":")[0]
        data["state_dir"] = state or "var"
    return data


def _problem(err: Any, source: str, env_keys: set[str]) -> Problem:
    loc = [str(p) for p in err["loc"]]
    dotted = _format_loc(tuple(p for p in err["loc"] if p != "[key]"))
    reason = str(err["msg"]).removeprefix("Value error, ")
    if "[key]" in err["loc"] and err["loc"][0] == "sequences":
        reason = "sequences are named by tier: cold, warm or hot"
    if err["type"] == "extra_forbidden":
        reason = "unknown setting (check the spelling)"
    elif err["type"] == "missing":
        reason = "required setting is missing"
    # Name the environment variable when the value came from there.
    for n in range(len(loc), 0, -1):
        candidate = ENV_PREFIX + "__".join(loc[:n]).upper()
        if candidate in env_keys:
            return Problem(f"environment {candidate}", dotted, reason)
    return Problem(source, dotted, reason)


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
