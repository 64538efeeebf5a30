"""Benchmark of ``campaignd leads import``: rows per second and peak memory.

Generates a realistic lead file (the header a CRM export has, accented names, mixed-case
and repeated addresses, a few bad rows) in a temporary directory, imports it into a fresh
database through the same function the command line calls, and prints rows per second
and memory. Each size runs in its own process, so its peak RSS is its own; a 100,000-row
and a 1,000,000-row run side by side show that memory does not grow with the file.

Run from the repository root::

    .venv/bin/python bench/import_leads.py                      # SQLite, 100k and 1M rows
    .venv/bin/python bench/import_leads.py --db postgres        # the test PostgreSQL server
    .venv/bin/python bench/import_leads.py --rows 200000 --reimport --profile

``--reimport`` imports the same file a second time (every row an unchanged known lead);
``--profile`` prints the 25 most expensive functions of the first import (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import json
import os
import pstats
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PG_URL = os.environ.get("CAMPAIGND_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

HEADER = [
    "Email Address",
    "First Name",
    "Last Name",
    "Company",
    "Phone",
    "Address",
    "City",
    "State",
    "Zip",
    "Country",
    "Time Zone",
    "Lead Source",
    "custom.industry",
]
FIRST = [
    "Maria", "Tom", "Aisha", "Liam", "Sophie", "Daniel", "Emma", "José", "Zoë", "Björn", "Chloé",
    "Noah", "Olivia", "Mateo", "Hannah", "Ravi", "Mei", "Søren", "Léa", "Giulia", "Kenji", "Amara",
]  # fmt: skip
LAST = [
    "Gonzalez", "Becker", "Khan", "O'Connor", "Martin", "Wu", "Schulz", "Müller", "Nowak", "Smith",
    "García", "Rossi", "Dubois", "Jensen", "Kowalski", "Tanaka", "Okafor", "Silva", "Brennan", "Lee",
]  # fmt: skip
COMPANY = ["Dental", "Bakery", "Fitness", "Legal", "Florals", "Accounting", "Architects", "Plumbing"]
STREETS = ["Elm Street", "Market Square", "N Halsted St", "Oak Avenue", "Capitol Ave", "Walnut St"]
PLACES = [
    ("Springfield", "IL", "627", "US", "America/Chicago"),
    ("Chicago", "IL", "606", "US", "America/Chicago"),
    ("Portland", "OR", "972", "US", "America/Los_Angeles"),
    ("Boston", "MA", "021", "US", "America/New_York"),
    ("Manchester", "", "M1 ", "United Kingdom", "Europe/London"),
    ("Berlin", "", "101", "DE", "Europe/Berlin"),
]
SOURCES = ["trade fair", "website", "referral", "seminar", ""]
DOMAINS = ["example.com", "mail.example", "corp.example.net", "Example.ORG"]


def generate(path: Path, rows: int, seed: int = 7) -> None:
    """Write ``rows`` lead rows: ~1% repeat an earlier address (in another case), ~0.3% are bad."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(HEADER)
        for n in range(rows):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            city, state, zip3, country, zone = rng.choice(PLACES)
            roll = rng.random()
            if roll < 0.01 and n > 10:
                earlier = rng.randrange(n)
                email = f"Lead{earlier}@{DOMAINS[earlier % 4]}".upper()
            elif roll < 0.013:
                email = rng.choice(["not-an-address", f"lead{n}@", f"lead{n}@@example.com", ""])
            else:
                email = f"lead{n}@{DOMAINS[n % 4]}"
            out.writerow(
                [
                    email,
                    first,
                    last,
                    f"{last} {rng.choice(COMPANY)}",
                    f"+1 217 555 {rng.randrange(10000):04d}",
                    f"{rng.randrange(1, 9999)} {rng.choice(STREETS)}",
                    city,
                    state,
                    f"{zip3}{rng.randrange(100):02d}" if country == "US" else f"{zip3}{rng.randrange(9)}AB",
                    country,
                    zone,
                    rng.choice(SOURCES),
                    rng.choice(["retail", "health", "services", ""]),
                ]
            )


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


