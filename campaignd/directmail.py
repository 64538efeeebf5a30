"""Direct mail: the ``mail`` channel, print batches, and the job that exports them.

The channel answers for each due ``mail`` step at once: a lead with a complete postal
address for its country gets a piece that waits (``pending``) for the next print batch;
a lead without one skips the step, with the reason recorded (or, with ``[print]
without_address = "email"``, the channel asks the dispatcher for the step's email
instead). Nothing is printed yet: pieces are printed from the templates at export time,
with the lead's data as it is then.

An export collects the waiting pieces, one batch per print template (one stock, one
format), presorted by country and postal code, and writes the batch folder
``<print dir>/batch-000012/``: ``batch-000012.pdf`` (every piece, one page range each,
in manifest order), ``batch-000012-manifest.csv`` (one row per piece for the mailing
house) and ``batch-000012-summary.txt``. It is atomic:

1. a batch number is reserved (``exporting``), and the folder is written under a
   temporary name, ``.batch-000012.partial``, every file fsynced;
2. one transaction checks that every piece in the files is still waiting (a lead who
   unsubscribed meanwhile sends the export round again without them) and records them
   ``queued`` in the batch (``sent`` and counted, with ``count_at = "export"``);
3. the folder is renamed to its final name.

A crash before 2 leaves a reserved batch and a partial folder: the next export marks the
batch ``failed``, deletes the folder, and the pieces, still waiting, go into a new batch.
A crash between 2 and 3 leaves a recorded batch whose files are complete under the
temporary name: the next export finishes the rename. So there is never a half batch
under a final name, and never a touch pointing at a batch without its files. One export
runs at a time (a lock file in the print folder; on PostgreSQL also an advisory lock).

Confirming a batch (``campaignd mail confirm``) counts its pieces as touches; cancelling
it gives them back to the dispatcher. Both are in :mod:`campaignd.store.mail`.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import fcntl
import hashlib
import io
import logging
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

from apscheduler.jobstores.base import JobLookupError
from apscheduler.triggers.cron import CronTrigger

from campaignd.addresses import AddressCheck, check_address
from campaignd.channels import FALLBACK, Delivery, Outcome, Outgoing
from campaignd.config import Channel, DigestSettings, PrintSettings, Settings
from campaignd.exceptions import CampaigndError, ExportBusy, PrintError
from campaignd.printing import (
    Laid,
    Stopped,
    format_of,
    pdf_outline,
    piece_context,
    render_pdf,
    render_piece_html,
)
from campaignd.render import Renderer, RenderError, lead_context
from campaignd.schedules import previous_fire_time
from campaignd.sequences import Policy
from campaignd.services import ServiceContext
from campaignd.store import Recorded, Store
from campaignd.store.mail import BatchRecord, PieceRecord, StalePieces
from campaignd.unsubscribe import Signer, load_keys

logger = logging.getLogger(__name__)


MANIFEST_COLUMNS = (
    "batch",
    "sequence",
    "reference",
    "first_page",
    "last_page",
    "pages",
    "recipient",
    "address_block",
    "address_1",
    "address_2",
    "address_3",
    "address_4",
    "address_5",
    "address_6",
    "address_7",
    "postal_code",
    "country",
    "lead_id",
    "email",
    "tier",
    "step",
    "template",
    "touch_id",
)


# -- the channel ----------------------------------------------------------------------------------


class DirectMailChannel:
    """The ``mail`` channel: checks the lead's postal address and queues the piece for print.

    :param settings: the ``[print]`` settings (the country mail is posted from, what to do
        without an address); :meth:`configure` replaces them on reload.
    """

    name = "print"
    concurrency = 4

    def __init__(self, *, settings: PrintSettings) -> None:
        self.settings = settings

    def configure(self, settings: PrintSettings) -> None:
        self.settings = settings

    async def open(self) -> None:
        return None

    async def send(self, message: Outgoing) -> Delivery:
        checked = check_address(message.lead, home_country=self.settings.country)
        if checked.complete:
            return Delivery(message.touch_id, Outcome.PENDING)
        extra = {FALLBACK: "email"} if self.settings.without_address == "email" else {}
        return Delivery(message.touch_id, Outcome.SKIPPED, checked.reason, extra=extra)

    async def close(self) -> None:
        return None


# -- exporting ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exported:
    """What exporting one batch did.

    :param batch: the batch as recorded, or None when none was made (no piece could go in).
    :param back_to_dispatch: pieces whose lead has no complete address any more: the
        dispatcher decides again (skip, or the email instead).
    :param failed: pieces that could not be printed for their lead, with the reason.
    :param dropped: pieces of steps that left the configuration (cancelled).
    """

    batch: BatchRecord | None
    template: str
    path: Path | None
    back_to_dispatch: list[tuple[int, str]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    counted: list[Recorded] = field(default_factory=list)

    def summary(self) -> str:
        if self.batch is None:
            head = f"no batch for {self.template}"
        else:
            pieces = f"{self.batch.pieces} piece" + ("" if self.batch.pieces == 1 else "s")
            head = (
                f"print batch {self.batch.id}: {pieces}, {self.batch.pages} pages "
                f"of {self.template} in {self.path}"
            )
        extra = []
        if self.back_to_dispatch:
            extra.append(f"{len(self.back_to_dispatch)} back to the dispatcher (address no longer complete)")
        if self.failed:
            extra.append(f"{len(self.failed)} failed (see 'campaignd status')")
        if self.dropped:
            extra.append(f"{len(self.dropped)} cancelled (step no longer configured)")
        return head + (f"; {', '.join(extra)}" if extra else "")


@dataclass(slots=True)
class _Attempt:
    committing: bool = False
    """Set once the transaction that records the batch has been started."""


@dataclass(slots=True)
class _Piece:
    record: PieceRecord
    lead: dict[str, Any]
    address: AddressCheck
    sequence: int = 0
    laid: Laid | None = None
    first_page: int = 0


def batch_folder(print_dir: Path, batch_id: int) -> Path:
    return print_dir / f"batch-{batch_id:06d}"


def partial_folder(print_dir: Path, batch_id: int) -> Path:
    return print_dir / f".batch-{batch_id:06d}.partial"


def zone_of(settings: Settings) -> str:
    """The time zone of the print schedule and of the date printed on pieces."""
    return settings.print.timezone or settings.timezone


class PrintBatches:
    """Exports waiting pieces as print batches, and finishes what a stopped export left.

    :param settings: the configuration (``[print]``, templates, sender, sequences).
    :param store: the database.
    """

    MAX_ROUNDS = 5
    """Exports of one batch redone because a lead stopped while its files were written."""

    def __init__(self, *, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.dir = settings.print_dir
        self._steps = {
            (tier.value, step.id): (index, step)
            for tier, seq in settings.sequences.items()
            for index, step in enumerate(seq.steps)
        }

    # -- one export at a time -----------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the export lock (this host's lock file, and the database's); raises
        :class:`ExportBusy` when another export holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fh: IO[str] = (self.dir / ".export.lock").open("a+")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise ExportBusy(
                    f"a print batch is being exported right now ({holder}); try again later"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            with self.store.export_lock() as got:
                if not got:
                    raise ExportBusy("another campaignd daemon is exporting a print batch; try again later")
                yield
        finally:
            fh.close()

    # -- recovery -------------------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Finish or undo what an export that stopped left behind (hold :meth:`locked`).

        :returns: what was done, one sentence each, for the log.
        """
        done: list[str] = []
        for batch in self.store.unfinished_exports():
            self.store.fail_batch(
                batch.id,
                detail="the export stopped before it finished (campaignd was stopped or crashed); "
                "its pieces waited for the next batch",
            )
            _remove_tree(partial_folder(self.dir, batch.id))
            done.append(f"print batch {batch.id} was left half exported: discarded, its pieces wait again")
        for partial in sorted(self.dir.glob(".batch-*.partial")):
            try:
                batch_id = int(partial.name.split("-", 1)[1].split(".", 1)[0])
                batch = self.store.get_batch(batch_id)
            except (ValueError, CampaigndError):
                _remove_tree(partial)
                continue
            final = Path(batch.path) if batch.path else batch_folder(self.dir, batch.id)
            if batch.status in ("exported", "confirmed", "cancelled") and not final.exists():
                # Recorded, but stopped before the rename: the files are complete.
                os.replace(partial, final)
                _fsync_dir(self.dir)
                done.append(f"print batch {batch.id} was recorded but not yet in place: moved to {final}")
            else:
                _remove_tree(partial)
        return done

    # -- export ---------------------------------------------------------------------------------------

    def export(self, *, now: datetime, stop: threading.Event | None = None) -> list[Exported]:
        """Export every waiting piece (up to ``print.max_pieces``), one batch per template.

        :param now: the time of the export, recorded and printed (as a date) on the pieces.
        :param stop: when set, the export in progress stops and is discarded.
        :raises ExportBusy: another export is running.
        :raises PrintError: the batch could not be made (its pieces still wait).
        """
        with self.locked():
            for line in self.recover():
                logger.warning("%s", line)
            waiting = self.store.waiting_pieces(limit=self.settings.print.max_pieces)
            groups: dict[str, list[PieceRecord]] = {}
            dropped: list[tuple[int, str]] = []
            for piece in waiting:
                found = self._steps.get((piece.tier, piece.step))
                if found is None or found[1].channel != Channel.MAIL:
                    dropped.append(
                        (piece.touch_id, f"step {piece.tier}/{piece.step} is no longer a mail step")
                    )
                    continue
                groups.setdefault(found[1].template, []).append(piece)
            out: list[Exported] = []
            if dropped:
                self.store.settle_pieces(now=now, dropped=dropped)
                out.append(Exported(None, "steps no longer configured", None, dropped=dropped))
            for template, pieces in groups.items():
                out.append(self._export_template(template, pieces, now=now, stop=stop))
            return out

    def _export_template(
        self, template: str, records: list[PieceRecord], *, now: datetime, stop: threading.Event | None
    ) -> Exported:
        country = self.settings.print.country
        pieces: list[_Piece] = []
        back: list[tuple[int, str]] = []
        for record in records:
            lead = lead_context(record.lead)
            checked = check_address(lead, home_country=country)
            if checked.complete:
                pieces.append(_Piece(record, lead, checked))
            else:
                back.append((record.touch_id, checked.reason))
        # Presorted, as mailing houses and postal discounts want: by country, then code.
        pieces.sort(
            key=lambda p: (p.address.address.country, p.address.address.postal_code, p.record.touch_id)
        )
        if not pieces:
            self.store.settle_pieces(now=now, back_to_dispatch=back)
            return Exported(None, template, None, back_to_dispatch=back)
        batch_id = self.store.begin_batch(now=now, detail=f"{template}: being exported")
        attempt = _Attempt()
        try:
            for _ in range(self.MAX_ROUNDS):
                try:
                    return self._write_and_record(
                        batch_id, template, pieces, back, now=now, stop=stop, attempt=attempt
                    )
                except StalePieces as exc:
                    stale = set(exc.touch_ids)
                    logger.info(
                        "print batch %d: %d leads stopped while it was written; writing it again "
                        "without them",
                        batch_id,
                        len(stale),
                    )
                    pieces = [p for p in pieces if p.record.touch_id not in stale]
                    if not pieces:
                        self.store.drop_batch(batch_id, now=now, back_to_dispatch=back)
                        return Exported(None, template, None, back_to_dispatch=back)
            raise PrintError(f"print batch {batch_id}: leads kept changing while it was written; try again")
        except BaseException as exc:
            if attempt.committing:
                # The batch may be recorded (the failure came with or after the commit): its
                # folder is complete, and the next export finishes or discards it by what the
                # database says.
                logger.error(
                    "print batch %d: stopped after recording began (%s); the next export finishes it",
                    batch_id,
                    _failure(exc),
                )
                raise
            _remove_tree(partial_folder(self.dir, batch_id))
            with contextlib.suppress(Exception):
                self.store.fail_batch(batch_id, detail=_failure(exc))
            if isinstance(exc, Stopped):
                raise PrintError(
                    f"print batch {batch_id} was stopped before it finished; its pieces wait"
                ) from None
            raise

    def _write_and_record(
        self,
        batch_id: int,
        template: str,
        pieces: list[_Piece],
        back: list[tuple[int, str]],
        *,
        now: datetime,
        stop: threading.Event | None,
        attempt: _Attempt,
    ) -> Exported:
        settings = self.settings
        final = batch_folder(self.dir, batch_id)
        if final.exists():
            raise PrintError(
                f"{final} already exists (left from another database?); move it away and export again"
            )
        work = partial_folder(self.dir, batch_id)
        _remove_tree(work)
        work.mkdir(parents=True)
        renderer = Renderer(settings=settings)
        signer = Signer(
            keys=load_keys(settings, create=True),
            base_url=settings.unsubscribe.base_url,
            mailto=settings.unsubscribe.mailto,
        )
        day = now.astimezone(ZoneInfo(zone_of(settings))).date()
        failed: list[tuple[int, str]] = []
        printed: list[_Piece] = []
        htmls: list[str] = []
        for piece in pieces:
            index, step = self._steps[(piece.record.tier, piece.record.step)]
            sequence = len(printed) + 1
            ctx = piece_context(settings, piece.lead, day=day, batch=batch_id, sequence=sequence)
            try:
                html = render_piece_html(
                    renderer,
                    step=step,
                    tier=piece.record.tier,
                    index=index,
                    lead=piece.lead,
                    links=signer.links(piece.record.lead.id, piece.record.lead.email),
                    piece=ctx,
                )
            except RenderError as exc:
                failed.append((piece.record.touch_id, f"cannot print: {exc.problem}"))
                continue
            piece.sequence = sequence
            printed.append(piece)
            htmls.append(html)
        name = final.name
        pdf_path = work / f"{name}.pdf"
        laid = (
            render_pdf(
                htmls,
                out=pdf_path,
                root=settings.templates,
                labels=[f"{p.sequence:04d} {p.address.block[0]}" for p in printed],
                title=f"campaignd print batch {batch_id}: {template}",
                workers=settings.print.workers,
                stop=stop,
            )
            if printed
            else []
        )
        placed: list[_Piece] = []
        page = 1
        for piece, one in zip(printed, laid, strict=True):
            if one.error:
                failed.append((piece.record.touch_id, f"cannot print: {one.error}"))
                continue
            piece.laid, piece.first_page = one, page
            page += one.pages
            placed.append(piece)
        if not placed:
            _remove_tree(work)
            self.store.drop_batch(batch_id, now=now, back_to_dispatch=back, failed=failed)
            return Exported(None, template, None, back_to_dispatch=back, failed=failed)
        pages = page - 1
        # Read back what was written: every page there, and the format of the first.
        in_pdf, first = pdf_outline(pdf_path)
        if in_pdf != pages:
            raise PrintError(f"print batch {batch_id}: the PDF has {in_pdf} pages, expected {pages}")
        fmt = format_of(first.width, first.height, settings.print.paper)
        manifest = work / f"{name}-manifest.csv"
        _write_file(manifest, manifest_csv(batch_id, template, placed).encode("utf-8-sig"))
        summary = work / f"{name}-summary.txt"
        _write_file(
            summary,
            summary_text(
                settings,
                batch_id=batch_id,
                template=template,
                pieces=placed,
                pages=pages,
                fmt_label=fmt.label if fmt else f"{first.width:.0f} x {first.height:.0f} mm",
                double_sided=bool(fmt and fmt.kind == "postcard"),
                now=now,
                pdf=pdf_path,
                manifest=manifest,
            ).encode("utf-8"),
        )
        _fsync_dir(work)
        if stop is not None and stop.is_set():
            raise Stopped
        count_now = settings.print.count_at == "export"
        attempt.committing = True
        try:
            counted = self.store.finish_batch(
                batch_id,
                placed=[p.record.touch_id for p in placed],
                pages=pages,
                path=str(final),
                detail=f"{template}: {fmt.label if fmt else 'print'}"
                + (", counted at export" if count_now else ""),
                now=now,
                count=count_now,
                policy=Policy.from_settings(settings),
                back_to_dispatch=back,
                failed=failed,
            )
        except StalePieces:
            attempt.committing = False  # rolled back: nothing was recorded
            raise
        publish(work, final)
        return Exported(
            self.store.get_batch(batch_id),
            template,
            final,
            back_to_dispatch=back,
            failed=failed,
            counted=counted,
        )


