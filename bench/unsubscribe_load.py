"""Load test of the unsubscribe endpoint while the dispatcher is sending.

Runs the real daemon (``campaignd run``) on a fresh database holding ``--leads`` leads,
each due one email at once, sending to a local SMTP sink (Postfix's ``smtp-sink``). Once
sending is under way it fires ``--requests`` one-click unsubscribes at the endpoint over
loopback, ``--concurrency`` at a time, each from a different client address behind the
trusted local proxy (so the per-client rate limit is not what is measured). Then it
stops the daemon and checks, in the database:

- every unsubscribe that was answered 200 is recorded: the address suppressed, the lead
  unsubscribed, one ``unsubscribed`` event, nothing of it left claimed or pending;
- no step was claimed for a lead after its opt-out was confirmed;
- sending kept going while the burst was served (messages per second before and during
  the burst, and the longest pause between two sends during it).

It prints requests per second and latency percentiles. Bounded: at most ``--requests``
requests, loopback only, ``--timeout`` seconds overall. Exit status 1 when a check fails.

    .venv/bin/python bench/unsubscribe_load.py
    .venv/bin/python bench/unsubscribe_load.py --leads 4000 --requests 2000 --concurrency 32
    .venv/bin/python bench/unsubscribe_load.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from campaignd.unsubscribe import make_token  # noqa: E402
from tests.factories import config_text  # noqa: E402

SENT = re.compile(r"\bsent \S+ to (\S+) \(touch")
ONE_CLICK = {"List-Unsubscribe": "One-Click"}

SEQUENCES = """
[sequences.cold]
steps = [
  { template = "cold/01-intro", delay = "0s" },
  { template = "cold/03-reminder", delay = "30d" },
]
"""
DISPATCH = """
[dispatch]
interval = "1s"
batch_size = 500
"""


@dataclass
class Report:
    """What one run measured and found wrong."""

    leads: int
    requests: int
    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    recorded: int = 0
    already_sent: int = 0
    """Unsubscribed leads whose email had been sent before they asked."""
    in_flight: int = 0
    """Unsubscribed leads whose email was already leaving when they asked (recorded after)."""
    sent_total: int = 0
    sent_before_load: int = 0
    sent_during_load: int = 0
    rate_before: float = 0.0
    rate_during: float = 0.0
    longest_pause: float = 0.0
    unsubscribed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    def lines(self) -> list[str]:
        ms = 1000
        rps = len(self.latencies) / self.seconds if self.seconds else 0.0
        return [
            f"unsubscribe load: {self.requests} one-click POSTs, {self.concurrency} at a time, "
            f"{self.leads} leads being sent to",
            f"  {rps:.0f} requests/s over {self.seconds:.2f}s; statuses {dict(self.statuses)}",
            f"  latency p50 {self.percentile(50) * ms:.1f} ms, p95 {self.percentile(95) * ms:.1f} ms, "
            f"p99 {self.percentile(99) * ms:.1f} ms, max {max(self.latencies, default=0) * ms:.1f} ms",
            f"  recorded {self.recorded} of {self.statuses.get(200, 0)} answered 200; of those, "
            f"{self.already_sent} had been sent their email before asking, {self.in_flight} had it "
            "on the wire, the rest got nothing",
            f"  sending: {self.sent_before_load} before the burst ({self.rate_before:.0f}/s), "
            f"{self.sent_during_load} during it ({self.rate_during:.0f}/s), longest pause between "
            f"two sends during it {self.longest_pause * ms:.0f} ms; {self.sent_total} sent in all",
            "  checks: " + ("all passed" if not self.problems else f"{len(self.problems)} FAILED"),
            *[f"    - {p}" for p in self.problems[:20]],
            *[f"  note: {n}" for n in self.notes],
        ]


class _DaemonProcess:
    """``campaignd run`` with every stderr line kept with the monotonic time it arrived."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "campaignd", "--config", str(config), "run"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for _, line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"the daemon did not log {text!r}:\n" + self.log[-4000:])

    def sends(self) -> list[tuple[float, str]]:
        out = []
        for at, line in list(self.lines):
            match = SENT.search(line)
            if match:
                out.append((at, match.group(1)))
        return out

    @property
    def log(self) -> str:
        return "\n".join(line for _, line in list(self.lines))

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    env.pop("JOURNAL_STREAM", None)
    return env | extra


def _campaignd(config: Path, env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "campaignd", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"campaignd {' '.join(args)} failed:\n{done.stderr}")


