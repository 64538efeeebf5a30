"""Benchmark of a print batch: export 1,000 letters as one batch, as the daemon would.

Sets up a throw-away state directory and SQLite database, imports the leads (mostly in
the United States, some in each other country campaignd knows, with accented names,
companies and second address lines), lets the real dispatcher queue one direct-mail
piece for each, then times :meth:`campaignd.directmail.PrintBatches.export`: the print
templates rendered for each lead, the layout by WeasyPrint (in worker processes, one
per CPU unless told otherwise), the merged PDF, the manifest and summary, the fsyncs and
the transaction that records the batch. Prints the wall time, the CPU time of this
process and its workers (which weighs less when other programs share the machine), and
the peak memory of this process and of the largest worker.

The budget is 60 seconds for 1,000 letters. Run from the repository root::

    .venv/bin/python bench/print_batch.py
    .venv/bin/python bench/print_batch.py --letters 200 --template cold/02-postcard --paper A4
    .venv/bin/python bench/print_batch.py --workers 1          # one process
    .venv/bin/python bench/print_batch.py --compare 40         # merged PDF against one PDF a letter
    .venv/bin/python bench/print_batch.py --keep /tmp/batch    # keep the batch folder to look at
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, date, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from campaignd import database  # noqa: E402
from campaignd.config import Settings, Step, load_settings  # noqa: E402
from campaignd.daemon import prepare  # noqa: E402
from campaignd.directmail import DirectMailChannel, PrintBatches  # noqa: E402
from campaignd.engine import Dispatcher  # noqa: E402
from campaignd.printing import (  # noqa: E402
    default_workers,
    html_to_pdf,
    piece_context,
    read_pdf,
    render_pdf,
    render_piece_html,
)
from campaignd.render import Renderer  # noqa: E402
from campaignd.store import LeadInput, Store  # noqa: E402
from campaignd.testing import MemoryChannel  # noqa: E402
from campaignd.unsubscribe import Links  # noqa: E402

FIRST = ["Maria", "Tom", "Aisha", "Liam", "Sophie", "Zoë", "Björn", "Chloé", "José", "Wei", "Ngozi", "Ann"]
LAST = ["Garcia", "Smith", "Khan", "O'Brien", "Ñúñez", "Müller", "Dubois", "Okafor", "Nakamura", "Lee"]
COMPANY = ["Lakeside Dental", "", "Brook & Sons", "Oak Street Bakery", "Müller GmbH", "", "Riverside Storage"]
ABROAD = [
    {"address_line1": "14 Mill Lane", "city": "Leeds", "postal_code": "LS6 2AB", "country": "GB"},
    {
        "address_line1": "350 Rue Saint-Paul O",
        "city": "Montréal",
        "region": "QC",
        "postal_code": "H2Y 2A7",
        "country": "CA",
    },
    {"address_line1": "Hauptstraße 12", "city": "Dresden", "postal_code": "01067", "country": "DE"},
    {"address_line1": "8 rue de l'Église", "city": "Lyon", "postal_code": "69002", "country": "FR"},
    {
        "address_line1": "27 George Street",
        "city": "Parramatta",
        "region": "NSW",
        "postal_code": "2150",
        "country": "AU",
    },
]
STREETS = ["Elm", "Oak", "Main", "Walnut"]
US_TOWNS = [
    ("Springfield", "IL", "627"),
    ("Chicago", "IL", "606"),
    ("Boston", "MA", "021"),
    ("Austin", "TX", "787"),
]


def make_config(state: Path, *, template: str, paper: str, workers: int) -> Path:
    path = state / "campaignd.toml"
    path.write_text(
        f"""
state_dir = "{state}"
templates = "{REPO / "templates"}"
timezone = "America/Chicago"

[sender]
from_name = "Harbor Home Services"
from_address = "hello@harborhome.example"
reply_to = "sales@harborhome.example"
postal_address = "Harbor Home Services, 418 Lakeshore Drive, Springfield, IL 62704, USA"

[dispatch]
batch_size = 5000

[print]
paper = "{paper}"
schedule = ""
workers = {workers}
return_address = ["Harbor Home Services", "418 Lakeshore Drive", "Springfield IL 62704"]

[campaign]
tagline = "Heating, insulation and repairs for local businesses"

[campaign.offer]
headline = "a free home energy check"
pitch = "cut their heating bills with small, well-planned repairs"
expires = "31 January"
url = "https://harborhome.example/offer"

[campaign.contact]
name = "Dana Whitfield"
title = "Owner, Harbor Home Services"
phone = "+1 217 555 0142"

