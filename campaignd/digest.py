"""The flagged-lead digest: what the sales side reads, built from plain data.

Owns the digest's read model (each lead to call with its contact details, flag and touch
timeline, and the period's totals), how a period is named (``--since 24h``, ``7d``, a
date), and every way of showing a digest: a table that fits the terminal, CSV for a
spreadsheet, JSON for scripts, and the email (subject, HTML and plain-text parts
rendered from ``templates/digest/``, the complete list attached as CSV).

Which period a scheduled digest covers, and sending it, belong to ``digest_job``; the
queries to ``store.digest``. This module imports no database, SMTP or scheduler module and
never reads the clock: times come in as arguments. Its only I/O is Jinja reading the
digest templates.
"""

from __future__ import annotations

import csv
import io
import json
import re
import textwrap
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, getaddresses
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from campaignd.config import Sender, parse_duration
from campaignd.exceptions import Problem, TemplateError

BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)
"""Where the first scheduled digest's period starts: it lists every lead still flagged."""

TEMPLATE_DIR = "digest"
TEMPLATE_PARTS = ("subject", "html", "txt")
HTML_BUDGET = 95_000
"""Bytes of HTML the email stays under: Gmail cuts a message's HTML at about 102 kB and
shows the rest only behind a link."""
ZIP_OVER = 2_000_000
"""Bytes of CSV above which the attached list is zipped: ten thousand leads with their
histories make several megabytes of text, which compress about tenfold."""
JSON_FORMAT = 1
"""Bumped only when a field of the JSON output changes meaning or disappears."""

CSV_COLUMNS = (
    "flagged_at",
    "first_name",
    "last_name",
    "company",
    "email",
    "phone",
    "address_line1",
    "address_line2",
    "city",
    "region",
    "postal_code",
    "country",
    "tier",
    "touches",
    "flag_reason",
    "last_touch_at",
    "timeline",
)

# -- the read model -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One touch that counted, as the salesperson sees it."""

    at: datetime
    channel: str
    tier: str
    step: str | None
    """None for a touch made by hand (a call, a meeting)."""
    template: str | None
    note: str | None

    @property
    def by_hand(self) -> bool:
        return self.step is None

    def describe(self) -> str:
        """``email cold/01-intro`` or ``call (by hand)``."""
        if self.by_hand:
            return f"{self.channel} (by hand)"
        what = self.template or f"{self.tier}/{self.step}"
        return f"{self.channel} {what}"


@dataclass(frozen=True, slots=True)
class DigestLead:
    """A lead flagged for sales follow-up, with everything needed to pick up the phone."""

    id: int
    email: str
    first_name: str
    last_name: str
    company: str
    phone: str
    address_line1: str
    address_line2: str
    city: str
    region: str
    postal_code: str
    country: str
    timezone: str
    tier: str
    touch_count: int
    flagged_at: datetime
    flag_reason: str
    last_touch_at: datetime | None
    timeline: tuple[TimelineEntry, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}".strip()

    @property
    def address_lines(self) -> list[str]:
        """The postal address as it goes on an envelope (US style: ``City, ST 12345``)."""
        town = " ".join(x for x in (self.region, self.postal_code) if x)
        last = ", ".join(x for x in (self.city, town) if x)
        return [x for x in (self.address_line1, self.address_line2, last, self.country) if x]


@dataclass(frozen=True, slots=True)
class Totals:
    """What happened in a digest's period, for every lead."""

    contacted: int = 0
    """Leads that got at least one touch."""
    touches: int = 0
    promoted: int = 0
    """Leads promoted from cold to warm."""
    flagged: int = 0
    """Flags raised, including leads since converted or unflagged."""
    converted: int = 0
    unsubscribed: int = 0
    bounced: int = 0
    failed: int = 0
    """Touches that failed or whose outcome is unknown (bounces included)."""

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("Leads contacted", self.contacted),
            ("Touches", self.touches),
            ("Promoted cold to warm", self.promoted),
            ("Flagged for sales", self.flagged),
            ("Converted", self.converted),
            ("Unsubscribed", self.unsubscribed),
            ("Bounced", self.bounced),
            ("Failed or unknown sends", self.failed),
        ]


