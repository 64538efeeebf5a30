"""Printing: what the print shop gets for a direct-mail piece, and checking it.

Owns the print formats (a letter on A4 for DIN 5008 window envelopes or on US Letter for
#10 window envelopes; a postcard, A6 or 6 x 4 in, front and address side), the zones
where the post looks for the recipient's address on each, the ``piece`` data that print
templates see besides the lead (the address block formatted for the destination's post,
the return address, the date, the piece's reference), rendering a piece's template to
HTML, turning many pieces into one merged PDF with WeasyPrint, reading PDFs back (page
sizes, embedded fonts, where each line of text is), and the print checks that
``templates check`` runs for every ``mail`` step.

A merged PDF is laid out in chunks of pieces, in worker processes when there are several
CPUs, each chunk written once with its fonts embedded once, and the chunks joined with
pypdf; one PDF per letter would embed the same fonts hundreds of times and take several
times as long. WeasyPrint may only read files under the templates folder and ``data:``
URLs: a template can never make campaignd fetch anything from the network.

Imports no database, SMTP or scheduler module and never reads the clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from campaignd.addresses import check_address
from campaignd.config import Channel, Settings, Step, Tier
from campaignd.config import Sequence as StepSequence
from campaignd.exceptions import PrintError, Problem
from campaignd.render import Renderer, RenderError
from campaignd.unsubscribe import Links

logger = logging.getLogger(__name__)

MM_PER_INCH = 25.4
PT_PER_MM = 72 / MM_PER_INCH
PX_PER_MM = 96 / MM_PER_INCH


# -- formats --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Zone:
    """A rectangle on a page, in millimetres from the top-left corner of the trimmed page."""

    left: float
    top: float
    width: float
    height: float

    def contains(self, x: float, y: float, *, slack: float = 0.5) -> bool:
        return (
            self.left - slack <= x <= self.left + self.width + slack
            and self.top - slack <= y <= self.top + self.height + slack
        )


@dataclass(frozen=True, slots=True)
class Format:
    """A print format: the trimmed page size and where the post reads the address.

    :param kind: ``letter`` or ``postcard``.
    :param address_zone: where every line of the recipient's address must be, on the
        piece's address page, for the envelope window or the post's reading machines.
    :param address_page: which page of the piece carries the address (0-based).
    :param pages: how many pages a piece has (None: as many as its text needs).
    """

    kind: str
    paper: str
    width: float
    height: float
    address_zone: Zone
    address_page: int
    pages: int | None
    label: str

    def matches(self, width: float, height: float, *, slack: float = 0.6) -> bool:
        return abs(self.width - width) <= slack and abs(self.height - height) <= slack


LETTER = {
    # DIN 5008 form B: the address field starts 45 mm from the top and 20 mm from the left;
    # its lower 27.3 mm (from 62.7 mm) hold the recipient, for DL and C5/6 window envelopes.
    "A4": Format("letter", "A4", 210.0, 297.0, Zone(20.0, 62.7, 85.0, 27.3), 0, None, "A4 letter"),
    # A #10 window envelope's window is 4 1/2 x 1 1/8 in, 7/8 in from the left; folded in
    # three, the letter shows the block from about 2 in below its top edge.
    "letter": Format(
        "letter", "letter", 215.9, 279.4, Zone(22.2, 50.8, 101.6, 28.6), 0, None, "US Letter letter"
    ),
}
POSTCARD = {
    # A6: the address zone is the right half below the 40 mm stamp zone and above the
    # 15 mm code zone along the bottom (Deutsche Post, Royal Mail).
    "A4": Format("postcard", "A4", 148.0, 105.0, Zone(78.0, 40.0, 60.0, 50.0), 1, 2, "A6 postcard"),
    # USPS: the address within the OCR read area (1/2 in from the sides, between 5/8 in and
    # 2 3/4 in from the bottom), on the right half, clear of the postage corner.
    "letter": Format(
        "postcard", "letter", 152.4, 101.6, Zone(80.0, 31.75, 59.7, 54.0), 1, 2, "6 x 4 in postcard"
    ),
}


def format_of(width: float, height: float, paper: str) -> Format | None:
    """The known format with this trimmed size, preferring the configured paper's."""
    candidates = [LETTER[paper], POSTCARD[paper], *LETTER.values(), *POSTCARD.values()]
    for fmt in candidates:
        if fmt.matches(width, height):
            return fmt
    return None


