"""Dispatch throughput: campaignd end to end against bare aiosmtplib, to Postfix's smtp-sink.

For each size, and for each database asked for, N leads with one due email step are sent
end to end — claim, render the shipped template with the real template machinery, mark
as sending, send over the real SMTP channel, record the touch — to ``smtp-sink`` on
loopback. In the same run the ceiling is measured: the same number of pre-built
messages sent by bare aiosmtplib clients over the same number of connections to the
same sink. Each measurement runs in a process of its own, so its peak memory is its own,
and each is taken ``--rounds`` times, in turn with the others: the table shows medians
(and the range of the rates), since one run on a busy machine can be off by a tenth.

The sink offers PIPELINING, as most relays do, so campaignd sends MAIL, RCPT and DATA
together; aiosmtplib always waits for each answer. ``--one-command-at-a-time`` adds a
run against a second sink that does not offer it.

    python bench/dispatch.py                       # 20,000 messages, SQLite and PostgreSQL
    python bench/dispatch.py --sizes 20000 200000  # both sizes
    python bench/dispatch.py --db sqlite --connections 4 --rounds 5 --one-command-at-a-time

Needs ``smtp-sink`` (Debian package ``postfix``; only that binary is used, the Postfix
service is never started) and, for PostgreSQL, the server in ``CAMPAIGND_TEST_PG_URL``
(default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PG_URL = os.environ.get("CAMPAIGND_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SEQUENCE = '[sequences.cold]\nsteps = [{ template = "cold/01-intro", delay = "0s" }]\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the ceiling: bare aiosmtplib clients ------------------------------------------------------


async def bare(port: int, messages: int, connections: int, body: bytes) -> dict[str, float]:
    import aiosmtplib

    queue = list(range(messages))

    async def client() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
        await smtp.connect()
        while queue:
            n = queue.pop()
            await smtp.sendmail("hello@harborhome.example", [f"lead{n}@example.com"], body)
        await smtp.quit()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    seconds = time.perf_counter() - started
    return {"messages": messages, "seconds": seconds, "rate": messages / seconds, "peak_mb": peak_rss_mb()}


# -- campaignd end to end ------------------------------------------------------------------------


def campaign_data() -> str:
    """The example configuration's campaign data and events, which the templates use."""
    text = (REPO / "config" / "campaignd.toml").read_text()
    return text[text.index("\n[campaign]") : text.index("\n[sequences.")]


def write_config(workdir: Path, port: int, connections: int) -> Path:
    config = workdir / "campaignd.toml"
    config.write_text(
        f"""
state_dir = "{workdir / "state"}"
templates = "{REPO / "templates"}"
timezone = "America/Chicago"

[sender]
from_name = "Harbor Home Services"
from_address = "hello@harborhome.example"
reply_to = "sales@harborhome.example"
postal_address = "Harbor Home Services, 418 Lakeshore Drive, Springfield, IL 62704, USA"

[unsubscribe]
base_url = "https://harborhome.example/campaignd"
mailto = "unsubscribe@harborhome.example"

[dispatch]
batch_size = 2000

[smtp]
host = "127.0.0.1"
port = {port}
tls = "none"
connections = {connections}
timeout = "30s"

{campaign_data()}

{SEQUENCE}
"""
    )
    return config


def campaignd(port: int, messages: int, connections: int, db: str, workdir: Path) -> dict[str, float]:
    import sqlalchemy as sa

    from campaignd.config import load_settings
    from campaignd.daemon import build_channels, prepare
    from campaignd.database import create_engine, upgrade
    from campaignd.engine import Dispatcher
    from campaignd.store import LeadInput, Store

    schema = ""
    if db == "sqlite":
        url = f"sqlite:///{workdir / 'bench.db'}"
    else:
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        admin = sa.create_engine(PG_URL)
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        admin.dispose()
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    config = write_config(workdir, port, connections)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    env["CAMPAIGND_DATABASE__URL"] = url
    settings = load_settings(config, environ=env, dotenv=None)
    engine = create_engine(settings.database_url, pool_size=connections + 2)
    try:
        upgrade(engine)
        store = Store(engine=engine)
        now = datetime.now(UTC)
        for start in range(0, messages, 5000):
            rows = [
                LeadInput(
                    email=f"lead{n}@example.com",
                    first_name=f"Lead{n}",
                    last_name="Sample",
                    company=f"Company {n % 500}",
                    city="Springfield",
                    country="US",
                )
                for n in range(start, min(messages, start + 5000))
            ]
            store.upsert_leads(rows, tier="cold", now=now)
        renderer, signer = prepare(settings)
        dispatcher = Dispatcher(
            store=store,
            settings=settings,
            renderer=renderer,
            signer=signer,
            channels=build_channels(settings),
            worker="bench:1",
            exclusive=db == "sqlite",
        )

        async def run() -> float:
            started = time.perf_counter()
            sent = 0
            while sent < messages:
                report = await dispatcher.run_pass(datetime.now(UTC))
                sent += report.sent
                if report.claimed == 0 and report.rescheduled == 0:
                    raise RuntimeError(f"stalled after {sent} of {messages}: {report.summary()}")
            return time.perf_counter() - started

        seconds = asyncio.run(run())
        with engine.connect() as conn:
            recorded = conn.execute(
                sa.text("select count(*) from touches where status = 'sent'")
            ).scalar_one()
        if recorded != messages:
            raise RuntimeError(f"{recorded} touches recorded as sent, expected {messages}")
    finally:
        engine.dispose()
        if schema:
            admin = sa.create_engine(PG_URL)
            with admin.begin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
            admin.dispose()
    return {"messages": messages, "seconds": seconds, "rate": messages / seconds, "peak_mb": peak_rss_mb()}


