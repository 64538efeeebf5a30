"""Commands that manage leads: leads, touches made by hand, the suppression list."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from campaignd.cli.app import STATE, app, emit_json, fmt_time, logger, out
from campaignd.clock import utcnow
from campaignd.config import Tier
from campaignd.exceptions import CampaigndError
from campaignd.models import LeadStatus, SuppressionReason
from campaignd.sequences import Policy
from campaignd.store import LeadRecord, TouchRecord

leads_app = typer.Typer(help="Import, list and manage leads.", no_args_is_help=True)
touches_app = typer.Typer(help="Touches made by hand, and re-queueing failed ones.", no_args_is_help=True)
suppression_app = typer.Typer(help="Addresses that must never be contacted.", no_args_is_help=True)
app.add_typer(leads_app, name="leads")
app.add_typer(touches_app, name="touches")
app.add_typer(suppression_app, name="suppression")


@leads_app.command("import")
def leads_import(
    file: Annotated[Path, typer.Argument(help="CSV file with a header row.", exists=True, dir_okay=False)],
    tier: Annotated[Tier, typer.Option(help="Tier for new leads without a tier column.")] = Tier.COLD,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and count, write nothing.")] = False,
    encoding: Annotated[
        str, typer.Option(help="The file's encoding, e.g. cp1252 for Excel on Windows.")
    ] = "utf-8",
    rejects: Annotated[
        Path | None,
        typer.Option(help="Write every rejected row here (CSV with line and reason), to fix and re-import."),
    ] = None,
) -> None:
    """Import leads from a CSV file: new leads are added, known ones updated, nothing reset.

    Every rejected row is reported with its line number and reason; every good row is
    imported.
    """
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
            encoding=encoding,
            progress=progress.update if progress else None,
            rejects=rejects,
        )
    finally:
        if progress:
            progress.close()
    for line, message in report.warnings:
        typer.echo(f"{file}: line {line}: note: {message}", err=True)
    if report.warning_count > len(report.warnings):
        typer.echo(f"... and {report.warning_count - len(report.warnings)} more notes", err=True)
    for line, reason in report.rejected:
        typer.echo(f"{file}: line {line}: rejected: {reason}", err=True)
    if report.rejected_count > len(report.rejected):
        more = report.rejected_count - len(report.rejected)
        hint = f" (all in {rejects})" if rejects else " (use --rejects FILE to get them all)"
        typer.echo(f"... and {more} more rejected rows{hint}", err=True)
    if report.ignored_columns:
        out(
            f"ignored columns: {', '.join(report.ignored_columns)} "
            "(name a column custom.NAME to keep it for templates)"
        )
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
def leads_unsubscribe(
    email: str,
    note: Annotated[str, typer.Option(help="How the request came (a reply, a call, the mailbox).")] = "",
) -> None:
    """Unsubscribe an address: suppressed for good, every pending step cancelled.

    Works for an address that is not a lead (yet): a later import will not add it.
    """
    from campaignd.importer import normalise_email

    try:
        address = normalise_email(email)
    except ValueError as exc:
        raise CampaigndError(f"{email!r} is not an email address: {exc}") from None
    store = STATE.store()
    added = store.suppress(
        address,
        reason=SuppressionReason.UNSUBSCRIBED,
        detail=note or "from the command line",
        now=utcnow(),
    )
    known = store.find_lead_by_email(address) is not None
    if not added:
        out(f"{address} was already on the suppression list; it will not be contacted")
    elif known:
        out(f"{address} unsubscribed: nothing more will be sent to it")
    else:
        out(f"{address} is not a lead; it is now on the suppression list, so no import will add it")


@leads_app.command("pause")
def leads_pause(email: str) -> None:
    """Stop sending to a lead for now (resume later)."""
    lead = _change(email, LeadStatus.PAUSED, expect=[LeadStatus.ACTIVE])
    out(f"{lead.email} paused")


@leads_app.command("resume")
def leads_resume(email: str) -> None:
    """Resume a paused lead's sequence where it stopped.

    An unsubscribed or bounced lead can be resumed too, once its address is off the
    suppression list ('campaignd suppression remove', which asks why).
    """
    lead = _change(
        email, LeadStatus.ACTIVE, expect=[LeadStatus.PAUSED, LeadStatus.UNSUBSCRIBED, LeadStatus.BOUNCED]
    )
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


@leads_app.command("converted")
def leads_converted(
    email: str,
    note: Annotated[str, typer.Option(help="What was sold, or how it closed.")] = "",
) -> None:
    """Record that a lead became a customer: it leaves the drip and the digests for good."""
    lead = _change(
        email,
        LeadStatus.CONVERTED,
        expect=[LeadStatus.FLAGGED, LeadStatus.ACTIVE, LeadStatus.PAUSED],
        reason=note or "converted",
    )
    out(f"{lead.email} marked as converted")


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


class SettleAs(StrEnum):
    sent = "sent"
    skipped = "skipped"


@touches_app.command("settle")
def touches_settle(
    ids: Annotated[list[int], typer.Argument(help="Touch ids from 'campaignd status'.")],
    as_: Annotated[
        SettleAs,
        typer.Option(
            "--as",
            help="sent: it did arrive (it counts as a touch); skipped: it did not, and is not to be sent.",
        ),
    ],
    note: Annotated[str, typer.Option(help="What you found (kept with the touch).")] = "",
) -> None:
    """Settle touches that are unknown or failed without sending them again.

    After checking the relay's log: --as sent when the message did arrive, --as skipped
    when it did not and should not be sent. The lead's sequence then goes on.
    """
    settings = STATE.settings()
    done = STATE.store().settle_touches(
        ids, outcome=as_.value, note=note, policy=Policy.from_settings(settings), now=utcnow()
    )
    for r in done:
        out(f"touch {r.touch_id} ({r.tier}/{r.step} to {r.email}) settled as {r.status}")
        if r.promoted:
            out(f"{r.email} promoted from cold to warm")
        if r.flagged:
            out(f"{r.email} flagged for sales follow-up")
    missing = sorted(set(ids) - {r.touch_id for r in done})
    if missing:
        raise CampaigndError(
            f"not settled (no such touch, or it is not unknown/failed): {', '.join(map(str, missing))}"
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
    removed = STATE.store().unsuppress(email, now=utcnow(), reason=reason.strip())
    if removed is None:
        raise CampaigndError(f"{email} is not suppressed")
    logger.warning("suppression of %s (%s) removed: %s", removed.email, removed.reason, reason)
    out(f"{removed.email} removed from the suppression list")
    lead = STATE.store().find_lead_by_email(removed.email)
    if lead is not None and lead.status in (LeadStatus.UNSUBSCRIBED, LeadStatus.BOUNCED):
        out(f"the lead stays {lead.status}; 'campaignd leads resume {removed.email}' restarts its sequence")