async def _fire(
    base: str, targets: list[tuple[int, str, str]], concurrency: int, budget: float, report: Report
) -> dict[str, tuple[datetime, datetime]]:
    """POST every link; returns email -> (wall time asked, wall time answered 200)."""
    answered: dict[str, tuple[datetime, datetime]] = {}
    queue: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
    for item in targets:
        queue.put_nowait(item)

    async def worker(http: aiohttp.ClientSession) -> None:
        while True:
            try:
                n, email, token = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            # Each request from its own client, forwarded by the trusted local proxy.
            client = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
            started, asked = time.monotonic(), datetime.now(UTC)
            try:
                async with http.post(
                    f"{base}/u/{token}", data=ONE_CLICK, headers={"X-Forwarded-For": client}
                ) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                report.problems.append(f"request for {email} failed: {exc!r}")
                status = 0
            report.latencies.append(time.monotonic() - started)
            report.statuses[status] += 1
            if status == 200:
                answered[email] = (asked, datetime.now(UTC))

    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=budget)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=client_timeout) as http,
        asyncio.timeout(budget),
    ):
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return answered


def run(
    *,
    leads: int,
    requests: int,
    concurrency: int,
    workdir: Path,
    smtp_port: int,
    database_url: str = "",
    timeout: float = 600.0,
    seed: int = 8058,
) -> Report:
    """One bounded run; see the module docstring. The SMTP server at ``smtp_port`` must be running."""
    if requests > leads:
        raise ValueError("cannot unsubscribe more leads than there are")
    deadline = time.monotonic() + timeout
    report = Report(leads=leads, requests=requests, concurrency=concurrency)
    key = secrets.token_urlsafe(32)
    config = workdir / "bench.toml"
    # The test suite's configuration: the real templates and the campaign data they need.
    config.write_text(
        config_text(
            state_dir=workdir / "state",
            db_url=database_url,
            smtp_port=smtp_port,
            threshold=8,
            sequences=SEQUENCES,
            extra=DISPATCH,
        )
    )
    csv_path = workdir / "leads.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["email", "first_name", "last_name", "company", "tier"])
        for i in range(leads):
            writer.writerow([f"lead{i:06d}@bench.example", "Pat", f"Lead{i}", "Bench Co", "cold"])
    env = _env({"CAMPAIGND_UNSUBSCRIBE__SECRET_KEY": key, "CAMPAIGND_UNSUBSCRIBE__LISTEN": "127.0.0.1:0"})
    _campaignd(config, env, "db", "upgrade")
    _campaignd(config, env, "leads", "import", str(csv_path))

    url = database_url or f"sqlite:///{workdir / 'state' / 'campaignd.db'}"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("select id, email from leads order by id")).all()
    finally:
        engine.dispose()
    chosen = random.Random(seed).sample(list(rows), requests)
    targets = [(n, r.email, make_token(key.encode(), r.id, r.email)) for n, r in enumerate(chosen)]

    daemon = _DaemonProcess(config, env)
    try:
        line = daemon.wait_for("unsubscribe endpoint listening on http://", 60)
        base = "http://" + line.split("listening on http://", 1)[1].split()[0]
        if not base.startswith(("http://127.", "http://[::1]")):
            raise RuntimeError(f"refusing to load anything but loopback: {base}")
        # Start the burst once the dispatcher is well into sending.
        warm_up = max(1, min(200, leads // 10))
        while len(daemon.sends()) < warm_up:
            if time.monotonic() > deadline or daemon.proc.poll() is not None:
                raise RuntimeError("the dispatcher did not start sending:\n" + daemon.log[-4000:])
            time.sleep(0.05)
        load_start = time.monotonic()
        answered = asyncio.run(
            _fire(base, targets, concurrency, max(10.0, deadline - time.monotonic()), report)
        )
        load_end = time.monotonic()
        report.seconds = load_end - load_start
        # Let the dispatcher finish: every lead sent or cancelled, or quiet for 5 seconds.
        last_count, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = len(daemon.sends())
            if count != last_count:
                last_count, quiet_since = count, time.monotonic()
            if count + requests >= leads and time.monotonic() - quiet_since > 1.5:
                break
            if time.monotonic() - quiet_since > 5:
                break
            time.sleep(0.2)
    finally:
        code = daemon.stop()
    if code != 0:
        report.problems.append(f"the daemon exited with status {code}")
    log = daemon.log
    if "campaignd/web.py" in log or "campaignd/store/optout.py" in log:
        report.problems.append("the endpoint took part in a traceback in the daemon's log")
    elif "Traceback" in log:
        report.notes.append("the daemon logged a traceback elsewhere (not the endpoint); see its log")

    sends = daemon.sends()
    report.sent_total = len(sends)
    first_send = sends[0][0] if sends else load_start
    before = [at for at, _ in sends if at < load_start]
    during = sorted(at for at, _ in sends if load_start <= at <= load_end)
    report.sent_before_load, report.sent_during_load = len(before), len(during)
    report.rate_before = len(before) / max(load_start - first_send, 1e-3)
    report.rate_during = len(during) / max(report.seconds, 1e-3)
    edges = [load_start, *during, load_end]
    report.longest_pause = max(b - a for a, b in itertools.pairwise(edges))
    if report.sent_during_load == 0:
        report.problems.append("no email was sent while the burst was served: sending stalled")
    for status, count in report.statuses.items():
        if status != 200:
            report.problems.append(f"{count} requests answered {status}")
    _check_database(url, answered, report)
    return report


def _check_database(url: str, answered: dict[str, tuple[datetime, datetime]], report: Report) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            suppressed = {
                r.email: r.reason for r in conn.execute(sa.text("select email, reason from suppressions"))
            }
            leads = {r.email: r for r in conn.execute(sa.text("select id, email, status from leads"))}
            events = Counter(
                r.lead_id
                for r in conn.execute(sa.text("select lead_id from lead_events where kind = 'unsubscribed'"))
            )
            touches: dict[int, list[sa.Row[tuple[str, datetime]]]] = {}
            for r in conn.execute(sa.text("select lead_id, status, created_at, sent_at from touches")):
                touches.setdefault(r.lead_id, []).append(r)
    finally:
        engine.dispose()
    for email, (asked, confirmed) in answered.items():
        lead = leads[email]
        report.unsubscribed.append(email)
        ok = (
            suppressed.get(email) == "unsubscribed" and lead.status == "unsubscribed" and events[lead.id] == 1
        )
        if not ok:
            report.problems.append(
                f"{email}: answered 200 but suppression={suppressed.get(email)} status={lead.status} "
                f"events={events[lead.id]}"
            )
            continue
        report.recorded += 1
        for t in touches.get(lead.id, []):
            if t.status in ("claimed", "retry", "pending"):
                report.problems.append(f"{email}: a touch is still {t.status} after the opt-out")
            if t.status == "sent":
                if _aware(t.sent_at) <= asked:
                    report.already_sent += 1
                else:
                    report.in_flight += 1
                if _aware(t.created_at) > confirmed:
                    report.problems.append(f"{email}: a step was claimed after the opt-out was confirmed")
    if len(suppressed) != len(answered):
        report.problems.append(
            f"{len(suppressed)} addresses suppressed, {len(answered)} unsubscribes answered"
        )


def _aware(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite through a plain engine returns text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# -- command line ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port: int = sock.getsockname()[1]
    return port


def _start_sink(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not Path(sink).exists():
        raise SystemExit("smtp-sink (Postfix) is needed: apt-get install postfix, or pass --smtp-port")
    args = [sink, "-m", "512"]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]  # smtp-sink refuses to keep root privileges
    proc = subprocess.Popen(
        [*args, f"127.0.0.1:{port}", "512"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir
    )
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise SystemExit("smtp-sink did not start")


def _pg_schema(url: str) -> tuple[str, str]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    admin.dispose()
    sep = "&" if "?" in url else "?"
    return schema, f"{url}{sep}options=-csearch_path%3D{schema}"


def _drop_pg_schema(url: str, schema: str) -> None:
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    admin.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--leads", type=int, default=6000, help="leads due an email (default 6000)")
    parser.add_argument("--requests", type=int, default=3000, help="unsubscribes to send (default 3000)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (a schema is made and dropped)")
    parser.add_argument(
        "--smtp-port", type=int, default=0, help="use a running SMTP server instead of smtp-sink"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = parser.parse_args()
    if not 1 <= args.requests <= 20_000 or not 1 <= args.concurrency <= 256:
        parser.error("keep it bounded: 1-20000 requests, 1-256 at a time")
    with tempfile.TemporaryDirectory(prefix="campaignd-bench-") as tmp:
        workdir = Path(tmp)
        sink = None
        port = args.smtp_port
        if not port:
            port = _free_port()
            sink = _start_sink(port, workdir)
        schema = ""
        url = args.database_url
        if url:
            schema, url = _pg_schema(url)
        try:
            report = run(
                leads=args.leads,
                requests=args.requests,
                concurrency=args.concurrency,
                workdir=workdir,
                smtp_port=port,
                database_url=url,
                timeout=args.timeout,
            )
        finally:
            if sink is not None:
                sink.terminate()
                sink.wait(10)
            if schema:
                _drop_pg_schema(args.database_url, schema)
    print("\n".join(report.lines()))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