# -- the piece data templates see -----------------------------------------------------------------

_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


def letter_date(day: date, country: str) -> str:
    """The date as letters to ``country`` write it: ``November 25, 2026`` in the US and
    Canada, ``25 November 2026`` elsewhere."""
    if country.upper() in ("US", "CA"):
        return f"{_MONTHS[day.month - 1]} {day.day}, {day.year}"
    return f"{day.day} {_MONTHS[day.month - 1]} {day.year}"


def return_address(settings: Settings) -> tuple[str, ...]:
    """The sender's address as printed on every piece, one line each."""
    configured = settings.print.return_address
    if configured:
        return configured
    postal = settings.sender.postal_address
    return (postal,) if postal else ()


def reference(batch: int | None, sequence: int | None) -> str:
    """The piece's mark, printed small on it: batch and place in the batch (``B12-0034``)."""
    if batch is None or sequence is None:
        return "PREVIEW"
    return f"B{batch}-{sequence:04d}"


def piece_context(
    settings: Settings,
    lead: Mapping[str, Any],
    *,
    day: date,
    batch: int | None = None,
    sequence: int | None = None,
) -> dict[str, Any]:
    """``piece`` as print templates see it.

    ``piece.address`` is the recipient's block as the destination's post wants it,
    ``piece.return_address`` the sender's lines (``piece.return_line`` on one line, for
    the line above the window), ``piece.date_text`` the date as the destination writes
    it, ``piece.paper`` ``A4`` or ``letter``, ``piece.reference`` the piece's mark.
    """
    checked = check_address(lead, home_country=settings.print.country)
    lines = return_address(settings)
    return {
        "paper": settings.print.paper,
        "address": list(checked.block),
        "address_complete": checked.complete,
        "country": checked.address.country,
        "return_address": list(lines),
        "return_line": " · ".join(lines),
        "date": day.isoformat(),
        "date_text": letter_date(day, checked.address.country or settings.print.country),
        "reference": reference(batch, sequence),
        "batch": batch,
        "sequence": sequence,
    }


def template_name(step: Step) -> str:
    """The template file a ``mail`` step prints (``cold/02-postcard.letter.html.j2``)."""
    return f"{step.template}.letter.html.j2"


def render_piece_html(
    renderer: Renderer,
    *,
    step: Step,
    tier: str,
    index: int,
    lead: Mapping[str, Any],
    links: Links,
    piece: Mapping[str, Any],
) -> str:
    """The HTML of one piece: the step's print template with the same context as the
    dispatcher gives it, plus ``piece``. Raises :class:`RenderError` with file and line."""
    settings = renderer.settings
    sender = settings.sender
    events = {name: renderer.invitation(name).context() for name in settings.events}
    context: dict[str, Any] = {
        "lead": dict(lead),
        "sender": {
            "name": sender.from_name,
            "from_name": sender.from_name,
            "from_address": sender.from_address,
            "reply_to": sender.reply_to or sender.from_address,
            "postal_address": sender.postal_address,
        },
        "campaign": settings.campaign,
        "postal_address": sender.postal_address,
        "step": {"id": step.id, "tier": tier, "number": index + 1, "channel": step.channel.value},
        "events": events,
        "unsubscribe_url": links.url,
        "unsubscribe_mailto": links.mailto,
        "piece": dict(piece),
    }
    if step.event is not None and step.event in events:
        context["event"] = events[step.event]
    # Never inline the CSS: WeasyPrint reads the <style> block, @page rules included.
    return renderer.render_template(template_name(step), context, inline_css=False)


# -- HTML to PDF ------------------------------------------------------------------------------------


class Stopped(Exception):
    """Rendering was asked to stop before it finished."""


@dataclass(frozen=True, slots=True)
class Laid:
    """How one piece came out: its pages and their trimmed size, or why it failed."""

    pages: int = 0
    width: float = 0.0
    height: float = 0.0
    error: str = ""


