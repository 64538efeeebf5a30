"""Make ``docs/images/letter.png`` and ``docs/images/postcard.png``: direct mail as printed.

Prints the example sales letter (``templates/print/examples/sales-letter``) and the demo's
postcard step (``templates/cold/02-postcard``) for the first sample lead, exactly as a
print batch would (the real templates, the ``piece`` data, WeasyPrint), with the demo
configuration, and turns the PDFs into PNGs with poppler's ``pdftoppm``: the letter's
first page, and the postcard's two sides next to each other, trimmed to the card (the
3 mm bleed the print shop cuts off is left out).

Usage: .venv/bin/python scripts/print_screenshots.py [--config config/demo.toml]
       [--out docs/images] [--dpi 110] [--pdf DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from PIL import Image

from campaignd.config import Channel, Step, load_settings
from campaignd.printing import html_to_pdf, piece_context, read_pdf, render_piece_html
from campaignd.render import Renderer
from campaignd.unsubscribe import Signer, load_keys

REPO = Path(__file__).resolve().parent.parent
DAY = date(2027, 1, 12)
CANVAS = (213, 219, 227)


def say(text: str) -> None:
    sys.stdout.write(text + "\n")


def render(config: Path, template: str, tier: str, state: Path) -> bytes:
    settings = load_settings(config, environ={}, dotenv=None, overrides={"state_dir": str(state)})
    renderer = Renderer(settings=settings)
    step = Step(template=template, channel=Channel.MAIL)
    lead = {**renderer.sample_leads(template, tier=tier)[0], "id": 1}
    signer = Signer(
        keys=load_keys(settings, create=True),
        base_url=settings.unsubscribe.base_url,
        mailto=settings.unsubscribe.mailto,
    )
    html = render_piece_html(
        renderer,
        step=step,
        tier=tier,
        index=0,
        lead=lead,
        links=signer.links(1, lead["email"]),
        piece=piece_context(settings, lead, day=DAY, batch=12, sequence=34),
    )
    return html_to_pdf(html, root=settings.templates)


def page_png(pdf: Path, page: int, dpi: int, out: Path) -> Image.Image:
    stem = out.with_suffix("")
    subprocess.run(
        [
            "pdftoppm",
            "-png",
            "-r",
            str(dpi),
            "-f",
            str(page),
            "-l",
            str(page),
            "-singlefile",
            str(pdf),
            str(stem),
        ],
        check=True,
        timeout=120,
    )
    with Image.open(stem.with_suffix(".png")) as image:
        return image.convert("RGB")


def trimmed(image: Image.Image, pdf: Path, page: int) -> Image.Image:
    """Cut the bleed off: keep the TrimBox."""
    facts = read_pdf(pdf, text=False)[page - 1]
    scale = image.width / facts.media_width
    left, top = round(facts.trim_left * scale), round(facts.trim_top * scale)
    return image.crop((left, top, left + round(facts.width * scale), top + round(facts.height * scale)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=REPO / "config" / "demo.toml")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--dpi", type=int, default=110)
    parser.add_argument("--pdf", type=Path, help="also keep the two PDFs in this folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        letter_pdf = work / "letter.pdf"
        letter_pdf.write_bytes(render(args.config, "print/examples/sales-letter", "warm", work))
        postcard_pdf = work / "postcard.pdf"
        postcard_pdf.write_bytes(render(args.config, "cold/02-postcard", "cold", work))

        letter = page_png(letter_pdf, 1, args.dpi, work / "letter-1.png")
        letter.save(args.out / "letter.png", optimize=True)
        say(f"wrote {args.out / 'letter.png'} ({letter.width}x{letter.height})")

        front = trimmed(page_png(postcard_pdf, 1, args.dpi * 2, work / "front.png"), postcard_pdf, 1)
        back = trimmed(page_png(postcard_pdf, 2, args.dpi * 2, work / "back.png"), postcard_pdf, 2)
        gap = front.width // 16
        sheet = Image.new(
            "RGB", (front.width + back.width + 3 * gap, max(front.height, back.height) + 2 * gap), CANVAS
        )
        sheet.paste(front, (gap, gap))
        sheet.paste(back, (2 * gap + front.width, gap))
        sheet.save(args.out / "postcard.png", optimize=True)
        say(f"wrote {args.out / 'postcard.png'} ({sheet.width}x{sheet.height}): front, then the address side")

        if args.pdf:
            args.pdf.mkdir(parents=True, exist_ok=True)
            for pdf in (letter_pdf, postcard_pdf):
                (args.pdf / pdf.name).write_bytes(pdf.read_bytes())


if __name__ == "__main__":
    main()
