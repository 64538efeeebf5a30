"""Rendering: the sandboxed environment, the context templates see, shapes, invitations and
the template check. Real template files (the shipped ones, or small trees in tmp_path)."""

from __future__ import annotations

import html as html_lib
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import icalendar
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaignd.config import Channel, Settings, Step, load_settings
from campaignd.exceptions import ConfigError, Problem, TemplateError
from campaignd.render import SAMPLE_LEAD, Renderer, RenderError, ascii_html
from campaignd.unsubscribe import Links
from tests.factories import SEQUENCES, TEMPLATES, config_text

LINKS = Links(
    url="https://harborhome.example/campaignd/u/7.Q2hlY2tpbmdsaW5rczEyMzQ1",
    mailto="mailto:unsubscribe@harborhome.example?subject=unsubscribe%207.Q2hlY2tpbmdsaW5rczEyMzQ1",
)
POSTAL = "Harbor Home Services, 418 Lakeshore Drive, Springfield, IL 62704, USA"


def make_settings(
    tmp_path: Path, *, templates: Path = TEMPLATES, sequences: str = SEQUENCES, extra: str = ""
) -> Settings:
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = config_text(state_dir=tmp_path / "state", sequences=sequences, extra=extra)
    text = text.replace(f'templates = "{TEMPLATES}"', f'templates = "{templates}"')
    path = tmp_path / "campaignd.toml"
    path.write_text(text)
    return load_settings(path, environ={}, dotenv=None)


def tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A copy of the shipped templates with ``files`` added or replaced."""
    root = tmp_path / "templates"
    shutil.copytree(TEMPLATES, root)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def lead(**fields: Any) -> dict[str, Any]:
    out = {**SAMPLE_LEAD, "id": 7, **fields}
    out["name"] = f"{out['first_name']} {out['last_name']}".strip()
    return out


def step_of(s: Settings, tier: str, step_id: str) -> tuple[int, Step]:
    for index, step in enumerate(s.sequence(tier).steps):
        if step.id == step_id:
            return index, step
    raise AssertionError(step_id)


def render(renderer: Renderer, tier: str, step_id: str, who: dict[str, Any], links: Links = LINKS) -> Any:
    index, step = step_of(renderer.settings, tier, step_id)
    return renderer.render(lead=who, tier=tier, step=step, index=index, links=links)


ONE_STEP = '[sequences.cold]\nsteps = [{ template = "t/one" }]\n'
EXTENDS = '{% extends "base.html.j2" %}\n{% block body %}\n'


def one_step(tmp_path: Path, *, html: str, txt: str | None = None, subject: str = "Hello") -> Renderer:
    files = {"t/one.html.j2": html, "t/one.subject.j2": subject}
    if txt is not None:
        files["t/one.txt.j2"] = txt
    return Renderer(settings=make_settings(tmp_path, templates=tree(tmp_path, files), sequences=ONE_STEP))


# -- the environment ------------------------------------------------------------------------


def test_html_is_escaped_and_text_and_subject_are_not(tmp_path: Path) -> None:
    r = Renderer(settings=make_settings(tmp_path))
    who = lead(first_name="<script>alert(1)</script>", company="Brook & Sons")
    out = render(r, "cold", "01-intro", who)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out.html and "<script>" not in out.html
    assert "Brook &amp; Sons" in out.html
    assert "Dear <script>alert(1)</script>," in out.text
    assert "Brook & Sons" in out.text
    assert out.subject.startswith("<script>alert(1)</script>, a free home energy check for Brook & Sons")


def test_an_undefined_variable_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    r = one_step(
        tmp_path,
        html='{% extends "base.html.j2" %}\n{% block body %}\n<p>{{ offer.title }}</p>\n{% endblock %}\n',
    )
    with pytest.raises(RenderError) as caught:
        render(r, "cold", "one", lead())
    problem = caught.value.problem
    assert problem.source.endswith("t/one.html.j2") and problem.where == "line 3"
    assert "undefined variable" in problem.reason and "offer" in problem.reason


def test_a_custom_field_one_lead_lacks_is_an_error_for_that_lead_only(tmp_path: Path) -> None:
    html = EXTENDS + "<p>Dear {{ lead.custom.salutation }} {{ lead.last_name }},</p>\n{% endblock %}\n"
    r = one_step(tmp_path, html=html)
    has = render(r, "cold", "one", lead(custom={"salutation": "Dr."}, last_name="Okafor"))
    assert "Dear Dr. Okafor," in has.html
    for _ in range(2):  # the first for this shape is traced, the second is not
        with pytest.raises(RenderError) as caught:
            render(r, "cold", "one", lead(custom={}))
        assert caught.value.problem.where == "line 3"
        assert "lead.custom.salutation is not set for this lead" in caught.value.problem.reason
    assert "Dear Ms. Li," in render(r, "cold", "one", lead(custom={"salutation": "Ms."}, last_name="Li")).html


@pytest.mark.parametrize(
    "expression",
    [
        "lead.__class__.__mro__",
        "''.__class__.__subclasses__()",
        "campaign.offer.update({'headline': 'hacked'})",
        "campaign.offer.pop('headline')",
        "lead.custom.setdefault('x', 1)",
    ],
)
def test_templates_run_in_the_sandbox_and_cannot_change_their_data(tmp_path: Path, expression: str) -> None:
    r = one_step(
        tmp_path, html='{% extends "base.html.j2" %}{% block body %}{{ ' + expression + " }}{% endblock %}"
    )
    with pytest.raises(RenderError) as caught:
        render(r, "cold", "one", lead())
    assert (
        "not allowed in a template" in caught.value.problem.reason
        or "undefined" in caught.value.problem.reason
    )
    assert r.settings.campaign["offer"]["headline"] == "a free home energy check"


def test_a_field_named_like_a_dict_method_is_the_field(tmp_path: Path) -> None:
    html = EXTENDS + "<p>{{ lead.custom.update }}/{{ lead.custom.items }}</p>{% endblock %}"
    r = one_step(tmp_path, html=html)
    out = render(r, "cold", "one", lead(custom={"update": "monthly", "items": "three"}))
    assert ">monthly/three</p>" in out.html


def test_css_is_inlined_and_media_rules_kept(tmp_path: Path) -> None:
    out = render(Renderer(settings=make_settings(tmp_path)), "cold", "01-intro", lead())
    assert 'class="cta"' in out.html
    cta = out.html.split('class="cta"', 1)[1].split(">", 1)[0]
    assert "background: #d9822b" in cta
    assert "@media (max-width: 640px)" in out.html
    assert ".content p {" not in out.html  # the rules themselves are gone into the elements


class _Counter(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Counter.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "text/css")
        self.end_headers()
        self.wfile.write(b".x { color: red }")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def css_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Counter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Counter.hits = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_nothing_remote_is_fetched_while_rendering(tmp_path: Path, css_server: str) -> None:
    html = (
        f'<html><head><link rel="stylesheet" href="{css_server}/linked.css">'
        f"<style>@import url({css_server}/imported.css); p {{ color: blue }}</style></head>"
        f"<body><p>{{{{ postal_address }}}} {{{{ unsubscribe_url }}}}</p></body></html>"
    )
    r = one_step(tmp_path, html=html)
    out = render(r, "cold", "one", lead())
    assert 'style="color: blue;"' in out.html
    assert _Counter.hits == []
    problems = r.check(sample_links=LINKS)
    assert any("linked stylesheet is never loaded" in p.reason and p.where == "line 1" for p in problems)


def test_a_missing_text_part_is_made_from_the_html(tmp_path: Path) -> None:
    html = (
        '{% extends "base.html.j2" %}{% block body %}<p>Dear {{ lead.first_name }},</p>'
        '<p><a href="https://harborhome.example/offer">See the offer</a></p>{% endblock %}'
    )
    r = one_step(tmp_path, html=html)
    out = render(r, "cold", "one", lead(first_name="Maria"))
    assert out.text_generated
    assert "Dear Maria," in out.text
    assert "https://harborhome.example/offer" in out.text
    assert LINKS.url in out.text and "418 Lakeshore Drive" in out.text
    assert r.check(sample_links=LINKS) == []
    assert r.steps_without_text() == [str(r.root / "t/one.txt.j2")]


# -- what templates see ---------------------------------------------------------------------


def test_templates_see_lead_sender_step_campaign_event_and_links(tmp_path: Path) -> None:
    html = (
        "{{ lead.first_name }}|{{ lead.name }}|{{ lead.company }}|{{ lead.custom.industry }}|"
        "{{ sender.from_name }}|{{ sender.from_address }}|{{ sender.reply_to }}|{{ postal_address }}|"
        "{{ step.id }}|{{ step.tier }}|{{ step.number }}|{{ step.channel }}|{{ campaign.offer.headline }}|"
        "{{ event.title }}|{{ event.when }}|{{ event.url }}|{{ events['winter-seminar'].location }}|"
        "{{ unsubscribe_url }}|{{ unsubscribe_mailto }}"
    )
    sequences = '[sequences.warm]\nsteps = [{ template = "t/one", event = "winter-seminar" }]\n'
    files = {"t/one.html.j2": html, "t/one.subject.j2": "x", "t/one.txt.j2": "x"}
    r = Renderer(settings=make_settings(tmp_path, templates=tree(tmp_path, files), sequences=sequences))
    who = lead(
        first_name="Maria", last_name="Gonzalez", company="Lakeview Dental", custom={"industry": "dental"}
    )
    page = html_lib.unescape(render(r, "warm", "one", who).html)  # (non-ASCII goes as &#...;)
    out = page.split("<body>")[1].split("</body>")[0].split("|")
    assert out == [
        "Maria",
        "Maria Gonzalez",
        "Lakeview Dental",
        "dental",
        "Harbor Home Services",
        "hello@harborhome.example",
        "sales@harborhome.example",
        POSTAL,
        "one",
        "warm",
        "1",
        "email",
        "a free home energy check",
        "Winter-proof your building",
        "Thursday 14 January 2027, 18:30–20:00 CST",
        "https://harborhome.example/seminar",
        "Springfield Public Library, 301 Main Street, Springfield, IL 62701",
        LINKS.url,
        LINKS.mailto,
    ]


def test_a_seminar_step_carries_its_event_as_an_ics_invitation(tmp_path: Path) -> None:
    r = Renderer(settings=make_settings(tmp_path))
    out = render(r, "warm", "02-seminar", lead())
    assert "Thursday 14 January 2027" in out.subject
    [attachment] = out.attachments
    assert attachment.filename == "winter-seminar.ics"
    assert attachment.content_type == "text/calendar; method=PUBLISH"
    stamp = datetime(2026, 12, 1, 15, 4, 5, tzinfo=UTC)
    cal = icalendar.Calendar.from_ical(attachment.content(stamp))
    assert cal["METHOD"] == "PUBLISH" and cal["VERSION"] == "2.0"
    [event] = cal.walk("VEVENT")
    assert str(event["UID"]) == "campaignd-event-winter-seminar@harborhome.example"
    assert event.decoded("DTSTAMP") == stamp
    start, end = event.decoded("DTSTART"), event.decoded("DTEND")
    assert (start.year, start.month, start.day, start.hour, start.minute) == (2027, 1, 14, 18, 30)
    assert str(start.tzinfo) == "America/Chicago" and event["DTSTART"].params["TZID"] == "America/Chicago"
    assert (end - start).total_seconds() == 90 * 60
    assert str(event["LOCATION"]) == "Springfield Public Library, 301 Main Street, Springfield, IL 62701"
    assert str(event["URL"]) == "https://harborhome.example/seminar"
    assert [str(tz["TZID"]) for tz in cal.walk("VTIMEZONE")] == ["America/Chicago"]
    # The same UID from another renderer (a restart, a reload): calendars update, not duplicate.
    again = Renderer(settings=make_settings(tmp_path / "again"))
    other = render(again, "warm", "02-seminar", lead(email="x@example.com")).attachments[0].content(stamp)
    assert other == attachment.content(stamp)
    # Other steps carry nothing.
    assert render(r, "warm", "01-sales-letter", lead()).attachments == ()


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ('start = 2027-01-14T18:30:00-06:00\nduration = "1h"', "without an offset"),
        ("start = 2027-01-14T18:30:00\nend = 2027-01-14T18:00:00", "must end after it starts"),
        ("start = 2027-01-14T18:30:00", "either an end or a duration"),
        ('start = 2027-01-14T18:30:00\nduration = "1h"\nurl = "ftp://x"', "is not an http(s) URL"),
        ('start = 2027-01-14T18:30:00\nduration = "1h"\ntimezone = "Mars/Olympus"', "unknown time zone"),
    ],
)
def test_event_settings_are_validated(tmp_path: Path, event: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings(tmp_path, extra=f'[events.spring]\ntitle = "Spring"\n{event}\n')
    assert "events.spring" in str(caught.value) and reason in str(caught.value)


def test_a_step_naming_an_unknown_event_is_a_problem(tmp_path: Path) -> None:
    sequences = '[sequences.warm]\nsteps = [{ template = "warm/01-sales-letter", event = "summer" }]\n'
    r = Renderer(settings=make_settings(tmp_path, sequences=sequences))
    [problem] = r.check(sample_links=LINKS)
    assert problem.where == "sequences.warm.steps[0].event"
    assert "no event named 'summer'" in problem.reason and "[events.summer]" in problem.reason


def test_a_seminar_template_without_an_event_says_how_to_name_one(tmp_path: Path) -> None:
    sequences = '[sequences.warm]\nsteps = [{ template = "warm/02-seminar" }]\n'
    problems = Renderer(settings=make_settings(tmp_path, sequences=sequences)).check(sample_links=LINKS)
    assert problems
    assert problems[0].source.endswith("warm/02-seminar.subject.j2") and problems[0].where == "line 1"
    assert "'event' is undefined" in problems[0].reason and 'add event = "<name>"' in problems[0].reason


# -- shapes: one render per kind of lead, the same text as rendering each ---------------------

FIELD = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "  ",
            "&",
            "<b>bold</b>",
            '"quoted"',
            "O'Brien & Sons",
            "\xa0",
            "a\r\nb",
            "x\ry",
            "\t",
            "Zoë",
            "Ñúñez",
            "=?utf-8?q?x?=",
            "&amp;",
            "&copy=1",
            "{{ lead }}",
            "{0}",
            "}{",
            "\ue000",
            "\x00",
        ]
    ),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
)


def leads() -> st.SearchStrategy[dict[str, Any]]:
    custom = st.dictionaries(
        st.sampled_from(["industry", "salutation", "update", "colour", "tags"]), FIELD, max_size=3
    )
    return st.builds(
        lambda first, last, company, city, custom: lead(
            first_name=first, last_name=last, company=company, city=city, custom=custom
        ),
        FIELD,
        FIELD,
        FIELD,
        FIELD,
        custom,
    )


def same(shaped: Renderer, plain: Renderer, tier: str, step_id: str, who: dict[str, Any]) -> None:
    try:
        expected = render(plain, tier, step_id, who)
    except RenderError as exc:
        with pytest.raises(RenderError) as caught:
            render(shaped, tier, step_id, who)
        assert (caught.value.problem.source, caught.value.problem.where) == (
            exc.problem.source,
            exc.problem.where,
        )
        return
    got = render(shaped, tier, step_id, who)
    assert got.subject == expected.subject
    assert got.text == expected.text
    assert got.html == expected.html  # the shape's once-inlined page is the per-message inlining


def test_shapes_give_what_rendering_each_lead_gives_for_every_example_step(tmp_path: Path) -> None:
    s = make_settings(tmp_path)
    shaped, plain = Renderer(settings=s), Renderer(settings=s, shapes=False)
    steps = [
        (tier.value, step.id)
        for tier, seq in s.sequences.items()
        for step in seq.steps
        if step.channel == Channel.EMAIL
    ]

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(who=leads())
    def check(who: dict[str, Any]) -> None:
        for tier, step_id in steps:
            same(shaped, plain, tier, step_id, who)

    check()
    for tier, step_id in steps:
        # Lead values only print or choose a branch: a handful of shapes serve every lead.
        assert 1 <= shaped.shape_count(tier, step_id) <= 8


ODD = {
    # branches, presence tests, attributes, title, comment, table, unescaped block, defaults
    "t/branch.html.j2": (
        "<!DOCTYPE html><html><head><title>{{ lead.first_name }}</title>"
        "<style>p { color: #123456 }</style></head>"
        '<body><p title="{{ lead.company }}">'
        "{% if lead.company %}<b>{{ lead.company }}</b>{% else %}none{% endif %}</p>"
        '<a href="https://x.example/?n={{ lead.first_name }}&amp;c={{ lead.city }}">'
        '{{ lead.first_name or "friend" }}</a>'
        "{% if lead.custom.industry is defined %}<p>{{ lead.custom.industry }}</p>{% endif %}"
        "<!-- {{ lead.last_name }} --><table>{{ lead.city }}<tr><td>{{ lead.last_name }}</td></tr></table>"
        "<p>{% autoescape false %}{{ lead.last_name }}{% endautoescape %}</p>"
        '<p>{{ lead.custom.update | default("no update") }}|{{ lead["first_name"] }}|'
        '{{ lead.custom.tags|d("") }}</p>'
        "<p>{{ unsubscribe_url }}</p></body></html>"
    ),
    "t/branch.txt.j2": (
        "{% if not lead.first_name %}Hello{% else %}Dear {{ lead.first_name }}{% endif %}\n"
        "{{ lead.company }}\n"
    ),
    "t/branch.subject.j2": "{{ lead.first_name or 'Hi' }} {{ lead.company }}",
    # things a shape cannot replay: filters, comparisons, loops, concatenation
    "t/filters.html.j2": (
        "<p>{{ lead.first_name | upper }} {{ lead.company | length }}"
        '{% if lead.city == "Springfield" %} local{% endif %}'
        "{% for k, v in lead.custom.items() %} {{ k }}={{ v }}{% endfor %} {{ lead.last_name ~ '!' }}</p>"
    ),
    "t/filters.txt.j2": "{{ lead.first_name | title }}",
    "t/filters.subject.j2": "{{ lead.company | trim }}",
    # captured output: set blocks, macros, super()
    "t/captures.html.j2": (
        '{% extends "t/layout.html.j2" %}{% macro m(x) %}[{{ x }}]{% endmacro %}'
        "{% block body %}{{ super() }}{% set who %}{{ lead.first_name }}{% endset %}"
        "<p>{{ who }}</p>{{ m(lead.company) }}{% endblock %}"
    ),
    "t/layout.html.j2": "<html><body>{% block body %}<p>{{ lead.city }}</p>{% endblock %}</body></html>",
    "t/captures.txt.j2": "{{ lead.first_name }}",
    "t/captures.subject.j2": "x",
    # a value inside a stylesheet
    "t/style.html.j2": (
        '<html><head><style>.x { color: {{ lead.custom.colour | default("red") }} }</style></head>'
        '<body><p class="x">{{ lead.first_name }}</p></body></html>'
    ),
    "t/style.txt.j2": "x",
    "t/style.subject.j2": "x",
    "t/super.html.j2": (
        '{% extends "t/layout.html.j2" %}'
        "{% block body %}<h1>{{ lead.company }}</h1>{{ super() }}{% endblock %}"
    ),
    "t/super.txt.j2": "x",
    "t/super.subject.j2": "x",
}
ODD_STEPS = ["branch", "filters", "captures", "style", "super"]


def test_shapes_give_what_rendering_each_lead_gives_for_templates_that_do_odd_things(tmp_path: Path) -> None:
    sequences = (
        "[sequences.cold]\nsteps = [" + ", ".join(f'{{ template = "t/{n}" }}' for n in ODD_STEPS) + "]\n"
    )
    s = make_settings(tmp_path, templates=tree(tmp_path, ODD), sequences=sequences)
    shaped, plain = Renderer(settings=s), Renderer(settings=s, shapes=False)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(who=leads())
    def check(who: dict[str, Any]) -> None:
        for step_id in ODD_STEPS:
            same(shaped, plain, "cold", step_id, who)

    check()
    assert shaped.shape_count("cold", "branch") > 1
    assert shaped.shape_count("cold", "super") >= 1
    # Filters, comparisons and captured output make a template render through Jinja each time.
    assert shaped.shape_count("cold", "filters") == 0
    assert shaped.shape_count("cold", "captures", "html") == 0
    assert shaped.shape_count("cold", "captures", "txt") >= 1


# -- the check -------------------------------------------------------------------------------


def problems_for(
    tmp_path: Path, files: dict[str, str], sequences: str = SEQUENCES, extra: str = ""
) -> list[Problem]:
    s = make_settings(tmp_path, templates=tree(tmp_path, files), sequences=sequences, extra=extra)
    return Renderer(settings=s).check(sample_links=LINKS)


def test_the_shipped_templates_pass_the_check(tmp_path: Path) -> None:
    assert Renderer(settings=make_settings(tmp_path)).check(sample_links=LINKS) == []


@pytest.mark.parametrize(
    ("name", "text", "line", "reason"),
    [
        (
            "cold/03-reminder.html.j2",
            '{% extends "base.html.j2" %}\n{% block body %}\n<p>{% if %}</p>\n',
            3,
            "syntax error",
        ),
        (
            "cold/03-reminder.html.j2",
            EXTENDS + "{{ lead.first_name | nosuchfilter }}\n{% endblock %}\n",
            3,
            "nosuchfilter",
        ),
        (
            "cold/03-reminder.txt.j2",
            '{% extends "base.txt.j2" %}\n{% block body %}\n\n{{ offer.url }}\n{% endblock %}\n',
            4,
            "undefined variable: 'offer' is undefined",
        ),
        ("base.html.j2", "<html>\n<body>\n{{ lead.first_name }\n</body></html>\n", 3, "syntax error"),
    ],
)
def test_a_broken_template_is_reported_with_file_line_and_reason(
    tmp_path: Path, name: str, text: str, line: int, reason: str
) -> None:
    problems = problems_for(tmp_path, {name: text})
    assert problems, "the broken template was not found"
    assert any(
        p.source == str(tmp_path / "templates" / name) and p.where == f"line {line}" and reason in p.reason
        for p in problems
    ), problems


def test_an_error_in_the_base_layout_names_the_layout(tmp_path: Path) -> None:
    base = (TEMPLATES / "base.txt.j2").read_text().replace("{{ postal_address }}", "{{ postal_adress }}")
    problems = problems_for(tmp_path, {"base.txt.j2": base})
    line = next(i for i, t in enumerate(base.splitlines(), 1) if "postal_adress" in t)
    assert {(p.source, p.where) for p in problems} == {
        (str(tmp_path / "templates/base.txt.j2"), f"line {line}")
    }


def test_a_missing_part_is_a_problem_but_a_missing_text_part_is_not(tmp_path: Path) -> None:
    root = tree(tmp_path, {})
    (root / "cold/03-reminder.subject.j2").unlink()
    (root / "cold/03-reminder.txt.j2").unlink()
    problems = Renderer(settings=make_settings(tmp_path, templates=root)).check(sample_links=LINKS)
    assert problems == [
        Problem(
            str(root / "cold/03-reminder.subject.j2"), "", "missing: step cold/03-reminder needs this file"
        )
    ]


def test_compliance_unsubscribe_link_postal_address_and_subject_in_every_email(tmp_path: Path) -> None:
    files = {
        "t/one.html.j2": "<html><body><p>Hello</p><p>{{ postal_address }}</p></body></html>",
        "t/one.txt.j2": "Hello\n{{ unsubscribe_url }}\n",
        "t/one.subject.j2": "{{ lead.custom.nothing | default('') }}",
    }
    problems = problems_for(tmp_path, files, sequences=ONE_STEP)
    root = tmp_path / "templates"
    assert {(p.source, p.reason.split(":")[0]) for p in problems} == {
        (str(root / "t/one.html.j2"), "no unsubscribe link in the HTML part"),
        (str(root / "t/one.txt.j2"), "the sender's postal address is missing from the plain-text part"),
        (str(root / "t/one.subject.j2"), "the subject is empty"),
    }


def test_the_postal_address_may_be_laid_out_on_several_lines(tmp_path: Path) -> None:
    files = {
        "t/one.html.j2": (
            "<html><body>{{ postal_address | replace(', ', '<br>') | safe }} "
            '<a href="{{ unsubscribe_url }}">Unsubscribe</a></body></html>'
        ),
        "t/one.txt.j2": "{{ postal_address | replace(', ', '\\n') }}\n{{ unsubscribe_url }}\n",
        "t/one.subject.j2": "Hi",
    }
    assert problems_for(tmp_path, files, sequences=ONE_STEP) == []


def test_no_postal_address_in_the_config_is_a_problem(tmp_path: Path) -> None:
    s = make_settings(tmp_path)
    s = s.model_copy(update={"sender": s.sender.model_copy(update={"postal_address": ""})})
    problems = Renderer(settings=s).check(sample_links=LINKS)
    assert problems[0].where == "sender.postal_address"


def test_each_folder_s_sample_leads_are_rendered(tmp_path: Path) -> None:
    html = (
        '{% extends "base.html.j2" %}{% block body %}<p>{{ lead.custom.salutation }} {{ lead.last_name }}</p>'
    )
    html += "{% endblock %}"
    files = {
        "t/one.html.j2": html,
        "t/one.subject.j2": "Hi",
        "t/one.txt.j2": (TEMPLATES / "base.txt.j2").read_text(),
    }
    sample = (
        '[[lead]]\nemail = "a@example.com"\nlast_name = "Ames"\n[lead.custom]\nsalutation = "Dr."\n\n'
        '[[lead]]\nemail = "b@example.com"\n'
    )
    problems = problems_for(tmp_path, {**files, "t/sample.toml": sample}, sequences=ONE_STEP)
    # The second sample lead has no salutation: the check catches what a real lead would hit.
    assert [(p.where, p.reason) for p in problems] == [
        ("line 1", "undefined variable: lead.custom.salutation is not set for this lead")
    ]
    fixed = sample.replace(
        'email = "b@example.com"\n', 'email = "b@example.com"\n[lead.custom]\nsalutation = "Ms."\n'
    )
    assert problems_for(tmp_path / "2", {**files, "t/sample.toml": fixed}, sequences=ONE_STEP) == []
    r = Renderer(
        settings=make_settings(
            tmp_path / "3",
            templates=tree(tmp_path / "3", {**files, "t/sample.toml": fixed}),
            sequences=ONE_STEP,
        )
    )
    first, second = r.sample_leads("t/one", tier="cold")
    assert (first["email"], first["last_name"], first["first_name"], first["tier"]) == (
        "a@example.com",
        "Ames",
        "Jane",
        "cold",
    )
    assert second["custom"] == {"salutation": "Ms."}


@pytest.mark.parametrize(
    ("sample", "where", "reason"),
    [
        ('[[lead]]\nemail = "a@example.com"\nfirst_name = \n', "line 3", "not valid TOML"),
        (
            '[[lead]]\nemail = "a@example.com"\nfrist_name = "Al"\n',
            "lead[0].frist_name",
            "unknown lead field",
        ),
        ('[leads]\nemail = "a@example.com"\n', "leads", "sample leads are [[lead]] tables"),
    ],
)
def test_a_broken_sample_file_is_reported(tmp_path: Path, sample: str, where: str, reason: str) -> None:
    problems = problems_for(tmp_path, {"cold/sample.toml": sample})
    assert [(p.source, p.where) for p in problems if reason in p.reason] == [
        (str(tmp_path / "templates/cold/sample.toml"), where)
    ]


def test_checking_real_leads_names_the_leads_a_template_fails_for(tmp_path: Path) -> None:
    html = '{% extends "base.html.j2" %}{% block body %}<p>{{ lead.custom.salutation }}</p>{% endblock %}'
    files = {
        "t/one.html.j2": html,
        "t/one.subject.j2": "Hi",
        "t/one.txt.j2": (TEMPLATES / "base.txt.j2").read_text(),
    }
    files["t/sample.toml"] = '[[lead]]\nemail = "s@example.com"\n[lead.custom]\nsalutation = "Dr."\n'
    r = Renderer(settings=make_settings(tmp_path, templates=tree(tmp_path, files), sequences=ONE_STEP))
    real = [
        lead(id=i, email=f"lead{i}@example.com", custom={} if i % 2 else {"salutation": "Mr."})
        for i in range(1, 11)
    ]
    [problem] = r.check(leads=real, sample_links=LINKS)
    assert problem.source.endswith("t/one.html.j2") and problem.where == "line 1"
    assert problem.reason.endswith(
        "(leads lead1@example.com, lead3@example.com, lead5@example.com and 2 more)"
    )


def test_letter_checks_are_run_for_direct_mail_steps(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    def fits(*, step: Step, tier: str, lead: Any, html: str, source: str) -> list[Problem]:
        seen.append((step.id, str(lead["email"])))
        return [Problem(source, "", "the address does not fit the window")] if "Dental" in html else []

    r = Renderer(settings=make_settings(tmp_path), letter_checks=[fits])
    problems = r.check(sample_links=LINKS)
    assert ("02-postcard", "maria.gonzalez@lakeview-dental.example") in seen
    assert [p.reason for p in problems] == ["the address does not fit the window"]


def test_check_or_raise_stops_with_every_problem(tmp_path: Path) -> None:
    root = tree(tmp_path, {"cold/01-intro.subject.j2": "{{ nope }}", "warm/03-last-call.html.j2": "{% if %}"})
    with pytest.raises(TemplateError) as caught:
        Renderer(settings=make_settings(tmp_path, templates=root)).check_or_raise(sample_links=LINKS)
    text = str(caught.value)
    assert text.startswith("2 template problem(s):")
    assert f"{root}/cold/01-intro.subject.j2: line 1: undefined variable" in text
    assert f"{root}/warm/03-last-call.html.j2: line 1: syntax error" in text


# -- HTML as ASCII ----------------------------------------------------------------------------


def test_html_travels_as_ascii_with_character_references(tmp_path: Path) -> None:
    r = Renderer(settings=make_settings(tmp_path))
    out = render(r, "warm", "01-sales-letter", lead(first_name="Zoë", company="Bücher & Söhne"))
    assert out.html.isascii()
    assert "Dear Zo&#235;," in out.html and "Dear Zoë," in html_lib.unescape(out.html)
    assert "B&#252;cher &amp; S&#246;hne" in out.html


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=30))
def test_ascii_html_changes_nothing_a_reader_sees(text: str) -> None:
    escaped = html_lib.escape(text)
    page = f'<p title="{escaped}">{escaped}</p><!-- {escaped} -->'
    page += f'<style>p::before {{ content: "→{text}" }}</style>'
    out = ascii_html(page)
    style = page[page.index("<style>") :]
    assert out.endswith(style)  # references are not decoded in a stylesheet: left alone
    # ASCII, but for C1 controls, which HTML reads differently as references
    assert all(ord(c) < 0xA0 for c in out[: -len(style)])
    assert html_lib.unescape(out[: -len(style)]) == html_lib.unescape(page[: -len(style)])


def test_a_mail_step_and_the_email_sent_in_its_place_do_not_mix(tmp_path: Path) -> None:
    files = {
        "t/piece.letter.html.j2": "<p>Letter for {{ lead.name }}</p>",
        "t/piece.subject.j2": "Instead of a letter, {{ lead.first_name }}",
        "t/piece.html.j2": EXTENDS + "<p>Email for {{ lead.name }}</p>{% endblock %}",
        "t/piece.txt.j2": '{% extends "base.txt.j2" %}{% block body %}Email for {{ lead.name }}'
        "{% endblock %}",
    }
    sequences = '[sequences.cold]\nsteps = [{ template = "t/piece", channel = "mail" }]\n'
    r = Renderer(settings=make_settings(tmp_path, templates=tree(tmp_path, files), sequences=sequences))
    index, step = step_of(r.settings, "cold", "piece")
    letter = r.render(lead=lead(), tier="cold", step=step, index=index, links=LINKS)
    assert letter.html == "<p>Letter for Jane Sample</p>" and letter.subject == ""
    instead = step.model_copy(update={"channel": Channel.EMAIL})
    email = r.render(lead=lead(), tier="cold", step=instead, index=index, links=LINKS)
    assert email.subject == "Instead of a letter, Jane" and "Email for Jane Sample" in email.text
    assert r.render(lead=lead(), tier="cold", step=step, index=index, links=LINKS).html == letter.html