def require_weasyprint() -> None:
    """Load WeasyPrint, or say which system libraries it misses.

    :raises PrintError: Pango (or a library it needs) is not installed.
    """
    try:
        import weasyprint  # type: ignore[import-untyped]  # noqa: F401
    except OSError as exc:
        raise PrintError(
            f"direct mail needs WeasyPrint's system libraries, and they could not be loaded ({exc}); "
            "on Debian or Ubuntu: apt-get install libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 "
            "(docs/direct-mail.md lists them for other systems)"
        ) from None


def _fetcher(root: str) -> Any:
    """A WeasyPrint URL fetcher that reads only ``data:`` URLs and files under ``root``."""
    from urllib.parse import unquote, urlsplit

    from weasyprint.urls import URLFetcher  # type: ignore[import-untyped]

    base = os.path.realpath(root)

    class LocalFetcher(URLFetcher):  # type: ignore[misc]
        def fetch(self, url: str, headers: Any = None) -> Any:
            if url.startswith("file:"):
                path = os.path.realpath(unquote(urlsplit(url).path))
                if path != base and not path.startswith(base + os.sep):
                    raise ValueError(f"{url} is outside the templates folder")
            return super().fetch(url, headers)

    return LocalFetcher(allowed_protocols=("file", "data"), timeout=5)


def _base_url(root: Path) -> str:
    return root.resolve().as_uri() + "/"


_STYLE = re.compile(r'<style(?:\s+type="text/css")?\s*>(.*?)</style\s*>', re.S | re.I)


def _shared_style(html: str) -> tuple[str, str | None]:
    """The page without its ``<style>`` blocks, and their text; or the page as it is.

    The pieces of a batch share their print layout's stylesheet: parsed once and given
    to every piece, it saves a fifth of the layout time. WeasyPrint then applies it as a
    user stylesheet; that cascades the same as the page's own CSS as long as the page has
    no other stylesheet (``<link>``, a ``<style>`` with a media query) and nothing is
    ``!important``, so only such pages are split.
    """
    if "<link" in html or "!important" in html:
        return html, None
    blocks = _STYLE.findall(html)
    if not blocks or html.count("<style") != len(blocks):
        return html, None
    return _STYLE.sub("", html), "\n".join(blocks)


def _layout(htmls: Sequence[str], root: str) -> tuple[list[Any], list[Laid]]:
    """Lay out each piece; a piece WeasyPrint cannot lay out is reported, not fatal."""
    require_weasyprint()
    from weasyprint import CSS, HTML
    from weasyprint.text.fonts import FontConfiguration  # type: ignore[import-untyped]

    fonts = FontConfiguration()
    fetcher = _fetcher(root)
    base = _base_url(Path(root))
    sheets: dict[str, Any] = {}
    documents, laid = [], []
    for html in htmls:
        page, style = _shared_style(html)
        try:
            stylesheets = None
            if style is not None:
                if style not in sheets:
                    sheets[style] = CSS(string=style, base_url=base, url_fetcher=fetcher, font_config=fonts)
                stylesheets = [sheets[style]]
            doc = HTML(string=page, base_url=base, url_fetcher=fetcher).render(
                font_config=fonts, stylesheets=stylesheets
            )
        except Exception as exc:
            laid.append(Laid(error=f"cannot lay out the piece: {type(exc).__name__}: {exc}"))
            continue
        if not doc.pages:
            laid.append(Laid(error="the piece has no pages"))
            continue
        first = doc.pages[0]
        documents.append(doc)
        laid.append(Laid(len(doc.pages), first.width / PX_PER_MM, first.height / PX_PER_MM))
    return documents, laid


def _render_chunk(htmls: Sequence[str], root: str, out: str) -> list[Laid]:
    """Lay out a chunk of pieces and write them as one PDF (in a worker process)."""
    documents, laid = _layout(htmls, root)
    if documents:
        pages = [page for doc in documents for page in doc.pages]
        documents[0].copy(pages).write_pdf(out)
    return laid


