"""Rendering: the Jinja environment and turning a step's templates into text for one lead.

Owns where templates live (``<templates>/<name>.subject.j2``, ``.html.j2``, ``.txt.j2``;
direct-mail steps use ``<name>.letter.html.j2``), the sandboxed, strict environment they
run in (undefined variables are errors, HTML is autoescaped, text is not), the context
templates see, and checking every referenced template before anything is sent: each
problem is reported with the template file, the line and the reason.

Imports no database, SMTP or scheduler module.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from campaignd.config import Channel, Settings, Step, Tier
from campaignd.exceptions import Problem, TemplateError
from campaignd.unsubscribe import Links

EMAIL_PARTS = ("subject", "html", "txt")
MAIL_PARTS = ("letter.html",)
_FOLD = re.compile(r"[\r\n\t\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class Rendered:
    """One step rendered for one lead."""

    subject: str
    html: str
    text: str


class RenderError(Exception):
    """A template failed for one lead (for example a custom field it lacks)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        super().__init__(str(problem))


SAMPLE_LEAD: dict[str, Any] = {
    "id": 0,
    "email": "jane.sample@example.com",
    "first_name": "Jane",
    "last_name": "Sample",
    "name": "Jane Sample",
    "company": "Sample & Co",
    "phone": "+1 555 0100",
    "address_line1": "1 Sample Street",
    "address_line2": "",
    "city": "Springfield",
    "region": "IL",
    "postal_code": "62701",
    "country": "US",
    "timezone": "America/Chicago",
    "tier": "cold",
    "touch_count": 0,
    "custom": {},
}


def lead_context(lead: Any) -> dict[str, Any]:
    """The ``lead`` a template sees: contact fields, ``name`` and ``custom`` fields."""
    fields = [
        "id",
        "email",
        "first_name",
        "last_name",
        "company",
        "phone",
        "address_line1",
        "address_line2",
        "city",
        "region",
        "postal_code",
        "country",
        "timezone",
        "tier",
        "touch_count",
    ]
    ctx = {f: getattr(lead, f) for f in fields}
    ctx["name"] = f"{lead.first_name} {lead.last_name}".strip()
    ctx["custom"] = dict(lead.custom or {})
    return ctx


