"""Benchmark of making messages: render (templates and CSS) and build (MIME bytes), per step.

For every email step of the shipped example configuration, renders the step for a few
thousand varied leads (accented names, leads without a company, international domains)
with real signed unsubscribe links, and builds each message's bytes exactly as the
dispatcher does. Prints CPU microseconds per message (process time, so other programs
on the machine weigh less) for:

- ``render``: :meth:`Renderer.render` (shapes, CSS inlined once per shape);
- ``build``: :func:`campaignd.message.build_email`;
- ``total``: the two, the cost the dispatcher pays per message before the network;
- ``shapes``: how many renders of the step served all the leads (see ``campaignd.render``);
- for comparison, ``jinja+css``: every lead rendered through Jinja with its CSS inlined
  per message (``Renderer(shapes=False)``), and ``EmailMessage``: the same message built
  with the standard library's ``email.message.EmailMessage``.

The budget is 60 µs per message for render and build together, on average over the
example steps. Run from the repository root::

    .venv/bin/python bench/render.py
    .venv/bin/python bench/render.py --config config/demo.toml --leads 5000 --repeat 7
    .venv/bin/python bench/render.py --profile      # the 25 most expensive functions
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from campaignd.config import Channel, Settings, Step, load_settings  # noqa: E402
from campaignd.message import build_email, message_id  # noqa: E402
from campaignd.render import SAMPLE_LEAD, Rendered, Renderer  # noqa: E402
from campaignd.unsubscribe import Links, Signer  # noqa: E402

FIRST = ["Maria", "Tom", "Aisha", "Liam", "Sophie", "Zoë", "Björn", "Chloé", "José", "", "Wei", "Ngozi"]
LAST = ["Garcia", "Smith", "Khan", "O'Brien", "Ñúñez", "Müller", "Dubois", "", "Okafor", "Nakamura"]
COMPANY = [
    "Lakeside Dental",
    "",
    "Brook & Sons",
    "Oak Street Bakery",
    "Müller GmbH",
    "",
    "Riverside <Storage>",
]
DOMAINS = ["example.com", "mail.example.org", "bücher.example", "example.net"]


def make_leads(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    leads = []
    for i in range(n):
        first, last = rnd.choice(FIRST), rnd.choice(LAST)
        lead = {
            **SAMPLE_LEAD,
            "id": i + 1,
            "email": f"lead{i}@{rnd.choice(DOMAINS)}",
            "first_name": first,
            "last_name": last,
            "name": f"{first} {last}".strip(),
            "company": rnd.choice(COMPANY),
            "city": rnd.choice(["Springfield", "Shelbyville", "Capital City"]),
            "custom": {"industry": rnd.choice(["dental", "retail", "storage"])},
        }
        leads.append(lead)
    return leads


def email_steps(settings: Settings) -> list[tuple[str, int, Step]]:
    return [
        (tier.value, index, step)
        for tier, seq in settings.sequences.items()
        for index, step in enumerate(seq.steps)
        if step.channel == Channel.EMAIL
    ]


def stdlib_build(rendered: Rendered, *, settings: Settings, lead: dict[str, Any], links: Links) -> bytes:
    """The same message made with ``EmailMessage`` (what campaignd did before)."""
    msg = EmailMessage(policy=SMTP.clone(max_line_length=998))
    sender = settings.sender
    local, _, domain = lead["email"].rpartition("@")
    msg["From"] = Address(sender.from_name, *sender.from_address.split("@"))
    msg["To"] = Address(lead["name"], local, domain.encode("idna").decode("ascii"))
    msg["Reply-To"] = Address(sender.from_name, *sender.reply_to.split("@"))
    msg["Subject"] = rendered.subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = "<campaignd.1.1@harborhome.example>"
    msg["List-Unsubscribe"] = links.header()
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content(rendered.text, subtype="plain", charset="utf-8")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8")
    for att in rendered.attachments:
        maintype, _, subtype = att.content_type.partition(";")[0].partition("/")
        msg.add_attachment(
            att.content(datetime.now(UTC)), maintype=maintype, subtype=subtype, filename=att.filename
        )
    return msg.as_bytes()


def cpu_us_per_item(fn: Callable[[int], object], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for i in range(n):
            fn(i)
        best = min(best, time.process_time() - started)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=REPO / "config" / "campaignd.toml")
    parser.add_argument("--leads", type=int, default=3000, help="distinct leads rendered per step")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the fastest counts")
    parser.add_argument("--baseline-leads", type=int, default=300, help="leads for the slow comparisons")
    parser.add_argument("--profile", action="store_true", help="profile rendering and building of all steps")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as state:
        settings = load_settings(args.config, environ={}, dotenv=None, overrides={"state_dir": state})
        signer = Signer(
            keys=[b"k" * 32], base_url=settings.unsubscribe.base_url, mailto=settings.unsubscribe.mailto
        )
        leads = make_leads(args.leads)
        links = [signer.links(lead["id"], lead["email"]) for lead in leads]
        renderer = Renderer(settings=settings)
        reference = Renderer(settings=settings, shapes=False)
        date = datetime(2027, 1, 12, 15, 0, tzinfo=UTC)
        steps = email_steps(settings)

        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for tier, index, step in steps:
                for lead, link in zip(leads, links, strict=True):
                    r = renderer.render(lead=lead, tier=tier, step=step, index=index, links=link)
                    build_email(
                        r,
                        sender=settings.sender,
                        to_name=lead["name"],
                        to_address=lead["email"],
                        msg_id=message_id(touch_id=1, lead_id=lead["id"], sender=settings.sender),
                        date=date,
                        links=link,
                        step_label=f"{tier}/{step.id}",
                    )
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            return

        print(f"{len(leads)} leads per step, best of {args.repeat}, CPU µs per message ({args.config.name})")
        columns = ("render", "build", "total", "shapes")
        header = (
            f"{'step':<24}"
            + "".join(f"{c:>9}" for c in columns)
            + f"   {'jinja+css':>10}{'EmailMessage':>14}"
        )
        print(header)
        print("-" * len(header))
        totals: list[float] = []
        for tier, index, step in steps:
            label = f"{tier}/{step.id}"
            n = len(leads)

            def render(i: int, tier: str = tier, index: int = index, step: Step = step) -> Rendered:
                return renderer.render(lead=leads[i], tier=tier, step=step, index=index, links=links[i])

            rendered = [render(i) for i in range(n)]  # traces the shapes once, as a daemon would

            def build(i: int, label: str = label, rendered: list[Rendered] = rendered) -> bytes:
                lead = leads[i]
                return build_email(
                    rendered[i],
                    sender=settings.sender,
                    to_name=lead["name"],
                    to_address=lead["email"],
                    msg_id=message_id(touch_id=i + 1, lead_id=lead["id"], sender=settings.sender),
                    date=date,
                    links=links[i],
                    step_label=label,
                )

            def plain(i: int, tier: str = tier, index: int = index, step: Step = step) -> Rendered:
                return reference.render(lead=leads[i], tier=tier, step=step, index=index, links=links[i])

            def stdlib(i: int, rendered: list[Rendered] = rendered) -> bytes:
                return stdlib_build(rendered[i], settings=settings, lead=leads[i], links=links[i])

            r_us = cpu_us_per_item(render, n, args.repeat)
            b_us = cpu_us_per_item(build, n, args.repeat)
            m = min(args.baseline_leads, n)
            j_us = cpu_us_per_item(plain, m, max(1, args.repeat // 2))
            e_us = cpu_us_per_item(stdlib, m, max(1, args.repeat // 2))
            totals.append(r_us + b_us)
            shapes = renderer.shape_count(tier, step.id)
            row = f"{label:<24}{r_us:>9.1f}{b_us:>9.1f}{r_us + b_us:>9.1f}{shapes:>9}"
            print(f"{row}   {j_us:>10.1f}{e_us:>14.1f}")
        average = sum(totals) / len(totals)
        print("-" * len(header))
        verdict = "within" if average <= 60 else "OVER"
        print(f"average render + build: {average:.1f} µs per message ({verdict} the 60 µs budget)")


if __name__ == "__main__":
    main()