def html_to_pdf(html: str, *, root: Path) -> bytes:
    """One piece as PDF bytes (previews and checks); raises :class:`PrintError`."""
    documents, laid = _layout([html], str(root))
    if laid[0].error:
        raise PrintError(laid[0].error)
    data: bytes = documents[0].write_pdf()
    return data


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def render_pdf(
    htmls: Sequence[str],
    *,
    out: Path,
    root: Path,
    labels: Sequence[str],
    title: str,
    workers: int = 0,
    chunk: int = 100,
    stop: threading.Event | None = None,
) -> list[Laid]:
    """Lay out ``htmls`` and write them, in order, as one PDF at ``out`` (fsynced).

    :param root: the templates folder: relative URLs resolve there, and nothing outside
        it may be read.
    :param labels: one outline entry per piece, so the PDF can be browsed by recipient.
    :param workers: processes to lay out with (0: one per CPU, at most 8).
    :param chunk: pieces per process at a time (bounds memory: about 0.5 MB a piece).
    :param stop: when set, rendering stops between chunks and :class:`Stopped` is raised.
    :returns: one :class:`Laid` per piece; pieces with an ``error`` are not in the PDF.
    """
    workers = workers or default_workers()
    size = max(1, min(chunk, math.ceil(len(htmls) / workers))) if htmls else 1
    chunks = [list(htmls[i : i + size]) for i in range(0, len(htmls), size)]
    parts_dir = out.with_name(f".{out.name}.parts")
    parts_dir.mkdir(exist_ok=True)
    parts = [str(parts_dir / f"part-{n:05d}.pdf") for n in range(len(chunks))]
    try:
        laid: list[list[Laid]] = [[] for _ in chunks]
        if workers == 1 or len(chunks) == 1:
            for n, piece_htmls in enumerate(chunks):
                _check_stop(stop)
                laid[n] = _render_chunk(piece_htmls, str(root), parts[n])
        else:
            laid = _render_parallel(chunks, str(root), parts, workers, stop)
        flat = [one for chunk_laid in laid for one in chunk_laid]
        _check_stop(stop)
        _merge(
            [p for p, chunk_laid in zip(parts, laid, strict=True) if any(x.pages for x in chunk_laid)],
            flat,
            labels,
            title,
            out,
        )
        return flat
    finally:
        for part in parts:
            with contextlib.suppress(OSError):
                os.unlink(part)
        with contextlib.suppress(OSError):
            parts_dir.rmdir()


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Stopped


class _Worker:
    """A layout process: chunks in on its stdin, what came out on its stdout, a JSON line each.

    A plain child process rather than :mod:`multiprocessing`: it never re-imports the
    program that started it (the daemon, the command line, a test), never inherits the
    daemon's threads and locks, and ends by itself when its stdin closes, however its
    parent ended.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from campaignd.printing import worker_main; worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )

    def run(self, htmls: list[str], root: str, out: str) -> list[Laid]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"htmls": htmls, "root": root, "out": out}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise PrintError(f"a layout process stopped (exit status {self.proc.wait()})")
        return [Laid(**one) for one in json.loads(answer)]

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def worker_main() -> None:
    """The body of a layout process (see :class:`_Worker`)."""
    for line in sys.stdin:
        job = json.loads(line)
        laid = _render_chunk(job["htmls"], job["root"], job["out"])
        sys.stdout.write(json.dumps([dataclasses.asdict(one) for one in laid]) + "\n")
        sys.stdout.flush()


def _render_parallel(
    chunks: list[list[str]], root: str, parts: list[str], workers: int, stop: threading.Event | None
) -> list[list[Laid]]:
    """Lay the chunks out in ``workers`` processes, each taking the next chunk when done."""
    laid: list[list[Laid]] = [[] for _ in chunks]
    todo = iter(range(len(chunks)))
    lock = threading.Lock()
    failures: list[BaseException] = []

    def feed(worker: _Worker) -> None:
        try:
            while True:
                with lock:
                    if failures or (stop is not None and stop.is_set()):
                        return
                    n = next(todo, None)
                if n is None:
                    return
                laid[n] = worker.run(chunks[n], root, parts[n])
        except BaseException as exc:
            with lock:
                failures.append(exc)

    pool = [_Worker() for _ in range(min(workers, len(chunks)))]
    try:
        threads = [threading.Thread(target=feed, args=(w,), name="layout", daemon=True) for w in pool]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for worker in pool:
            worker.close()
    if failures:
        raise failures[0]
    _check_stop(stop)
    return laid


def _merge(parts: list[str], laid: list[Laid], labels: Sequence[str], title: str, out: Path) -> None:
    from pypdf import PdfWriter

    writer = PdfWriter()
    for part in parts:
        writer.append(part, import_outline=False)
    page = 0
    for piece, label in zip(laid, labels, strict=True):
        if piece.pages:
            writer.add_outline_item(title=label, page_number=page)
            page += piece.pages
    writer.add_metadata({"/Title": title, "/Creator": "campaignd"})
    with out.open("wb") as fh:
        writer.write(fh)
        fh.flush()
        os.fsync(fh.fileno())


# -- reading PDFs back --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Font:
    name: str
    embedded: bool


@dataclass(frozen=True, slots=True)
class PageFacts:
    """One page as a print shop's preflight sees it (sizes in mm)."""

    width: float
    height: float
    """The trimmed size (the TrimBox)."""
    media_width: float
    media_height: float
    """The sheet, bleed included (the MediaBox)."""
    trim_left: float
    trim_top: float
    """Where the trimmed page starts on the sheet, from its top-left corner."""
    fonts: tuple[Font, ...]
    text: str = ""


