"""Config files and leads for tests: real TOML files, the real templates."""

from __future__ import annotations

from pathlib import Path

from campaignd.config import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"

SEQUENCES = """
[sequences.cold]
steps = [
  { template = "cold/01-intro", delay = "0s" },
  { template = "cold/02-postcard", channel = "mail", delay = "1h" },
  { template = "cold/03-reminder", delay = "1d" },
]

[sequences.warm]
steps = [
  { template = "warm/01-sales-letter", delay = "1d" },
  { template = "warm/02-seminar", delay = "1d", event = "winter-seminar" },
  { template = "warm/03-last-call", delay = "1d" },
]
"""

CAMPAIGN = """
[campaign]
tagline = "Heating, insulation and repairs for local businesses"

[campaign.offer]
headline = "a free home energy check"
pitch = "cut their heating bills"
details = "One of our engineers walks your building with a thermal camera."
expires = "31 January"
url = "https://harborhome.example/offer"

[campaign.contact]
name = "Dana Whitfield"
title = "Owner, Harbor Home Services"
phone = "+1 217 555 0142"

[events.winter-seminar]
title = "Winter-proof your building"
start = 2027-01-14T18:30:00
duration = "90m"
location = "Springfield Public Library, 301 Main Street, Springfield, IL 62701"
url = "https://harborhome.example/seminar"
description = "Insulation, heating and the grants available this year."
"""


def config_text(
    *,
    state_dir: Path,
    db_url: str = "",
    smtp_port: int | None = None,
    threshold: int = 5,
    sequences: str = SEQUENCES,
    extra: str = "",
) -> str:
    smtp = ""
    if smtp_port is not None:
        smtp = f"""
[smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
connections = 2
timeout = "5s"
"""
    database = f'\n[database]\nurl = "{db_url}"\n' if db_url else ""
    return f"""
state_dir = "{state_dir}"
templates = "{TEMPLATES}"
timezone = "America/Chicago"

[sender]
from_name = "Harbor Home Services"
from_address = "hello@harborhome.example"
reply_to = "sales@harborhome.example"
postal_address = "Harbor Home Services, 418 Lakeshore Drive, Springfield, IL 62704, USA"

[followup]
threshold = {threshold}

[unsubscribe]
base_url = "https://harborhome.example/campaignd"
mailto = "unsubscribe@harborhome.example"
{database}{smtp}
{extra}
{CAMPAIGN}
{sequences}
"""


def write_config(tmp_path: Path, **kwargs: object) -> Path:
    path = tmp_path / "campaignd.toml"
    path.write_text(config_text(state_dir=tmp_path / "state", **kwargs))  # type: ignore[arg-type]
    return path


def make_settings(tmp_path: Path, **kwargs: object) -> Settings:
    return load_settings(write_config(tmp_path, **kwargs), environ={}, dotenv=None)
