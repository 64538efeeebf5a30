"""Direct mail against the real databases and WeasyPrint: the channel, print batches, PDFs.

Every PDF here is made by the real templates and read back: with pypdf for the page count,
sizes and embedded fonts, and with poppler's ``pdftotext`` for where each address line is
(on the right page, inside the envelope window or the postcard's address zone), and the
manifest is checked against the PDF. Time is passed in; the
dispatcher's clock is a variable the test moves.
"""

from __future__ import annotations

import asyncio
import csv
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from campaignd import directmail
from campaignd.addresses import check_address
from campaignd.channels import Outcome, Outgoing
from campaignd.config import Channel, Settings, Step, load_settings
from campaignd.daemon import prepare
from campaignd.database import create_engine
from campaignd.directmail import (
    FALLBACK,
    DirectMailChannel,
    ExportBusy,
    PrintBatches,
    PrintBatchService,
    batch_folder,
    partial_folder,
    previous_fire,
    trigger_for,
)
from campaignd.engine import Dispatcher
from campaignd.exceptions import CampaigndError
from campaignd.models import LeadStatus, SuppressionReason, TouchStatus
from campaignd.printing import (
    LETTER,
    POSTCARD,
    PrintCheck,
    Zone,
    email_fallback,
    html_to_pdf,
    piece_context,
    preview_pdf,
    read_pdf,
    render_pdf,
    render_piece_html,
    weasyprint_warnings,
)
from campaignd.render import Renderer, lead_context
from campaignd.sequences import Policy, decide
from campaignd.services import ServiceContext
from campaignd.store import LeadInput, Store
from campaignd.testing import MemoryChannel
from campaignd.unsubscribe import Links
from tests.factories import REPO, TEMPLATES

T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)  # a Monday, 09:00 in Chicago
DAY = date(2026, 3, 2)
LINKS = Links(url="https://harborhome.example/campaignd/u/1.sample", mailto="")

SEQUENCES = """
[sequences.cold]
steps = [
  { template = "cold/02-postcard", channel = "mail", delay = "0s" },
  { template = "cold/03-reminder", delay = "1d" },
]

[sequences.warm]
steps = [
  { id = "sales-letter", template = "print/examples/sales-letter", channel = "mail", delay = "0s" },
]
"""


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_settings(
    tmp_path: Path,
    *,
    paper: str = "letter",
    country: str = "US",
    print_extra: str = "",
    sequences: str = SEQUENCES,
    threshold: int = 5,
    templates: Path = TEMPLATES,
    database: str = "",
    extra: str = "",
    workers: int = 1,
) -> Settings:
    """Write ``campaignd.toml`` in ``tmp_path`` (the CLI can use it too) and load it."""
    path = tmp_path / "campaignd.toml"
    database_table = f'[database]\nurl = "{database}"\n' if database else ""
    path.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
templates = "{templates}"
timezone = "America/Chicago"

[sender]
from_name = "Harbor Home Services"
from_address = "hello@harborhome.example"
reply_to = "sales@harborhome.example"
postal_address = "Harbor Home Services, 418 Lakeshore Drive, Springfield, IL 62704, USA"

{database_table}
[followup]
threshold = {threshold}
{extra}

[unsubscribe]
base_url = "https://harborhome.example/campaignd"
mailto = "unsubscribe@harborhome.example"

[print]
paper = "{paper}"
country = "{country}"
schedule = ""
workers = {workers}
return_address = ["Harbor Home Services", "418 Lakeshore Drive", "Springfield IL 62704"]
{print_extra}

[campaign.offer]
headline = "a free home energy check"
pitch = "cut their heating bills"
details = "An engineer walks your building with a thermal camera."
expires = "31 January"
url = "https://harborhome.example/offer"

[campaign.contact]
name = "Dana Whitfield"
title = "Owner, Harbor Home Services"
phone = "+1 217 555 0142"

{sequences}
"""
    )
    return load_settings(path, environ={}, dotenv=None)


def with_schedule(settings: Settings, schedule: str) -> Settings:
    return settings.model_copy(update={"print": settings.print.model_copy(update={"schedule": schedule})})


def sample_recipients() -> list[dict[str, Any]]:
    """The print samples: one lead in each country whose post campaignd knows."""
    with (TEMPLATES / "print" / "sample.toml").open("rb") as fh:
        leads: list[dict[str, Any]] = tomllib.load(fh)["lead"]
    return leads


def add_sample_leads(store: Store, *, tier: str = "cold", now: datetime = T0) -> list[str]:
    rows = [LeadInput(**{k: v for k, v in lead.items() if k != "custom"}) for lead in sample_recipients()]
    store.upsert_leads(rows, tier=tier, now=now)
    return [r.email for r in rows]


def dispatcher_for(settings: Settings, store: Store, clock: Clock) -> tuple[Dispatcher, MemoryChannel]:
    renderer, signer = prepare(settings)
    email = MemoryChannel()
    dispatcher = Dispatcher(
        store=store,
        settings=settings,
        renderer=renderer,
        signer=signer,
        channels={"email": email, "mail": DirectMailChannel(settings=settings.print)},
        worker="test:1",
        clock=clock,
    )
    return dispatcher, email


def manifest(folder: Path, batch_id: int) -> list[dict[str, str]]:
    with (folder / f"batch-{batch_id:06d}-manifest.csv").open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def assert_manifest_matches_pdf(
    folder: Path, batch_id: int, settings: Settings, *, kind: str
) -> list[dict[str, str]]:
    """Every manifest row's page range holds that piece, address in the zone; nothing else."""
    rows = manifest(folder, batch_id)
    pdf = folder / f"batch-{batch_id:06d}.pdf"
    pages = read_pdf(pdf)
    fmt = (LETTER if kind == "letter" else POSTCARD)[settings.print.paper]
    expected_page = 1
    for n, row in enumerate(rows, 1):
        assert int(row["sequence"]) == n
        first, last = int(row["first_page"]), int(row["last_page"])
        assert first == expected_page and last - first + 1 == int(row["pages"])
        expected_page = last + 1
        piece = pages[first - 1 : last]
        if fmt.pages is not None:
            assert len(piece) == fmt.pages
        for page in piece:
            assert fmt.matches(page.width, page.height), (page.width, page.height)
            assert page.fonts and all(f.embedded for f in page.fonts)
        lines = pdf_lines(pdf, first + fmt.address_page)
        block = row["address_block"].split("\n")
        assert block[0] == row["recipient"]
        for line in block:
            found = locate(lines, line)
            assert found is not None, f"{line!r} not on page {first + fmt.address_page}"
            assert found.inside(fmt.address_zone), found
        # The piece is marked with its reference on its own pages.
        assert row["reference"] in " ".join(p.text for p in piece)
    assert expected_page - 1 == len(pages)
    return rows


