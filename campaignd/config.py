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
from datetime import datetime, time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values
from pydantic import (
    AfterValidator,
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


def _event_name(value: str) -> str:
    if not _STEP_ID.match(value):
        raise ValueError(
            f"event name {value!r} must be lower-case letters, digits, '-' or '_', such as 'winter-seminar'"
        )
    return value


EventName = Annotated[str, AfterValidator(_event_name)]


class Step(_Strict):
    """One touch in a tier's sequence."""

    id: str = ""
    channel: Channel = Channel.EMAIL
    template: str
    delay: Duration = timedelta(0)
    window: Window | None = None
    event: EventName | None = None
    """An event under ``[events]`` this step is about: its templates see it as ``event``, and
    an email carries it as an ``.ics`` invitation the recipient adds to their calendar."""

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


class Event(_Strict):
    """A dated event, such as a seminar or a training session, that invitations announce.

    ``start`` and ``end`` are wall-clock times (TOML local date-times, without an offset)
    in the event's ``timezone``, the business's ``timezone`` when unset. The calendar
    entry keeps one UID for as long as the event keeps its name, so a corrected invitation
    updates the entry recipients already added; raise ``sequence`` when you change the
    date, time or place of an event that has been announced.
    """

    title: str
    start: datetime
    end: datetime | None = None
    duration: Duration | None = None
    """Instead of ``end``: how long it lasts (``90m``, ``2h``)."""
    timezone: TimeZoneName | None = None
    location: str = ""
    """The venue, as it should appear in the calendar (name and street address)."""
    url: str = ""
    """Where to book a seat or read more."""
    description: str = ""
    uid: str = ""
    """The calendar UID; by default derived from the event's name and the sender's domain."""
    sequence: int = Field(default=0, ge=0, le=100_000)
    """The calendar revision: raise it after changing the date, time or place."""

    @field_validator("title", "location", "uid")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if any(c in value for c in "\r\n\0"):
            raise ValueError("must be a single line")
        return value.strip()

    @field_validator("start", "end")
    @classmethod
    def _local_time(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            raise ValueError(
                "write the local time without an offset (2027-01-14T18:30:00) and set the event's timezone"
            )
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip()
        if value and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _span(self) -> Event:
        if not self.title:
            raise ValueError("an event needs a title")
        if (self.end is None) == (self.duration is None):
            raise ValueError("give an event either an end or a duration")
        if self.end is None and self.duration is not None:
            object.__setattr__(self, "end", self.start + self.duration)
        if self.end is not None and self.end <= self.start:
            raise ValueError("an event must end after it starts")
        return self


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


_LETTER_PAPER_COUNTRIES = frozenset({"US", "CA", "MX", "PH", "CL", "CO", "VE", "GT", "DO", "CR", "PA"})


def check_schedule(value: str) -> str:
    """A cron schedule (see :meth:`DigestSettings.cron_fields`), spaces normalised.

    :raises ValueError: it does not parse, or it never fires.
    """
    from apscheduler.triggers.cron import CronTrigger

    value = " ".join(value.split())
    try:
        trigger = CronTrigger(**DigestSettings.cron_fields(value), timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid schedule: {exc}") from None
    if trigger.get_next_fire_time(None, datetime(2000, 1, 1, tzinfo=ZoneInfo("UTC"))) is None:
        raise ValueError(f"{value!r} never happens (check the day and month)")
    return value


class PrintSettings(_Strict):
    """Direct mail: print batches for the print shop or mailing house (``[print]``)."""

    path: Path = Path("print")
    """Where print batches are written (relative to the state directory)."""
    country: str = "US"
    """The country the pieces are posted from: leads without a country live there, and
    mail to it carries no country line."""
    paper: Literal["A4", "letter"] = "letter"
    """Letters on ``A4`` (DIN 5008 window, DL envelopes; postcards A6) or US ``letter``
    (#10 window envelopes; postcards 6 x 4 in). Default: ``letter`` when posting from the
    US or Canada, ``A4`` elsewhere."""
    schedule: str = "0 15 * * mon-fri"
    """When waiting pieces are exported as a batch: a cron expression (minute hour day
    month weekday) in ``timezone``; empty for no scheduled export."""
    timezone: TimeZoneName | None = None
    """The schedule's time zone; the business's ``timezone`` when unset."""
    when_waiting: int = Field(default=0, ge=0, le=1_000_000)
    """Also export as soon as this many pieces are waiting (0: only on the schedule)."""
    max_pieces: int = Field(default=5000, ge=1, le=100_000)
    """At most this many pieces in one batch; the rest go in the next."""
    count_at: Literal["confirm", "export"] = "confirm"
    """When a piece counts as a touch: when its batch is confirmed mailed (``campaignd mail
    confirm``), or as soon as the batch is exported."""
    without_address: Literal["skip", "email"] = "skip"
    """A lead without a complete postal address skips the step (with the reason recorded),
    or gets the step by email instead (``<template>.subject.j2``/``.html.j2``/``.txt.j2``
    beside the print template)."""
    return_address: tuple[str, ...] = ()
    """The sender's address on every piece, one line each; ``sender.postal_address`` when unset."""
    workers: int = Field(default=0, ge=0, le=64)
    """Processes that lay out a batch (0: one per CPU, at most 8)."""

    @model_validator(mode="before")
    @classmethod
    def _default_paper(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        paper = data.get("paper")
        if isinstance(paper, str):
            key = paper.strip().lower().replace("-", " ").replace("_", " ")
            data["paper"] = {"a4": "A4", "letter": "letter", "us letter": "letter"}.get(key, paper)
        elif paper is None:
            country = data.get("country", "US")
            code = country.strip().upper() if isinstance(country, str) else ""
            data["paper"] = "letter" if code in _LETTER_PAPER_COUNTRIES else "A4"
        return data

    @field_validator("country")
    @classmethod
    def _country(cls, value: str) -> str:
        from campaignd.addresses import rules_for
        from campaignd.countries import country_code

        code = country_code(value)
        if not code or rules_for(code) is None:
            raise ValueError(
                f"{value!r} is not a country campaignd can post from; use its code, such as US or DE"
            )
        return code

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        return check_schedule(value) if value.strip() else ""

    @field_validator("return_address", mode="before")
    @classmethod
    def _lines(cls, value: object) -> object:
        # One string (from the environment, or one line in the file): a line per newline.
        if isinstance(value, str):
            return [line for line in (part.strip() for part in value.splitlines()) if line]
        return value

    @field_validator("return_address")
    @classmethod
    def _clean_lines(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(c in line for line in value for c in "\0\r\n"):
            raise ValueError("a line of the return address contains a control character")
        return tuple(" ".join(line.split()) for line in value if line.strip())


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
    """The unsubscribe links in every marketing email, and the endpoint that honours them.

    The daemon serves the endpoint itself on ``listen``; the operator's reverse proxy
    terminates TLS and forwards ``base_url`` to it (see ``docs/unsubscribe.md``).
    """

    base_url: str = "http://localhost:8025"
    """Public URL under which the unsubscribe endpoint is reachable."""
    mailto: str = ""
    """A mailbox for ``mailto:`` unsubscribes in the List-Unsubscribe header (read by a person for now)."""
    secret_key: SecretStr = SecretStr("")
    previous_secret_key: SecretStr = SecretStr("")
    listen: str = ""
    """Where the daemon serves the endpoint, ``HOST:PORT`` (``127.0.0.1:8025``); empty: not served.

    Port 0 takes a free port (the log says which); only useful for tests.
    """
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    """Addresses or networks of reverse proxies whose ``X-Forwarded-For`` names the client."""
    rate_limit: int = Field(default=120, ge=0, le=1_000_000)
    """Requests per minute per client address (bursts up to the same number); 0: no limit."""

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r}: the base URL cannot have a query or a fragment")
        return value.rstrip("/")

    @field_validator("mailto")
    @classmethod
    def _mailbox(cls, value: str) -> str:
        value = value.strip()
        if value.lower().startswith("mailto:"):
            value = value[len("mailto:") :]
        if value and (value.count("@") != 1 or any(c in value for c in "\r\n\0 <>,?;\"'")):
            raise ValueError(f"{value!r} is not a plain email address such as 'unsubscribe@example.com'")
        return value

    @field_validator("secret_key", "previous_secret_key")
    @classmethod
    def _key_length(cls, value: SecretStr) -> SecretStr:
        # A short key can be guessed offline from one signed link; 32 characters of
        # 'openssl rand -base64 32' carry far more than the 128 bits a signature needs.
        if value.get_secret_value() and len(value.get_secret_value()) < 32:
            raise ValueError(
                "a signing key needs at least 32 characters; make one with 'openssl rand -base64 32'"
            )
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        value = value.strip()
        if value:
            Unsubscribe.parse_listen(value)
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, value: object) -> object:
        import ipaddress

        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError("expected a list of addresses or networks such as ['127.0.0.1', '10.0.0.0/8']")
        out = []
        for item in items:
            try:
                out.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network such as '10.0.0.0/8'") from None
        return tuple(out)

    @model_validator(mode="after")
    def _rotation(self) -> Unsubscribe:
        if self.previous_secret_key.get_secret_value() and not self.secret_key.get_secret_value():
            raise ValueError(
                "previous_secret_key is set but secret_key is not: rotation needs the new key "
                "in secret_key and the old one in previous_secret_key"
            )
        return self

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """``(host, port)`` to serve the endpoint on, or None when it is not served."""
        return Unsubscribe.parse_listen(self.listen) if self.listen else None

    @property
    def base_path(self) -> str:
        """The path part of ``base_url`` (``/campaignd``), empty at the root."""
        return urlsplit(self.base_url).path.rstrip("/")

    @staticmethod
    def parse_listen(value: str) -> tuple[str, int]:
        """``127.0.0.1:8025``, ``[::1]:8025`` or ``localhost:8025`` into ``(host, port)``."""
        host, sep, port_text = value.strip().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{value!r}: write an IPv6 address in brackets, such as '[::1]:8025'")
        if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError(f"{value!r} is not HOST:PORT, such as '127.0.0.1:8025'")
        if any(c.isspace() or c in "/[]" for c in host):
            raise ValueError(f"{value!r}: {host!r} is not a host name or address")
        return host, int(port_text)


class DigestSettings(_Strict):
    """The flagged-lead digest the sales side reviews."""

    schedule: str = "0 8 * * mon-fri"
    """When the daemon sends it: a cron expression (minute hour day month weekday) in the
    digest's time zone. Weekdays are names (``mon-fri``) or numbers as in crontab (0 and 7
    are Sunday). An optional sixth field in front gives seconds."""
    timezone: TimeZoneName | None = None
    """The schedule's time zone; the business's ``timezone`` when unset."""
    recipients: tuple[str, ...] = ()
    """Who receives it (``sales@example.com`` or ``Sales <sales@example.com>``); no
    recipients, no scheduled digest."""
    send_empty: bool = False
    """Send a digest even when no lead was flagged since the last one."""
    email_leads: int = Field(default=20, ge=1, le=500)
    """The email lists at most this many leads, newest flag first, and says how many more
    there are; the attached CSV always holds every one. Fewer are listed when long touch
    histories would make the email too big for mail clients to show whole (Gmail cuts
    messages over about 100 kB)."""

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        return check_schedule(value)

    @field_validator("recipients", mode="before")
    @classmethod
    def _split_recipients(cls, value: object) -> object:
        # One string from the environment: CAMPAIGND_DIGEST__RECIPIENTS="a@x.com, b@y.com".
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from email.headerregistry import Address
        from email.utils import parseaddr

        from email_validator import EmailNotValidError, validate_email

        out: dict[str, str] = {}
        for item in value:
            name, addr = parseaddr(item.strip())
            try:
                if not addr or any(c in item for c in "\r\n\0"):
                    raise EmailNotValidError("expected an address such as sales@example.com")
                checked = validate_email(addr, check_deliverability=False, globally_deliverable=False)
            except EmailNotValidError as exc:
                raise ValueError(f"{item!r} is not an email address: {exc}") from None
            name = " ".join(name.split())
            # Address() quotes a display name that needs it ("Doe, Jane" <jane@example.com>).
            text = (
                str(Address(display_name=name, addr_spec=checked.normalized)) if name else checked.normalized
            )
            out.setdefault(checked.normalized.lower(), text)
        return tuple(out.values())

    @staticmethod
    def cron_fields(expression: str) -> dict[str, str]:
        """The schedule as APScheduler 3 ``CronTrigger`` fields.

        Weekday numbers follow crontab (0 and 7 are Sunday), but APScheduler 3 counts from
        Monday, so weekdays are handed over as names. Raises ValueError with the reason.
        """
        aliases = {
            "@hourly": "0 * * * *",
            "@daily": "0 0 * * *",
            "@weekly": "0 0 * * sun",
            "@monthly": "0 0 1 * *",
            "@yearly": "0 0 1 1 *",
        }
        parts = aliases.get(expression.strip().lower(), expression).split()
        if len(parts) == 5:
            parts = ["0", *parts]
        if len(parts) != 6:
            raise ValueError(
                f"expected five fields (minute hour day month weekday), such as '0 8 * * mon-fri'; "
                f"got {len(parts)}"
            )
        names = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
        full = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")

        def day(token: str) -> int:
            if token.isdigit() and int(token) <= 7:
                return int(token)
            if token in names or token in full:
                return names.index(token[:3])
            raise ValueError(f"{token!r} is not a weekday (use 0-7, where 0 and 7 are Sunday, or mon-sun)")

        field = parts[5].lower()
        days: set[int] = set()
        for part in [] if field in ("*", "?") else field.split(","):
            span, _, step_text = part.partition("/")
            if step_text and not (step_text.isdigit() and int(step_text) > 0):
                raise ValueError(f"{part!r}: the step after '/' must be a positive number")
            if span == "*":
                first, last = 0, 6
            elif "-" in span:
                first, last = (day(t) for t in span.split("-", 1))
            else:
                first = day(span)
                last = 6 if step_text else first
            if first > last:
                raise ValueError(f"the weekday range {span!r} must run from an earlier day to a later one")
            days.update(d % 7 for d in range(first, last + 1, int(step_text or 1)))
        # Monday first, as APScheduler names them; every day is '*'.
        weekdays = ",".join(names[d] for d in sorted(days, key=lambda d: (d + 6) % 7))
        second, minute, hour, dom, month = parts[:5]
        return {
            "second": second,
            "minute": minute,
            "hour": hour,
            "day": dom,
            "month": month,
            "day_of_week": weekdays if days and len(days) < 7 else "*",
        }


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
    """Free-form data for templates: offers, prices, booking links."""
    events: dict[EventName, Event] = {}
    """Dated events (seminars, training sessions) that steps announce, by name."""
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


def _url_password(url: str) -> bool:
    """Whether a database URL carries a password, in its address or its query."""
    parts = urlsplit(url)
    return bool(parts.password) or any(
        key.lower() == "password" for key, _ in parse_qsl(parts.query, keep_blank_values=True)
    )


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    if parts.query:
        query = [
            (key, "***" if key.lower() == "password" else value)
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return parts.geturl()


def _drop(data: dict[str, Any], dotted: str) -> dict[str, Any]:
    """A copy of ``data`` without the key at ``dotted``."""
    head, _, rest = dotted.partition(".")
    if head not in data:
        return data
    out = dict(data)
    if rest and isinstance(out[head], dict):
        out[head] = _drop(out[head], rest)
    else:
        del out[head]
    return out


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
        except IsADirectoryError:
            raise ConfigError([Problem(source, "", "is a directory, not a file")]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                [Problem(source, "", f"not valid TOML: the file is not UTF-8 text (byte {exc.start})")]
            ) from None
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
    if isinstance(db_url, str) and _url_password(db_url):
        problems.append(
            Problem(
                source,
                "database.url",
                "a database URL with a password is a "
                f"secret; set {env_name('database.url')} in the environment instead",
            )
        )
    # The secrets are reported; the rest of the file is still checked so that every
    # problem shows at once.
    for problem in problems:
        data = _drop(data, problem.where)

    dotenv_env: dict[str, str] = {}
    if dotenv is not None and _readable_file(dotenv):
        dotenv_env = {k: v for k, v in dotenv_values(dotenv).items() if v is not None}
    merged_env = {**dotenv_env, **env}
    env_keys = {k for k in merged_env if k.startswith(ENV_PREFIX)}
    env_keys.discard(ENV_PREFIX + "CONFIG")

    base = path.parent if path else Path.cwd()
    data = _resolve_paths(data, base, merged_env)
    data = _deep_merge(data, _env_overrides(merged_env, env_keys))
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        from_dotenv = {k: str(dotenv) for k in env_keys if k not in env}
        problems += [_problem(err, source, env_keys, from_dotenv) for err in exc.errors()]
        raise ConfigError(problems) from None
    problems += _cross_checks(settings, source)
    if problems:
        raise ConfigError(problems)
    return settings.model_copy(update={"config_path": path})


def _readable_file(path: Path) -> bool:
    """Whether ``path`` is a file; False also when the directory cannot be looked into
    (a command run from a directory its user may not read)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _cross_checks(settings: Settings, source: str) -> list[Problem]:
    """Rules that tie several settings together."""
    problems = []
    # A send is at most the exchange of the message (bounded by the timeout as a whole)
    # and, when a pooled connection failed before the data, a connect, TLS and login and
    # the exchange again: five timeouts. A lease shorter than that would let another
    # daemon declare a message that is still being sent abandoned.
    slowest_send = settings.smtp.timeout * 6
    if settings.dispatch.lease < slowest_send:
        problems.append(
            Problem(
                source,
                "dispatch.lease",
                f"must be at least 6 × smtp.timeout ({format_duration(slowest_send)}) so that a message "
                "still being sent is never taken for abandoned",
            )
        )
    return problems


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


def _problem(err: Any, source: str, env_keys: set[str], from_dotenv: dict[str, str]) -> Problem:
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
        if candidate in from_dotenv:
            return Problem(f"{from_dotenv[candidate]}: {candidate}", dotted, reason)
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