# -- orchestration -------------------------------------------------------------------------------


def sample_message(port: int, connections: int, workdir: Path) -> bytes:
    """One message exactly as campaignd builds it for the benchmark's step, for the bare run."""
    from campaignd.config import load_settings
    from campaignd.daemon import prepare
    from campaignd.message import build_email, message_id
    from campaignd.render import SAMPLE_LEAD

    settings = load_settings(write_config(workdir, port, connections), environ={}, dotenv=None)
    renderer, signer = prepare(settings)
    step = settings.sequences[next(iter(settings.sequences))].steps[0]
    links = signer.links(1, "lead1@example.com")
    rendered = renderer.render(lead=SAMPLE_LEAD, tier="cold", step=step, index=0, links=links)
    return build_email(
        rendered,
        sender=settings.sender,
        to_name="Lead1 Sample",
        to_address="lead1@example.com",
        msg_id=message_id(touch_id=1, lead_id=1, sender=settings.sender),
        date=datetime.now(UTC),
        links=links,
        step_label="cold/01-intro",
    )


def child(args: argparse.Namespace) -> None:
    if args.child == "bare":
        with tempfile.TemporaryDirectory(prefix="campaignd-bench-") as tmp:
            body = sample_message(args.port, args.connections, Path(tmp))
        result = asyncio.run(bare(args.port, args.messages, args.connections, body))
    else:
        with tempfile.TemporaryDirectory(prefix="campaignd-bench-") as tmp:
            result = campaignd(args.port, args.messages, args.connections, args.child, Path(tmp))
    print(json.dumps(result))


def measure(kind: str, port: int, messages: int, connections: int) -> dict[str, float]:
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--port",
            str(port),
            "--messages",
            str(messages),
            "--connections",
            str(connections),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def start_sink(*options: str) -> tuple[subprocess.Popen[bytes], int]:
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not Path(sink).exists():
        raise SystemExit("smtp-sink not found: apt-get install postfix (only the binary is used)")
    port = free_port()
    user = ["-u", "postfix"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([sink, *user, *options, f"127.0.0.1:{port}", "1024"])
    time.sleep(0.5)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each measurement, taken in turn; medians are shown"
    )
    parser.add_argument(
        "--one-command-at-a-time",
        action="store_true",
        help="also send through a sink that does not offer PIPELINING (campaignd then waits for "
        "each command's answer, as bare aiosmtplib always does)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sink, port = start_sink()
    sinks = [sink]
    try:
        plain_port = 0
        if args.one_command_at_a_time:
            plain, plain_port = start_sink("-p")  # -p: PIPELINING is not offered
            sinks.append(plain)
        dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
        runs: list[tuple[str, str, int]] = [("bare aiosmtplib", "bare", port)]
        for db in dbs:
            runs.append((f"campaignd {db}", db, port))
            if plain_port:
                runs.append((f"campaignd {db}, no PIPELINING", db, plain_port))
        print(
            f"{args.connections} connections to smtp-sink on 127.0.0.1; {os.cpu_count()} CPUs; "
            f"median of {args.rounds} rounds"
        )
        print(f"{'run':<34}{'messages':>10}{'seconds':>9}{'msg/s':>9}{'ratio':>7}{'peak MB':>9}  range msg/s")
        for size in args.sizes:
            results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in runs}
            for _ in range(args.rounds):
                for label, kind, at in runs:
                    results[label].append(measure(kind, at, size, args.connections))
            ceiling = statistics.median(r["rate"] for r in results["bare aiosmtplib"])
            for label, _, _ in runs:
                rates = [r["rate"] for r in results[label]]
                rate = statistics.median(rates)
                seconds = statistics.median(r["seconds"] for r in results[label])
                peak = max(r["peak_mb"] for r in results[label])
                ratio = "" if label == "bare aiosmtplib" else f"{rate / ceiling:.2f}"
                print(
                    f"{label:<34}{size:>10}{seconds:>9.1f}{rate:>9.0f}{ratio:>7}{peak:>9.0f}"
                    f"  {min(rates):.0f}-{max(rates):.0f}"
                )
    finally:
        for proc in sinks:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
