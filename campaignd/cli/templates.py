"""Commands for the marketer's templates: ``templates check``, ``templates preview`` and
``send-test``.

``preview`` and ``send-test`` make a message exactly as the dispatcher does (the same
renderer, the same message builder, the lead's own unsubscribe links), so what they
show is what a lead receives.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo

import typer

from campaignd.cli.app import STATE, app, out
from campaignd.exceptions import CampaigndError, TemplateError

if TYPE_CHECKING:
    from campaignd.config import Settings, Step
    from campaignd.render import LetterCheck, Rendered, Renderer
    from campaignd.unsubscribe import Links, Signer

templates_app = typer.Typer(help="Check and preview the templates the sequences use.", no_args_is_help=True)
app.add_typer(templates_app, name="templates")

SAMPLE_EMAIL = "jane.sample@example.com"


class Format(StrEnum):
    EML = "eml"
    HTML = "html"
    TEXT = "text"
    PDF = "pdf"


def _signer(settings: Settings) -> Signer:
    from campaignd.unsubscribe import Signer, load_keys

    # Checks and previews never create the key file; without one, links are signed with
    # a throw-away key and would not be accepted (nothing is sent with them).
    return Signer(
        keys=load_keys(settings, create=False),
        base_url=settings.unsubscribe.base_url,
        mailto=settings.unsubscribe.mailto,
    )


# -- check ---------------------------------------------------------------------------------


@templates_app.command("check")
def templates_check(
    all_leads: Annotated[
        bool, typer.Option("--all-leads", help="Also render every step for every active lead.")
    ] = False,
) -> None:
    """Render every template the sequences use and report each problem with file and line.

    Each template is rendered with the sample leads of its folder (sample.toml); every
    email must have a subject, and the postal address and the unsubscribe link in both
    its HTML and its plain-text part. Exits 1 on any problem.
    """
    from campaignd.render import Renderer, lead_context

    settings = STATE.settings()
    signer = _signer(settings)
    renderer = Renderer(settings=settings, letter_checks=_letter_checks(settings))
    counted = [0]

    def leads() -> Iterator[dict[str, Any]]:
        for record in STATE.store().list_leads(active_only=True):
            counted[0] += 1
            yield lead_context(record)

    problems = renderer.check(
        leads=leads() if all_leads else (),
        sample_links=signer.links(0, SAMPLE_EMAIL),
        lead_links=lambda lead: signer.links(int(lead["id"]), str(lead["email"])),
    )
    if problems:
        raise TemplateError(problems)
    steps = sum(len(s.steps) for s in settings.sequences.values())
    checked = f", rendered for {counted[0]} active leads" if all_leads else ""
    out(f"templates OK: {steps} steps in {settings.templates}{checked}")
    for path in renderer.steps_without_text():
        out(f"note: {path} does not exist: the plain-text part is made from the HTML (better write one)")


def _letter_checks(settings: Settings) -> list[LetterCheck]:
    """The print checks of direct-mail letters (page format, fonts, the address window)."""
    from campaignd.clock import utcnow
    from campaignd.config import Channel
    from campaignd.printing import PrintCheck

    if not any(s.channel == Channel.MAIL for seq in settings.sequences.values() for s in seq.steps):
        return []
    today = utcnow().astimezone(ZoneInfo(settings.timezone)).date()
    return [PrintCheck(settings=settings, day=today)]


# -- preview and send-test -------------------------------------------------------------------


def _find_step(settings: Settings, tier: str, step: str) -> tuple[int, Step]:
    from campaignd.config import Tier

    try:
        sequence = settings.sequence(Tier(tier.lower()))
    except ValueError:
        raise CampaigndError(f"{tier!r} is not a tier: use cold, warm or hot") from None
    steps = sequence.steps
    for index, candidate in enumerate(steps):
        if candidate.id == step or candidate.template == step:
            return index, candidate
    if step.isdigit() and 1 <= int(step) <= len(steps):
        return int(step) - 1, steps[int(step) - 1]
    known = ", ".join(s.id for s in steps) or "none"
    raise CampaigndError(f"no step {step!r} in the {tier.lower()} sequence (its steps: {known}; or a number)")


def _lead_for(renderer: Renderer, step: Step, tier: str, email: str | None) -> dict[str, Any]:
    """The sample lead with that address (the folder's first without one), else the real lead."""
    from campaignd.render import lead_context

    samples = renderer.sample_leads(step.template, tier=tier)
    if email is None:
        return samples[0]
    for sample in samples:
        if str(sample["email"]).lower() == email.strip().lower():
            return sample
    return lead_context(STATE.store().get_lead(email))


def _make(
    tier: str, step_name: str, lead_email: str | None, *, sample_links: bool = False
) -> tuple[Settings, Step, dict[str, Any], Rendered, Links]:
    """Render a step for a lead as the dispatcher would: with the lead's own links, or a
    sample lead's (``sample_links``)."""
    from campaignd.render import Renderer, RenderError

    settings = STATE.settings()
    index, step = _find_step(settings, tier, step_name)
    renderer = Renderer(settings=settings)
    lead = _lead_for(renderer, step, tier.lower(), lead_email)
    signer = _signer(settings)
    if sample_links:
        links = signer.links(0, SAMPLE_EMAIL)
    else:
        links = signer.links(int(lead["id"]), str(lead["email"]))
    try:
        rendered = renderer.render(lead=lead, tier=tier.lower(), step=step, index=index, links=links)
    except RenderError as exc:
        raise TemplateError([exc.problem]) from None
    return settings, step, lead, rendered, links


@templates_app.command("preview")
def templates_preview(
    tier: Annotated[str, typer.Argument(help="cold, warm or hot.")],
    step: Annotated[str, typer.Argument(help="The step's id, its template, or its number in the sequence.")],
    lead: Annotated[
        str | None,
        typer.Option(
            "--lead",
            metavar="EMAIL",
            help="A lead's address (a sample lead's or a real lead's); default: the folder's first sample.",
        ),
    ] = None,
    format_: Annotated[
        Format,
        typer.Option(
            "--format",
            "-f",
            help="The whole message (eml), its HTML or its plain text; for a direct-mail step, "
            "its HTML or the printed piece as PDF.",
        ),
    ] = Format.EML,
    out_file: Annotated[
        Path | None, typer.Option("--out", "-o", metavar="FILE", help="Write to FILE instead of the screen.")
    ] = None,
) -> None:
    """Show the exact message a step sends to a lead, byte for byte as the SMTP channel
    sends it (only the Date and the Message-ID are those of this moment)."""
    from campaignd.clock import utcnow
    from campaignd.config import Channel
    from campaignd.message import build_email, message_id

    settings, found, lead_ctx, rendered, links = _make(tier, step, lead)
    tier = tier.lower()
    data: bytes
    if found.channel == Channel.MAIL:
        if format_ == Format.PDF:
            from campaignd.printing import html_to_pdf

            if out_file is None and sys.stdout.isatty():
                raise CampaigndError("a PDF is not for the terminal: write it with --out FILE")
            data = html_to_pdf(rendered.html, root=settings.templates)
        elif format_ == Format.HTML:
            data = rendered.html.encode("utf-8")
        else:
            raise CampaigndError(
                f"{tier}/{found.id} is a direct-mail step: "
                "preview its piece with --format pdf or --format html"
            )
    elif format_ == Format.PDF:
        raise CampaigndError(f"{tier}/{found.id} is an email step: --format pdf is for direct-mail steps")
    elif format_ == Format.HTML:
        data = rendered.html.encode("utf-8")
    elif format_ == Format.TEXT:
        data = rendered.text.encode("utf-8")
    else:
        data = build_email(
            rendered,
            sender=settings.sender,
            to_name=f"{lead_ctx['first_name']} {lead_ctx['last_name']}",
            to_address=str(lead_ctx["email"]),
            msg_id=message_id(touch_id=0, lead_id=int(lead_ctx["id"]), sender=settings.sender),
            date=utcnow(),
            links=links,
            step_label=f"{tier}/{found.id}",
        )
    if out_file is not None:
        try:
            out_file.write_bytes(data)
        except OSError as exc:
            raise CampaigndError(f"cannot write {out_file}: {exc.strerror or exc}") from None
        out(f"wrote {tier}/{found.id} for {lead_ctx['email']} to {out_file} ({len(data)} bytes)")
        return
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@app.command("send-test")
def send_test(
    tier: Annotated[str, typer.Argument(help="cold, warm or hot.")],
    step: Annotated[str, typer.Argument(help="The step's id, its template, or its number in the sequence.")],
    to: Annotated[str, typer.Option("--to", metavar="ADDRESS", help="Where to send the test message.")],
    lead: Annotated[
        str | None,
        typer.Option(
            "--lead",
            metavar="EMAIL",
            help="Render it for this lead (a sample lead's or a real lead's address); "
            "default: the folder's first sample lead.",
        ),
    ] = None,
) -> None:
    """Send one rendered step to a test address through the configured channel (the SMTP
    relay, or the local outbox), without counting a touch or changing any lead.

    The message is the one the lead would get, addressed to ADDRESS; its unsubscribe
    links are a sample lead's, so clicking them in the test unsubscribes nobody.
    """
    from campaignd.channels import Outcome, Outgoing
    from campaignd.clock import utcnow
    from campaignd.config import Channel
    from campaignd.daemon import build_channels
    from campaignd.message import addr_spec, build_email, one_off_message_id

    try:
        addr_spec(to)
    except ValueError:
        raise CampaigndError(f"{to!r} is not an email address") from None
    # A test recipient who clicks unsubscribe must not unsubscribe the lead it was made for.
    settings, found, _, rendered, links = _make(tier, step, lead, sample_links=True)
    tier = tier.lower()
    if found.channel != Channel.EMAIL:
        raise CampaigndError(f"{tier}/{found.id} is a direct-mail step: there is nothing to email")
    msg_id = one_off_message_id(sender=settings.sender, nonce=secrets.token_hex(8))
    data = build_email(
        rendered,
        sender=settings.sender,
        to_name="",
        to_address=to,
        msg_id=msg_id,
        date=utcnow(),
        links=links,
        step_label=f"{tier}/{found.id}",
        extra_headers=[("X-Campaignd-Test", "yes")],
    )
    channel = build_channels(settings)["email"]
    message = Outgoing(
        0, settings.sender.from_address, to, data, msg_id, filename_hint=f"test-{tier}-{found.id}"
    )

    async def deliver() -> Any:
        await channel.open()
        try:
            return await channel.send(message)
        finally:
            await channel.close()

    delivery = asyncio.run(deliver())
    if delivery.outcome != Outcome.SENT:
        raise CampaigndError(f"the test message was not sent ({delivery.outcome.value}): {delivery.detail}")
    out(f"sent {tier}/{found.id} to {to} via {channel.name}: {delivery.detail}")