@dataclass(frozen=True, slots=True)
class Digest:
    """The leads flagged in ``(start, end]``, newest flag first, and the period's totals."""

    start: datetime
    end: datetime
    leads: tuple[DigestLead, ...]
    totals: Totals

    @property
    def first(self) -> bool:
        """True for a digest that covers everything before ``end`` (the first scheduled one)."""
        return self.start <= BEGINNING


def period_contains(start: datetime, end: datetime, at: datetime) -> bool:
    """Whether ``at`` falls in a digest period: after its start, up to and including its end.

    Consecutive scheduled digests share a boundary (one's end is the next one's start), so
    a lead flagged exactly at the boundary is in the earlier digest and only that one.
    """
    return start < at <= end


# -- naming a period ------------------------------------------------------------------------------

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_since(text: str, *, now: datetime, zone: str) -> datetime:
    """The start of a period given as ``24h``, ``7d``, ``2026-01-05`` or ``2026-01-05 08:00``.

    A date without a time is midnight, and a time without an offset is local, in ``zone``.
    Raises ValueError with a reason the user can act on.
    """
    value = text.strip()
    try:
        if not re.match(r"^\d{4}-\d", value):
            return now - parse_duration(value)
        if _DATE.match(value):
            start = datetime.combine(date.fromisoformat(value), time(0), ZoneInfo(zone))
        else:
            start = datetime.fromisoformat(value)
            if start.tzinfo is None:
                start = start.replace(tzinfo=ZoneInfo(zone))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration ('24h', '7d') nor a date ('2026-01-05' or '2026-01-05 08:00')"
        ) from None
    start = start.astimezone(UTC)
    if start >= now:
        raise ValueError(f"{text!r} is not in the past")
    return start


# -- dates for people ------------------------------------------------------------------------------


def _local(value: datetime, zone: str) -> datetime:
    return value.astimezone(ZoneInfo(zone))


def _day(value: datetime) -> str:
    return f"{value:%a} {value.day} {value:%b %Y}"


def _stamp(value: datetime | None, zone: str) -> str:
    """``2026-01-05 07:42`` in ``zone``: sorts as text, and spreadsheets read it as a date."""
    return "" if value is None else _local(value, zone).strftime("%Y-%m-%d %H:%M")


def human_time(value: datetime, zone: str) -> str:
    """``Mon 5 Jan 2026, 07:42`` in ``zone``."""
    local = _local(value, zone)
    return f"{_day(local)}, {local:%H:%M}"


def _short(value: datetime, zone: str) -> str:
    """``Mon 5 Jan, 07:42`` in ``zone``: the year is in the digest's heading."""
    local = _local(value, zone)
    return f"{local:%a} {local.day} {local:%b}, {local:%H:%M}"


def describe_period(digest: Digest, zone: str) -> str:
    """``since Fri 9 Jan 2026, 08:00``, or ``until Mon 12 Jan 2026, 08:00`` for a digest that
    covers everything before its end (the first scheduled one)."""
    if digest.first:
        return f"until {human_time(digest.end, zone)}"
    return f"since {human_time(digest.start, zone)}"


# -- terminal table -------------------------------------------------------------------------------


def format_table(digest: Digest, *, zone: str, width: int = 100) -> str:
    """The digest as a table for a terminal ``width`` columns wide, then the totals.

    When the table is too wide the company and name columns give way first, then the
    phone and the email; the flag time drops its year when every flag is this year's.
    """
    count = len(digest.leads)
    title = f"{count} {'lead' if count == 1 else 'leads'} flagged for sales follow-up"
    lines = [*textwrap.wrap(f"{title} {describe_period(digest, zone)} ({zone})", width=max(width, 40)), ""]
    if digest.leads:
        year = _local(digest.end, zone).year
        short = all(_local(lead.flagged_at, zone).year == year for lead in digest.leads)
        header = ("flagged", "name", "company", "phone", "email", "tier", "touches")
        rows = [
            (
                _stamp(lead.flagged_at, zone)[5 if short else 0 :],
                lead.name,
                lead.company,
                lead.phone,
                lead.email,
                lead.tier,
                str(lead.touch_count),
            )
            for lead in digest.leads
        ]
        natural = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        # First the company and name give way; then the columns close up and the phone
        # and email give way too.
        for gap, shrink in ((2, _SHRINK[:2]), (1, _SHRINK)):
            widths = _fit(natural, width, gap, shrink)
            if sum(widths) + gap * (len(widths) - 1) <= width:
                break
        for row in (header, *rows):
            cells = [_clip(cell, widths[i]) for i, cell in enumerate(row)]
            cells = [c.rjust(widths[i]) if i == 6 else c.ljust(widths[i]) for i, c in enumerate(cells)]
            lines.append((" " * gap).join(cells).rstrip())
        lines.append("")
    totals = ", ".join(f"{label.lower()} {n}" for label, n in digest.totals.rows())
    lines += textwrap.wrap(f"totals {describe_period(digest, zone)}: {totals}", width=max(width, 40))
    if digest.leads:
        lines.append("(a lead's full history: campaignd leads show EMAIL)")
    return "\n".join(lines) + "\n"