class _Sampler:
    """The highest RSS seen while the import runs (ru_maxrss covers the whole process)."""

    def __init__(self) -> None:
        self.peak = _rss_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_kib())

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kib())


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measured run, in this process: generate, import, import again if asked."""
    from campaignd import database
    from campaignd.importer import import_leads
    from campaignd.store import Store

    with tempfile.TemporaryDirectory(prefix="campaignd-bench-") as tmp:
        csv_path = Path(tmp) / "leads.csv"
        generate(csv_path, args.rows)
        schema = None
        if args.db == "sqlite":
            url = f"sqlite:///{Path(tmp) / 'campaignd.db'}"
        else:
            import sqlalchemy as sa

            schema = f"bench_{uuid.uuid4().hex[:10]}"
            admin = sa.create_engine(PG_URL)
            with admin.begin() as conn:
                conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
            admin.dispose()
            url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
        # As the command line builds it (campaignd.cli.app.State.store).
        engine = database.create_engine(url, busy_timeout_s=10.0)
        try:
            database.upgrade(engine)
            store = Store(engine=engine)
            result: dict[str, Any] = {
                "db": args.db,
                "rows": args.rows,
                "file_mb": round(csv_path.stat().st_size / 1e6, 1),
            }
            passes = ["first"] + (["again"] if args.reimport else [])
            for name in passes:
                profiler = cProfile.Profile() if args.profile and name == "first" else None
                before = _rss_kib()
                with _Sampler() as sampler:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    if profiler:
                        profiler.enable()
                    report = import_leads(
                        store, csv_path, default_tier="cold", now=datetime.now(UTC), rejects=None
                    )
                    if profiler:
                        profiler.disable()
                    seconds = time.perf_counter() - started
                    cpu = time.process_time() - cpu_started
                c = report.counts
                assert report.rows == c.inserted + c.updated + c.unchanged + report.rejected_count
                result[name] = {
                    "seconds": round(seconds, 2),
                    "rows_per_s": round(report.rows / seconds),
                    "cpu_seconds": round(cpu, 2),
                    "rows_per_cpu_s": round(report.rows / cpu),
                    "rss_before_mb": round(before / 1024, 1),
                    "rss_peak_mb": round(sampler.peak / 1024, 1),
                    "rss_growth_mb": round((sampler.peak - before) / 1024, 1),
                    "summary": report.summary().split(": ", 1)[1],
                }
                if profiler:
                    stats = pstats.Stats(profiler, stream=sys.stderr)
                    stats.sort_stats("cumulative").print_stats(25)
                    stats.sort_stats("tottime").print_stats(25)
            result["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            result["leads_in_db"] = store.count_leads()
        finally:
            engine.dispose()
            if schema is not None:
                import sqlalchemy as sa

                admin = sa.create_engine(PG_URL)
                with admin.begin() as conn:
                    conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
                admin.dispose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--rows", type=int, action="append", help="rows per run (repeatable)")
    parser.add_argument("--reimport", action="store_true", help="import the same file a second time")
    parser.add_argument("--profile", action="store_true", help="cProfile the first import (slower)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.rows = args.rows[0]
        print(json.dumps(child(args)))
        return
    print(
        f"campaignd lead import benchmark, {args.db}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    for rows in args.rows or [100_000, 1_000_000]:
        cmd = [sys.executable, __file__, "--child", "--db", args.db, "--rows", str(rows)]
        cmd += ["--reimport"] * args.reimport + ["--profile"] * args.profile
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"benchmark run failed:\n{proc.stderr}")
        if args.profile:
            print(proc.stderr)
        data = json.loads(proc.stdout)
        print(f"\n{rows:,} rows ({data['file_mb']} MB CSV) into {args.db}:")
        for name in ("first", "again"):
            if name in data:
                r = data[name]
                label = "import" if name == "first" else "re-import"
                print(
                    f"  {label:<9} {r['seconds']:>7.2f} s  {r['rows_per_s']:>7,} rows/s  "
                    f"(CPU {r['cpu_seconds']:.2f} s: {r['rows_per_cpu_s']:,} rows per CPU-second)  "
                    f"peak RSS {r['rss_peak_mb']:.0f} MB (+{r['rss_growth_mb']:.0f} MB during the import)"
                )
                print(f"            {r['summary']}")
        print(
            f"  leads in the database: {data['leads_in_db']:,}; "
            f"process peak RSS {data['ru_maxrss_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
