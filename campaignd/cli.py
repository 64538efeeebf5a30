"""The command line: builds Settings once, wires the objects, prints results.

No business logic lives here. Every ``CampaigndError`` is printed as its message, without
a traceback, and the command exits 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from campaignd import __version__, database
from campaignd.config import Settings, Tier, find_config, load_settings, parse_duration
from campaignd.engine import utcnow
from campaignd.exceptions import CampaigndError, ConfigError, Problem, TemplateError
from campaignd.logs import setup_logging
from campaignd.models import LeadStatus, SuppressionReason
from campaignd.sequences import Policy, forecast
from campaignd.store import LeadRecord, Store, TouchRecord

app = typer.Typer(
    name="campaignd",
    help="Email and direct-mail drip campaigns that hand warm leads to sales.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="The lead database: migrations.", no_args_is_help=True)
config_app = typer.Typer(help="Check and show the configuration.", no_args_is_help=True)
leads_app = typer.Typer(help="Import, list and manage leads.", no_args_is_help=True)
touches_app = typer.Typer(help="Touches made by hand, and re-queueing failed ones.", no_args_is_help=True)
templates_app = typer.Typer(help="Check the templates the sequences use.", no_args_is_help=True)
suppression_app = typer.Typer(help="Addresses that must never be contacted.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(leads_app, name="leads")
app.add_typer(touches_app, name="touches")
app.add_typer(templates_app, name="templates")
app.add_typer(suppression_app, name="suppression")

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
        from zoneinfo import ZoneInfo

        value = value.astimezone(ZoneInfo(zone))
    return value.strftime("%Y-%m-%d %H:%M %Z").strip()


# -- run --------------------------------------------------------------------------------------


@app.command()
def run(
    once: Annotated[bool, typer.Option("--once", help="Do the passes that are due now, then exit.")] = False,
    for_: Annotated[
        str | None,
        typer.Option("--for", metavar="DURATION", help="Stop by itself after this long (e.g. 60s)."),
    ] = None,
) -> None:
    """Run the daemon: send due steps, count touches, promote and flag leads."""
    from campaignd.daemon import Daemon

    duration = _duration(for_) if for_ else None
    settings = STATE.settings()
    code = Daemon(settings=settings, reload=STATE.reload, once=once, duration=duration).run()
    raise typer.Exit(code)


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def demo(
    leads: Annotated[Path, typer.Option(help="Leads to import.")] = Path("examples/leads.csv"),
    for_: Annotated[str, typer.Option("--for", metavar="DURATION", help="How long to run.")] = "60s",
) -> None:
    """Set up the demo database, import the example leads, run the daemon, show the result.

    Uses the config given with --config (the quick start passes config/demo.toml).
    """
    from campaignd.daemon import Daemon
    from campaignd.importer import import_leads

    settings = STATE.settings()
    out(f"campaignd demo: state in {settings.state_dir}/, messages go to {settings.outbox_dir}/")
    engine = database.create_engine(settings.database_url)
    database.upgrade(engine)
    store = Store(engine=engine)
    report = import_leads(store, leads, default_tier=Tier.COLD.value, now=utcnow())
    out(report.summary())
    _print_sequences(settings)
    out(f"\nrunning the daemon for {for_} (Ctrl-C stops it early)...\n")
    Daemon(settings=settings, reload=STATE.reload, duration=_duration(for_)).run()
    out("")
    _print_status(store, settings)
    out(f"\nThe messages are in {settings.outbox_dir}/new/ (open any .eml file in a mail client).")


def _print_sequences(settings: Settings) -> None:
    out("\nsequences:")
    for tier, seq in settings.sequences.items():
        out(f"  {tier.value}:")
        for i, step in enumerate(seq.steps, 1):
            window = seq.window_for(step)
            extra = f", window {window.describe()}" if window else ""
            out(
                f"    {i}. {step.id:<20} {step.channel.value:<5} {step.template:<28} "
                f"after {_fmt_delay(step.delay)}{extra}"
            )
    out(
        f"  flagged for sales after {settings.followup.threshold} touches; cold→warm "
        + (
            "when the cold sequence completes"
            if settings.promotion.rule == "sequence_complete"
            else f"after {settings.promotion.after_touches} touches"
        )
    )


def _fmt_delay(delay: timedelta) -> str:
    from campaignd.config import format_duration

    return format_duration(delay)


# -- status and plan ---------------------------------------------------------------------------


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Leads by tier and status, what is due, recent sends, failures and unknowns."""
    settings = STATE.settings()
    store = STATE.store()
    if as_json:
        r = store.status_report(now=utcnow())
        emit_json(
            {
                "leads": [
                    {"tier": t, "status": s, "count": n} for (t, s), n in sorted(r.by_tier_status.items())
                ],
                "due_now": r.due_now,
                "next_due_at": r.next_due_at,
                "sent_last_24h": r.sent_last_day,
                "touches_by_status": r.touches_by_status,
                "suppressed": r.suppressed,
                "unknown": [
                    {"touch": t.id, "lead": e, "tier": t.tier, "step": t.step, "error": t.error}
                    for t, e in r.unknown
                ],
                "failed": [
                    {"touch": t.id, "lead": e, "tier": t.tier, "step": t.step, "error": t.error}
                    for t, e in r.failed
                ],
                "flagged_last_24h": [
                    {"email": lead.email, "flagged_at": lead.flagged_at, "reason": lead.flag_reason}
                    for lead in r.flagged_recent
                ],
            }
        )
        return
    _print_status(store, settings)