# Columns that give way, in this order, when the terminal is narrow, and how far each
# may shrink: company, then name, then phone; the email identifies the lead and goes last.
_SHRINK = ((2, 6), (1, 10), (3, 15), (4, 16))


def _fit(widths: list[int], total: int, gap: int, shrink: Sequence[tuple[int, int]]) -> list[int]:
    widths = list(widths)
    excess = sum(widths) + gap * (len(widths) - 1) - total
    for column, floor in shrink:
        if excess <= 0:
            break
        cut = min(excess, max(widths[column] - floor, 0))
        widths[column] -= cut
        excess -= cut
    return widths


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


# -- CSV -------------------------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PHONE_SHAPED = re.compile(r"^[+\-]?[\d\s().\-/x]+$", re.IGNORECASE)


def _cell(value: str) -> str:
    # A spreadsheet runs a cell that starts like a formula, and lead data comes from
    # outside (web forms, bought lists), so such a cell is kept as text with a leading
    # apostrophe (OWASP's advice). A phone number such as "+1 217 555 0142" can hold no
    # formula worth the name and is left alone, so salespeople see it as it is.
    if value.startswith(_FORMULA_START) and not _PHONE_SHAPED.match(value):
        return "'" + value
    return value


def format_csv(digest: Digest, *, zone: str, bom: bool = False) -> str:
    """One row per lead, newest flag first; times are local to ``zone``.

    :param bom: start with a byte-order mark, so that Excel reads the file as UTF-8.
    """
    out = io.StringIO()
    if bom:
        out.write("\ufeff")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for lead in digest.leads:
        timeline = "\n".join(
            f"{_stamp(t.at, zone)} {t.describe()}" + (f": {t.note}" if t.note else "") for t in lead.timeline
        )
        row = [
            _stamp(lead.flagged_at, zone),
            lead.first_name,
            lead.last_name,
            lead.company,
            lead.email,
            lead.phone,
            lead.address_line1,
            lead.address_line2,
            lead.city,
            lead.region,
            lead.postal_code,
            lead.country,
            lead.tier,
            str(lead.touch_count),
            lead.flag_reason,
            _stamp(lead.last_touch_at, zone),
            timeline,
        ]
        writer.writerow([_cell(v) for v in row])
    return out.getvalue()


# -- JSON ------------------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def as_json(digest: Digest, *, zone: str) -> dict[str, Any]:
    """The digest as plain data for scripts. Times are UTC (ISO 8601, ``Z``); ``format``
    changes only when a field changes meaning or disappears."""
    return {
        "format": JSON_FORMAT,
        "period": {
            "start": None if digest.first else _iso(digest.start),
            "end": _iso(digest.end),
            "timezone": zone,
        },
        "count": len(digest.leads),
        "leads": [
            {
                "id": lead.id,
                "email": lead.email,
                "name": lead.name,
                "first_name": lead.first_name,
                "last_name": lead.last_name,
                "company": lead.company,
                "phone": lead.phone,
                "address": {
                    "line1": lead.address_line1,
                    "line2": lead.address_line2,
                    "city": lead.city,
                    "region": lead.region,
                    "postal_code": lead.postal_code,
                    "country": lead.country,
                },
                "timezone": lead.timezone,
                "tier": lead.tier,
                "touch_count": lead.touch_count,
                "flagged_at": _iso(lead.flagged_at),
                "flag_reason": lead.flag_reason,
                "last_touch_at": _iso(lead.last_touch_at),
                "timeline": [
                    {
                        "at": _iso(t.at),
                        "channel": t.channel,
                        "tier": t.tier,
                        "step": t.step,
                        "template": t.template,
                        "by_hand": t.by_hand,
                        "note": t.note,
                    }
                    for t in lead.timeline
                ],
            }
            for lead in digest.leads
        ],
        "totals": {
            "contacted": digest.totals.contacted,
            "touches": digest.totals.touches,
            "promoted": digest.totals.promoted,
            "flagged": digest.totals.flagged,
            "converted": digest.totals.converted,
            "unsubscribed": digest.totals.unsubscribed,
            "bounced": digest.totals.bounced,
            "failed": digest.totals.failed,
        },
    }


