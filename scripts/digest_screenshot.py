"""Make ``docs/images/digest.png``: the demo's flagged-lead digest as the sales team sees it.

Sets the demo up in a temporary directory (``config/demo.toml``, ``examples/leads.csv``),
runs the real dispatcher over one simulated week, one pass each weekday morning, with the
email and direct-mail channels kept in memory, and does what a week brings by hand: a
phone call logged with a note, an unsubscribe, a sale. Then it builds the first scheduled
digest (the next Monday at 08:00), renders its email with the templates in
``templates/digest/``, and photographs it in headless Chromium at a desktop mail
client's width and a phone's, side by side.

Usage: .venv/bin/python scripts/digest_screenshot.py [--out docs/images/digest.png]
       [--html digest.html] [--leads 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from chromium_shot import shoot as chromium_shot
from PIL import Image, ImageDraw, ImageFont

from campaignd import database
from campaignd.config import load_settings
from campaignd.daemon import prepare
from campaignd.digest import BEGINNING, DigestTemplates, attachment_for
from campaignd.digest_job import zone_of
from campaignd.engine import Dispatcher
from campaignd.importer import import_leads
from campaignd.models import LeadStatus, SuppressionReason
from campaignd.sequences import Policy
from campaignd.store import Store
from campaignd.testing import MemoryChannel

REPO = Path(__file__).resolve().parent.parent

CHICAGO = ZoneInfo("America/Chicago")
MONDAY = datetime(2026, 1, 5, 9, 0, tzinfo=CHICAGO)
BACKGROUND = (238, 241, 245)  # the digest's page colour (#eef1f5)
CANVAS = (213, 219, 227)
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


def say(text: str) -> None:
    sys.stdout.write(text + "\n")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """A local time in the demo week: day 0 is Monday 5 January 2026."""
    return (MONDAY + timedelta(days=day)).replace(hour=hour, minute=minute)


async def simulate_week(state: Path) -> tuple[Store, Path, datetime, str]:
    settings = load_settings(
        REPO / "config" / "demo.toml",
        environ={},
        dotenv=None,
        overrides={"state_dir": str(state)},
    )
    engine = database.create_engine(settings.database_url)
    database.upgrade(engine)
    store = Store(engine=engine)
    report = import_leads(store, REPO / "examples" / "leads.csv", default_tier="cold", now=MONDAY)
    say(report.summary())
    renderer, signer = prepare(settings)
    clock = Clock(MONDAY)
    dispatcher = Dispatcher(
        store=store,
        settings=settings,
        renderer=renderer,
        signer=signer,
        channels={"email": MemoryChannel(), "mail": MemoryChannel(concurrency=1)},
        worker="screenshot:1",
        clock=clock,
    )
    policy = Policy.from_settings(settings)
    maria = "maria.gonzalez@lakeview-dental.example"
    # Maria's drip starts a day late: she was on holiday.
    store.set_status(maria, LeadStatus.PAUSED, now=at(0, 9, 30), reason="on holiday until Tuesday")
    for day in range(5):
        if day == 1:
            store.set_status(maria, LeadStatus.ACTIVE, now=at(1, 8, 0))
        clock.now = at(day, 10, 0)
        await dispatcher.run_pass(clock.now)
        if day == 2:
            store.suppress(
                "daniel.wu@wu-accounting.example",
                reason=SuppressionReason.UNSUBSCRIBED,
                detail="one-click unsubscribe",
                now=at(2, 13, 12),
            )
    store.log_manual_touch(
        maria,
        channel="call",
        note="Called back about the postcard: wants a quote for attic insulation before the cold "
        "snap. Best reached after 4 pm.",
        at=at(4, 15, 5),
        policy=policy,
    )
    store.set_status(
        "sophie.martin@martin-florals.example",
        LeadStatus.CONVERTED,
        now=at(4, 16, 30),
        reason="signed for a full energy check",
    )
    end = at(7, 8, 0)  # the first scheduled digest: Monday 12 January, 08:00
    return store, settings.templates, end, zone_of(settings)


def render_html(leads: int, state: Path) -> tuple[str, int]:
    store, templates, end, zone = asyncio.run(simulate_week(state))
    digest = store.read_digest(start=BEGINNING, end=end)
    settings = load_settings(REPO / "config" / "demo.toml", environ={}, dotenv=None)
    attachment = attachment_for(digest, zone)
    rendered = DigestTemplates(root=templates).render(
        digest,
        zone=zone,
        sender=settings.sender,
        email_leads=leads,
        attachment=attachment.filename if attachment else "",
    )
    store.engine.dispose()
    say(f"subject: {rendered.subject}")
    return rendered.html, len(digest.leads)


def shoot(html: Path, width: int, png: Path, profile: Path) -> Image.Image:
    return chromium_shot(html, width, png, profile, background=BACKGROUND)


def compose(desktop: Image.Image, phone: Image.Image) -> Image.Image:
    pad, label = 36, 40
    font = ImageFont.truetype(str(FONT), 20) if FONT.exists() else ImageFont.load_default()
    height = max(desktop.height, phone.height) + 2 * pad + label
    canvas = Image.new("RGB", (desktop.width + phone.width + 3 * pad, height), CANVAS)
    draw = ImageDraw.Draw(canvas)
    for x, image, caption in (
        (pad, desktop, f"In a mail client ({desktop.width} px)"),
        (2 * pad + desktop.width, phone, f"On a phone ({phone.width} px)"),
    ):
        draw.text((x, pad), caption, fill=(31, 41, 51), font=font)
        canvas.paste(image, (x, pad + label))
        draw.rectangle(
            (x - 1, pad + label - 1, x + image.width, pad + label + image.height), outline=(160, 170, 182)
        )
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "digest.png")
    parser.add_argument("--html", type=Path, help="also keep the digest's HTML here")
    parser.add_argument("--leads", type=int, default=3, help="leads written out in the email")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="campaignd-digest-") as tmp:
        work = Path(tmp)
        html, count = render_html(args.leads, work / "state")
        page = work / "digest.html"
        page.write_text(html, encoding="utf-8")
        if args.html:
            args.html.write_text(html, encoding="utf-8")
        desktop = shoot(page, 760, work / "desktop.png", work / "profile-desktop")
        phone = shoot(page, 390, work / "phone.png", work / "profile-phone")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        compose(desktop, phone).save(args.out, optimize=True)
    say(f"{count} flagged leads; wrote {args.out}")


if __name__ == "__main__":
    main()
