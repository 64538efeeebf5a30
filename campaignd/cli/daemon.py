"""Commands that run or inspect the daemon: run, demo, status, plan, doctor."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from campaignd import database
from campaignd.cli.app import STATE, app, emit_json, fmt_time, out, parse_duration_option
from campaignd.config import Settings, Tier, find_config, format_duration
from campaignd.engine import utcnow
from campaignd.exceptions import CampaigndError, ConfigError
from campaignd.models import LeadStatus
from campaignd.sequences import Policy, forecast
from campaignd.store import LeadRecord, Store

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

    duration = parse_duration_option(for_) if for_ else None
    settings = STATE.settings()
    code = Daemon(settings=settings, reload=STATE.reload, once=once, duration=duration).run()
    raise typer.Exit(code)


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
    Daemon(settings=settings, reload=STATE.reload, duration=parse_duration_option(for_)).run()
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
        checks.append(
            Check(
                "sequences",
                False,
                "no sequence is configured: nothing will be sent",
                "add [sequences.cold] and [sequences.warm] (see config/campaignd.toml)",
            )
        )
    if email_steps and not settings.sender.postal_address:
        checks.append(
            Check(
                "postal address",
                False,
                "sender.postal_address is empty",
                "marketing email must carry the business's postal address; set it in [sender]",
            )
        )
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
        checks.append(
            Check(
                "state directory",
                False,
                f"{state}: {exc.strerror or exc}",
                "create it and give the service user write access (StateDirectory= under systemd)",
            )
        )

    try:
        engine = database.create_engine(settings.database_url)
        current, head = database.current_revision(engine), database.head_revision()
        engine.dispose()
        if current == head:
            checks.append(Check("database", True, f"reachable, at revision {head}"))
        else:
            checks.append(
                Check(
                    "database",
                    False,
                    f"at revision {current or 'none (empty)'}, needs {head}",
                    "run 'campaignd db upgrade'",
                )
            )
    except CampaigndError as exc:
        checks.append(Check("database", False, str(exc), "check database.url and that the server is up"))

    if settings.smtp.host:
        from campaignd.mailer import SmtpChannel

        where = f"{settings.smtp.host}:{settings.smtp.port} ({settings.smtp.tls.value})"
        try:
            answer = asyncio.run(SmtpChannel(settings=settings.smtp).check())
            login = f", logged in as {settings.smtp.username}" if settings.smtp.username else ""
            checks.append(Check("smtp relay", True, f"{answer}{login}"))
        except Exception as exc:
            checks.append(
                Check(
                    "smtp relay",
                    False,
                    f"{where}: {exc}",
                    "check [smtp] host/port/tls/username and CAMPAIGND_SMTP__PASSWORD",
                )
            )
    else:
        checks.append(
            Check(
                "smtp relay",
                True,
                f"none configured: email goes to the outbox {settings.outbox_dir}",
                "set [smtp] host to send for real",
                warn=True,
            )
        )

    keyed = bool(settings.unsubscribe.secret_key.get_secret_value())
    key_file = settings.state_dir / KEY_FILE
    if keyed:
        checks.append(Check("unsubscribe key", True, "set in the environment"))
    else:
        checks.append(
            Check(
                "unsubscribe key",
                True,
                f"generated in {key_file}" if key_file.exists() else f"will be generated in {key_file}",
                "back this file up, or set CAMPAIGND_UNSUBSCRIBE__SECRET_KEY",
                warn=True,
            )
        )
    base = settings.unsubscribe.base_url
    if base.startswith("https://"):
        checks.append(Check("unsubscribe links", True, f"{base}/u/…"))
    else:
        checks.append(
            Check(
                "unsubscribe links",
                True,
                f"{base} is not https",
                "set unsubscribe.base_url to the public https URL of your reverse proxy",
                warn=True,
            )
        )
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
