"""Commands for the marketer's templates: check."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import typer

from campaignd.cli.app import STATE, app, out
from campaignd.exceptions import TemplateError

templates_app = typer.Typer(help="Check the templates the sequences use.", no_args_is_help=True)
app.add_typer(templates_app, name="templates")


@templates_app.command("check")
def templates_check(
    all_leads: Annotated[
        bool, typer.Option("--all-leads", help="Also render for every active lead.")
    ] = False,
) -> None:
    """Render every template the sequences use and report each problem with file and line."""
    from campaignd.render import Renderer, lead_context
    from campaignd.unsubscribe import Signer, load_keys

    settings = STATE.settings()
    signer = Signer(
        keys=load_keys(settings, create=False),
        base_url=settings.unsubscribe.base_url,
        mailto=settings.unsubscribe.mailto,
    )
    renderer = Renderer(settings=settings)
    leads: Iterator[dict[str, Any]] = iter(())
    if all_leads:
        leads = (lead_context(rec) for rec in STATE.store().list_leads(active_only=True))
    problems = renderer.check(leads=leads, sample_links=signer.links(0, "jane.sample@example.com"))
    if problems:
        raise TemplateError(problems)
    steps = sum(len(s.steps) for s in settings.sequences.values())
    out(f"templates OK: {steps} steps in {settings.templates}")
