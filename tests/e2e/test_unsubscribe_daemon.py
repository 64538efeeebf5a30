"""Unsubscribing from the running daemon: a real process, a real SMTP server, a real HTTP client.

The links come out of the messages the SMTP server received, exactly as a reader or a
mail provider would get them; the daemon serves them on a free loopback port (a reverse
proxy would forward ``https://harborhome.example/campaignd/...`` there).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import sqlalchemy as sa

from bench.unsubscribe_load import run as run_load
from campaignd.unsubscribe import make_token
from tests.conftest import drop_pg_schema, pg_schema_url
from tests.e2e.proc import Daemon
from tests.factories import REPO, write_config
from tests.smtp import SmtpServer

KEY = "e2e-signing-key-0123456789-abcdefghijklmnopqrs"
NEW_KEY = "e2e-rotated-key-0123456789-abcdefghijklmnopqrs"
SEQUENCES = """
[sequences.cold]
steps = [
  { template = "cold/01-intro", delay = "0s" },
  { template = "cold/03-reminder", delay = "10s" },
]

[sequences.warm]
steps = [
  { template = "warm/01-sales-letter", delay = "2s" },
  { template = "warm/03-last-call", delay = "2s" },
]
"""
MARIA = "maria.gonzalez@lakeview-dental.example"
TOM = "tom.becker@becker-bakery.example"
LIAM = "liam.oconnor@oconnor-legal.example"
LEADS_CSV = REPO / "examples" / "leads.csv"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    done = subprocess.run(
        [sys.executable, "-m", "campaignd", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done


def show(config: Path, email: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(cli(config, "leads", "show", email, "--json").stdout)
    return data


def prepare(tmp_path: Path, smtp_port: int, database: str = "") -> Path:
    extra = f"""
[dispatch]
interval = "1s"

[smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
connections = 2
timeout = "5s"
"""
    config = write_config(tmp_path, db_url=database, sequences=SEQUENCES, extra=extra)
    cli(config, "db", "upgrade")
    cli(config, "leads", "import", str(LEADS_CSV))
    return config


def start(
    config: Path, *, key: str = KEY, previous: str = "", listen: str = "127.0.0.1:0"
) -> tuple[Daemon, str]:
    env = {"CAMPAIGND_UNSUBSCRIBE__SECRET_KEY": key, "CAMPAIGND_UNSUBSCRIBE__LISTEN": listen}
    if previous:
        env["CAMPAIGND_UNSUBSCRIBE__PREVIOUS_SECRET_KEY"] = previous
    daemon = Daemon(config, env=env)
    line = daemon.wait_for("unsubscribe endpoint listening on http://")
    address = line.split("listening on http://", 1)[1].split()[0]
    daemon.wait_for("campaignd started")
    return daemon, f"http://{address}"


def link_for(smtpd: SmtpServer, email: str, timeout: float = 30.0) -> str:
    """The path of the one-click link in the first message ``email`` received."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for received in list(smtpd.received):
            if email in received.recipients:
                msg = received.message
                assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
                https = str(msg["List-Unsubscribe"]).split(",")[0].strip().strip("<>")
                assert https.startswith("https://harborhome.example/campaignd/u/")
                return urlsplit(https).path
        time.sleep(0.05)
    raise AssertionError(f"{email} received nothing within {timeout}s")


async def request(method: str, url: str, **kwargs: object) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kwargs) as r:  # type: ignore[arg-type]
        return r.status, await r.text()


def call(method: str, url: str, **kwargs: object) -> tuple[int, str]:
    return asyncio.run(request(method, url, **kwargs))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        yield ""
        return
    schema, url = pg_schema_url()
    try:
        yield url
    finally:
        drop_pg_schema(schema)


def assert_endpoint_clean(daemon: Daemon) -> None:
    """The endpoint logged no error and took part in no traceback."""
    log = daemon.log
    assert "campaignd/web.py" not in log and "campaignd/store/optout.py" not in log, log
    assert not [line for line in log.splitlines() if "ERROR" in line and "campaignd.web" in line], log


def engine_for(tmp_path: Path, database: str) -> sa.Engine:
    return sa.create_engine(database or f"sqlite:///{tmp_path / 'state' / 'campaignd.db'}")


