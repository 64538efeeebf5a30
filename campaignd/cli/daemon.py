"""Commands that run or inspect the daemon: run, demo, status, plan, doctor."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from campaignd import database
from campaignd.cli.app import STATE, app, emit_json, fmt_time, out, parse_duration_option
from campaignd.clock import utcnow
from campaignd.config import Settings, Tier, find_config, format_duration
from campaignd.exceptions import CampaigndError, ConfigError
from campaignd.models import LeadStatus
from campaignd.planning import Plan, PlannedFor, summarise
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
    for line, reason in report.rejected:
        out(f"{leads}: line {line}: rejected: {reason}")
    out(report.summary())
    _print_sequences(settings)
    out(f"\nrunning the daemon for {for_} (Ctrl-C stops it early)...\n")
    Daemon(settings=settings, reload=STATE.reload, duration=parse_duration_option(for_)).run()
    out("")
    _print_status(_status(store, settings), settings)
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
    """Leads by tier and status, what is due, recent sends, direct mail, the last digest,
    and every touch that needs a person: unknown and failed sends."""
    settings = STATE.settings()
    store = STATE.store()
    data = _status(store, settings)
    if as_json:
        emit_json(data)
        return
    _print_status(data, settings)


def _status(store: Store, settings: Settings) -> dict[str, Any]:
    from campaignd.digest_job import describe_run, zone_of

    now = utcnow()
    r = store.status_report(now=now)
    runs = store.digest_runs(limit=50, kind="scheduled")
    last_digest = runs[0] if runs else None
    last_sent = next((run for run in runs if run.status == "sent"), None)
    mail = {status: n for (channel, status), n in r.touches_by_channel.items() if channel == "mail"}
    return {
        "at": now,
        "leads": [{"tier": t, "status": s, "count": n} for (t, s), n in sorted(r.by_tier_status.items())],
        "due_now": r.due_now,
        "next_due_at": r.next_due_at,
        "sent_last_24h": r.sent_last_day,
        "touches_by_status": r.touches_by_status,
        "direct_mail": {
            "waiting_for_batch": mail.get("pending", 0),
            "exported_not_confirmed": mail.get("queued", 0),
            "mailed": mail.get("sent", 0),
            "skipped": mail.get("skipped", 0),
        },
        "suppressed": r.suppressed,
        "last_digest": None
        if last_digest is None
        else {
            "what": describe_run(last_digest, zone_of(settings)),
            "scheduled_for": last_digest.scheduled_for,
            "status": last_digest.status,
            "leads": last_digest.leads,
            "last_sent": None
            if last_sent is None or last_sent is last_digest
            else {"what": describe_run(last_sent, zone_of(settings)), "leads": last_sent.leads},
        },
        "unknown": [
            {"touch": t.id, "lead": e, "tier": t.tier, "step": t.step, "error": t.error} for t, e in r.unknown
        ],
        "failed": [
            {"touch": t.id, "lead": e, "tier": t.tier, "step": t.step, "error": t.error} for t, e in r.failed
        ],
        "flagged_last_24h": [
            {
                "email": lead.email,
                "name": lead.name,
                "touches": lead.touch_count,
                "flagged_at": lead.flagged_at,
                "reason": lead.flag_reason,
            }
            for lead in r.flagged_recent
        ],
    }


def _print_status(data: dict[str, Any], settings: Settings) -> None:
    statuses = [s.value for s in LeadStatus]
    counts = {(row["tier"], row["status"]): row["count"] for row in data["leads"]}
    out("leads".ljust(8) + "".join(s.rjust(13) for s in statuses) + "total".rjust(9))
    for tier in [t.value for t in Tier]:
        row = [counts.get((tier, s), 0) for s in statuses]
        out(tier.ljust(8) + "".join(str(n).rjust(13) for n in row) + str(sum(row)).rjust(9))
    out("")
    out(f"due now:          {data['due_now']}")
    out(f"next due:         {fmt_time(data['next_due_at'], settings.timezone)}")
    out(f"sent (24h):       {data['sent_last_24h']}")
    tb = data["touches_by_status"]
    out(f"touches:          {', '.join(f'{k} {v}' for k, v in sorted(tb.items())) or 'none yet'}")
    mail = data["direct_mail"]
    if any(mail.values()):
        out(
            f"direct mail:      {mail['waiting_for_batch']} waiting for a print batch, "
            f"{mail['exported_not_confirmed']} exported and not yet confirmed mailed, "
            f"{mail['mailed']} mailed, {mail['skipped']} skipped (no complete address)"
        )
    out(f"suppressed:       {data['suppressed']}")
    digest = data["last_digest"]
    if digest is not None:
        leads = f"{digest['leads']} lead" + ("" if digest["leads"] == 1 else "s")
        sent = digest["last_sent"]
        before = f" (the last one sent: {sent['what']}, {sent['leads']} leads)" if sent else ""
        out(f"last digest:      {digest['what']}: {digest['status']}, {leads}{before}")
    elif settings.digest.recipients:
        out("last digest:      none yet")
    flagged = data["flagged_last_24h"]
    if flagged:
        out(f"\nflagged for sales follow-up (24h): {len(flagged)}")
        shown = flagged[:20]
        email_width = max(len(lead["email"]) for lead in shown)
        name_width = max(len(lead["name"]) for lead in shown)
        for lead in shown:
            out(
                f"  {lead['email']:<{email_width}}  {lead['name']:<{name_width}}  {lead['touches']} touches  "
                f"{fmt_time(lead['flagged_at'], settings.timezone)}"
            )
    for title, rows in (
        (
            "UNKNOWN outcome (check the relay's log, then 'campaignd touches settle ID --as sent' "
            "or 'touches retry ID')",
            data["unknown"],
        ),
        (
            "FAILED (check, then 'campaignd touches retry ID' or 'touches settle ID --as skipped')",
            data["failed"],
        ),
    ):
        if rows:
            out(f"\n{title}: {len(rows)}")
            for row in rows[:50]:
                out(
                    f"  touch {row['touch']:<7} {row['lead']:<36} {row['tier']}/{row['step']}  "
                    f"{(row['error'] or '')[:80]}"
                )


@app.command()
def plan(
    days: Annotated[int, typer.Option(help="How far ahead to look.", min=1, max=365)] = 14,
    lead: Annotated[str | None, typer.Option(help="Only this lead (email): its whole timeline.")] = None,
    tier: Annotated[Tier | None, typer.Option(help="Only leads in this tier.")] = None,
    detail: Annotated[
        bool, typer.Option("--detail", help="List every planned touch, not only the next ones.")
    ] = False,
    limit: Annotated[int, typer.Option(help="At most this many touches listed.", min=1)] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Forecast who gets which step when, without sending anything.

    The same decision core as the daemon works through every active lead, as if every
    send succeeded at its due time: what goes out each day (in the business's time
    zone), who gets promoted to warm, who will be handed to sales.
    """
    settings = STATE.settings()
    store = STATE.store()
    policy = Policy.from_settings(settings)
    now = utcnow()
    until = now + timedelta(days=days)
    planned: list[PlannedFor] = []
    ends: Counter[str] = Counter()
    looked_at = 0
    if lead:
        chunks: Iterator[list[LeadRecord]] = iter([[store.get_lead(lead)]])
    else:
        chunks = _chunks(store.list_leads(active_only=True, tier=tier.value if tier else None), 500)
    for chunk in chunks:
        states = store.lead_states(chunk)
        for rec in chunk:
            looked_at += 1
            fc = forecast(states[rec.id], policy, now=now, until=until)
            ends[fc.end or "more after the period"] += 1
            zone = rec.timezone or settings.timezone
            planned.extend(PlannedFor(rec.email, rec.name, zone, p) for p in fc.touches)
    result = summarise(planned, leads=looked_at, ends=ends, zone=settings.timezone)
    if as_json:
        emit_json(
            {
                "from": now,
                "until": until,
                "timezone": settings.timezone,
                "leads": result.leads,
                "touches_planned": result.total,
                "days": [
                    {
                        "date": d.day.isoformat(),
                        "touches": d.total,
                        "steps": [
                            {"tier": t, "step": s, "channel": c, "count": n}
                            for (t, s, c), n in sorted(d.steps.items())
                        ],
                        "promotions": d.promotions,
                        "flags": d.flags,
                    }
                    for d in result.days
                ],
                "ends": dict(result.ends),
                "touches": [_planned_json(p) for p in result.touches[:limit]],
            }
        )
        return
    if lead:
        _print_timeline(result, lead, days)
        return
    _print_plan(result, days=days, zone=settings.timezone, detail=detail, limit=limit)