def format_json(digest: Digest, *, zone: str) -> str:
    return json.dumps(as_json(digest, zone=zone), indent=2, ensure_ascii=False) + "\n"


# -- the email --------------------------------------------------------------------------------------


def tel_href(phone: str) -> str:
    """A ``tel:`` link a phone dials (``tel:+12175550142``), or "" when there is no number.

    An extension (``x12``, ``ext. 12``) follows a comma, which phones dial as a pause.
    """
    match = re.match(r"^(.*?)(?:\s*(?:x|ext\.?|extension)\s*(\d+))?\s*$", phone.strip(), re.IGNORECASE)
    main, extension = (match.group(1), match.group(2)) if match else (phone, None)
    digits = re.sub(r"\D", "", main)
    if len(digits) < 3:
        return ""
    return "tel:" + ("+" if main.startswith("+") else "") + digits + (f",{extension}" if extension else "")


def mailto_href(email: str) -> str:
    return "mailto:" + quote(email, safe="@.+-_")


def attachment_name(digest: Digest, zone: str) -> str:
    return f"flagged-leads-{_local(digest.end, zone):%Y-%m-%d}.csv"


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    data: bytes
    maintype: str
    subtype: str


def attachment_for(digest: Digest, zone: str) -> Attachment | None:
    """The complete list as a CSV file (zipped when big), or None when there is no lead.

    The CSV starts with a byte-order mark, so that Excel opens it as UTF-8.
    """
    if not digest.leads:
        return None
    name = attachment_name(digest, zone)
    data = ("\ufeff" + format_csv(digest, zone=zone)).encode()
    if len(data) <= ZIP_OVER:
        return Attachment(name, data, "text", "csv")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        # Dated with the digest's end, not the clock, so that the same digest zips alike.
        info = zipfile.ZipInfo(name, date_time=_local(digest.end, zone).timetuple()[:6])
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, data)
    return Attachment(name.removesuffix(".csv") + ".zip", out.getvalue(), "application", "zip")


@dataclass(frozen=True, slots=True)
class RenderedDigest:
    subject: str
    html: str
    text: str