def publish(work: Path, final: Path) -> None:
    """Give a recorded batch's complete folder its final name, durably."""
    os.replace(work, final)
    _fsync_dir(final.parent)


def _failure(exc: BaseException) -> str:
    if isinstance(exc, Stopped):
        return "the export was stopped before it finished; its pieces waited for the next batch"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"the export failed: {text[:300]}; its pieces waited for the next batch"


# -- the files ---------------------------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    """A manifest cell that a spreadsheet shows as text, never runs as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def manifest_csv(batch_id: int, template: str, pieces: Sequence[_Piece]) -> str:
    """One row per piece, in the PDF's order, with its page range and full address block."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(MANIFEST_COLUMNS)
    for p in pieces:
        assert p.laid is not None
        block = list(p.address.block)
        lines = block + [""] * (7 - len(block))
        lead = p.record.lead
        writer.writerow(
            [
                _cell(v)
                for v in (
                    batch_id,
                    p.sequence,
                    f"B{batch_id}-{p.sequence:04d}",
                    p.first_page,
                    p.first_page + p.laid.pages - 1,
                    p.laid.pages,
                    block[0],
                    "\n".join(block),
                    *lines[:7],
                    p.address.address.postal_code,
                    p.address.address.country,
                    lead.id,
                    lead.email,
                    p.record.tier,
                    p.record.step,
                    template,
                    p.record.touch_id,
                )
            ]
        )
    return out.getvalue()


def summary_text(
    settings: Settings,
    *,
    batch_id: int,
    template: str,
    pieces: Sequence[_Piece],
    pages: int,
    fmt_label: str,
    double_sided: bool,
    now: datetime,
    pdf: Path,
    manifest: Path,
) -> str:
    """What the print shop and the operator need to know about a batch, in plain words."""
    zone = zone_of(settings)
    local = now.astimezone(ZoneInfo(zone))
    countries = Counter(p.address.address.country for p in pieces)
    home = settings.print.country
    destinations = ", ".join(
        f"{code} {n}" for code, n in sorted(countries.items(), key=lambda x: (-x[1], x[0]))
    )
    per_piece = Counter(p.laid.pages for p in pieces if p.laid is not None)
    page_note = ", ".join(f"{n} of {k} page{'s' if k > 1 else ''}" for k, n in sorted(per_piece.items()))
    if double_sided:
        printing = "print both sides: page 1 of each piece is the front, page 2 the address side"
    else:
        printing = "print one side; fold each letter so its address shows in the envelope window"
    if settings.print.count_at == "export":
        counting = "the pieces counted as touches when this batch was exported"
        after = [f"  campaignd mail confirm {batch_id}   (records the date it was mailed)"]
    else:
        counting = "the pieces count as touches once this batch is confirmed mailed"
        after = [
            f"  campaignd mail confirm {batch_id}   once it is handed to the post",
            f"  campaignd mail cancel {batch_id}    if it will not be mailed (the pieces wait again)",
        ]
    lines = [
        f"campaignd print batch {batch_id}",
        "",
        f"exported      {local:%Y-%m-%d %H:%M} {local.tzname() or zone} ({zone})",
        f"template      {template}",
        f"format        {fmt_label}; {printing}",
        f"pieces        {len(pieces)} ({page_note})",
        f"pages         {pages} in {pdf.name}",
        f"              sha256 {_sha256(pdf)}",
        f"manifest      {manifest.name}: one row per piece in the PDF's order, with its page range",
        f"              sha256 {_sha256(manifest)}",
        f"order         presorted by country and postal code; each piece is marked B{batch_id}-NNNN",
        f"destinations  {destinations} (posted from {home}; mail abroad ends with the country's name)",
        "",
        f"Counting: {counting}.",
        *after,
        "",
    ]
    return "\n".join(lines)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def mark_cancelled(batch: BatchRecord, *, at: str) -> None:
    """Leave a note in a cancelled batch's folder, so nobody prints it by mistake."""
    if not batch.path or not Path(batch.path).is_dir():
        return
    with contextlib.suppress(OSError):
        _write_file(
            Path(batch.path) / "CANCELLED.txt",
            f"Print batch {batch.id} was cancelled on {at}: do not print or mail it.\n"
            "Its pieces went back to the queue and will be in a later batch.\n".encode(),
        )


