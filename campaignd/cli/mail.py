"""Direct mail by hand: print batches for the print shop or mailing house.

``mail batches`` lists them, ``mail show`` tells one's pieces, ``mail export`` makes a
batch of the waiting pieces now, ``mail confirm`` records that a batch was handed to the
post (its pieces count as touches), and ``mail cancel`` puts an unmailed batch's pieces
back in the queue.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Any

import typer

from campaignd.cli.app import STATE, app, emit_json, fmt_time, out
from campaignd.clock import utcnow

mail_app = typer.Typer(
    help="Print batches of direct mail: list, show, export, confirm mailed, cancel.", no_args_is_help=True
)
app.add_typer(mail_app, name="mail")


def _zone() -> str:
    settings = STATE.settings()
    return settings.print.timezone or settings.timezone


@mail_app.command("batches")
def mail_batches(
    limit: Annotated[int, typer.Option(help="Show at most this many, newest first.", min=1)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The latest print batches, and the pieces waiting for the next one."""
    store = STATE.store()
    status = store.mail_status()
    batches = store.batches(limit=limit)
    zone = _zone()
    if as_json:
        emit_json(
            {
                "waiting": status.waiting,
                "waiting_since": status.waiting_since,
                "exported_batches": status.exported_batches,
                "exported_pieces": status.exported_pieces,
                "skipped_for_address": status.skipped_for_address,
                "batches": [_batch_json(b) for b in batches],
            }
        )
        return
    since = f" (since {fmt_time(status.waiting_since, zone)})" if status.waiting_since else ""
    out(f"waiting for a batch:        {status.waiting}{since}")
    out(
        f"exported, not yet mailed:   {_n(status.exported_pieces, 'piece')} "
        f"in {_n(status.exported_batches, 'batch', 'batches')}"
    )
    out(f"skipped (no postal address): {status.skipped_for_address}")
    if not batches:
        out("\nno print batches yet ('campaignd mail export' makes one now)")
        return
    out(f"\n{'batch':>6}  {'status':<10} {'pieces':>6} {'pages':>6}  {'exported':<22} {'mailed':<22} folder")
    for b in batches:
        mailed = fmt_time(b.confirmed_at, zone) if b.confirmed_at else ""
        if b.status == "cancelled":
            mailed = "cancelled " + fmt_time(b.cancelled_at, zone)
        out(
            f"{b.id:>6}  {b.status:<10} {b.pieces:>6} {b.pages:>6}  "
            f"{fmt_time(b.exported_at, zone) if b.exported_at else '-':<22} {mailed:<22} {b.path or '-'}"
        )


def _batch_json(b: Any) -> dict[str, Any]:
    return {
        "batch": b.id,
        "status": b.status,
        "pieces": b.pieces,
        "pages": b.pages,
        "path": b.path,
        "detail": b.detail,
        "created_at": b.created_at,
        "exported_at": b.exported_at,
        "confirmed_at": b.confirmed_at,
        "cancelled_at": b.cancelled_at,
    }