def read_pdf(data: bytes | Path, *, text: bool = True) -> list[PageFacts]:
    """Every page of a PDF: sizes, fonts (and whether each is embedded), and its text."""
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data) if isinstance(data, bytes) else data)
    return [_page_facts(page, text) for page in reader.pages]


def pdf_outline(path: Path) -> tuple[int, PageFacts]:
    """How many pages a PDF has, and its first page (cheap for a PDF of thousands of pages)."""
    from pypdf import PdfReader

    reader = PdfReader(path)
    return len(reader.pages), _page_facts(reader.pages[0], False)


def _page_facts(page: Any, with_text: bool) -> PageFacts:
    trim, media = page.trimbox, page.mediabox
    fonts: dict[str, Font] = {}
    resources = page.get("/Resources")
    font_dict = resources.get_object().get("/Font") if resources is not None else None
    for ref in (font_dict or {}).values():
        font = ref.get_object()
        descriptor = font.get("/FontDescriptor")
        if descriptor is None and font.get("/DescendantFonts"):
            descriptor = font["/DescendantFonts"][0].get_object().get("/FontDescriptor")
        descriptor = descriptor.get_object() if descriptor is not None else {}
        embedded = any(k in descriptor for k in ("/FontFile", "/FontFile2", "/FontFile3"))
        name = str(font.get("/BaseFont", "?")).lstrip("/").split("+", 1)[-1]
        fonts[name] = Font(name, embedded)
    return PageFacts(
        width=float(trim.width) / PT_PER_MM,
        height=float(trim.height) / PT_PER_MM,
        media_width=float(media.width) / PT_PER_MM,
        media_height=float(media.height) / PT_PER_MM,
        trim_left=(float(trim.left) - float(media.left)) / PT_PER_MM,
        trim_top=(float(media.top) - float(trim.top)) / PT_PER_MM,
        fonts=tuple(fonts.values()),
        text=" ".join(page.extract_text().split()) if with_text else "",
    )


# -- where the text is -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """A line of text on a page: its box in mm from the trimmed page's top-left corner."""

    text: str
    left: float
    top: float
    right: float
    bottom: float
    size: float = 0.0
    """The font size in points."""


def laid_out_lines(page: Any) -> list[Line]:
    """The lines of a page as WeasyPrint laid them out (margin boxes included)."""
    from weasyprint.formatting_structure import boxes  # type: ignore[import-untyped]

    out: list[Line] = []

    def walk(box: Any) -> None:
        if isinstance(box, boxes.LineBox):
            texts = [b for b in box.descendants() if isinstance(b, boxes.TextBox)]
            text = " ".join("".join(b.text for b in texts).split())
            if text:
                left = min(b.position_x for b in texts)
                right = max(b.position_x + b.width for b in texts)
                out.append(
                    Line(
                        text,
                        left / PX_PER_MM,
                        box.position_y / PX_PER_MM,
                        right / PX_PER_MM,
                        (box.position_y + box.height) / PX_PER_MM,
                        max(b.style["font_size"] for b in texts) * 0.75,
                    )
                )
            return
        for child in getattr(box, "children", ()):
            walk(child)

    walk(page._page_box)
    return out


