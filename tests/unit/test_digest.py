"""The digest's pure parts: periods, the schedule, every output format and the email.

No database, no network and no clock: times are written out. The templates are the
shipped ones in ``templates/digest/``.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
from pydantic import ValidationError

from campaignd.config import DigestSettings, Sender
from campaignd.digest import (
    BEGINNING,
    CSV_COLUMNS,
    HTML_BUDGET,
    Digest,
    DigestLead,
    DigestTemplates,
    TimelineEntry,
    Totals,
    attachment_for,
    build_message,
    envelope_recipients,
    format_csv,
    format_json,
    format_table,
    mailto_href,
    parse_since,
    period_contains,
    sample_digest,
    tel_href,
)
from campaignd.schedules import previous_fire_time
from tests.factories import TEMPLATES

ZONE = "America/Chicago"
# Monday 2 March 2026, 08:00 in Chicago (CST, UTC-6).
MON_8 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
SENDER = Sender(
    from_name="Harbor Home Services",
    from_address="hello@harborhome.example",
    postal_address="Harbor Home Services, 418 Lakeshore Drive, Springfield, IL 62704, USA",
)


def lead(n: int, *, flagged_at: datetime, **fields: object) -> DigestLead:
    base = DigestLead(
        id=n,
        email=f"lead{n}@example.com",
        first_name="Maria",
        last_name="Gonzalez",
        company="Lakeview Dental",
        phone="+1 217 555 0142",
        address_line1="22 Elm Street",
        address_line2="",
        city="Springfield",
        region="IL",
        postal_code="62701",
        country="US",
        timezone=ZONE,
        tier="warm",
        touch_count=8,
        flagged_at=flagged_at,
        flag_reason="reached 8 touches (threshold 8)",
        last_touch_at=flagged_at,
        timeline=(
            TimelineEntry(flagged_at - timedelta(days=3), "email", "cold", "01-intro", "cold/01-intro", None),
            TimelineEntry(
                flagged_at - timedelta(days=2), "mail", "cold", "02-postcard", "cold/02-postcard", None
            ),
            TimelineEntry(flagged_at, "call", "warm", None, None, "Wants a quote before winter"),
        ),
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def digest_of(
    *leads: DigestLead, start: datetime = MON_8 - timedelta(days=1), end: datetime = MON_8
) -> Digest:
    return Digest(start, end, tuple(leads), Totals(contacted=12, touches=31, promoted=4, flagged=len(leads)))


# -- periods ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "inside"),
    [
        (MON_8 - timedelta(days=1), False),  # the start belongs to the previous digest
        (MON_8 - timedelta(days=1) + timedelta(microseconds=1), True),
        (MON_8 - timedelta(hours=5), True),
        (MON_8, True),  # the end is this digest's
        (MON_8 + timedelta(microseconds=1), False),
    ],
)
def test_a_period_holds_its_end_and_not_its_start(at: datetime, inside: bool) -> None:
    assert period_contains(MON_8 - timedelta(days=1), MON_8, at) is inside


def test_consecutive_periods_hold_every_instant_exactly_once() -> None:
    fires = [MON_8 + timedelta(days=d) for d in range(4)]
    periods = list(zip([BEGINNING, *fires], fires, strict=False))
    for probe in (fires[0], fires[1], fires[1] + timedelta(microseconds=1), fires[2] - timedelta(seconds=1)):
        assert sum(period_contains(s, e, probe) for s, e in periods) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", MON_8 - timedelta(hours=24)),
        ("7d", MON_8 - timedelta(days=7)),
        ("1h30m", MON_8 - timedelta(minutes=90)),
        ("2026-02-27", datetime(2026, 2, 27, 6, 0, tzinfo=UTC)),  # midnight in Chicago
        ("2026-02-27 08:00", datetime(2026, 2, 27, 14, 0, tzinfo=UTC)),
        ("2026-02-27T08:00:00+00:00", datetime(2026, 2, 27, 8, 0, tzinfo=UTC)),
    ],
)
def test_since_takes_durations_and_dates_in_the_digest_time_zone(text: str, expected: datetime) -> None:
    assert parse_since(text, now=MON_8, zone=ZONE) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("yesterday", "neither a duration"),
        ("2026-13-01", "neither a duration"),
        ("2026-03-03", "not in the past"),
        ("", "neither a duration"),
    ],
)
def test_since_explains_what_it_cannot_read(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_since(text, now=MON_8, zone=ZONE)


# -- the schedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "weekdays"),
    [
        ("0 8 * * mon-fri", "mon,tue,wed,thu,fri"),
        ("0 8 * * 1-5", "mon,tue,wed,thu,fri"),  # crontab numbers: 1 is Monday
        ("0 8 * * 0", "sun"),
        ("0 8 * * 7", "sun"),
        ("0 8 * * 5-7", "fri,sat,sun"),
        ("0 8 * * */2", "tue,thu,sat,sun"),  # 0, 2, 4, 6
        ("0 8 * * *", "*"),
        ("0 8 * * 0-6", "*"),
        ("@weekly", "sun"),
        ("*/5 * * * * *", "*"),
    ],
)
def test_weekdays_are_read_as_in_crontab(expression: str, weekdays: str) -> None:
    assert DigestSettings.cron_fields(expression)["day_of_week"] == weekdays


def test_a_sixth_field_in_front_gives_seconds() -> None:
    fields = DigestSettings.cron_fields("*/5 * * * * *")
    assert fields["second"] == "*/5"
    assert DigestSettings.cron_fields("0 8 * * *")["second"] == "0"


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("0 8 * *", "expected five fields"),
        ("61 8 * * *", "higher than the maximum"),
        ("0 8 * * 5-1", "must run from an earlier day"),
        ("0 8 * * funday", "is not a weekday"),
        ("0 8 * * 8", "is not a weekday"),
        ("0 8 30 2 *", "never happens"),
    ],
)
def test_a_bad_schedule_is_refused_with_the_reason(expression: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        DigestSettings(schedule=expression)


def trigger(expression: str) -> object:
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger(**DigestSettings.cron_fields(expression), timezone=ZONE)


@pytest.mark.parametrize(
    ("expression", "now", "expected"),
    [
        # weekdays at 08:00 Chicago: Monday 08:00 itself, then later that day, then Saturday
        ("0 8 * * mon-fri", MON_8, MON_8),
        ("0 8 * * mon-fri", MON_8 + timedelta(hours=6), MON_8),
        ("0 8 * * mon-fri", MON_8 - timedelta(seconds=1), MON_8 - timedelta(days=3)),  # Friday's
        ("0 8 * * mon-fri", MON_8 + timedelta(days=5, hours=3), MON_8 + timedelta(days=4)),  # Sat: Fri's
        ("*/5 * * * * *", MON_8 + timedelta(seconds=7), MON_8 + timedelta(seconds=5)),
        ("0 8 1 * *", MON_8 + timedelta(days=40), datetime(2026, 4, 1, 13, 0, tzinfo=UTC)),  # CDT
        ("0 8 1 1 *", MON_8, datetime(2026, 1, 1, 14, 0, tzinfo=UTC)),
    ],
)
def test_previous_fire_time_is_the_latest_at_or_before_now(
    expression: str, now: datetime, expected: datetime
) -> None:
    assert previous_fire_time(trigger(expression), now) == expected  # type: ignore[arg-type]


def test_recipients_are_checked_and_kept_with_their_names() -> None:
    settings = DigestSettings(recipients="Sales Team <sales@harborhome.example>, ann@harborhome.example")  # type: ignore[arg-type]
    assert settings.recipients == ("Sales Team <sales@harborhome.example>", "ann@harborhome.example")
    assert envelope_recipients(settings.recipients) == ["sales@harborhome.example", "ann@harborhome.example"]
    named = DigestSettings(recipients=('"Doe, Jane" <jane@example.com>', "JANE@example.com"))
    assert named.recipients == ('"Doe, Jane" <jane@example.com>',)  # the same address once
    with pytest.raises(ValidationError, match="'sales team' is not an email address"):
        DigestSettings(recipients=("sales team",))


# -- the terminal table ----------------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 100, 140])
def test_the_table_fits_the_terminal(width: int) -> None:
    leads = [
        lead(
            1, flagged_at=MON_8 - timedelta(hours=1), company="Schulz Architects & Engineering Partners LLC"
        ),
        lead(2, flagged_at=MON_8 - timedelta(hours=2), email="maria.gonzalez@lakeview-dental.example"),
    ]
    text = format_table(digest_of(*leads), zone=ZONE, width=width)
    assert all(len(line) <= width for line in text.splitlines()), text
    assert "+1 217 555 0142" in text  # a phone number is never cut
    if width >= 100:
        assert "maria.gonzalez@lakeview-dental.example" in text  # the email gives way last
    else:
        assert "maria.gonzalez@lake" in text and "…" in text
    if width == 100:
        assert "Schulz Architects & Engineering Partners LLC" not in text  # the company gave way first
    assert "2 leads flagged for sales follow-up since Sun 1 Mar 2026, 08:00" in text
    assert "touches 31" in text


def test_the_table_lists_the_newest_flag_first_as_given_and_says_when_there_is_none() -> None:
    text = format_table(digest_of(), zone=ZONE, width=100)
    assert text.startswith("0 leads flagged for sales follow-up since")
    first = format_table(digest_of(start=BEGINNING), zone=ZONE, width=100)
    assert "until Mon 2 Mar 2026, 08:00" in first


# -- CSV -------------------------------------------------------------------------------------------


def test_the_csv_has_one_row_per_lead_and_reads_back() -> None:
    leads = [lead(1, flagged_at=MON_8 - timedelta(hours=1)), lead(2, flagged_at=MON_8 - timedelta(hours=3))]
    text = format_csv(digest_of(*leads), zone=ZONE)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["email"] for r in rows] == ["lead1@example.com", "lead2@example.com"]
    assert rows[0]["flagged_at"] == "2026-03-02 07:00"  # local time, as a spreadsheet reads it
    assert rows[0]["phone"] == "+1 217 555 0142"  # a phone number is left as it is
    assert rows[0]["timeline"].splitlines() == [
        "2026-02-27 07:00 email cold/01-intro",
        "2026-02-28 07:00 mail cold/02-postcard",
        "2026-03-02 07:00 call (by hand): Wants a quote before winter",
    ]
    assert text.endswith("\r\n")
    assert format_csv(digest_of(*leads), zone=ZONE, bom=True).startswith("\ufeffflagged_at,")


def test_csv_cells_that_a_spreadsheet_would_run_are_kept_as_text() -> None:
    evil = lead(1, flagged_at=MON_8, company='=HYPERLINK("http://evil.example","x")', last_name="@SUM(A1)")
    row = next(csv.DictReader(io.StringIO(format_csv(digest_of(evil), zone=ZONE))))
    assert row["company"] == '\'=HYPERLINK("http://evil.example","x")'
    assert row["last_name"] == "'@SUM(A1)"


# -- JSON ------------------------------------------------------------------------------------------


def test_the_json_is_stable_for_scripts() -> None:
    data = json.loads(format_json(digest_of(lead(1, flagged_at=MON_8 - timedelta(hours=1))), zone=ZONE))
    assert data["format"] == 1
    assert data["period"] == {
        "start": "2026-03-01T14:00:00Z",
        "end": "2026-03-02T14:00:00Z",
        "timezone": ZONE,
    }
    assert data["count"] == 1
    first = data["leads"][0]
    assert set(first) == {
        "id",
        "email",
        "name",
        "first_name",
        "last_name",
        "company",
        "phone",
        "address",
        "timezone",
        "tier",
        "touch_count",
        "flagged_at",
        "flag_reason",
        "last_touch_at",
        "timeline",
    }
    assert first["flagged_at"] == "2026-03-02T13:00:00Z"
    assert first["timeline"][-1] == {
        "at": "2026-03-02T13:00:00Z",
        "channel": "call",
        "tier": "warm",
        "step": None,
        "template": None,
        "by_hand": True,
        "note": "Wants a quote before winter",
    }
    assert data["totals"] == {
        "contacted": 12,
        "touches": 31,
        "promoted": 4,
        "flagged": 1,
        "converted": 0,
        "unsubscribed": 0,
        "bounced": 0,
        "failed": 0,
    }
    assert json.loads(format_json(digest_of(start=BEGINNING), zone=ZONE))["period"]["start"] is None


# -- the email -------------------------------------------------------------------------------------


def render(digest: Digest, email_leads: int = 20) -> tuple[str, str, str]:
    attachment = attachment_for(digest, ZONE)
    r = DigestTemplates(root=TEMPLATES).render(
        digest,
        zone=ZONE,
        sender=SENDER,
        email_leads=email_leads,
        attachment=attachment.filename if attachment else "",
    )
    return r.subject, r.html, r.text


def test_the_email_has_what_a_salesperson_taps_and_reads() -> None:
    subject, html, text = render(digest_of(lead(1, flagged_at=MON_8 - timedelta(hours=1))))
    assert subject == "1 lead to call — Mon 2 Mar"
    assert 'href="tel:+12175550142"' in html
    assert 'href="mailto:lead1@example.com"' in html
    assert "Springfield, IL 62701" in html and "Springfield, IL 62701" in text
    assert "Wants a quote before winter" in html and "Wants a quote before winter" in text
    assert "email · cold/01-intro" in html
    assert "reached 8 touches (threshold 8)" in text
    assert "Leads contacted" in html and "Touches                    31" in text
    assert 'name="viewport"' in html  # reads on a phone
    assert 'style="' in html  # the stylesheet is inlined for mail clients that drop <style>
    assert "unsubscribe" not in html.lower().replace("unsubscribed", "")  # internal mail, not marketing


def test_the_subject_counts_the_leads() -> None:
    assert render(digest_of())[0] == "No new leads to call — Mon 2 Mar"
    two = digest_of(lead(1, flagged_at=MON_8), lead(2, flagged_at=MON_8 - timedelta(hours=1)))
    assert render(two)[0] == "2 leads to call — Mon 2 Mar"


def test_lead_data_cannot_inject_html() -> None:
    evil = lead(1, flagged_at=MON_8, company="<script>alert(1)</script>", first_name='"><img src=x>')
    _, html, text = render(digest_of(evil))
    assert "<script>alert(1)" not in html and "&lt;script&gt;" in html
    assert "<img src=x>" not in html
    assert "<script>alert(1)</script>" in text  # plain text is not HTML


def test_a_long_digest_lists_the_newest_and_points_to_the_attachment() -> None:
    leads = [lead(i, flagged_at=MON_8 - timedelta(minutes=i)) for i in range(1, 8)]
    subject, html, text = render(digest_of(*leads), email_leads=3)
    assert subject == "7 leads to call — Mon 2 Mar"
    assert html.count('href="mailto:lead') == 2 * 3  # button and address, three leads
    assert "lead3@example.com" in text and "lead4@example.com" not in text
    assert "... and 4 more. Every lead is in the attached flagged-leads-2026-03-02.csv." in text
    assert "flagged-leads-2026-03-02.csv" in html


def test_long_histories_keep_the_html_under_the_clipping_size() -> None:
    history = tuple(
        TimelineEntry(MON_8 - timedelta(days=i), "email", "cold", f"s{i}", f"cold/{i:02}-offer", "note " * 20)
        for i in range(30)
    )
    leads = [lead(i, flagged_at=MON_8 - timedelta(minutes=i), timeline=history) for i in range(1, 40)]
    _, html, text = render(digest_of(*leads), email_leads=39)
    assert len(html.encode()) <= HTML_BUDGET
    assert "more. Every lead is in the attached" in text


def test_the_message_is_text_and_html_with_the_csv_attached() -> None:
    digest = digest_of(lead(1, flagged_at=MON_8 - timedelta(hours=1), last_name="Gonzàlez"))
    attachment = attachment_for(digest, ZONE)
    assert attachment is not None and attachment.filename == "flagged-leads-2026-03-02.csv"
    rendered = DigestTemplates(root=TEMPLATES).render(
        digest, zone=ZONE, sender=SENDER, email_leads=20, attachment=attachment.filename
    )
    assert "The list is also attached as flagged-leads-2026-03-02.csv" in rendered.text
    data = build_message(
        rendered,
        sender=SENDER,
        recipients=("Sales Team <sales@harborhome.example>", '"Doe, Jane" <jane@harborhome.example>'),
        msg_id="<campaignd.digest.7@harborhome.example>",
        date=MON_8,
        attachment=attachment,
    )
    msg = message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in msg.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "text/csv",
    ]
    assert msg["Subject"] == "1 lead to call — Mon 2 Mar"
    assert msg["From"] == '"Harbor Home Services (campaignd)" <hello@harborhome.example>'
    assert [a.addr_spec for a in msg["To"].addresses] == [
        "sales@harborhome.example",
        "jane@harborhome.example",
    ]
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Message-ID"] == "<campaignd.digest.7@harborhome.example>"
    assert msg["List-Unsubscribe"] is None
    part = next(p for p in msg.walk() if p.get_content_type() == "text/csv")
    assert part.get_filename() == "flagged-leads-2026-03-02.csv"
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.startswith(b"\xef\xbb\xbf")  # Excel reads it as UTF-8
    assert "Gonzàlez" in payload.decode("utf-8-sig")
    assert attachment_for(digest_of(), ZONE) is None  # nothing to attach


def test_ten_thousand_flagged_leads_make_a_readable_email_and_a_complete_list() -> None:
    leads = [lead(i, flagged_at=MON_8 - timedelta(seconds=i)) for i in range(1, 10_001)]
    digest = digest_of(*leads)
    attachment = attachment_for(digest, ZONE)
    assert attachment is not None
    rendered = DigestTemplates(root=TEMPLATES).render(
        digest, zone=ZONE, sender=SENDER, email_leads=20, attachment=attachment.filename
    )
    data = build_message(
        rendered, sender=SENDER, recipients=("s@x.com",), msg_id="<x@y>", date=MON_8, attachment=attachment
    )
    assert rendered.subject == "10000 leads to call — Mon 2 Mar"
    assert len(rendered.html.encode()) < 100_000
    assert rendered.html.count('href="mailto:lead') == 2 * 20
    assert "... and 9980 more. Every lead is in the attached flagged-leads-2026-03-02.zip" in rendered.text
    assert "(a zipped CSV file)" in rendered.text
    # Megabytes of CSV travel zipped: the whole message stays small.
    assert (attachment.maintype, attachment.subtype) == ("application", "zip")
    assert len(data) < 1_000_000
    with zipfile.ZipFile(io.BytesIO(attachment.data)) as archive:
        assert archive.namelist() == ["flagged-leads-2026-03-02.csv"]
        text = archive.read("flagged-leads-2026-03-02.csv").decode("utf-8-sig")
    assert text == format_csv(digest, zone=ZONE)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 10_000 and rows[-1]["email"] == "lead10000@example.com"


def test_phone_and_mail_links() -> None:
    assert tel_href("+1 (217) 555-0142") == "tel:+12175550142"
    assert tel_href("217.555.0142 ext. 12") == "tel:2175550142,12"
    assert tel_href("n/a") == ""
    assert mailto_href("o'connor+sales@example.com") == "mailto:o%27connor+sales@example.com"


def test_the_sample_digest_renders_with_the_shipped_templates() -> None:
    assert DigestTemplates(root=TEMPLATES).check(sender=SENDER, end=MON_8, zone=ZONE) == []
    assert len(sample_digest(MON_8).leads) == 2