# -- reading the PDF back with another engine: where poppler finds each line --------------------------


@dataclass(frozen=True)
class Placed:
    """Words found on a page, their box in mm from the trimmed page's top-left corner."""

    text: str
    left: float
    top: float
    right: float
    bottom: float

    def inside(self, zone: Zone) -> bool:
        return zone.contains(self.left, self.top) and zone.contains(self.right, self.bottom)


def pdf_lines(pdf: Path, page: int) -> list[list[Placed]]:
    """Each line of page ``page`` (1-based) as poppler's ``pdftotext -bbox-layout`` reads it."""
    facts = read_pdf(pdf, text=False)[page - 1]
    xml = subprocess.run(
        ["pdftotext", "-bbox-layout", "-f", str(page), "-l", str(page), str(pdf), "-"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    ns = "{http://www.w3.org/1999/xhtml}"
    mm = 72 / 25.4
    lines = []
    for line in ElementTree.fromstring(xml).iter(f"{ns}line"):
        lines.append(
            [
                Placed(
                    w.text or "",
                    float(w.get("xMin", 0)) / mm - facts.trim_left,
                    float(w.get("yMin", 0)) / mm - facts.trim_top,
                    float(w.get("xMax", 0)) / mm - facts.trim_left,
                    float(w.get("yMax", 0)) / mm - facts.trim_top,
                )
                for w in line.iter(f"{ns}word")
            ]
        )
    return lines


def locate(lines: list[list[Placed]], text: str) -> Placed | None:
    """Where the words of ``text`` stand together on one line, or None."""
    wanted = text.split()
    for words in lines:
        got = [w.text for w in words]
        for i in range(len(got) - len(wanted) + 1):
            if got[i : i + len(wanted)] == wanted:
                span = words[i : i + len(wanted)]
                return Placed(
                    text,
                    min(w.left for w in span),
                    min(w.top for w in span),
                    max(w.right for w in span),
                    max(w.bottom for w in span),
                )
    return None


# -- the PDFs themselves --------------------------------------------------------------------------


def _render_samples(tmp_path: Path, settings: Settings, template: str, tier: str) -> tuple[Path, list[Any]]:
    renderer = Renderer(settings=settings)
    step = Step(template=template, channel=Channel.MAIL)
    leads = sample_recipients()
    htmls = [
        render_piece_html(
            renderer,
            step=step,
            tier=tier,
            index=0,
            lead={**lead, "name": f"{lead['first_name']} {lead['last_name']}"},
            links=LINKS,
            piece=piece_context(settings, lead, day=DAY, batch=7, sequence=n),
        )
        for n, lead in enumerate(leads, 1)
    ]
    out = tmp_path / "samples.pdf"
    laid = render_pdf(
        htmls,
        out=out,
        root=settings.templates,
        labels=[lead["email"] for lead in leads],
        title="samples",
        workers=1,
    )
    return out, laid


@pytest.mark.parametrize("paper", ["A4", "letter"])
def test_letters_print_on_their_paper_with_every_address_in_the_window(tmp_path: Path, paper: str) -> None:
    settings = make_settings(tmp_path, paper=paper)
    out, laid = _render_samples(tmp_path, settings, "print/examples/sales-letter", "warm")
    pages = read_pdf(out)
    fmt = LETTER[paper]
    assert [x.error for x in laid] == [""] * 6
    assert len(pages) == sum(x.pages for x in laid) == 6  # one page each
    page = 0
    for lead, one in zip(sample_recipients(), laid, strict=True):
        first = pages[page]
        assert (round(first.width, 1), round(first.height, 1)) == (fmt.width, fmt.height)
        assert (first.media_width, first.media_height) == pytest.approx((first.width, first.height))
        assert first.fonts and all(f.embedded for f in first.fonts)
        assert {f.name for f in first.fonts} >= {"Liberation-Sans", "Liberation-Serif"}
        lines = pdf_lines(out, page + 1)
        block = check_address(lead, home_country="US").block
        for line in block:
            found = locate(lines, line)
            assert found is not None, f"{line!r} missing from the letter to {lead['email']}"
            assert found.inside(fmt.address_zone), found
            # 10 pt type (9 pt for a block of seven lines): Liberation Sans's ascent and
            # descent make its words 1.117 times as tall.
            size = 9 if len(block) > 6 else 10
            assert found.bottom - found.top == pytest.approx(size * 1.117 * 25.4 / 72, abs=0.1)
        # The sender: in the letterhead, and on the line above the window on A4.
        assert locate(lines, "418 Lakeshore Drive") is not None
        return_line = locate(lines, "Harbor Home Services · 418 Lakeshore Drive · Springfield IL 62704")
        if paper == "A4":
            assert return_line is not None and return_line.bottom < fmt.address_zone.top
        else:
            assert return_line is None
        assert f"Dear {lead['first_name']}," in first.text
        page += one.pages


@pytest.mark.parametrize("paper", ["A4", "letter"])
def test_postcards_have_a_front_and_an_address_side_with_bleed(tmp_path: Path, paper: str) -> None:
    settings = make_settings(tmp_path, paper=paper)
    out, laid = _render_samples(tmp_path, settings, "cold/02-postcard", "cold")
    pages = read_pdf(out)
    fmt = POSTCARD[paper]
    bleed = 3.175 if paper == "letter" else 3.0
    assert [x.pages for x in laid] == [2] * 6
    assert len(pages) == 12
    for n, lead in enumerate(sample_recipients()):
        front, back = pages[2 * n], pages[2 * n + 1]
        for side in (front, back):
            assert (side.width, side.height) == pytest.approx((fmt.width, fmt.height), abs=0.05)
            assert (side.media_width, side.media_height) == pytest.approx(
                (fmt.width + 2 * bleed, fmt.height + 2 * bleed), abs=0.05
            )
            assert all(f.embedded for f in side.fonts)
        assert "A free home energy check" in front.text
        back_lines = pdf_lines(out, 2 * n + 2)
        block = check_address(lead, home_country="US").block
        # The front carries no address (the company may be named in the text).
        for line in block[2:]:
            assert line not in front.text
        for line in block:
            found = locate(back_lines, line)
            assert found is not None, f"{line!r} missing from the address side for {lead['email']}"
            assert found.inside(fmt.address_zone), found
        # The return address in the top left corner, the mark in the bottom left, clear of
        # the strip along the bottom where the post prints its code.
        sender = locate(back_lines, "418 Lakeshore Drive")
        assert sender is not None and sender.right < fmt.width / 2 and sender.bottom < 15
        mark = locate(back_lines, f"B7-{n + 1:04d}")
        assert mark is not None and mark.right < 30 and mark.top > fmt.height - 10


def test_several_processes_make_the_same_pdf_as_one(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, paper="A4")
    renderer = Renderer(settings=settings)
    step = Step(template="print/examples/sales-letter", channel=Channel.MAIL)
    leads = sample_recipients()[:5]
    htmls = [
        render_piece_html(
            renderer,
            step=step,
            tier="warm",
            index=0,
            lead=lead,
            links=LINKS,
            piece=piece_context(settings, lead, day=DAY, batch=1, sequence=n),
        )
        for n, lead in enumerate(leads, 1)
    ]
    labels = [lead["email"] for lead in leads]
    one = render_pdf(htmls, out=tmp_path / "one.pdf", root=TEMPLATES, labels=labels, title="t", workers=1)
    many = render_pdf(
        htmls, out=tmp_path / "many.pdf", root=TEMPLATES, labels=labels, title="t", workers=2, chunk=2
    )
    assert one == many
    a, b = read_pdf(tmp_path / "one.pdf"), read_pdf(tmp_path / "many.pdf")
    assert [p.text for p in a] == [p.text for p in b]
    assert not list(tmp_path.glob(".*.parts"))
    from pypdf import PdfReader

    outline = PdfReader(tmp_path / "many.pdf").outline
    assert [item.title for item in outline] == labels  # type: ignore[union-attr]


def test_a_template_can_only_read_files_under_the_templates_folder(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    (root / "print").mkdir(parents=True)
    (root / "print" / "extra.css").write_text('p::after { content: " (local)" }')
    (tmp_path / "outside.css").write_text('p::before { content: "(outside) " }')
    html = (
        '<link rel="stylesheet" href="print/extra.css">'
        f'<link rel="stylesheet" href="{(tmp_path / "outside.css").as_uri()}">'
        '<link rel="stylesheet" href="https://example.com/remote.css">'
        "<p>hi</p>"
    )
    with weasyprint_warnings() as warnings:
        pages = read_pdf(html_to_pdf(html, root=root))
    # The file in the templates folder is read; the one outside it and the network are not.
    assert pages[0].text == "hi (local)"
    assert any("outside.css is outside the templates folder" in w for w in warnings)
    assert any("remote.css" in w and "disallowed protocol" in w for w in warnings)


# -- the channel -----------------------------------------------------------------------------------


async def test_the_channel_queues_a_complete_address_and_skips_an_incomplete_one(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    channel = DirectMailChannel(settings=settings.print)
    complete = {**sample_recipients()[3], "name": "Jürgen Müller"}
    incomplete = {"first_name": "Ann", "address_line1": "1 Main St", "city": "Springfield", "country": "US"}

    def outgoing(lead: dict[str, Any]) -> Outgoing:
        return Outgoing(1, "a@b.c", "x@y.z", b"<html>", "<id>", kind="mail", lead=lead)

    assert (await channel.send(outgoing(complete))).outcome == Outcome.PENDING
    skipped = await channel.send(outgoing(incomplete))
    assert skipped.outcome == Outcome.SKIPPED
    assert skipped.detail == (
        "no complete postal address for United States of America: "
        "no state (region); no ZIP code (postal_code)"
    )
    assert skipped.extra == {}
    channel.configure(make_settings(tmp_path, print_extra='without_address = "email"').print)
    fallback = await channel.send(outgoing(incomplete))
    assert fallback.outcome == Outcome.SKIPPED and fallback.extra == {FALLBACK: "email"}


def test_the_email_fallback_is_the_steps_own_email_parts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    step = settings.sequence("cold").steps[0]
    email = email_fallback(step)
    assert (email.id, email.template, email.channel) == (step.id, step.template, Channel.EMAIL)
    rendered = Renderer(settings=settings).render(
        lead={
            **sample_recipients()[0],
            "name": "Maria Gonzalez",
            "id": 1,
            "tier": "cold",
            "touch_count": 0,
            "phone": "",
            "timezone": "",
            "custom": {},
        },
        tier="cold",
        step=email,
        index=0,
        links=LINKS,
    )
    assert rendered.subject == "A free home energy check: book by 31 January"
    assert LINKS.url in rendered.html and LINKS.url in rendered.text
    assert "418 Lakeshore Drive" in rendered.text


# -- print batches ---------------------------------------------------------------------------------


async def test_export_writes_one_complete_folder_whose_manifest_matches_the_pdf(
    tmp_path: Path, store: Store
) -> None:
    settings = make_settings(tmp_path)
    clock = Clock(T0)
    dispatcher, email = dispatcher_for(settings, store, clock)
    emails = add_sample_leads(store)
    store.upsert_leads(
        [LeadInput(email="nowhere@example.com", first_name="Ann", city="Springfield")], tier="cold", now=T0
    )
    report = await dispatcher.run_pass(T0)
    assert (report.for_print, report.skipped, report.sent) == (6, 1, 0)
    skipped = store.touches_for(store.get_lead("nowhere@example.com").id)
    assert skipped[0].status == TouchStatus.SKIPPED
    assert skipped[0].error and skipped[0].error.startswith("no complete postal address for United States")
    status = store.mail_status()
    assert (status.waiting, status.skipped_for_address, status.exported_pieces) == (6, 1, 0)

    clock.now = T0 + timedelta(hours=6)
    [done] = PrintBatches(settings=settings, store=store).export(now=clock.now)
    assert done.batch is not None and done.path == batch_folder(settings.print_dir, done.batch.id)
    assert (done.batch.status, done.batch.pieces, done.batch.pages) == ("exported", 6, 12)
    assert sorted(p.name for p in done.path.iterdir()) == [
        "batch-000001-manifest.csv",
        "batch-000001-summary.txt",
        "batch-000001.pdf",
    ]
    assert sorted(p.name for p in settings.print_dir.iterdir()) == [".export.lock", "batch-000001"]
    rows = assert_manifest_matches_pdf(done.path, 1, settings, kind="postcard")
    # Presorted: the domestic pieces by ZIP, then the others by country and postal code.
    assert [r["country"] for r in rows] == ["AU", "CA", "DE", "FR", "GB", "US"]
    assert {r["email"] for r in rows} == set(emails)
    assert {r["template"] for r in rows} == {"cold/02-postcard"}
    us = rows[-1]
    assert (
        us["address_block"] == "Maria Gonzalez\nLakeview Dental\nSUITE 4\n22 ELM STREET\nSPRINGFIELD IL 62701"
    )
    assert (us["address_1"], us["address_5"], us["address_6"]) == (
        "Maria Gonzalez",
        "SPRINGFIELD IL 62701",
        "",
    )
    assert rows[2]["address_block"].endswith("01067 Dresden\nGERMANY")
    summary = (done.path / "batch-000001-summary.txt").read_text()
    assert "pieces        6 (6 of 2 pages)" in summary
    assert "6 x 4 in postcard; print both sides" in summary
    assert "campaignd mail confirm 1" in summary

    # Recorded as touches of the batch, not counted, and the leads wait for the mailing.
    for address in emails:
        lead = store.get_lead(address)
        [touch] = store.touches_for(lead.id)
        assert (touch.status, touch.batch_id, lead.touch_count) == (TouchStatus.QUEUED, 1, 0)
        state = store.lead_state(lead)
        assert "waiting to be mailed" in decide(state, Policy.from_settings(settings), now=clock.now).reason  # type: ignore[union-attr]
    assert store.mail_status().exported_pieces == 6
    # Their next step waits for the mailing; the lead that skipped the postcard goes on.
    await dispatcher.run_pass(clock.now + timedelta(days=3))
    assert [m.recipient for m in email.outbox] == ["nowhere@example.com"]
    # Nothing waits any more: a second export makes no batch.
    assert PrintBatches(settings=settings, store=store).export(now=clock.now) == []


async def test_confirming_counts_each_piece_once_and_the_sequence_goes_on(
    tmp_path: Path, store: Store
) -> None:
    settings = make_settings(tmp_path, threshold=1)
    clock = Clock(T0)
    dispatcher, _ = dispatcher_for(settings, store, clock)
    emails = add_sample_leads(store)
    await dispatcher.run_pass(T0)
    [done] = PrintBatches(settings=settings, store=store).export(now=T0 + timedelta(hours=1))
    assert done.batch is not None

    mailed = T0 + timedelta(days=1)
    confirmed = store.confirm_batch(done.batch.id, now=mailed, policy=Policy.from_settings(settings))
    assert (confirmed.batch.status, confirmed.batch.confirmed_at) == ("confirmed", mailed)
    assert len(confirmed.counted) == 6 and all(r.flagged for r in confirmed.counted)
    for address in emails:
        lead = store.get_lead(address)
        [touch] = store.touches_for(lead.id)
        assert (touch.status, touch.sent_at, touch.batch_id) == (TouchStatus.SENT, mailed, 1)
        assert (lead.touch_count, lead.status, lead.last_touch_at) == (1, LeadStatus.FLAGGED, mailed)
        assert [e.kind for e in store.events_for(lead.id)] == ["flagged"]
    again = store.confirm_batch(
        done.batch.id, now=mailed + timedelta(hours=1), policy=Policy.from_settings(settings)
    )
    assert again.already and again.counted == []
    assert store.get_lead(emails[0]).touch_count == 1
    with pytest.raises(CampaigndError, match="print batch 1 is confirmed; only an exported batch"):
        store.cancel_batch(1, now=mailed)
    with pytest.raises(CampaigndError, match="there is no print batch 99"):
        store.confirm_batch(99, now=mailed, policy=Policy.from_settings(settings))


async def test_after_the_mailing_the_next_step_waits_its_delay_from_the_mailing(
    tmp_path: Path, store: Store
) -> None:
    settings = make_settings(tmp_path)
    clock = Clock(T0)
    dispatcher, email = dispatcher_for(settings, store, clock)
    add_sample_leads(store)
    await dispatcher.run_pass(T0)
    [done] = PrintBatches(settings=settings, store=store).export(now=T0 + timedelta(hours=1))
    assert done.batch is not None
    mailed = T0 + timedelta(days=2)
    store.confirm_batch(done.batch.id, now=mailed, policy=Policy.from_settings(settings))
    # The reminder's delay (1d) counts from the mailing, not from the export.
    await dispatcher.run_pass(mailed + timedelta(hours=23))
    assert email.outbox == []
    await dispatcher.run_pass(mailed + timedelta(days=1, minutes=1))
    assert len(email.outbox) == 6
    assert {m.recipient for m in email.outbox} == {lead["email"] for lead in sample_recipients()}


async def test_cancelled_pieces_go_back_to_due_and_into_a_later_batch(tmp_path: Path, store: Store) -> None:
    settings = make_settings(tmp_path)
    clock = Clock(T0)
    dispatcher, _ = dispatcher_for(settings, store, clock)
    emails = add_sample_leads(store)
    await dispatcher.run_pass(T0)
    batches = PrintBatches(settings=settings, store=store)
    [first] = batches.export(now=T0 + timedelta(hours=1))
    assert first.batch is not None
    store.suppress(
        emails[0], reason=SuppressionReason.UNSUBSCRIBED, detail="by hand", now=T0 + timedelta(hours=2)
    )
    # An exported piece is paper: unsubscribing does not take it out of the batch.
    assert store.touches_for(store.get_lead(emails[0]).id)[0].status == TouchStatus.QUEUED

    cancelled_at = T0 + timedelta(hours=3)
    record, again, stopped = store.cancel_batch(first.batch.id, now=cancelled_at)
    assert (record.status, record.cancelled_at, again, stopped) == ("cancelled", cancelled_at, 5, 1)
    assert store.touches_for(store.get_lead(emails[0]).id)[0].status == TouchStatus.CANCELLED
    for address in emails[1:]:
        lead = store.get_lead(address)
        [touch] = store.touches_for(lead.id)
        assert (touch.status, touch.batch_id, touch.next_attempt_at) == (
            TouchStatus.RETRY,
            None,
            cancelled_at,
        )
        assert (lead.next_due_at, lead.touch_count) == (cancelled_at, 0)
    with pytest.raises(CampaigndError, match="print batch 1 is cancelled"):
        store.confirm_batch(1, now=cancelled_at, policy=Policy.from_settings(settings))

    report = await dispatcher.run_pass(cancelled_at)
    assert report.for_print == 5
    [second] = batches.export(now=cancelled_at + timedelta(hours=1))
    assert second.batch is not None and second.batch.id == 2 and second.batch.pieces == 5
    rows = assert_manifest_matches_pdf(second.path, 2, settings, kind="postcard")  # type: ignore[arg-type]
    assert emails[0] not in {r["email"] for r in rows}
    # The first batch's files stay where they were.
    assert (batch_folder(settings.print_dir, 1) / "batch-000001.pdf").is_file()


async def test_pieces_counted_at_export_cannot_be_cancelled(tmp_path: Path, store: Store) -> None:
    settings = make_settings(tmp_path, print_extra='count_at = "export"')
    clock = Clock(T0)
    dispatcher, _ = dispatcher_for(settings, store, clock)
    emails = add_sample_leads(store)
    await dispatcher.run_pass(T0)
    exported_at = T0 + timedelta(hours=1)
    [done] = PrintBatches(settings=settings, store=store).export(now=exported_at)
    assert done.batch is not None and len(done.counted) == 6
    assert "counted at export" in done.batch.detail
    for address in emails:
        lead = store.get_lead(address)
        [touch] = store.touches_for(lead.id)
        assert (touch.status, touch.sent_at, touch.batch_id, lead.touch_count) == ("sent", exported_at, 1, 1)
    with pytest.raises(CampaigndError, match="counted as touches when it was exported"):
        store.cancel_batch(done.batch.id, now=exported_at)
    assert store.get_lead(emails[0]).touch_count == 1
    confirmed = store.confirm_batch(done.batch.id, now=exported_at, policy=Policy.from_settings(settings))
    assert confirmed.counted == [] and confirmed.batch.status == "confirmed"
    assert store.get_lead(emails[0]).touch_count == 1


async def test_a_lead_that_unsubscribes_while_waiting_gets_no_piece(tmp_path: Path, store: Store) -> None:
    settings = make_settings(tmp_path)
    dispatcher, _ = dispatcher_for(settings, store, Clock(T0))
    emails = add_sample_leads(store)
    await dispatcher.run_pass(T0)
    store.suppress(emails[1], reason=SuppressionReason.UNSUBSCRIBED, detail="link", now=T0)
    [done] = PrintBatches(settings=settings, store=store).export(now=T0 + timedelta(hours=1))
    assert done.batch is not None and done.batch.pieces == 5
    rows = manifest(done.path, 1)  # type: ignore[arg-type]
    assert emails[1] not in {r["email"] for r in rows}
    assert store.touches_for(store.get_lead(emails[1]).id)[0].status == TouchStatus.CANCELLED


async def test_a_lead_that_stops_while_the_batch_is_written_is_left_out(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path)
    dispatcher, _ = dispatcher_for(settings, store, Clock(T0))
    emails = add_sample_leads(store)
    await dispatcher.run_pass(T0)
    real = directmail.render_pdf
    calls: list[int] = []

    def render_while_someone_unsubscribes(htmls: list[str], **kwargs: Any) -> Any:
        calls.append(len(htmls))
        if len(calls) == 1:
            store.suppress(emails[2], reason=SuppressionReason.UNSUBSCRIBED, detail="link", now=T0)
        return real(htmls, **kwargs)

    monkeypatch.setattr(directmail, "render_pdf", render_while_someone_unsubscribes)
    [done] = PrintBatches(settings=settings, store=store).export(now=T0 + timedelta(hours=1))
    assert calls == [6, 5]  # written again without the lead who stopped
    assert done.batch is not None and (done.batch.id, done.batch.pieces, done.batch.pages) == (1, 5, 10)
    rows = assert_manifest_matches_pdf(done.path, 1, settings, kind="postcard")  # type: ignore[arg-type]
    assert emails[2] not in {r["email"] for r in rows}
    assert store.touches_for(store.get_lead(emails[2]).id)[0].status == TouchStatus.CANCELLED


async def test_an_address_that_became_incomplete_goes_back_to_the_dispatcher(
    tmp_path: Path, store: Store
) -> None:
    settings = make_settings(tmp_path)
    clock = Clock(T0)
    dispatcher, _ = dispatcher_for(settings, store, clock)
    emails = add_sample_leads(store)
    await dispatcher.run_pass(T0)
    store.upsert_leads([LeadInput(email=emails[0], postal_code="ABCDE")], tier="cold", now=T0)
    clock.now = T0 + timedelta(hours=1)
    [done] = PrintBatches(settings=settings, store=store).export(now=clock.now)
    assert done.batch is not None and done.batch.pieces == 5
    assert [t for t, _ in done.back_to_dispatch] == [store.touches_for(store.get_lead(emails[0]).id)[0].id]
    touch = store.touches_for(store.get_lead(emails[0]).id)[0]
    assert touch.status == TouchStatus.RETRY and "'ABCDE' is not a US ZIP code" in (touch.error or "")
    # The dispatcher decides again: the step is skipped, with the reason.
    report = await dispatcher.run_pass(clock.now)
    assert report.skipped == 1
    touch = store.touches_for(store.get_lead(emails[0]).id)[0]
    assert touch.status == TouchStatus.SKIPPED and "'ABCDE' is not a US ZIP code" in (touch.error or "")


async def test_a_piece_that_cannot_be_printed_fails_visibly(tmp_path: Path, store: Store) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    letter = templates / "print" / "examples" / "sales-letter.letter.html.j2"
    letter.write_text(
        letter.read_text().replace(
            "{% block body %}",
            '{% block body %}{% if piece.reference != "PREVIEW" %}<p>{{ lead.custom.vip }}</p>{% endif %}',
        )
    )
    settings = make_settings(tmp_path, templates=templates)
    dispatcher, _ = dispatcher_for(settings, store, Clock(T0))
    emails = add_sample_leads(store, tier="warm")
    store.upsert_leads([LeadInput(email=emails[0], custom={"vip": "Platinum member"})], tier="warm", now=T0)
    await dispatcher.run_pass(T0)
    [done] = PrintBatches(settings=settings, store=store).export(now=T0 + timedelta(hours=1))
    assert done.batch is not None and done.batch.pieces == 1
    assert len(done.failed) == 5
    rows = assert_manifest_matches_pdf(done.path, 1, settings, kind="letter")  # type: ignore[arg-type]
    assert [r["email"] for r in rows] == [emails[0]]
    assert "Platinum member" in read_pdf(done.path / "batch-000001.pdf")[0].text  # type: ignore[operator]
    failed = store.touches_for(store.get_lead(emails[1]).id)[0]
    assert failed.status == TouchStatus.FAILED
    assert "sales-letter.letter.html.j2: line" in (failed.error or "") and "vip" in (failed.error or "")


async def test_each_print_template_gets_a_batch_of_its_own(tmp_path: Path, store: Store) -> None:
    settings = make_settings(tmp_path, paper="A4")
    dispatcher, _ = dispatcher_for(settings, store, Clock(T0))
    add_sample_leads(store, tier="cold")
    store.upsert_leads(
        [LeadInput(**{**sample_recipients()[0], "email": "warm@example.com"})], tier="warm", now=T0
    )
    await dispatcher.run_pass(T0)
    done = PrintBatches(settings=settings, store=store).export(now=T0 + timedelta(hours=1))
    by_template = {d.template: d for d in done}
    assert set(by_template) == {"cold/02-postcard", "print/examples/sales-letter"}
    postcards, letters = by_template["cold/02-postcard"], by_template["print/examples/sales-letter"]
    assert postcards.batch is not None and letters.batch is not None
    assert (postcards.batch.pieces, letters.batch.pieces) == (6, 1)
    assert_manifest_matches_pdf(postcards.path, postcards.batch.id, settings, kind="postcard")  # type: ignore[arg-type]
    assert_manifest_matches_pdf(letters.path, letters.batch.id, settings, kind="letter")  # type: ignore[arg-type]
    assert "A6 postcard" in (postcards.path / f"batch-{postcards.batch.id:06d}-summary.txt").read_text()  # type: ignore[operator]


def test_one_export_runs_at_a_time(tmp_path: Path, store: Store, db_url: str) -> None:
    settings = make_settings(tmp_path)
    batches = PrintBatches(settings=settings, store=store)
    with batches.locked(), pytest.raises(ExportBusy, match="a print batch is being exported right now"):
        PrintBatches(settings=settings, store=store).export(now=T0)
    # Daemons on other machines share only the database: on PostgreSQL it says who exports.
    other = create_engine(db_url)
    try:
        with store.export_lock() as first, Store(engine=other).export_lock() as second:
            assert first and second is (not store.is_postgres)
        with Store(engine=other).export_lock() as again:
            assert again
    finally:
        other.dispose()


async def test_a_half_export_is_discarded_and_a_recorded_one_finished(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path)
    dispatcher, _ = dispatcher_for(settings, store, Clock(T0))
    add_sample_leads(store)
    await dispatcher.run_pass(T0)
    batches = PrintBatches(settings=settings, store=store)

    # An export that stopped while writing: a reserved batch and a partial folder.
    reserved = store.begin_batch(now=T0, detail="cold/02-postcard: being exported")
    half = partial_folder(settings.print_dir, reserved)
    half.mkdir(parents=True)
    (half / f"batch-{reserved:06d}.pdf").write_bytes(b"%PDF-1.7 half")
    with batches.locked():
        done = batches.recover()
    assert done == [f"print batch {reserved} was left half exported: discarded, its pieces wait again"]
    assert not half.exists()
    assert store.get_batch(reserved).status == "failed"
    assert store.mail_status().waiting == 6

    # An export that stopped after recording, before its folder got its final name.
    def crash(work: Path, final: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(directmail, "publish", crash)
    with pytest.raises(KeyboardInterrupt):
        batches.export(now=T0 + timedelta(hours=1))
    recorded = store.batches(limit=1)[0]
    assert recorded.status == "exported" and recorded.pieces == 6
    assert partial_folder(settings.print_dir, recorded.id).is_dir()
    assert not batch_folder(settings.print_dir, recorded.id).exists()
    monkeypatch.undo()
    with batches.locked():
        done = batches.recover()
    final = batch_folder(settings.print_dir, recorded.id)
    assert done == [f"print batch {recorded.id} was recorded but not yet in place: moved to {final}"]
    assert_manifest_matches_pdf(final, recorded.id, settings, kind="postcard")
    assert sorted(p.name for p in settings.print_dir.iterdir()) == [".export.lock", final.name]


# -- the schedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "now", "fired"),
    [
        (
            "0 15 * * mon-fri",
            datetime(2026, 3, 2, 21, 30, tzinfo=UTC),
            datetime(2026, 3, 2, 21, 0, tzinfo=UTC),
        ),
        (
            "0 15 * * mon-fri",
            datetime(2026, 3, 2, 20, 59, tzinfo=UTC),
            datetime(2026, 2, 27, 21, 0, tzinfo=UTC),
        ),
        (
            "0 15 * * mon-fri",
            datetime(2026, 3, 2, 21, 0, tzinfo=UTC),
            datetime(2026, 3, 2, 21, 0, tzinfo=UTC),
        ),
        ("*/10 * * * *", datetime(2026, 3, 2, 21, 34, tzinfo=UTC), datetime(2026, 3, 2, 21, 30, tzinfo=UTC)),
        ("0 9 1 1 *", datetime(2026, 3, 2, 21, 34, tzinfo=UTC), None),
    ],
)
def test_the_last_scheduled_export_before_now(
    tmp_path: Path, schedule: str, now: datetime, fired: datetime | None
) -> None:
    settings = with_schedule(make_settings(tmp_path), schedule)
    trigger = trigger_for(settings)
    assert trigger is not None
    assert previous_fire(trigger, now) == fired


async def _start_service(
    settings: Settings, store: Store, clock: Clock
) -> tuple[PrintBatchService, AsyncIOScheduler, ServiceContext]:
    scheduler = AsyncIOScheduler(timezone=UTC)
    scheduler.start()
    ctx = ServiceContext(
        settings=settings,
        store=store,
        scheduler=scheduler,
        channels={"email": MemoryChannel(), "mail": DirectMailChannel(settings=settings.print)},
        clock=clock,
        health=dict,
    )
    service = PrintBatchService()
    await service.start(ctx)
    return service, scheduler, ctx


async def _wait_for_batches(store: Store, n: int) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while len([b for b in store.batches() if b.status == "exported"]) < n:
        assert asyncio.get_running_loop().time() < deadline, store.batches()
        await asyncio.sleep(0.2)


async def test_the_service_exports_as_soon_as_enough_pieces_wait(tmp_path: Path, store: Store) -> None:
    settings = make_settings(tmp_path, print_extra='when_waiting = 6\n[dispatch]\ninterval = "1s"')
    clock = Clock(T0)
    dispatcher, _ = dispatcher_for(settings, store, clock)
    service, scheduler, _ = await _start_service(settings, store, clock)
    try:
        add_sample_leads(store)
        await asyncio.sleep(1.5)
        assert store.batches() == []  # nothing waits yet
        await dispatcher.run_pass(T0)
        await _wait_for_batches(store, 1)
        [batch] = store.batches()
        assert (batch.pieces, batch.exported_at) == (6, T0)
    finally:
        await service.stop()
        scheduler.shutdown(wait=False)


async def test_a_scheduled_export_missed_while_down_is_made_at_start(tmp_path: Path, store: Store) -> None:
    settings = with_schedule(make_settings(tmp_path), "0 15 * * *")
    clock = Clock(datetime(2026, 3, 2, 19, 0, tzinfo=UTC))  # 13:00 in Chicago
    dispatcher, _ = dispatcher_for(settings, store, clock)
    add_sample_leads(store, now=clock.now)
    await dispatcher.run_pass(clock.now)
    clock.now = datetime(2026, 3, 2, 22, 0, tzinfo=UTC)  # 16:00: the 15:00 export was missed
    service, scheduler, _ = await _start_service(settings, store, clock)
    try:
        await _wait_for_batches(store, 1)
    finally:
        await service.stop()
        scheduler.shutdown(wait=False)
    # Pieces that started waiting after the last scheduled time wait for the next one.
    dispatcher2, _ = dispatcher_for(settings, store, clock)
    store.upsert_leads(
        [LeadInput(**{**sample_recipients()[0], "email": "late@example.com"})], tier="cold", now=clock.now
    )
    await dispatcher2.run_pass(clock.now)
    service, scheduler, _ = await _start_service(settings, store, clock)
    try:
        await asyncio.sleep(2)
        assert len(store.batches()) == 1 and store.mail_status().waiting == 1
    finally:
        await service.stop()
        scheduler.shutdown(wait=False)


# -- checks and previews ---------------------------------------------------------------------------


def test_the_print_check_passes_the_shipped_templates(tmp_path: Path) -> None:
    for paper in ("A4", "letter"):
        settings = make_settings(tmp_path, paper=paper)
        renderer = Renderer(settings=settings, letter_checks=[PrintCheck(settings=settings, day=DAY)])
        assert renderer.check(sample_links=LINKS) == []


@pytest.mark.parametrize(
    ("css", "reasons"),
    [
        pytest.param(
            ".window { margin-top: 30mm }",
            [
                f"the address line {line!r} is at 22-"
                for line in (
                    "Maria Gonzalez",
                    "Lakeview Dental",
                    "SUITE 4",
                    "22 ELM STREET",
                    "SPRINGFIELD IL 62701",
                )
            ],
            id="the window moved down",
        ),
        pytest.param("@page { size: A5 }", ["the page is 148.0 x 210.0 mm"], id="a page of another size"),
        pytest.param(".window { colour: red }", ["WeasyPrint: Ignored `colour: red ` at"], id="a CSS typo"),
    ],
)
def test_the_print_check_finds_what_the_post_or_the_print_shop_would(
    tmp_path: Path, css: str, reasons: list[str]
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    letter = templates / "print" / "examples" / "sales-letter.letter.html.j2"
    letter.write_text(
        letter.read_text().replace(
            "{% block body %}", f"{{% block style %}}{css}{{% endblock %}}\n{{% block body %}}"
        )
    )
    settings = make_settings(tmp_path, templates=templates)
    step = Step(id="sales-letter", template="print/examples/sales-letter", channel=Channel.MAIL)
    lead = {**sample_recipients()[0], "name": "Maria Gonzalez"}
    problems = PrintCheck(settings=settings, day=DAY)(
        step=step, tier="warm", lead=lead, html="", source=str(letter)
    )
    assert all(p.source == str(letter) for p in problems)
    assert len(problems) == len(reasons)
    for problem, reason in zip(problems, reasons, strict=True):
        assert problem.reason.startswith(reason), problem.reason
        if "address line" in reason:
            assert problem.reason.endswith(
                "mm down, outside the US Letter letter's address zone (22-124 mm across, 51-79 mm down) "
                "(sample lead maria.gonzalez@lakeview-dental.example)"
            )


def test_a_preview_is_the_piece_as_the_batch_prints_it(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, paper="A4")
    step = settings.sequence("cold").steps[0]
    lead = {**sample_recipients()[4], "name": "Camille Durand"}
    pdf = tmp_path / "preview.pdf"
    pdf.write_bytes(preview_pdf(settings, tier="cold", step=step, lead=lead, links=LINKS, day=DAY))
    pages = read_pdf(pdf)
    assert len(pages) == 2
    found = locate(pdf_lines(pdf, 2), "69002 LYON")
    assert found is not None and found.inside(POSTCARD["A4"].address_zone)
    assert "PREVIEW" in pages[1].text
    with pytest.raises(CampaigndError, match="is an email step"):
        preview_pdf(
            settings, tier="cold", step=settings.sequence("cold").steps[1], lead=lead, links=LINKS, day=DAY
        )


def test_the_templates_context_of_a_lead_record_prints(tmp_path: Path, store: Store) -> None:
    settings = make_settings(tmp_path)
    add_sample_leads(store)
    record = store.get_lead(sample_recipients()[1]["email"])
    pdf = preview_pdf(
        settings,
        tier="cold",
        step=settings.sequence("cold").steps[0],
        lead=lead_context(record),
        links=LINKS,
        day=DAY,
    )
    assert "LS6 2AB UNITED KINGDOM" in read_pdf(pdf)[1].text


def test_the_shipped_configs_still_load(tmp_path: Path) -> None:
    for name in ("campaignd.toml", "demo.toml"):
        settings = load_settings(REPO / "config" / name, environ={}, dotenv=None)
        assert settings.print.paper in ("A4", "letter")
