"""Make ``docs/images/email-<tier>-<step>.png``: each example email as its recipient sees it.

Renders every email step of ``config/campaignd.toml`` for the first sample lead of its
template folder (``templates/<tier>/sample.toml``), exactly as the dispatcher would (the
same renderer: CSS inlined, nothing fetched from the network), then photographs the HTML
in headless Chromium at a desktop mail client's width and a phone's, side by side, under
the sender, the subject and the inbox preview line.

Usage: .venv/bin/python scripts/email_screenshots.py [--config config/campaignd.toml]
       [--out docs/images] [--html DIR]
"""

from __future__ import annotations

import argparse
import html
import re
import sys
import tempfile
from pathlib import Path

from chromium_shot import shoot as chromium_shot
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from campaignd.config import Channel, load_settings  # noqa: E402
from campaignd.render import Renderer  # noqa: E402
from campaignd.unsubscribe import Signer  # noqa: E402

BACKGROUND = (238, 241, 245)  # the layout's page colour, #eef1f5
CANVAS = (250, 251, 252)
INK = (31, 41, 51)
GREY = (96, 108, 122)
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
BOLD = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
PREHEADER = re.compile(r'<div class="preheader"[^>]*>(.*?)</div>', re.S)


def say(text: str) -> None:
    sys.stderr.write(text + "\n")


def shoot(html: Path, width: int, png: Path, profile: Path) -> Image.Image:
    return chromium_shot(html, width, png, profile, background=BACKGROUND, height=3200, margin=12)


def font(path: Path, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.truetype(str(path), size) if path.exists() else ImageFont.load_default()


def compose(
    desktop: Image.Image, phone: Image.Image, *, sender: str, subject: str, preview: str
) -> Image.Image:
    pad, inbox, label = 36, 104, 34
    top = pad + inbox + label
    width = desktop.width + phone.width + 3 * pad
    canvas = Image.new("RGB", (width, max(desktop.height, phone.height) + top + pad), CANVAS)
    draw = ImageDraw.Draw(canvas)
    # What the inbox shows before the message is opened.
    draw.rectangle((pad, pad, width - pad, pad + inbox - 12), fill=(255, 255, 255), outline=(214, 220, 227))
    draw.text((pad + 18, pad + 12), sender, fill=INK, font=font(BOLD, 19))
    draw.text((pad + 18, pad + 40), subject, fill=INK, font=font(BOLD, 17))
    line = preview if len(preview) <= 118 else preview[:118].rsplit(" ", 1)[0].rstrip(",.;") + " …"
    draw.text((pad + 18, pad + 62), line, fill=GREY, font=font(FONT, 15))
    for x, image, caption in (
        (pad, desktop, f"Opened in a mail client ({desktop.width} px)"),
        (2 * pad + desktop.width, phone, f"On a phone ({phone.width} px)"),
    ):
        draw.text((x, pad + inbox), caption, fill=INK, font=font(FONT, 17))
        canvas.paste(image, (x, top))
        draw.rectangle((x - 1, top - 1, x + image.width, top + image.height), outline=(160, 170, 182))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "campaignd.toml")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--html", type=Path, help="also keep each email's HTML in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="campaignd-emails-") as tmp:
        work = Path(tmp)
        settings = load_settings(
            args.config, environ={}, dotenv=None, overrides={"state_dir": str(work / "state")}
        )
        renderer = Renderer(settings=settings)
        signer = Signer(keys=[b"screenshots" * 3], base_url=settings.unsubscribe.base_url, mailto="")
        args.out.mkdir(parents=True, exist_ok=True)
        for tier, sequence in settings.sequences.items():
            for index, step in enumerate(sequence.steps):
                if step.channel != Channel.EMAIL:
                    continue
                lead = renderer.sample_leads(step.template, tier=tier.value)[0]
                links = signer.links(1, str(lead["email"]))
                rendered = renderer.render(lead=lead, tier=tier.value, step=step, index=index, links=links)
                name = f"email-{tier.value}-{step.id}"
                page = work / f"{name}.html"
                page.write_text(rendered.html, encoding="utf-8")
                if args.html:
                    args.html.mkdir(parents=True, exist_ok=True)
                    (args.html / f"{name}.html").write_text(rendered.html, encoding="utf-8")
                desktop = shoot(page, 700, work / f"{name}-desktop.png", work / f"profile-{name}-d")
                phone = shoot(page, 390, work / f"{name}-phone.png", work / f"profile-{name}-p")
                found = PREHEADER.search(rendered.html)
                preview = html.unescape(" ".join(found.group(1).split())) if found else rendered.text[:120]
                sender = f"{settings.sender.from_name} <{settings.sender.from_address}>"
                image = compose(desktop, phone, sender=sender, subject=rendered.subject, preview=preview)
                target = args.out / f"{name}.png"
                image.save(target, optimize=True)
                say(f"{tier.value}/{step.id} for {lead['email']}: wrote {target}")


if __name__ == "__main__":
    main()