[sequences.cold]
steps = [{{ template = "{template}", channel = "mail", delay = "0s" }}]
"""
    )
    return path


def make_leads(n: int, seed: int = 11) -> list[LeadInput]:
    rnd = random.Random(seed)
    leads = []
    for i in range(n):
        if rnd.random() < 0.8:
            town, state, zip3 = rnd.choice(US_TOWNS)
            place = {
                "address_line1": f"{rnd.randint(1, 9999)} {rnd.choice(STREETS)} Street",
                "city": town,
                "region": state,
                "postal_code": f"{zip3}{rnd.randint(0, 99):02d}",
                "country": "US",
            }
        else:
            place = dict(rnd.choice(ABROAD))
        if rnd.random() < 0.3:
            place["address_line2"] = f"Suite {rnd.randint(1, 400)}"
        leads.append(
            LeadInput(
                email=f"lead{i:05d}@example.com",
                first_name=rnd.choice(FIRST),
                last_name=rnd.choice(LAST),
                company=rnd.choice(COMPANY),
                **place,
            )
        )
    return leads


def queue_pieces(settings: Settings, store: Store, n: int, now: datetime) -> int:
    """Import ``n`` leads and let the real dispatcher queue a piece for each."""
    store.upsert_leads(make_leads(n), tier="cold", now=now)
    renderer, signer = prepare(settings)
    dispatcher = Dispatcher(
        store=store,
        settings=settings,
        renderer=renderer,
        signer=signer,
        channels={"email": MemoryChannel(), "mail": DirectMailChannel(settings=settings.print)},
        worker="bench:1",
        clock=lambda: now,
    )
    report = asyncio.run(dispatcher.run_pass(now))
    return report.for_print


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process, and by its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def compare(settings: Settings, n: int) -> None:
    """One merged PDF against one PDF a letter, in this one process, for ``n`` letters."""
    renderer = Renderer(settings=settings)
    step: Step = settings.sequence("cold").steps[0]
    links = Links(url="https://harborhome.example/campaignd/u/1.x", mailto="")
    leads = [{**asdict(x), "name": f"{x.first_name} {x.last_name}"} for x in make_leads(n)]
    htmls = [
        render_piece_html(
            renderer,
            step=step,
            tier="cold",
            index=0,
            lead=lead,
            links=links,
            piece=piece_context(settings, lead, day=date(2027, 1, 12), batch=1, sequence=i + 1),
        )
        for i, lead in enumerate(leads)
    ]
    html_to_pdf(htmls[0], root=settings.templates)  # fonts and imports warmed up for both
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        render_pdf(
            htmls,
            out=Path(out) / "merged.pdf",
            root=settings.templates,
            labels=[""] * n,
            title="x",
            workers=1,
        )
        merged = time.perf_counter() - started
        started = time.perf_counter()
        for i, html in enumerate(htmls):
            (Path(out) / f"{i}.pdf").write_bytes(html_to_pdf(html, root=settings.templates))
        single = time.perf_counter() - started
    print(
        f"\n{n} letters in one process: merged PDF {merged:.1f} s, one PDF a letter {single:.1f} s "
        f"({single / merged:.1f} times as long)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--letters", type=int, default=1000, help="pieces in the batch")
    parser.add_argument("--template", default="print/examples/sales-letter", help="the print template")
    parser.add_argument("--paper", choices=["A4", "letter"], default="letter")
    parser.add_argument("--workers", type=int, default=0, help="layout processes (0: one per CPU)")
    parser.add_argument(
        "--compare", type=int, default=0, metavar="N", help="also time N letters one PDF each"
    )
    parser.add_argument("--keep", type=Path, help="copy the batch folder here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        settings = load_settings(
            make_config(state, template=args.template, paper=args.paper, workers=args.workers),
            environ={},
            dotenv=None,
        )
        engine = database.create_engine(settings.database_url)
        database.upgrade(engine)
        store = Store(engine=engine)
        now = datetime(2027, 1, 12, 21, 0, tzinfo=UTC)
        queued = queue_pieces(settings, store, args.letters, now)
        print(
            f"{queued} pieces of {args.template} waiting "
            f"({args.paper}, {settings.print.workers or 'auto'} workers)"
        )

        (own0, kids0), started = cpu_seconds(), time.perf_counter()
        [done] = PrintBatches(settings=settings, store=store).export(now=now)
        wall = time.perf_counter() - started
        own1, kids1 = cpu_seconds()
        own_cpu, kids_cpu = own1 - own0, kids1 - kids0
        assert done.batch is not None and done.path is not None
        pdf = done.path / f"{done.path.name}.pdf"
        pages = len(read_pdf(pdf, text=False))
        assert done.batch.pieces == queued and pages == done.batch.pages
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        workers = settings.print.workers or default_workers()
        # What the export takes when nothing else wants the CPUs: this process's part runs
        # alone, the workers' part is shared among them.
        alone = own_cpu + kids_cpu / min(workers, os.cpu_count() or 1)
        print(
            f"batch {done.batch.id}: {done.batch.pieces} pieces, {pages} pages, "
            f"{pdf.stat().st_size / 1e6:.1f} MB PDF"
        )
        print(f"export: {wall:.1f} s wall ({wall / queued * 1000:.0f} ms a piece)")
        print(
            f"CPU: {own_cpu:.1f} s in this process, {kids_cpu:.1f} s in {workers} layout processes "
            f"({(own_cpu + kids_cpu) / queued * 1000:.0f} ms a piece); on otherwise idle CPUs about "
            f"{alone:.0f} s (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
        )
        print(f"peak memory: {own:.0f} MB this process, {child:.0f} MB the largest layout process")
        scale = 1000 / queued
        print(
            f"budget: 60 s for 1,000 letters: {wall * scale:.0f} s measured, {alone * scale:.0f} s "
            "on idle CPUs (scaled to 1,000)"
        )
        if args.keep:
            shutil.copytree(done.path, args.keep, dirs_exist_ok=True)
            print(f"kept in {args.keep}")
        if args.compare:
            compare(settings, args.compare)
        engine.dispose()


if __name__ == "__main__":
    main()