class Renderer:
    """Renders the configured templates.

    :param settings: the configuration (templates folder, sender, campaign data).
    """

    def __init__(self, *, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.templates
        self.env = self._environment(self.root)
        self._cache: dict[str, jinja2.Template] = {}
        self._sender = types.MappingProxyType(settings.sender.model_dump())
        self._campaign = types.MappingProxyType(dict(settings.campaign))

    @staticmethod
    def _environment(root: Path) -> SandboxedEnvironment:
        # Marketers edit these templates: run them sandboxed, fail on anything undefined,
        # and escape HTML output but never plain text or subjects.
        return SandboxedEnvironment(
            loader=jinja2.FileSystemLoader(str(root)),
            undefined=jinja2.StrictUndefined,
            autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=False,
        )

    def template(self, name: str) -> jinja2.Template:
        cached = self._cache.get(name)
        if cached is None:
            cached = self._cache[name] = self.env.get_template(name)
        return cached

    def parts_for(self, step: Step) -> tuple[str, ...]:
        return MAIL_PARTS if step.channel == Channel.MAIL else EMAIL_PARTS

    def context(
        self, *, lead: Mapping[str, Any], tier: str, step: Step, index: int, links: Links
    ) -> dict[str, Any]:
        return {
            "lead": lead,
            "sender": self._sender,
            "campaign": self._campaign,
            "step": {"id": step.id, "tier": tier, "number": index + 1, "channel": step.channel.value},
            "unsubscribe_url": links.url,
            "unsubscribe_mailto": links.mailto,
            "postal_address": self.settings.sender.postal_address,
        }

    def render(self, *, lead: Mapping[str, Any], tier: str, step: Step, index: int, links: Links) -> Rendered:
        """Render ``step`` for ``lead``; raises :class:`RenderError` naming file and line."""
        ctx = self.context(lead=lead, tier=tier, step=step, index=index, links=links)
        if step.channel == Channel.MAIL:
            letter = self._render_part(f"{step.template}.letter.html.j2", ctx)
            return Rendered(subject="", html=letter, text="")
        subject = _FOLD.sub(" ", self._render_part(f"{step.template}.subject.j2", ctx)).strip()
        html = self._render_part(f"{step.template}.html.j2", ctx)
        text = self._render_part(f"{step.template}.txt.j2", ctx)
        return Rendered(subject=subject, html=html, text=text)

    def _render_part(self, name: str, ctx: dict[str, Any]) -> str:
        try:
            return self.template(name).render(ctx)
        except jinja2.TemplateNotFound as exc:
            raise RenderError(
                Problem(str(self.root / name), "", f"template not found ({exc.name})")
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(_syntax_problem(self.root, exc)) from None
        except Exception as exc:
            raise RenderError(_runtime_problem(self.root, name, exc)) from None

    # -- checking ---------------------------------------------------------------------------

    def check(self, *, leads: Iterable[Mapping[str, Any]] = (), sample_links: Links) -> list[Problem]:
        """Every problem in the templates that the sequences reference.

        Each referenced part must exist, compile, and render with the sample lead (and
        every lead in ``leads``); every email must carry the postal address and the
        unsubscribe link.
        """
        problems: list[Problem] = []
        for tier, sequence in self.settings.sequences.items():
            for index, step in enumerate(sequence.steps):
                problems += self._check_step(tier, step, index, sample_links, leads)
        return _dedupe(problems)

    def _check_step(
        self, tier: Tier, step: Step, index: int, links: Links, leads: Iterable[Mapping[str, Any]]
    ) -> list[Problem]:
        problems: list[Problem] = []
        for part in self.parts_for(step):
            name = f"{step.template}.{part}.j2"
            if not (self.root / name).is_file():
                problems.append(
                    Problem(
                        str(self.root / name), "", f"missing: step {tier.value}/{step.id} needs this file"
                    )
                )
                continue
            try:
                self.template(name)
            except jinja2.TemplateSyntaxError as exc:
                problems.append(_syntax_problem(self.root, exc))
        if problems:
            return problems
        sample = {**SAMPLE_LEAD, "tier": tier.value}
        for lead in [sample, *leads]:
            try:
                rendered = self.render(lead=lead, tier=tier.value, step=step, index=index, links=links)
            except RenderError as exc:
                who = "" if lead is sample else f" (lead {lead.get('email')})"
                problems.append(Problem(exc.problem.source, exc.problem.where, exc.problem.reason + who))
                continue
            if step.channel == Channel.EMAIL:
                problems += self._compliance(tier, step, rendered, links)
        return problems

    def _compliance(self, tier: Tier, step: Step, rendered: Rendered, links: Links) -> list[Problem]:
        out: list[Problem] = []
        postal = self.settings.sender.postal_address
        for part, body in (("html", rendered.html), ("txt", rendered.text)):
            source = str(self.root / f"{step.template}.{part}.j2")
            if links.url not in body:
                out.append(
                    Problem(
                        source,
                        "",
                        "no unsubscribe link: include {{ unsubscribe_url }} "
                        "(the base layout does this for you)",
                    )
                )
            if not postal:
                out.append(
                    Problem(
                        "config",
                        "sender.postal_address",
                        "the business's postal address is required in every marketing email",
                    )
                )
            elif _squash(postal) not in _squash(_unescape(body)):
                out.append(
                    Problem(
                        source,
                        "",
                        "the sender's postal address is missing: include "
                        "{{ postal_address }} (the base layout does this for you)",
                    )
                )
        if not rendered.subject:
            out.append(Problem(str(self.root / f"{step.template}.subject.j2"), "", "the subject is empty"))
        return out

    def check_or_raise(self, *, sample_links: Links) -> None:
        problems = self.check(sample_links=sample_links)
        if problems:
            raise TemplateError(problems)


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _unescape(html: str) -> str:
    import html as html_mod

    return html_mod.unescape(re.sub(r"<[^>]+>", " ", html))


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[Problem] = set()
    out = []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _syntax_problem(root: Path, exc: jinja2.TemplateSyntaxError) -> Problem:
    source = exc.filename or str(root / (exc.name or "?"))
    return Problem(source, f"line {exc.lineno}", f"syntax error: {exc.message}")


def _runtime_problem(root: Path, name: str, exc: Exception) -> Problem:
    """Locate a render-time error in the template that raised it (which may be the base layout)."""
    source, line = str(root / name), 0
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".j2"):
            source, line = filename, tb.tb_lineno
        tb = tb.tb_next
    message = str(exc)
    if isinstance(exc, jinja2.UndefinedError):
        message = f"undefined variable: {message}"
    elif isinstance(exc, jinja2.exceptions.SecurityError):
        message = f"not allowed in a template: {message}"
    return Problem(source, f"line {line}" if line else "", message)