# -- the schedule --------------------------------------------------------------------------------------------

JOB_ID = "print-batch"
WAITING_JOB_ID = "print-batch-waiting"
CATCH_UP_JOB_ID = "print-batch-catch-up"


def trigger_for(settings: Settings) -> CronTrigger | None:
    schedule = settings.print.schedule
    if not schedule:
        return None
    return CronTrigger(**DigestSettings.cron_fields(schedule), timezone=zone_of(settings))


def previous_fire(trigger: CronTrigger, now: datetime) -> datetime | None:
    """The latest time at or before ``now`` at which ``trigger`` fired, if within the last
    eight days: an export missed longer ago than that is not caught up at start-up."""
    return previous_fire_time(trigger, now, within=timedelta(days=8))


class PrintBatchService:
    """Exports print batches on the ``[print]`` schedule, and when enough pieces wait.

    Jobs with fixed ids: ``print-batch`` (the schedule), ``print-batch-waiting`` (counts
    waiting pieces every dispatch interval when ``when_waiting`` is set) and, at start-up,
    ``print-batch-catch-up``: it finishes what a stopped export left, and exports at once
    when pieces have been waiting since a scheduled export that did not happen (campaignd
    was down). An export runs in a worker thread; on stop it is asked to stop and discarded
    (its pieces wait for the next one).
    """

    name = "print batches"

    def __init__(self) -> None:
        self._ctx: ServiceContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = threading.Event()

    @property
    def ctx(self) -> ServiceContext:
        assert self._ctx is not None, "the print batch service is not started"
        return self._ctx

    async def start(self, ctx: ServiceContext) -> None:
        self._configure(ctx)
        ctx.run_now(self._catch_up, CATCH_UP_JOB_ID)

    async def reload(self, ctx: ServiceContext) -> None:
        self._configure(ctx)

    async def stop(self) -> None:
        if self._ctx is None:
            return
        self._ctx.remove_jobs(JOB_ID, WAITING_JOB_ID, CATCH_UP_JOB_ID)
        task = self._task
        if task is None or task.done():
            return
        self._stop.set()
        bound = self._ctx.settings.dispatch.stop_timeout.total_seconds()
        done, _ = await asyncio.wait({task}, timeout=bound)
        if not done:
            logger.error(
                "the print batch export did not stop within %ss; it is discarded at the next start", bound
            )

    def _configure(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        settings = ctx.settings
        channel = ctx.channels.get("mail")
        if isinstance(channel, DirectMailChannel):
            channel.configure(settings.print)
        trigger = trigger_for(settings)
        if trigger is None:
            with contextlib.suppress(JobLookupError):
                ctx.scheduler.remove_job(JOB_ID)
        else:
            ctx.scheduler.add_job(
                self._scheduled,
                trigger,
                id=JOB_ID,
                coalesce=True,
                max_instances=1,
                misfire_grace_time=None,
                replace_existing=True,
            )
        waiting = settings.print.when_waiting
        if not waiting:
            with contextlib.suppress(JobLookupError):
                ctx.scheduler.remove_job(WAITING_JOB_ID)
        else:
            every = max(settings.dispatch.interval.total_seconds(), 1.0)
            ctx.scheduler.add_job(
                self._check_waiting,
                "interval",
                seconds=every,
                id=WAITING_JOB_ID,
                coalesce=True,
                max_instances=1,
                misfire_grace_time=max(int(every), 1),
                replace_existing=True,
            )
        if trigger is not None or waiting:
            how = [f"on the schedule '{settings.print.schedule}' ({zone_of(settings)})"] if trigger else []
            how += [f"when {waiting} piece{'s are' if waiting > 1 else ' is'} waiting"] if waiting else []
            logger.info("print batches are exported %s into %s", " and ".join(how), settings.print_dir)

    # -- jobs -----------------------------------------------------------------------------------------

    async def _scheduled(self) -> None:
        await self.export_now("scheduled")

    async def _check_waiting(self) -> None:
        ctx = self.ctx
        waiting = await asyncio.to_thread(ctx.store.mail_status)
        if ctx.settings.print.when_waiting and waiting.waiting >= ctx.settings.print.when_waiting:
            await self.export_now(f"{waiting.waiting} pieces waiting")

    async def _catch_up(self) -> None:
        ctx = self.ctx
        batches = PrintBatches(settings=ctx.settings, store=ctx.store)
        try:
            done = await asyncio.to_thread(self._recover, batches)
        except ExportBusy:
            done = []
        for line in done:
            logger.warning("%s", line)
        trigger = trigger_for(ctx.settings)
        if trigger is None:
            return
        now = ctx.clock()
        fired = previous_fire(trigger, now)
        status = await asyncio.to_thread(ctx.store.mail_status)
        if fired is not None and status.waiting_since is not None and status.waiting_since <= fired:
            await self.export_now("catching up the export due at " + fired.isoformat(timespec="minutes"))

    @staticmethod
    def _recover(batches: PrintBatches) -> list[str]:
        with batches.locked():
            return batches.recover()

    async def export_now(self, reason: str) -> list[Exported]:
        """Export the waiting pieces now, unless an export is already running."""
        if self._task is not None and not self._task.done():
            return []
        ctx = self.ctx
        result: list[Exported] = []

        async def run() -> None:
            nonlocal result
            batches = PrintBatches(settings=ctx.settings, store=ctx.store)
            result = await asyncio.to_thread(batches.export, now=ctx.clock(), stop=self._stop)

        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(run())
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            return []  # the scheduler is shutting down; stop() asks the export to stop
        except ExportBusy as exc:
            logger.info("print batch export (%s) skipped: %s", reason, exc)
            return []
        except Exception as exc:
            logger.error("print batch export (%s) failed: %s", reason, exc)
            return []
        for exported in result:
            log_export(exported, ctx.settings)
        return result


def log_export(exported: Exported, settings: Settings) -> None:
    if exported.batch is not None:
        if settings.print.count_at == "export":
            logger.info("%s; counted as touches at export", exported.summary())
        else:
            logger.info(
                "%s; confirm with 'campaignd mail confirm %d' once it is mailed",
                exported.summary(),
                exported.batch.id,
            )
    elif exported.back_to_dispatch or exported.failed or exported.dropped:
        logger.warning("%s", exported.summary())
    for touch_id, reason in exported.failed:
        logger.error("direct-mail piece (touch %d) cannot be printed: %s", touch_id, reason)
    for rec in exported.counted:
        if rec.promoted:
            logger.info("promoted %s from cold to warm", rec.email)
        if rec.flagged:
            logger.info("flagged %s for sales follow-up after %d touches", rec.email, rec.touch_count)