def find_line(lines: Sequence[Line], text: str) -> Line | None:
    """The line whose text is ``text`` (spaces normalised), or None."""
    wanted = " ".join(text.split())
    for line in lines:
        if line.text == wanted:
            return line
    return None


def inside(zone: Zone, line: Line, *, slack: float = 0.5) -> bool:
    """Whether the whole of ``line`` lies in ``zone``."""
    return zone.contains(line.left, line.top, slack=slack) and zone.contains(
        line.right, line.bottom, slack=slack
    )


# -- checking print templates --------------------------------------------------------------------------

SAMPLE_LINKS = Links(url="https://unsubscribe.example/u/1.sample", mailto="")


def email_fallback(step: Step) -> Step:
    """The email a ``mail`` step sends instead to a lead without a postal address: the
    step's own ``.subject.j2``, ``.html.j2`` and ``.txt.j2`` beside its print template."""
    return step.model_copy(update={"channel": Channel.EMAIL})


class PrintCheck:
    """The print checks ``templates check`` runs for each ``mail`` step and sample lead.

    Renders the piece as the print batch would (with ``piece``), lays it out with
    WeasyPrint and checks the result: the page must be one of the print formats of the
    configured paper, a postcard must have exactly two pages, every font must be embedded
    in the PDF, every line of the recipient's address must lie inside the address zone of
    the address page (for a sample whose address is complete), and the return address must
    be printed. CSS that WeasyPrint ignores is reported too. With ``[print]
    without_address = "email"``, the step's email parts are checked like any email step.
    Use it as a :class:`campaignd.render.LetterCheck`.

    :param settings: the configuration (paper, country, return address).
    :param day: the date printed on the sample pieces.
    """

    def __init__(self, *, settings: Settings, day: date) -> None:
        self.settings = settings
        self.day = day
        self._renderer: Renderer | None = None
        self._fallbacks_checked: set[tuple[str, str]] = set()

    def __call__(
        self, *, step: Step, tier: str, lead: Mapping[str, Any], html: str, source: str
    ) -> list[Problem]:
        if self._renderer is None:
            self._renderer = Renderer(settings=self.settings)
        problems = self._fallback(step, tier)
        piece = piece_context(self.settings, lead, day=self.day)
        try:
            page_html = render_piece_html(
                self._renderer,
                step=step,
                tier=tier,
                index=_step_index(self.settings, tier, step),
                lead=lead,
                links=SAMPLE_LINKS,
                piece=piece,
            )
        except RenderError as exc:
            return [*problems, exc.problem]
        who = f"sample lead {lead.get('email', '?')}"
        with weasyprint_warnings() as warnings:
            documents, laid = _layout([page_html], str(self.settings.templates))
        problems += [Problem(source, "", f"WeasyPrint: {w}") for w in dict.fromkeys(warnings)]
        if laid[0].error:
            return [*problems, Problem(source, "", f"{laid[0].error} ({who})")]
        document = documents[0]
        pages = read_pdf(document.write_pdf(), text=False)
        lines = [laid_out_lines(page) for page in document.pages]
        return problems + check_piece(
            pages, lines, settings=self.settings, piece=piece, source=source, who=who
        )

    def _fallback(self, step: Step, tier: str) -> list[Problem]:
        """Problems of the email a lead without a postal address gets instead (once a step)."""
        if self.settings.print.without_address != "email" or (tier, step.id) in self._fallbacks_checked:
            return []
        self._fallbacks_checked.add((tier, step.id))
        email = email_fallback(step)
        only = self.settings.model_copy(update={"sequences": {Tier(tier): StepSequence(steps=(email,))}})
        why = f"the email that replaces {tier}/{step.id} for leads without a postal address"
        return [
            Problem(p.source, p.where, f"{p.reason} ({why})")
            for p in Renderer(settings=only).check(sample_links=SAMPLE_LINKS)
        ]