class DigestTemplates:
    """The digest's templates, in a sandboxed, strict environment like the marketing
    templates': undefined variables are errors, HTML is autoescaped, text is not.

    :param root: the templates folder; the digest's are ``digest/digest.{subject,html,txt}.j2``.
    """

    def __init__(self, *, root: Path) -> None:
        import css_inline
        import jinja2
        from jinja2.sandbox import SandboxedEnvironment

        self.root = root
        self.env = SandboxedEnvironment(
            loader=jinja2.FileSystemLoader(str(root)),
            undefined=jinja2.StrictUndefined,
            autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=False,
        )
        # Inline the stylesheet for mail clients that drop <style>; keep @media rules,
        # which only a <style> can carry. Never fetch anything over the network.
        self._inliner = css_inline.CSSInliner(keep_at_rules=True, load_remote_stylesheets=False)

    def names(self) -> list[str]:
        return [f"{TEMPLATE_DIR}/digest.{part}.j2" for part in TEMPLATE_PARTS]

    def render(
        self, digest: Digest, *, zone: str, sender: Sender, email_leads: int, attachment: str = ""
    ) -> RenderedDigest:
        """The email's subject, HTML and text; raises TemplateError naming the file and line.

        :param email_leads: list at most this many leads, newest flag first; the rest are
            counted, and are in the attachment. Fewer are listed when their HTML would
            pass :data:`HTML_BUDGET` (long touch histories).
        :param attachment: the file name of the attached list, if there is one.
        """
        shown = max(min(email_leads, len(digest.leads)), 1)
        while True:
            ctx = self.context(digest, zone=zone, sender=sender, email_leads=shown, attachment=attachment)
            subject, html, text = (self._render(name, ctx) for name in self.names())
            html = self._inliner.inline(html)
            size = len(html.encode())
            if size <= HTML_BUDGET or shown <= 1:
                return RenderedDigest(subject=" ".join(subject.split()), html=html, text=text)
            shown = max(1, min(shown - 1, shown * HTML_BUDGET // size))

    def _render(self, name: str, ctx: dict[str, Any]) -> str:
        import jinja2

        try:
            return self.env.get_template(name).render(ctx)
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(
                [Problem(str(self.root / name), "", f"template not found ({exc.name})")]
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            where = f"line {exc.lineno}"
            raise TemplateError(
                [Problem(exc.filename or str(self.root / name), where, f"syntax error: {exc.message}")]
            ) from None
        except Exception as exc:
            raise TemplateError([_runtime_problem(self.root / name, exc)]) from None

    def check(self, *, sender: Sender, end: datetime, zone: str) -> list[Problem]:
        """Every problem the digest templates have, found by rendering a sample digest."""
        problems: list[Problem] = []
        for digest in (sample_digest(end), Digest(end - timedelta(days=1), end, (), Totals())):
            try:
                rendered = self.render(digest, zone=zone, sender=sender, email_leads=1)
            except TemplateError as exc:
                problems += [p for p in exc.problems if p not in problems]
                continue
            if not rendered.subject:
                problems.append(Problem(str(self.root / self.names()[0]), "", "the subject is empty"))
        return problems

    def context(
        self, digest: Digest, *, zone: str, sender: Sender, email_leads: int, attachment: str = ""
    ) -> dict[str, Any]:
        """What the digest templates see."""
        shown = digest.leads[:email_leads]
        end = _local(digest.end, zone)
        return {
            "sender": {"from_name": sender.from_name, "postal_address": sender.postal_address},
            "digest": {
                "count": len(digest.leads),
                "leads": [_lead_context(lead, zone, sender) for lead in shown],
                "more": len(digest.leads) - len(shown),
                "attachment": attachment,
                "zipped": attachment.endswith(".zip"),
                "period": {
                    "first": digest.first,
                    "text": describe_period(digest, zone),
                    "start": "" if digest.first else human_time(digest.start, zone),
                    "end": human_time(digest.end, zone),
                    "end_day": f"{end:%a} {end.day} {end:%b}",
                    "timezone": zone,
                },
                "totals": [{"label": label, "value": n} for label, n in digest.totals.rows()],
            },
        }


def _lead_context(lead: DigestLead, zone: str, sender: Sender) -> dict[str, Any]:
    return {
        "name": lead.name,
        "first_name": lead.first_name,
        "company": lead.company,
        "email": lead.email,
        "mailto": mailto_href(lead.email),
        "phone": lead.phone,
        "tel": tel_href(lead.phone),
        "address_lines": lead.address_lines,
        "address": ", ".join(lead.address_lines),
        "tier": lead.tier,
        "touch_count": lead.touch_count,
        "flagged": human_time(lead.flagged_at, zone),
        "reason": lead.flag_reason,
        "last_touch": human_time(lead.last_touch_at, zone) if lead.last_touch_at else "",
        "timeline": [
            {
                "date": human_time(t.at, zone),
                "short": _short(t.at, zone),
                "channel": t.channel,
                "what": t.describe(),
                "step": t.step or "",
                "template": t.template or "",
                "by_hand": t.by_hand,
                "note": t.note or "",
            }
            for t in lead.timeline
        ],
    }


def _runtime_problem(path: Path, exc: Exception) -> Problem:
    """Locate a render-time error in the template line that raised it."""
    import jinja2

    source, line = str(path), 0
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(".j2"):
            source, line = tb.tb_frame.f_code.co_filename, tb.tb_lineno
        tb = tb.tb_next
    message = str(exc)
    if isinstance(exc, jinja2.UndefinedError):
        message = f"undefined variable: {message}"
    return Problem(source, f"line {line}" if line else "", message)


def envelope_recipients(recipients: Sequence[str]) -> list[str]:
    """The bare addresses of configured recipients (``Sales <s@x.com>`` gives ``s@x.com``)."""
    return [addr for _, addr in getaddresses(list(recipients)) if addr]


def digest_message_id(run_id: int, sender: Sender) -> str:
    """One Message-ID per recorded digest, so a retry to the remaining recipients keeps it."""
    domain = sender.from_address.rpartition("@")[2] or "localhost"
    return f"<campaignd.digest.{run_id}@{domain}>"


def build_message(
    rendered: RenderedDigest,
    *,
    sender: Sender,
    recipients: Sequence[str],
    msg_id: str,
    date: datetime,
    attachment: Attachment | None = None,
) -> bytes:
    """The digest email as bytes: text and HTML alternatives, and the list attached.

    It is internal mail to the sales team, not marketing, so it carries no unsubscribe
    link; ``Auto-Submitted`` keeps vacation responders from answering it (RFC 3834).
    """
    from campaignd.message import safe_header_text

    msg = EmailMessage(policy=SMTP)
    local, _, domain = sender.from_address.rpartition("@")
    msg["From"] = Address(
        display_name=safe_header_text(f"{sender.from_name} (campaignd)"), username=local, domain=domain
    )
    msg["To"] = ", ".join(safe_header_text(r) for r in recipients)
    msg["Subject"] = safe_header_text(rendered.subject)
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = msg_id
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Campaignd-Digest"] = "flagged leads"
    msg.set_content(rendered.text, subtype="plain", charset="utf-8")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8")
    if attachment is not None:
        msg.add_attachment(
            attachment.data,
            maintype=attachment.maintype,
            subtype=attachment.subtype,
            filename=attachment.filename,
        )
    return msg.as_bytes(policy=SMTP)


# -- sample data --------------------------------------------------------------------------------------


def sample_digest(end: datetime) -> Digest:
    """A small digest with every kind of entry, for checking templates."""
    flagged = end - timedelta(hours=3)
    emails = [
        TimelineEntry(flagged - timedelta(days=8 - i), "email", "cold", f"0{i}-step", f"cold/0{i}-step", None)
        for i in range(1, 4)
    ]
    call = TimelineEntry(flagged, "call", "warm", None, None, "Asked for a quote for the roof & gutters")
    touches = (*emails, call)
    lead = DigestLead(
        id=0,
        email="jane.sample@example.com",
        first_name="Jane",
        last_name="Sample",
        company="Sample & Co",
        phone="+1 555 0100",
        address_line1="1 Sample Street",
        address_line2="",
        city="Springfield",
        region="IL",
        postal_code="62701",
        country="US",
        timezone="America/Chicago",
        tier="warm",
        touch_count=len(touches),
        flagged_at=flagged,
        flag_reason="reached 4 touches (threshold 4)",
        last_touch_at=flagged,
        timeline=touches,
    )
    bare = DigestLead(
        id=1,
        email="no.details@example.com",
        first_name="",
        last_name="",
        company="",
        phone="",
        address_line1="",
        address_line2="",
        city="",
        region="",
        postal_code="",
        country="",
        timezone="",
        tier="cold",
        touch_count=0,
        flagged_at=flagged - timedelta(hours=1),
        flag_reason="flagged by hand",
        last_touch_at=None,
    )
    return Digest(
        end - timedelta(days=1),
        end,
        (lead, bare),
        Totals(
            contacted=5, touches=9, promoted=1, flagged=2, converted=1, unsubscribed=1, bounced=1, failed=1
        ),
    )


def check_templates(root: Path, *, sender: Sender, end: datetime, zone: str) -> None:
    """Raise TemplateError listing every problem in the digest templates under ``root``."""
    problems = DigestTemplates(root=root).check(sender=sender, end=end, zone=zone)
    if problems:
        raise TemplateError(problems)