def _chunks(items: Iterable[LeadRecord], size: int) -> Iterator[list[LeadRecord]]:
    chunk: list[LeadRecord] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _planned_json(p: PlannedFor) -> dict[str, Any]:
    return {
        "at": p.touch.at,
        "local_time": fmt_time(p.touch.at, p.zone),
        "email": p.email,
        "name": p.name,
        "tier": p.touch.tier,
        "step": p.touch.step.id,
        "channel": p.touch.step.channel.value,
        "template": p.touch.step.template,
        "touch_number": p.touch.touch_number,
        "promotes": p.touch.promotes,
        "flags": p.touch.flags,
    }


def _marks(p: PlannedFor) -> str:
    return (" → warm" if p.touch.promotes else "") + (" → FLAG for sales" if p.touch.flags else "")


def _print_timeline(result: Plan, email: str, days: int) -> None:
    if not result.touches:
        out(f"{email}: nothing planned in the next {days} days")
    for p in result.touches:
        out(
            f"{p.touch.at.strftime('%Y-%m-%d %H:%M')} UTC  {fmt_time(p.touch.at, p.zone):<24} "
            f"{p.touch.tier + '/' + p.touch.step.id:<24} {p.touch.step.channel.value:<6} "
            f"touch #{p.touch.touch_number}{_marks(p)}"
        )
    [(end, _)] = result.ends.most_common(1)
    out(f"\nthen: {end}")