def check_piece(
    pages: Sequence[PageFacts],
    lines: Sequence[Sequence[Line]],
    *,
    settings: Settings,
    piece: Mapping[str, Any],
    source: str,
    who: str,
) -> list[Problem]:
    """What is wrong with one printed piece, for the print shop and the post.

    :param pages: the piece's pages as read from its PDF.
    :param lines: each page's lines of text, where they were laid out.
    """
    paper = settings.print.paper
    if not pages:
        return [Problem(source, "", f"the piece has no pages ({who})")]
    first = pages[0]
    fmt = format_of(first.width, first.height, paper)
    if fmt is None or fmt.paper != paper:
        return [
            Problem(
                source,
                "",
                f"the page is {first.width:.1f} x {first.height:.1f} mm; with print.paper = "
                f"'{paper}' a piece is an {LETTER[paper].label} or a {POSTCARD[paper].label}: "
                "extend print/letter.html.j2 or print/postcard.html.j2 rather than setting @page",
            )
        ]
    problems: list[Problem] = []
    if fmt.pages is not None and len(pages) != fmt.pages:
        problems.append(
            Problem(source, "", f"a postcard has 2 pages (front, address side); this one has {len(pages)}")
        )
    for n, page in enumerate(pages):
        if not fmt.matches(page.width, page.height):
            problems.append(Problem(source, "", f"page {n + 1} is not {fmt.label} size like page 1"))
        for font in page.fonts:
            if not font.embedded:
                problems.append(Problem(source, "", f"the font {font.name} is not embedded in the PDF"))
    zone = fmt.address_zone
    if piece.get("address_complete") and fmt.address_page < len(lines):
        page_lines = lines[fmt.address_page]
        for text in piece["address"]:
            line = find_line(page_lines, text)
            if line is None:
                problems.append(
                    Problem(
                        source,
                        "",
                        f"the address line {text!r} is not printed on its own line on page "
                        f"{fmt.address_page + 1}: print piece.address (the print layouts do this for you)",
                    )
                )
            elif not inside(zone, line):
                problems.append(
                    Problem(
                        source,
                        "",
                        f"the address line {text!r} is at {line.left:.0f}-{line.right:.0f} mm across, "
                        f"{line.top:.0f}-{line.bottom:.0f} mm down, outside the {fmt.label}'s address zone "
                        f"({zone.left:.0f}-{zone.left + zone.width:.0f} mm across, "
                        f"{zone.top:.0f}-{zone.top + zone.height:.0f} mm down) ({who})",
                    )
                )
    returned = piece["return_address"][:1]
    printed = " ".join(line.text for page_lines in lines for line in page_lines)
    if returned and " ".join(returned[0].split()) not in printed:
        problems.append(
            Problem(
                source,
                "",
                "the return address is not printed: include piece.return_address "
                "(the print layouts do this for you)",
            )
        )
    return list(dict.fromkeys(problems))


def _step_index(settings: Settings, tier: str, step: Step) -> int:
    for index, candidate in enumerate(settings.sequence(tier).steps):
        if candidate.id == step.id:
            return index
    return 0


@contextmanager
def weasyprint_warnings() -> Iterator[list[str]]:
    """Collect what WeasyPrint logs about the document (ignored CSS, refused files)."""
    collected: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            collected.append(record.getMessage())

    handler = Collect(logging.WARNING)
    target = logging.getLogger("weasyprint")
    target.addHandler(handler)
    try:
        yield collected
    finally:
        target.removeHandler(handler)


def preview_pdf(
    settings: Settings,
    *,
    tier: Tier | str,
    step: Step,
    lead: Mapping[str, Any],
    links: Links,
    day: date,
    renderer: Renderer | None = None,
) -> bytes:
    """One ``mail`` step printed for one lead, as the print batch would print it.

    For ``templates preview --format pdf``: ``lead`` is a sample lead or a real one (as
    :func:`campaignd.render.lead_context` makes it). Raises :class:`RenderError` (file and
    line) or :class:`PrintError`.
    """
    if step.channel != Channel.MAIL:
        raise PrintError(f"step {tier}/{step.id} is an email step; only direct-mail steps print")
    renderer = renderer or Renderer(settings=settings)
    html = render_piece_html(
        renderer,
        step=step,
        tier=str(tier),
        index=_step_index(settings, str(tier), step),
        lead=lead,
        links=links,
        piece=piece_context(settings, lead, day=day),
    )
    return html_to_pdf(html, root=settings.templates)