def _print_status(store: Store, settings: Settings) -> None:
    now = utcnow()
    r = store.status_report(now=now)
    statuses = [s.value for s in LeadStatus]
    tiers = [t.value for t in Tier]
    out("leads".ljust(8) + "".join(s.rjust(13) for s in statuses) + "total".rjust(9))
    for tier in tiers:
        row = [r.by_tier_status.get((tier, s), 0) for s in statuses]
        out(tier.ljust(8) + "".join(str(n).rjust(13) for n in row) + str(sum(row)).rjust(9))
    out("")
    out(f"due now:          {r.due_now}")
    out(f"next due:         {fmt_time(r.next_due_at, settings.timezone)}")
    out(f"sent (24h):       {r.sent_last_day}")
    tb = r.touches_by_status
    out(f"touches:          {', '.join(f'{k} {v}' for k, v in sorted(tb.items())) or 'none yet'}")
    out(f"suppressed:       {r.suppressed}")
    if r.flagged_recent:
        out(f"\nflagged for sales follow-up (24h): {len(r.flagged_recent)}")
        for lead in r.flagged_recent[:20]:
            out(f"  {lead.email:<36} {lead.name:<24} {lead.touch_count} touches  {fmt_time(lead.flagged_at)}")
    for title, rows in (
        ("UNKNOWN outcome (check, then 'campaignd touches retry ID')", r.unknown),
        ("FAILED (check, then 'campaignd touches retry ID')", r.failed),
    ):
        if rows:
            out(f"\n{title}: {len(rows)}")
            for t, email in rows[:50]:
                out(f"  touch {t.id:<7} {email:<36} {t.tier}/{t.step}  {(t.error or '')[:80]}")