def _print_plan(result: Plan, *, days: int, zone: str, detail: bool, limit: int) -> None:
    if not result.touches:
        out(f"nothing planned in the next {days} days for {result.leads} active leads")
        return
    out(f"the next {days} days ({zone}): {result.total} touches for {result.leads} active leads\n")
    for d in result.days:
        extra = ", ".join(
            x
            for x in (
                f"{d.promotions} promoted to warm" if d.promotions else "",
                f"{d.flags} handed to sales" if d.flags else "",
            )
            if x
        )
        out(f"  {d.day.strftime('%a %d %b'):<12}{d.total:>7} touches" + (f"  ({extra})" if extra else ""))
        for (t, s, c), n in sorted(d.steps.items()):
            out(f"  {'':<12}{n:>7} × {t}/{s}" + (" (direct mail)" if c == "mail" else ""))
    promotions = sum(d.promotions for d in result.days)
    flags = sum(d.flags for d in result.days)
    out(f"\nin all: {result.total} touches, {promotions} promoted to warm, {flags} handed to sales")
    ends = [f"{n} × {end}" for end, n in result.ends.most_common() if end != "more after the period"]
    if ends:
        out("after that: " + "; ".join(ends))
    shown = (result.touches if detail else result.touches[:20])[:limit]
    width = max(len(p.email) for p in shown)
    out(f"\n{'when (UTC)':<17} {'lead local time':<24} {'lead':<{width}} {'step':<24} {'via':<6} touch")
    for p in shown:
        out(
            f"{p.touch.at.strftime('%Y-%m-%d %H:%M'):<17} {fmt_time(p.touch.at, p.zone):<24} "
            f"{p.email:<{width}} {p.touch.tier + '/' + p.touch.step.id:<24} {p.touch.step.channel.value:<6} "
            f"#{p.touch.touch_number}{_marks(p)}"
        )
    if len(shown) < result.total:
        out(f"... {result.total - len(shown)} more ('--detail' lists them, '--json' for scripts)")


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
    if not settings.unsubscribe.listen:
        checks.append(
            Check(
                "unsubscribe endpoint",
                True,
                "not served by this daemon (unsubscribe.listen is empty)",
                f'set [unsubscribe] listen = "127.0.0.1:8025" and forward {base}/u/ to it',
                warn=True,
            )
        )
    else:
        from campaignd.web import probe_listen

        ok, detail = probe_listen(settings.unsubscribe.listen)
        checks.append(
            Check("unsubscribe endpoint", ok, detail, "free the port or change [unsubscribe] listen")
        )
    if not settings.digest.recipients:
        checks.append(
            Check(
                "digest",
                True,
                "no recipients: the flagged-lead digest is not sent ('campaignd digest' shows it)",
                "set [digest] recipients to the sales team's addresses",
                warn=True,
            )
        )
    else:
        checks.append(
            Check("digest", True, f"to {', '.join(settings.digest.recipients)} at {settings.digest.schedule}")
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
