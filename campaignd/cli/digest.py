"""The flagged-lead digest by hand: review, export and send it."""

from __future__ import annotations

import asyncio
import shutil
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from campaignd.cli.app import STATE, app, emit_json, fmt_time, out
from campaignd.clock import utcnow
from campaignd.config import DigestSettings
from campaignd.digest import (
    BEGINNING,
    Digest,
    DigestTemplates,
    attachment_for,
    format_csv,
    format_json,
    format_table,
    parse_since,
)
from campaignd.digest_job import LEASE, DigestSender, describe_run, zone_of
from campaignd.exceptions import CampaigndError
from campaignd.store.digest import Delivery, DigestRunRecord, RunKind, RunStatus

DEFAULT_SINCE = "24h"


class Format(StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"
    HTML = "html"
    TEXT = "text"


@app.command("digest")
def digest_command(
    since: Annotated[
        str | None,
        typer.Option(
            metavar="24h|7d|DATE",
            help="Leads flagged since then: a duration, a date (2026-01-05) or a date and time "
            "(2026-01-05 08:00) in the digest's time zone. Default: since the last scheduled "
            "digest, or the last 24 hours.",
        ),
    ] = None,
    format_: Annotated[
        Format,
        typer.Option(
            "--format",
            "-f",
            help="table for the terminal, csv for a spreadsheet, json for scripts, html and text "
            "as the email shows it.",
            case_sensitive=False,
        ),
    ] = Format.TABLE,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write to this file instead of the terminal.", dir_okay=False),
    ] = None,
    send: Annotated[
        bool,
        typer.Option(
            "--send", help="Email it now to the digest's recipients (recorded; the schedule is unchanged)."
        ),
    ] = False,
    to: Annotated[
        list[str] | None,
        typer.Option("--to", metavar="ADDRESS", help="With --send: to this address instead (repeatable)."),
    ] = None,
    runs: Annotated[
        bool, typer.Option("--runs", help="List the latest digests sent, and whether each arrived.")
    ] = False,
) -> None:
    """The leads flagged for sales follow-up, with contact details and touch history.

    Newest flag first, then the period's totals. Converted leads are not listed.
    """
    if to and not send:
        raise typer.BadParameter("--to is for --send: who gets the digest sent now", param_hint="--to")
    settings = STATE.settings()
    store = STATE.store()
    zone = zone_of(settings)
    if runs:
        _print_runs(store.digest_runs(limit=20), zone, as_json=format_ == Format.JSON)
        return
    now = utcnow()
    if since is None:
        start = store.scheduled_period_start(before=now)
        if start <= BEGINNING:
            start = parse_since(DEFAULT_SINCE, now=now, zone=zone)
    else:
        try:
            start = parse_since(since, now=now, zone=zone)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--since") from None
    if send:
        _send(start, now, to or [])
        return
    digest = store.read_digest(start=start, end=now)
    text = _render(digest, format_, zone, to_file=output is not None)
    if output is None:
        typer.echo(text, nl=False)
        return
    # Spreadsheets read a CSV file as UTF-8 only when it starts with a byte-order mark.
    bom = "\ufeff" if format_ == Format.CSV else ""
    output.write_text(bom + text, encoding="utf-8", newline="")
    out(f"{len(digest.leads)} flagged leads written to {output}")


def _render(digest: Digest, format_: Format, zone: str, *, to_file: bool) -> str:
    settings = STATE.settings()
    if format_ == Format.TABLE:
        width = 100 if to_file else shutil.get_terminal_size((100, 24)).columns
        return format_table(digest, zone=zone, width=width)
    if format_ == Format.CSV:
        return format_csv(digest, zone=zone)
    if format_ == Format.JSON:
        return format_json(digest, zone=zone)
    attachment = attachment_for(digest, zone)
    rendered = DigestTemplates(root=settings.templates).render(
        digest,
        zone=zone,
        sender=settings.sender,
        email_leads=settings.digest.email_leads,
        attachment=attachment.filename if attachment else "",
    )
    if format_ == Format.HTML:
        return rendered.html
    return f"Subject: {rendered.subject}\n\n{rendered.text}"


def _send(start: datetime, end: datetime, to: list[str]) -> None:
    from campaignd.daemon import build_channels

    settings = STATE.settings()
    store = STATE.store()
    zone = zone_of(settings)
    if to:
        try:
            recipients = DigestSettings(recipients=tuple(to)).recipients
        except ValidationError as exc:
            reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            raise typer.BadParameter(reason, param_hint="--to") from None
    else:
        recipients = settings.digest.recipients
    if not recipients:
        raise CampaigndError(
            "the digest has no recipients: set [digest] recipients in the config, or give --to ADDRESS"
        )
    run = store.begin_manual_run(start=start, end=end, now=utcnow(), recipients=recipients, lease=LEASE)
    channel = build_channels(settings)["email"]
    sender = DigestSender(store=store, settings=settings, channel=channel, clock=utcnow)
    attempt = asyncio.run(sender.attempt(run, send_empty=True, max_attempts=1))
    done = attempt.run
    sent = [a for a, d in done.deliveries.items() if d == Delivery.SENT]
    count = len(attempt.digest.leads)
    if done.status != RunStatus.SENT:
        raise CampaigndError(
            f"{describe_run(done, zone)} with {count} leads was not delivered to everyone "
            f"({done.status}): {done.error or 'no answer'}"
            + (f"; it did reach {', '.join(sent)}" if sent else "")
        )
    where = (
        f" (no relay is configured: written to {settings.outbox_dir}/new)" if not settings.smtp.host else ""
    )
    leads = f"{count} {'lead' if count == 1 else 'leads'}"
    out(f"digest with {leads} sent to {', '.join(sent)}{where} (run {done.id})")


def _print_runs(runs: list[DigestRunRecord], zone: str, *, as_json: bool) -> None:
    if as_json:
        emit_json(
            [
                {
                    "id": r.id,
                    "kind": r.kind,
                    "scheduled_for": r.scheduled_for,
                    "period_start": None if r.period_start <= BEGINNING else r.period_start,
                    "period_end": r.period_end,
                    "status": r.status,
                    "leads": r.leads,
                    "deliveries": dict(r.deliveries),
                    "attempts": r.attempts,
                    "next_attempt_at": r.next_attempt_at,
                    "error": r.error,
                    "created_at": r.created_at,
                    "finished_at": r.finished_at,
                }
                for r in runs
            ]
        )
        return
    if not runs:
        out("no digest has been sent yet")
        return
    out(f"{'run':>5}  {'for':<22} {'kind':<9} {'status':<8} {'leads':>5}  recipients")
    for r in runs:
        when = fmt_time(r.scheduled_for if r.kind == RunKind.SCHEDULED else r.created_at, zone)
        who = ", ".join(f"{a} ({d})" for a, d in r.deliveries.items()) or "-"
        out(f"{r.id:>5}  {when:<22} {r.kind:<9} {r.status:<8} {r.leads:>5}  {who}")
        if r.status in (RunStatus.RETRY, RunStatus.FAILED, RunStatus.PARTIAL, RunStatus.UNKNOWN) and r.error:
            for line in r.error.splitlines()[-3:]:
                out(f"{'':>7}{line}")
        if r.status == RunStatus.RETRY and r.next_attempt_at:
            out(f"{'':>7}next attempt {fmt_time(r.next_attempt_at, zone)}")