@mail_app.command("show")
def mail_show(
    batch: Annotated[int, typer.Argument(help="The batch number.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """One batch: its status, files and pieces (who, which step, which pages)."""
    store = STATE.store()
    record = store.get_batch(batch)
    pieces = store.batch_pieces(batch)
    manifest = _manifest(record.path, batch)
    if as_json:
        emit_json(
            {
                **_batch_json(record),
                "pieces": [
                    {
                        "touch": p.touch_id,
                        "lead": p.email,
                        "name": p.name,
                        "tier": p.tier,
                        "step": p.step,
                        "status": p.status,
                        "counted_at": p.sent_at,
                    }
                    for p in pieces
                ],
                "manifest": manifest,
            }
        )
        return
    zone = _zone()
    out(f"print batch {record.id}: {record.status}")
    out(f"  {record.detail}")
    out(f"  pieces {record.pieces}, pages {record.pages}")
    out(f"  created   {fmt_time(record.created_at, zone)}")
    if record.exported_at:
        out(f"  exported  {fmt_time(record.exported_at, zone)}  {record.path}")
    if record.confirmed_at:
        out(f"  mailed    {fmt_time(record.confirmed_at, zone)}")
    if record.cancelled_at:
        out(f"  cancelled {fmt_time(record.cancelled_at, zone)}")
    if record.status == "exported":
        if any(p.status == "queued" for p in pieces):
            out(f"\nonce it is handed to the post: campaignd mail confirm {record.id}")
            out(f"if it will not be mailed:      campaignd mail cancel {record.id}")
        else:
            out("\nits pieces were counted as touches when it was exported")
            out(f"once it is handed to the post: campaignd mail confirm {record.id} (records the date)")
    by_touch = {row["touch_id"]: row for row in manifest}
    if pieces:
        # In the PDF's order, as the print shop sees them.
        pieces.sort(key=lambda p: int(by_touch.get(str(p.touch_id), {}).get("sequence") or 0))
        width = max(len(p.email) for p in pieces)
        out(f"\n{'seq':>5} {'pages':<9} {'lead':<{width}} {'step':<24} status")
        for p in pieces:
            row = by_touch.get(str(p.touch_id), {})
            pages = f"{row.get('first_page', '?')}-{row.get('last_page', '?')}"
            step = f"{p.tier}/{p.step}"
            out(f"{row.get('sequence', '?'):>5} {pages:<9} {p.email:<{width}} {step:<24} {p.status}")
    elif manifest:
        # A cancelled batch: its pieces went back to the queue; the manifest still says who.
        out(f"\nits {len(manifest)} pieces went back to the queue; the manifest listed:")
        for row in manifest:
            out(f"{row['sequence']:>5} {row['email']} {row['tier']}/{row['step']}")


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _manifest(path: str, batch: int) -> list[dict[str, str]]:
    if not path:
        return []
    file = Path(path) / f"batch-{batch:06d}-manifest.csv"
    try:
        with file.open(encoding="utf-8-sig", newline="") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


@mail_app.command("export")
def mail_export() -> None:
    """Make print batches of every waiting piece now (one per print template)."""
    from campaignd.directmail import PrintBatches

    settings = STATE.settings()
    store = STATE.store()
    done = PrintBatches(settings=settings, store=store).export(now=utcnow())
    if not done:
        out("no pieces are waiting for a print batch")
        return
    for exported in done:
        out(exported.summary())
        for touch_id, reason in exported.failed:
            out(f"  touch {touch_id}: {reason}")
        if exported.batch is not None:
            if settings.print.count_at == "export":
                out("  the pieces counted as touches now")
            else:
                out(f"  once it is handed to the post: campaignd mail confirm {exported.batch.id}")


@mail_app.command("confirm")
def mail_confirm(batch: Annotated[int, typer.Argument(help="The batch number.")]) -> None:
    """Record that a batch was handed to the post: each piece counts as a touch, once."""
    from campaignd.sequences import Policy

    settings = STATE.settings()
    store = STATE.store()
    done = store.confirm_batch(batch, now=utcnow(), policy=Policy.from_settings(settings))
    zone = _zone()
    if done.already:
        out(f"print batch {batch} was already confirmed mailed on {fmt_time(done.batch.confirmed_at, zone)}")
        return
    promoted = sum(r.promoted for r in done.counted)
    flagged = sum(r.flagged for r in done.counted)
    if done.counted:
        out(f"print batch {batch} confirmed mailed: {_n(len(done.counted), 'piece')} counted as touches")
    else:
        out(f"print batch {batch} confirmed mailed (its pieces were counted as touches at export)")
    if promoted:
        out(f"  {promoted} leads promoted from cold to warm")
    if flagged:
        out(f"  {flagged} leads flagged for sales follow-up")


@mail_app.command("cancel")
def mail_cancel(batch: Annotated[int, typer.Argument(help="The batch number.")]) -> None:
    """Cancel a batch that will not be mailed: its pieces go back in the queue, due now."""
    from campaignd.directmail import mark_cancelled

    store = STATE.store()
    record, again, stopped = store.cancel_batch(batch, now=utcnow())
    mark_cancelled(record, at=fmt_time(record.cancelled_at, _zone()))
    out(f"print batch {batch} cancelled: {_n(again, 'piece')} due again, for a later batch")
    if stopped:
        out(f"  {stopped} pieces were dropped: their leads have stopped (unsubscribed, paused or flagged)")
