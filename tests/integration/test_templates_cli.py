"""``templates check``, ``templates preview`` and ``send-test`` through the real entry point,
against real databases and a real SMTP server."""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from email import policy
from pathlib import Path

import icalendar
import pytest

from campaignd.database import create_engine
from campaignd.store import Store
from tests.factories import REPO, TEMPLATES, write_config
from tests.smtp import SmtpServer


def campaignd(*args: str, config: Path) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    env.pop("JOURNAL_STREAM", None)
    return subprocess.run(
        [sys.executable, "-m", "campaignd", "--config", str(config), *args],
        capture_output=True,
        env=env,
        timeout=120,
    )


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode()


@pytest.fixture
def smtpd() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def copy_templates(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    shutil.copytree(TEMPLATES, root)
    return root


def configure(tmp_path: Path, templates: Path | None = None, **kwargs: object) -> Path:
    path = write_config(tmp_path, **kwargs)
    if templates is not None:
        path.write_text(path.read_text().replace(f'templates = "{TEMPLATES}"', f'templates = "{templates}"'))
    return path


# -- check ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["campaignd.toml", "demo.toml"])
def test_check_passes_the_shipped_configs_and_templates(name: str) -> None:
    result = campaignd("templates", "check", config=REPO / "config" / name)
    assert result.returncode == 0, err(result)
    steps = {"campaignd.toml": 7, "demo.toml": 6}[name]
    assert result.stdout.decode().startswith(f"templates OK: {steps} steps in ")


@pytest.mark.parametrize(
    ("name", "text", "line", "reason"),
    [
        (
            "cold/01-intro.html.j2",
            '{% extends "base.html.j2" %}\n{% block body %}\n<p>{% for x in %}</p>\n{% endblock %}\n',
            3,
            "syntax error: Expected an expression",
        ),
        (
            "warm/01-sales-letter.txt.j2",
            '{% extends "base.txt.j2" %}\n{% block body %}\nDear {{ lead.frist_name }},\n{% endblock %}\n',
            3,
            "undefined variable: lead.frist_name is not set for this lead",
        ),
        (
            "cold/03-reminder.subject.j2",
            "{{ campaign.offer.headline | shout }}",
            1,
            "No filter named 'shout'",
        ),
    ],
    ids=["syntax-error", "unknown-variable", "unknown-filter"],
)
def test_a_broken_template_fails_the_check_with_file_line_and_reason(
    tmp_path: Path, name: str, text: str, line: int, reason: str
) -> None:
    templates = copy_templates(tmp_path)
    (templates / name).write_text(text)
    result = campaignd("templates", "check", config=configure(tmp_path, templates))
    assert result.returncode == 1
    assert "Traceback" not in err(result)
    assert "1 template problem(s):" in err(result)
    assert f"{templates / name}: line {line}: " in err(result) and reason in err(result)


def test_a_missing_unsubscribe_link_fails_the_check(tmp_path: Path) -> None:
    templates = copy_templates(tmp_path)
    base = templates / "base.txt.j2"
    base.write_text(base.read_text().replace("{{ unsubscribe_url }}", "(reply STOP)"))
    result = campaignd("templates", "check", config=configure(tmp_path, templates))
    assert result.returncode == 1
    for step in ("cold/01-intro", "cold/03-reminder", "warm/01-sales-letter", "warm/02-seminar"):
        assert f"{templates}/{step}.txt.j2: no unsubscribe link in the plain-text part" in err(result)


def test_check_all_leads_names_the_leads_a_custom_field_is_missing_for(tmp_path: Path, db_url: str) -> None:
    templates = copy_templates(tmp_path)
    letter = templates / "warm/01-sales-letter.html.j2"
    letter.write_text(letter.read_text().replace("<p>Dear {{", "<p>Dear {{ lead.custom.salutation }} {{"))
    sample = templates / "warm/sample.toml"
    sample.write_text(sample.read_text().replace("[lead.custom]\n", '[lead.custom]\nsalutation = "Mr."\n'))
    sample.write_text(sample.read_text() + '\n[lead.custom]\nsalutation = "Ms."\n')
    config = configure(tmp_path, templates, db_url=db_url if db_url.startswith("postgresql") else "")
    assert campaignd("db", "upgrade", config=config).returncode == 0
    leads = tmp_path / "leads.csv"
    leads.write_text(
        "email,first_name,last_name,tier,custom.salutation\n"
        "ada@example.com,Ada,Byron,warm,Dr.\n"
        "bo@example.com,Bo,Lee,warm,\n"
        "cy@example.com,Cy,Ng,cold,\n"
    )
    assert campaignd("leads", "import", str(leads), config=config).returncode == 0
    assert campaignd("templates", "check", config=config).returncode == 0
    result = campaignd("templates", "check", "--all-leads", config=config)
    assert result.returncode == 1
    line = next(i for i, text in enumerate(letter.read_text().splitlines(), 1) if "salutation" in text)
    assert (
        f"{letter}: line {line}: undefined variable: lead.custom.salutation is not set for this lead "
        "(leads bo@example.com, cy@example.com)"
    ) in err(result)
    assert "ada@example.com" not in err(result)


# -- preview ----------------------------------------------------------------------------------


def normalise(data: bytes) -> bytes:
    """The message without what belongs to the moment and the touch: Date, Message-ID and
    the boundaries derived from it."""
    data = re.sub(rb"^Date: .*\r\n", b"", data, flags=re.M)
    data = re.sub(rb"^Message-ID: .*\r\n", b"", data, flags=re.M)
    return re.sub(rb"=_(alt|mix)_[0-9a-f]{24}", rb"=_\1_BOUNDARY", data)


def test_preview_is_byte_for_byte_what_the_smtp_channel_sends(
    tmp_path: Path, db_url: str, smtpd: SmtpServer
) -> None:
    sequences = (
        '[sequences.cold]\nsteps = [{ template = "cold/01-intro" }]\n'
        '[sequences.warm]\nsteps = [{ template = "warm/01-sales-letter" }]\n'
    )
    url = db_url if db_url.startswith("postgresql") else ""
    config = configure(tmp_path, db_url=url, smtp_port=smtpd.port, sequences=sequences)
    assert campaignd("db", "upgrade", config=config).returncode == 0
    leads = tmp_path / "leads.csv"
    leads.write_text(
        "email,first_name,last_name,company,tier\n"
        "zoe@bücher.example,Zoë,Ñúñez,Bücher & Söhne,cold\n"
        "tom@becker.example,Tom,Becker,Becker Bakery,warm\n"
    )
    assert campaignd("leads", "import", str(leads), config=config).returncode == 0
    ran = campaignd("run", "--once", config=config)
    assert ran.returncode == 0, err(ran)
    received = {r.recipients[0]: r for r in smtpd.wait_for(2)}
    for address, tier, step in (
        ("zoe@xn--bcher-kva.example", "cold", "01-intro"),
        ("tom@becker.example", "warm", "01-sales-letter"),
    ):
        lead = "zoe@bücher.example" if address.startswith("zoe") else address
        preview = campaignd("templates", "preview", tier, step, "--lead", lead, config=config)
        assert preview.returncode == 0, err(preview)
        sent = received[address].data
        assert normalise(preview.stdout) == normalise(sent)
        assert normalise(preview.stdout) != preview.stdout  # the Date, Message-ID and boundaries were there


def test_preview_formats_files_and_sample_leads(tmp_path: Path) -> None:
    config = configure(tmp_path)
    eml = campaignd("templates", "preview", "warm", "02-seminar", config=config)
    assert eml.returncode == 0, err(eml)
    msg = email.message_from_bytes(eml.stdout, policy=policy.default)
    assert msg["To"] == "Tom Becker <tom.becker@becker-bakery.example>"  # warm/sample.toml's first lead
    invitation = [p for p in msg.walk() if p.get_content_type() == "text/calendar"]
    assert len(invitation) == 1
    assert icalendar.Calendar.from_ical(invitation[0].get_content())["METHOD"] == "PUBLISH"

    html = campaignd(
        "templates", "preview", "warm", "3", "--lead", "zoe.nunez@example.com", "-f", "html", config=config
    )
    assert html.returncode == 0
    page = html.stdout.decode()
    # Characters beyond ASCII travel as character references, which every browser shows as Zoë.
    assert page.startswith("<!DOCTYPE html>") and "Dear Zo&#235;," in page and 'style="' in page

    out = tmp_path / "intro.txt"
    text = campaignd(
        "templates", "preview", "cold", "cold/01-intro", "--format", "text", "--out", str(out), config=config
    )
    assert text.returncode == 0 and f"to {out}" in text.stdout.decode()
    assert out.read_text().startswith("Dear Maria,")

    letter = campaignd("templates", "preview", "cold", "02-postcard", config=config)
    assert letter.returncode == 1 and "direct-mail step" in err(letter) and "--format html" in err(letter)
    missing = campaignd("templates", "preview", "cold", "04-nothing", config=config)
    assert missing.returncode == 1
    assert "no step '04-nothing' in the cold sequence (its steps: 01-intro, 02-postcard, 03-reminder" in err(
        missing
    )
    unknown = campaignd(
        "templates", "preview", "cold", "01-intro", "--lead", "nobody@example.com", config=config
    )
    assert unknown.returncode == 1 and "Traceback" not in err(unknown)


# -- send-test --------------------------------------------------------------------------------


def test_send_test_goes_through_the_relay_and_counts_no_touch(
    tmp_path: Path, db_url: str, smtpd: SmtpServer
) -> None:
    config = configure(
        tmp_path, db_url=db_url if db_url.startswith("postgresql") else "", smtp_port=smtpd.port
    )
    assert campaignd("db", "upgrade", config=config).returncode == 0
    leads = tmp_path / "leads.csv"
    leads.write_text("email,first_name,last_name,company,tier\nana@example.com,Ana,Silva,Silva Studio,warm\n")
    assert campaignd("leads", "import", str(leads), config=config).returncode == 0

    result = campaignd(
        "send-test",
        "warm",
        "02-seminar",
        "--to",
        "marketing@harborhome.example",
        "--lead",
        "ana@example.com",
        config=config,
    )
    assert result.returncode == 0, err(result)
    assert "sent warm/02-seminar to marketing@harborhome.example via smtp: 250" in result.stdout.decode()
    [received] = smtpd.wait_for(1)
    assert received.recipients == ("marketing@harborhome.example",)
    msg = email.message_from_bytes(received.data, policy=policy.default)
    assert msg["To"] == "marketing@harborhome.example" and msg["X-Campaignd-Test"] == "yes"
    assert msg["Message-ID"].startswith("<campaignd.test.")
    body = msg.get_body(("plain",)).get_content()
    assert "Dear Ana," in body and "Silva Studio" in body
    # Its unsubscribe links are a sample lead's: a tester's click unsubscribes nobody.
    assert "/u/0." in msg["List-Unsubscribe"] and "/u/0." in body

    engine = create_engine(
        db_url if db_url.startswith("postgresql") else f"sqlite:///{tmp_path / 'state/campaignd.db'}"
    )
    try:
        store = Store(engine=engine)
        ana = store.get_lead("ana@example.com")
        assert store.touches_for(ana.id) == [] and ana.touch_count == 0
    finally:
        engine.dispose()


def test_send_test_without_a_relay_writes_to_the_outbox(tmp_path: Path) -> None:
    config = configure(tmp_path)
    result = campaignd("send-test", "cold", "01-intro", "--to", "me@example.com", config=config)
    assert result.returncode == 0, err(result)
    [written] = list((tmp_path / "state" / "outbox" / "new").glob("*.eml"))
    msg = email.message_from_bytes(written.read_bytes(), policy=policy.default)
    assert msg["To"] == "me@example.com" and msg["X-Campaignd-Step"] == "cold/01-intro"
    refused = campaignd("send-test", "cold", "01-intro", "--to", "not an address", config=config)
    assert refused.returncode == 1 and "is not an email address" in err(refused)
    mail = campaignd("send-test", "cold", "02-postcard", "--to", "me@example.com", config=config)
    assert mail.returncode == 1 and "direct-mail step" in err(mail)


# -- the daemon ------------------------------------------------------------------------------


def test_the_daemon_will_not_start_with_an_unknown_variable(tmp_path: Path, smtpd: SmtpServer) -> None:
    templates = copy_templates(tmp_path)
    reminder = templates / "cold/03-reminder.txt.j2"
    reminder.write_text(reminder.read_text().replace("{{ campaign.offer.url }}", "{{ campaign.offer.link }}"))
    config = configure(tmp_path, templates, smtp_port=smtpd.port)
    assert campaignd("db", "upgrade", config=config).returncode == 0
    leads = tmp_path / "leads.csv"
    leads.write_text("email,tier\nana@example.com,cold\n")
    assert campaignd("leads", "import", str(leads), config=config).returncode == 0
    result = campaignd("run", "--once", config=config)
    assert result.returncode == 1
    line = next(i for i, t in enumerate(reminder.read_text().splitlines(), 1) if "offer.link" in t)
    assert f"{reminder}: line {line}: undefined variable" in err(result) and "'link'" in err(result)
    assert smtpd.received == []


def test_preview_of_a_direct_mail_step_as_pdf_is_the_printed_piece(tmp_path: Path) -> None:
    from campaignd.printing import read_pdf

    config = configure(tmp_path)
    pdf = tmp_path / "postcard.pdf"
    made = campaignd(
        "templates", "preview", "cold", "02-postcard", "-f", "pdf", "-o", str(pdf), config=config
    )
    assert made.returncode == 0, err(made)
    pages = read_pdf(pdf)
    assert len(pages) == 2  # a postcard: the picture side and the address side
    address_side = " ".join(pages[1].text.split())
    assert "Maria Gonzalez" in address_side and "Lakeview Dental" in address_side  # cold/sample.toml
    assert all(font.embedded for page in pages for font in page.fonts)

    refused = campaignd("templates", "preview", "cold", "01-intro", "-f", "pdf", config=config)
    assert refused.returncode == 1 and "pdf is for direct-mail steps" in err(refused)