@app.command()
def plan(
    days: Annotated[int, typer.Option(help="How far ahead to look.", min=1, max=365)] = 14,
    lead: Annotated[str | None, typer.Option(help="Only this lead (email).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many leads.", min=1)] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Forecast who gets which step when, without sending anything."""
    settings = STATE.settings()
    store = STATE.store()
    policy = Policy.from_settings(settings)
    now = utcnow()
    until = now + timedelta(days=days)
    leads: list[LeadRecord] = (
        [store.get_lead(lead)] if lead else list(store.list_leads(active_only=True, limit=limit))
    )
    states = store.lead_states(leads)
    entries: list[dict[str, Any]] = []
    ends: dict[str, str] = {}
    for rec in leads:
        fc = forecast(states[rec.id], policy, now=now, until=until)
        ends[rec.email] = fc.end
        for p in fc.touches:
            entries.append(
                {
                    "at": p.at,
                    "email": rec.email,
                    "name": rec.name,
                    "tier": p.tier,
                    "step": p.step.id,
                    "channel": p.step.channel.value,
                    "template": p.step.template,
                    "touch_number": p.touch_number,
                    "promotes": p.promotes,
                    "flags": p.flags,
                    "local_time": fmt_time(p.at, rec.timezone or settings.timezone),
                }
            )
    entries.sort(key=lambda e: (e["at"], e["email"]))
    if as_json:
        emit_json({"from": now, "until": until, "touches": entries, "leads": ends})
        return
    if not entries:
        out(f"nothing planned in the next {days} days")
    else:
        out(f"{'when (UTC)':<17} {'lead local time':<22} {'lead':<32} {'step':<18} {'channel':<7} touch")
    for e in entries:
        marks = (" → warm" if e["promotes"] else "") + (" → FLAG for sales" if e["flags"] else "")
        out(
            f"{e['at'].strftime('%Y-%m-%d %H:%M'):<17} {e['local_time']:<22} {e['email']:<32} "
            f"{e['tier'] + '/' + e['step']:<18} {e['channel']:<7} #{e['touch_number']}{marks}"
        )
    if lead:
        out(f"\n{lead}: {ends[store.get_lead(lead).email] or 'more steps after ' + str(days) + ' days'}")
    else:
        out(f"\n{len(entries)} touches planned for {len(leads)} active leads in the next {days} days")


# -- doctor -------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""
    warn: bool = False


def _doctor_checks() -> list[Check]:
    import asyncio
    import tempfile

    from campaignd.config import Channel
    from campaignd.daemon import prepare
    from campaignd.unsubscribe import KEY_FILE

    checks: list[Check] = []
    path = find_config(STATE.config)
    try:
        settings = STATE.settings()
    except ConfigError as exc:
        checks.append(Check("config", False, str(exc), "fix the keys above, then 'campaignd config check'"))
        return checks
    checks.append(Check("config", True, f"{path or 'built-in defaults'} is valid"))

    email_steps = any(s.channel == Channel.EMAIL for seq in settings.sequences.values() for s in seq.steps)
    if not settings.sequences:
        checks.append(Check("sequences", False, "no sequence is configured: nothing will be sent",
                            "add [sequences.cold] and [sequences.warm] (see config/campaignd.toml)"))
    if email_steps and not settings.sender.postal_address:
        checks.append(Check("postal address", False, "sender.postal_address is empty",
                            "marketing email must carry the business's postal address; set it in [sender]"))
    else:
        checks.append(Check("postal address", True, settings.sender.postal_address or "(no email steps)"))

    try:
        prepare(settings, create_key=False)
        checks.append(Check("templates", True, f"every referenced template renders ({settings.templates})"))
    except CampaigndError as exc:
        checks.append(Check("templates", False, str(exc), "fix them, then 'campaignd templates check'"))

    state = settings.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state, prefix=".doctor-"):
            pass
        checks.append(Check("state directory", True, f"{state} is writable"))
    except OSError as exc:
        checks.append(Check("state directory", False, f"{state}: {exc.strerror or exc}",
                            "create it and give the service user write access (StateDirectory= under systemd)"))

    try:
        engine = database.create_engine(settings.database_url)
        current, head = database.current_revision(engine), database.head_revision()
        engine.dispose()
        if current == head:
            checks.append(Check("database", True, f"reachable, at revision {head}"))
        else:
            checks.append(Check("database", False, f"at revision {current or 'none (empty)'}, needs {head}",
                                "run 'campaignd db upgrade'"))
    except CampaigndError as exc:
        checks.append(Check("database", False, str(exc), "check database.url and that the server is up"))

    if settings.smtp.host:
        from campaignd.mailer import check_relay

        where = f"{settings.smtp.host}:{settings.smtp.port} ({settings.smtp.tls.value})"
        try:
            banner = asyncio.run(check_relay(settings.smtp))
            login = f", logged in as {settings.smtp.username}" if settings.smtp.username else ""
            checks.append(Check("smtp relay", True, f"{where} answers{login}: {banner[:80]}"))
        except CampaigndError as exc:
            checks.append(Check("smtp relay", False, f"{where}: {exc}",
                                "check [smtp] host/port/tls/username and CAMPAIGND_SMTP__PASSWORD"))
    else:
        checks.append(Check("smtp relay", True, f"none configured: email goes to the outbox {settings.outbox_dir}",
                            "set [smtp] host to send for real", warn=True))

    keyed = bool(settings.unsubscribe.secret_key.get_secret_value())
    key_file = settings.state_dir / KEY_FILE
    if keyed:
        checks.append(Check("unsubscribe key", True, "set in the environment"))
    else:
        checks.append(Check("unsubscribe key", True,
                            f"generated in {key_file}" if key_file.exists() else f"will be generated in {key_file}",
                            "back this file up, or set CAMPAIGND_UNSUBSCRIBE__SECRET_KEY", warn=True))
    base = settings.unsubscribe.base_url
    if base.startswith("https://"):
        checks.append(Check("unsubscribe links", True, f"{base}/u/…"))
    else:
        checks.append(Check("unsubscribe links", True, f"{base} is not https",
                            "set unsubscribe.base_url to the public https URL of your reverse proxy", warn=True))
    return checks


@app.command()
def doctor() -> None:
    """Check what a broken install usually gets wrong, one line each with a hint."""
    checks = _doctor_checks()
    for c in checks:
        mark = "FAIL" if not c.ok else ("WARN" if c.warn else " OK ")
        first, *rest = c.detail.splitlines() or [""]
        out(f"[{mark}] {c.name:<18} {first}")
        for line in rest:
            out(f"       {'':<18} {line}")
        if c.hint and (not c.ok or c.warn):
            out(f"       {'':<18} → {c.hint}")
    failed = [c for c in checks if not c.ok]
    out(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed")
    if failed:
        raise typer.Exit(1)


# -- config, db, templates ----------------------------------------------------------------------


@config_app.command("check")
def config_check() -> None:
    """Validate the configuration and the templates it references."""
    from campaignd.daemon import prepare

    path = find_config(STATE.config)
    settings = STATE.settings()
    prepare(settings, create_key=False)
    steps = sum(len(s.steps) for s in settings.sequences.values())
    out(
        f"{path or 'defaults'}: configuration valid ({len(settings.sequences)} sequences, {steps} steps, "
        f"templates in {settings.templates})"
    )


@config_app.command("show")
def config_show(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print the effective configuration, secrets redacted."""
    data = STATE.settings().redacted()
    if as_json:
        emit_json(data)
        return
    _print_toml(data)


def _print_toml(data: dict[str, Any], prefix: str = "") -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if prefix and scalars:
        out(f"[{prefix}]")
    for k, v in scalars.items():
        out(f"{k} = {json.dumps(v, ensure_ascii=False)}")
    if scalars:
        out()
    for k, v in tables.items():
        _print_toml(v, f"{prefix}.{k}" if prefix else k)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the database or bring it to the latest schema revision."""
    settings = STATE.settings()
    engine = database.create_engine(settings.database_url)
    before, after = database.upgrade(engine)
    if before == after:
        out(f"database already at revision {after}")
    else:
        out(f"database upgraded from {before or 'empty'} to revision {after}")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database and the one this version needs."""
    settings = STATE.settings()
    engine = database.create_engine(settings.database_url)
    current, head = database.current_revision(engine), database.head_revision()
    out(f"database revision: {current or 'empty'}; this version needs: {head}")
    if current != head:
        raise typer.Exit(1)


@templates_app.command("check")
def templates_check(
    all_leads: Annotated[
        bool, typer.Option("--all-leads", help="Also render for every active lead.")
    ] = False,
) -> None:
    """Render every template the sequences use and report each problem with file and line."""
    from campaignd.render import Renderer, lead_context
    from campaignd.unsubscribe import Signer, load_keys

    settings = STATE.settings()
    signer = Signer(
        keys=load_keys(settings, create=False),
        base_url=settings.unsubscribe.base_url,
        mailto=settings.unsubscribe.mailto,
    )
    renderer = Renderer(settings=settings)
    leads: Iterator[dict[str, Any]] = iter(())
    if all_leads:
        leads = (lead_context(rec) for rec in STATE.store().list_leads(active_only=True))
    problems = renderer.check(leads=leads, sample_links=signer.links(0, "jane.sample@example.com"))
    if problems:
        raise TemplateError(problems)
    steps = sum(len(s.steps) for s in settings.sequences.values())
    out(f"templates OK: {steps} steps in {settings.templates}")


# -- leads -------------------------------------------------------------------------------------------


@leads_app.command("import")
def leads_import(
    file: Annotated[Path, typer.Argument(help="CSV file with a header row.", exists=True, dir_okay=False)],
    tier: Annotated[Tier, typer.Option(help="Tier for new leads without a tier column.")] = Tier.COLD,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and count, write nothing.")] = False,
) -> None:
    """Import leads from a CSV file: new leads are added, known ones updated, nothing reset."""
    from campaignd.importer import import_leads

    store = STATE.store()
    progress = _progress_bar(file)
    try:
        report = import_leads(
            store,
            file,
            default_tier=tier.value,
            now=utcnow(),
            dry_run=dry_run,
            progress=progress.update if progress else None,
        )
    finally:
        if progress:
            progress.close()
    for line, reason in report.rejected:
        typer.echo(f"{file}: line {line}: {reason}", err=True)
    if report.rejected_count > len(report.rejected):
        typer.echo(f"... and {report.rejected_count - len(report.rejected)} more rejected rows", err=True)
    if report.ignored_columns:
        out(f"ignored columns: {', '.join(report.ignored_columns)}")
    if report.duplicates:
        out(f"{report.duplicates} duplicate rows merged (the last one wins)")
    out(("dry run, nothing written: " if dry_run else "") + report.summary())


class _Progress:
    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        self.bar = Progress(
            "importing", BarColumn(), DownloadColumn(), TimeRemainingColumn(), transient=True, console=None
        )
        self.task = self.bar.add_task("import", total=total)
        self.bar.start()

    def update(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        self.bar.stop()


def _progress_bar(file: Path) -> _Progress | None:
    if not sys.stderr.isatty() or os.environ.get("CI"):
        return None
    return _Progress(file.stat().st_size)


def _lead_json(lead: LeadRecord) -> dict[str, Any]:
    return lead.as_dict()


@leads_app.command("list")
def leads_list(
    tier: Annotated[Tier | None, typer.Option(help="Only this tier.")] = None,
    status_: Annotated[LeadStatus | None, typer.Option("--status", help="Only this status.")] = None,
    flagged: Annotated[bool, typer.Option("--flagged", help="Only leads flagged for sales.")] = False,
    limit: Annotated[int | None, typer.Option(help="At most this many.", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List leads."""
    store = STATE.store()
    wanted = LeadStatus.FLAGGED if flagged else status_
    leads = store.list_leads(
        tier=tier.value if tier else None, status=wanted.value if wanted else None, limit=limit
    )
    if as_json:
        emit_json([_lead_json(lead) for lead in leads])
        return
    count = 0
    for lead in leads:
        if count == 0:
            out(f"{'email':<36} {'name':<24} {'company':<20} {'tier':<5} {'status':<12} touches  next")
        count += 1
        nxt = f"{lead.next_step} {fmt_time(lead.next_due_at)}" if lead.next_step else "-"
        out(
            f"{lead.email:<36} {lead.name[:24]:<24} {lead.company[:20]:<20} {lead.tier:<5} "
            f"{lead.status:<12} {lead.touch_count:>7}  {nxt}"
        )
    out(f"{count} leads")


@leads_app.command("show")
def leads_show(
    email: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A lead's fields and its full touch history."""
    store = STATE.store()
    lead = store.get_lead(email)
    touches = store.touches_for(lead.id)
    if as_json:
        emit_json(
            {
                **_lead_json(lead),
                "suppressed": store.is_suppressed(lead.email),
                "touches": [t.as_dict() for t in touches],
            }
        )
        return
    address = ", ".join(
        x
        for x in (
            lead.address_line1,
            lead.address_line2,
            lead.city,
            lead.region,
            lead.postal_code,
            lead.country,
        )
        if x
    )
    rows = [
        ("email", lead.email),
        ("name", lead.name),
        ("company", lead.company),
        ("phone", lead.phone),
        ("address", address),
        ("time zone", lead.timezone or "(default)"),
        ("tier", lead.tier),
        ("status", lead.status + (" (suppressed)" if store.is_suppressed(lead.email) else "")),
        ("touches", str(lead.touch_count)),
        ("in tier since", fmt_time(lead.tier_since)),
        ("last touch", fmt_time(lead.last_touch_at)),
        ("next step", f"{lead.next_step} at {fmt_time(lead.next_due_at)}" if lead.next_step else "-"),
    ]
    if lead.flagged_at:
        rows.append(("flagged", f"{fmt_time(lead.flagged_at)}: {lead.flag_reason}"))
    for k, v in lead.custom.items():
        rows.append((f"custom.{k}", str(v)))
    for k, v in rows:
        out(f"{k:<14} {v}")
    out("\nhistory:")
    if not touches:
        out("  no touches yet")
    for t in touches:
        out("  " + _touch_line(t))


def _touch_line(t: TouchRecord) -> str:
    when = fmt_time(t.sent_at or t.created_at)
    what = f"{t.tier}/{t.step}" if t.step else f"{t.channel} (by hand)"
    extra = t.note or t.error or ""
    return f"#{t.id:<6} {when:<22} {t.channel:<7} {what:<24} {t.status:<9} {extra[:80]}"


def _change(
    email: str, target: LeadStatus, *, expect: list[LeadStatus] | None = None, reason: str | None = None
) -> LeadRecord:
    return STATE.store().set_status(email, target, now=utcnow(), reason=reason, expect=expect)


@leads_app.command("set-tier")
def leads_set_tier(email: str, tier: Tier) -> None:
    """Move a lead to another tier; that tier's sequence starts for it now."""
    lead = STATE.store().set_tier(email, tier.value, now=utcnow())
    out(f"{lead.email} is now {lead.tier}")


@leads_app.command("unsubscribe")
def leads_unsubscribe(email: str) -> None:
    """Unsubscribe a lead: suppressed for good, pending steps cancelled."""
    store = STATE.store()
    lead = store.get_lead(email)
    store.suppress(
        lead.email, reason=SuppressionReason.UNSUBSCRIBED, detail="from the command line", now=utcnow()
    )
    out(f"{lead.email} unsubscribed; it will not be contacted again")


@leads_app.command("pause")
def leads_pause(email: str) -> None:
    """Stop sending to a lead for now (resume later)."""
    lead = _change(email, LeadStatus.PAUSED, expect=[LeadStatus.ACTIVE])
    out(f"{lead.email} paused")


@leads_app.command("resume")
def leads_resume(email: str) -> None:
    """Resume a paused lead's sequence."""
    lead = _change(email, LeadStatus.ACTIVE, expect=[LeadStatus.PAUSED])
    out(f"{lead.email} resumed")


@leads_app.command("flag")
def leads_flag(
    email: str, reason: Annotated[str, typer.Option(help="Why sales should call.")] = "flagged by hand"
) -> None:
    """Flag a lead for personal sales follow-up; its automated drip stops."""
    lead = _change(email, LeadStatus.FLAGGED, expect=[LeadStatus.ACTIVE, LeadStatus.PAUSED], reason=reason)
    out(f"{lead.email} flagged for sales follow-up")


@leads_app.command("unflag")
def leads_unflag(email: str) -> None:
    """Return a flagged lead to its automated sequence."""
    lead = _change(email, LeadStatus.ACTIVE, expect=[LeadStatus.FLAGGED])
    out(f"{lead.email} unflagged; its sequence continues")


# -- touches -------------------------------------------------------------------------------------------


class ManualChannel(StrEnum):
    CALL = "call"
    MEETING = "meeting"
    LETTER = "letter"
    EMAIL = "email"


@touches_app.command("log")
def touches_log(
    email: str,
    channel: Annotated[ManualChannel, typer.Option(help="How the lead was contacted.")],
    note: Annotated[str, typer.Option(help="What happened.")] = "",
) -> None:
    """Record a touch made by hand; it counts toward the follow-up threshold."""
    settings = STATE.settings()
    lead, after = STATE.store().log_manual_touch(
        email, channel=channel.value, note=note, at=utcnow(), policy=Policy.from_settings(settings)
    )
    threshold = settings.followup.threshold
    out(f"logged {channel.value} with {lead.email}: touch {after.touch_count} of {threshold}")
    if after.promoted:
        out(f"{lead.email} promoted from cold to warm")
    if after.flagged:
        out(f"{lead.email} flagged for sales follow-up")


@touches_app.command("retry")
def touches_retry(
    ids: Annotated[list[int], typer.Argument(help="Touch ids from 'campaignd status'.")],
) -> None:
    """Re-queue touches that are unknown or failed, after you have checked them."""
    done = STATE.store().retry_touches(ids, now=utcnow())
    got = {t.id for t in done}
    for t in done:
        out(f"touch {t.id} ({t.tier}/{t.step}) re-queued")
    missing = [i for i in ids if i not in got]
    if missing:
        raise CampaigndError(
            f"not re-queued (no such touch, or it is not unknown/failed): {', '.join(map(str, missing))}"
        )


# -- suppression -----------------------------------------------------------------------------------


@suppression_app.command("list")
def suppression_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every suppressed address, with why and since when."""
    rows = STATE.store().suppressions()
    if as_json:
        emit_json(
            [{"email": r.email, "reason": r.reason, "detail": r.detail, "since": r.created_at} for r in rows]
        )
        return
    for r in rows:
        out(f"{r.email:<40} {r.reason:<13} {fmt_time(r.created_at):<22} {r.detail}")
    out(f"{len(rows)} suppressed addresses")


@suppression_app.command("add")
def suppression_add(
    email: str, detail: Annotated[str, typer.Option("--reason", help="Why.")] = "added by hand"
) -> None:
    """Block an address for good (whether or not it is a lead yet)."""
    added = STATE.store().suppress(email, reason=SuppressionReason.MANUAL, detail=detail, now=utcnow())
    out(f"{email.strip().lower()} {'suppressed' if added else 'was already suppressed'}")


@suppression_app.command("remove")
def suppression_remove(
    email: str,
    reason: Annotated[
        str,
        typer.Option(
            "--reason",
            prompt="Why may this address be contacted again?",
            help="Why the address may be contacted again (logged).",
        ),
    ],
) -> None:
    """Take an address off the suppression list (the lead stays stopped until resumed)."""
    if not reason.strip():
        raise CampaigndError("a reason is required to remove a suppression")
    removed = STATE.store().unsuppress(email)
    if removed is None:
        raise CampaigndError(f"{email} is not suppressed")
    logger.warning("suppression of %s (%s) removed: %s", removed.email, removed.reason, reason)
    out(f"{removed.email} removed from the suppression list")


# -- entry point -----------------------------------------------------------------------------------


def main() -> None:
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


__all__ = ["Problem", "app", "main"]