def test_one_click_unsubscribes_while_the_daemon_runs_and_nothing_more_is_sent(
    tmp_path: Path, database: str
) -> None:
    engine = engine_for(tmp_path, database)

    def lead(email: str) -> sa.Row[tuple[int, str]]:
        with engine.connect() as conn:
            return conn.execute(sa.text("select id, status from leads where email = :e"), {"e": email}).one()

    with SmtpServer() as smtpd:
        config = prepare(tmp_path, smtpd.port, database)
        daemon, base = start(config)
        try:
            path = link_for(smtpd, MARIA)
            maria_id = lead(MARIA).id

            # GET shows the page and unsubscribes nothing (link scanners follow links).
            status, body = call("GET", base + path)
            assert status == 200 and "<button" in body and "m***@l***.example" in body
            assert MARIA not in body
            assert lead(MARIA).status == "active"

            # The one-click POST a mail provider sends, well before her next step is due.
            status, body = call("POST", base + path, data=ONE_CLICK)
            assert status == 200 and "You are unsubscribed" in body
            assert lead(MARIA).status == "unsubscribed"
            daemon.wait_for(f"unsubscribed {MARIA} (lead {maria_id}, one-click")

            # Forged, truncated, re-signed and other-lead tokens: refused, nothing changes.
            token = link_for(smtpd, TOM).rsplit("/", 1)[1]
            tom_id = lead(TOM).id
            lead_part, sig = token.split(".")
            maria_sig = path.rsplit(".", 1)[1]
            forged = {
                "truncated": token[:-3],
                "altered": f"{lead_part}.{sig[:-1]}{'B' if sig[-1] == 'A' else 'A'}",
                "another lead's signature": f"{tom_id}.{maria_sig}",
                "another key": make_token(b"x" * 40, tom_id, TOM),
                "another address": make_token(KEY.encode(), tom_id, MARIA),
            }
            for name, bad in forged.items():
                for method in ("GET", "POST"):
                    status, body = call(method, f"{base}/campaignd/u/{bad}", data=ONE_CLICK)
                    assert 400 <= status < 500, (name, method, status)
                    assert "Traceback" not in body
            assert lead(TOM).status == "active"

            # A re-import while the daemon runs does not resubscribe her.
            cli(config, "leads", "import", str(LEADS_CSV))
            shown = show(config, MARIA)
            assert shown["status"] == "unsubscribed" and shown["suppressed"] is True
            suppressed = json.loads(cli(config, "suppression", "list", "--json").stdout)
            assert [s["email"] for s in suppressed] == [MARIA]

            # The daemon keeps running: Tom gets his whole sequence, Maria nothing more.
            all_steps = ["cold/01-intro", "cold/03-reminder", "warm/01-sales-letter", "warm/03-last-call"]
            end = time.monotonic() + 90
            while smtpd.by_recipient().get(TOM, []) != all_steps and time.monotonic() < end:
                time.sleep(0.1)
            assert smtpd.by_recipient()[TOM] == all_steps
            assert call("GET", f"{base}/health")[0] == 200
        finally:
            assert daemon.stop() == 0
        assert_endpoint_clean(daemon)
    assert smtpd.by_recipient()[MARIA] == ["cold/01-intro"]
    assert smtpd.rcpt_attempts.count(MARIA) == 1
    with engine.connect() as conn:
        events = conn.execute(
            sa.text("select kind, detail from lead_events where lead_id = :id"), {"id": maria_id}
        ).all()
    engine.dispose()
    # what the digest's totals count, once
    assert [tuple(e) for e in events] == [("unsubscribed", "one-click (List-Unsubscribe-Post)")]


def test_health_and_key_rotation_across_restarts(tmp_path: Path) -> None:
    with SmtpServer() as smtpd:
        config = prepare(tmp_path, smtpd.port)
        daemon, base = start(config)
        try:
            maria_link, tom_link = link_for(smtpd, MARIA), link_for(smtpd, TOM)
            status, body = call("GET", f"{base}/health")
            health = json.loads(body)
            assert status == 200 and health["status"] == "ok" and health["database"] == "ok"
        finally:
            assert daemon.stop() == 0

        # New key, old one still accepted: links already in mailboxes keep working.
        daemon, base = start(config, key=NEW_KEY, previous=KEY)
        try:
            assert call("POST", base + maria_link, data=ONE_CLICK)[0] == 200
        finally:
            assert daemon.stop() == 0
        assert show(config, MARIA)["status"] == "unsubscribed"

        # The old key dropped: its links are refused, and change nothing.
        daemon, base = start(config, key=NEW_KEY)
        try:
            assert call("POST", base + tom_link, data=ONE_CLICK)[0] == 404
        finally:
            assert daemon.stop() == 0
        assert show(config, TOM)["status"] != "unsubscribed"
        assert_endpoint_clean(daemon)


def test_a_taken_port_stops_the_start_with_a_clear_message_and_nothing_is_sent(tmp_path: Path) -> None:
    with SmtpServer() as smtpd, socket.create_server(("127.0.0.1", 0)) as taken:
        config = prepare(tmp_path, smtpd.port)
        port = taken.getsockname()[1]
        env = {"CAMPAIGND_UNSUBSCRIBE__SECRET_KEY": KEY, "CAMPAIGND_UNSUBSCRIBE__LISTEN": f"127.0.0.1:{port}"}
        daemon = Daemon(config, env=env)
        assert daemon.wait(60) == 1
    # The operator's message, printed as it is, last.
    assert daemon.lines[-1].startswith(
        f"the unsubscribe endpoint cannot listen on 127.0.0.1:{port}: Address already in use "
        "(is another program, or another campaignd, using it?)"
    )
    assert smtpd.received == []


def test_a_burst_of_unsubscribes_while_the_dispatcher_sends(tmp_path: Path) -> None:
    """The short version of ``bench/unsubscribe_load.py``: all recorded, none lost, sending goes on."""
    with SmtpServer() as smtpd:
        report = run_load(
            leads=600, requests=300, concurrency=20, workdir=tmp_path, smtp_port=smtpd.port, timeout=240
        )
        received = smtpd.by_recipient()
    print("\n".join(report.lines()))
    assert report.problems == []
    assert report.statuses == {200: 300}
    assert report.recorded == 300
    assert report.sent_during_load > 0
    # no message reached an address except the ones the database says were sent
    assert sum(len(v) for v in received.values()) == report.sent_total
    for email in report.unsubscribed:
        assert len(received.get(email, [])) <= 1
