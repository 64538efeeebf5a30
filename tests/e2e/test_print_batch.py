"""Print batches with real processes: the daemon exporting on its own, and exports killed.

An export is killed with SIGKILL at each point where a crash could split the files from
the database (while the PDF is being put together, with the folder complete but nothing
recorded, inside the recording transaction, and after the commit before the folder gets
its final name) and at random moments from outside. Each time, what is left must be
either nothing (the pieces still wait and the next export makes a whole batch of them)
or a whole batch (recorded, with its complete folder); never a half folder under a final
name, and never a touch recorded in a batch without its files.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from campaignd.config import load_settings
from campaignd.database import create_engine
from campaignd.store import Store
from tests.e2e.proc import Daemon
from tests.factories import REPO
from tests.integration.test_directmail import assert_manifest_matches_pdf, make_settings

PRINT_ONLY = """
[sequences.cold]
steps = [
  { template = "cold/02-postcard", channel = "mail", delay = "0s" },
  { template = "cold/03-reminder", delay = "2s" },
]
"""


def campaignd(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    env.pop("JOURNAL_STREAM", None)
    return subprocess.run(
        [sys.executable, "-m", "campaignd", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def db_for(db_url: str) -> str:
    return db_url if db_url.startswith("postgresql") else ""


def write_leads(path: Path, n: int) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["email", "first_name", "last_name", "company", "address", "city", "state", "zip", "country"]
        )
        for i in range(n):
            writer.writerow(
                [
                    f"lead{i:03d}@example.com",
                    f"Name{i:03d}",
                    "Sample",
                    f"Company {i:03d}",
                    f"{100 + i} Main Street",
                    "Springfield",
                    "IL",
                    f"{62701 + i % 9}",
                    "US",
                ]
            )
    return path


def statuses(config: Path) -> tuple[dict[str, int], list[tuple[int, str]]]:
    """Direct-mail touches by status, and every batch as (id, status), newest first."""
    settings = load_settings(config, environ={}, dotenv=None)
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT status, count(*) FROM touches WHERE channel = 'mail' GROUP BY status")
            ).all()
        batches = [(b.id, b.status) for b in Store(engine=engine).batches(limit=1000)]
    finally:
        engine.dispose()
    return {r[0]: int(r[1]) for r in rows}, batches


def assert_no_half_batch(config: Path) -> None:
    """Every final folder is a recorded batch with complete files, and every piece
    recorded in a batch has that batch's files (under the final name, or the temporary
    one the next export gives its final name)."""
    settings = load_settings(config, environ={}, dotenv=None)
    print_dir = settings.print_dir
    engine = create_engine(settings.database_url)
    try:
        recorded = {b.id: b for b in Store(engine=engine).batches(limit=1000)}
        with engine.connect() as conn:
            in_batches = set(
                conn.execute(
                    sa.text("SELECT DISTINCT batch_id FROM touches WHERE batch_id IS NOT NULL")
                ).scalars()
            )
    finally:
        engine.dispose()
    for folder in sorted(print_dir.glob("batch-*")):
        batch_id = int(folder.name.split("-")[1])
        assert recorded[batch_id].status in ("exported", "confirmed", "cancelled"), folder
        assert_manifest_matches_pdf(folder, batch_id, settings, kind="postcard")
    for batch_id in in_batches:
        assert recorded[batch_id].status in ("exported", "confirmed")
        final = Path(recorded[batch_id].path)
        waiting = print_dir / f".batch-{batch_id:06d}.partial"
        assert final.is_dir() or (waiting / f"batch-{batch_id:06d}-summary.txt").is_file()


def prepare(tmp_path: Path, db_url: str, *, leads: Path, print_extra: str = "", workers: int = 1) -> Path:
    make_settings(
        tmp_path,
        workers=workers,
        sequences=PRINT_ONLY,
        database=db_for(db_url),
        print_extra=print_extra,
        extra='[dispatch]\ninterval = "1s"',
    )
    config = tmp_path / "campaignd.toml"
    ok(campaignd(config, "db", "upgrade"))
    ok(campaignd(config, "leads", "import", str(leads)))
    return config


# -- the daemon ---------------------------------------------------------------------------------------


def test_the_daemon_exports_a_batch_and_the_drip_goes_on_once_it_is_mailed(
    tmp_path: Path, db_url: str
) -> None:
    config = prepare(tmp_path, db_url, leads=REPO / "examples" / "leads.csv", print_extra="when_waiting = 5")
    daemon = Daemon(config)
    try:
        daemon.wait_for("campaignd started")
        line = daemon.wait_for("print batch 1: 5 pieces, 10 pages of cold/02-postcard", timeout=120)
        assert "confirm with 'campaignd mail confirm 1' once it is mailed" in line
        folder = tmp_path / "state" / "print" / "batch-000001"
        settings = load_settings(config, environ={}, dotenv=None)
        assert_manifest_matches_pdf(folder, 1, settings, kind="postcard")
        batches = json.loads(ok(campaignd(config, "mail", "batches", "--json")))
        assert (batches["waiting"], batches["exported_pieces"]) == (0, 5)
        shown = ok(campaignd(config, "mail", "show", "1"))
        assert "print batch 1: exported" in shown
        assert (
            len([line for line in shown.splitlines() if line.endswith("cold/02-postcard         queued")])
            == 5
        )
        # Nothing more goes to these leads until the batch is mailed.
        time.sleep(4)
        assert "sent cold/03-reminder" not in daemon.log

        confirmed = ok(campaignd(config, "mail", "confirm", "1"))
        assert "print batch 1 confirmed mailed: 5 pieces counted as touches" in confirmed
        daemon.wait_for("sent cold/03-reminder", count=5, timeout=60)
    finally:
        assert daemon.stop() == 0
    status = json.loads(ok(campaignd(config, "status", "--json")))
    assert status["touches_by_status"] == {"sent": 10}
    assert statuses(config) == ({"sent": 5}, [(1, "confirmed")])
    assert len(list((tmp_path / "state" / "outbox" / "new").iterdir())) == 5
    # Confirming twice counts nothing twice; cancelling a mailed batch is refused, plainly.
    again = ok(campaignd(config, "mail", "confirm", "1"))
    assert "was already confirmed mailed" in again
    refused = campaignd(config, "mail", "cancel", "1")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "print batch 1 is confirmed; only an exported batch" in refused.stderr
    missing = campaignd(config, "mail", "show", "7")
    assert missing.returncode == 1 and "there is no print batch 7" in missing.stderr


# -- exports killed ------------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
import campaignd.directmail, campaignd.printing, campaignd.store.mail
where = sys.argv.pop(1)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if where == "merging":
    campaignd.printing._merge = die
elif where == "before-commit":
    campaignd.store.mail.MailQueries.finish_batch = die
elif where == "in-commit":
    campaignd.store.mail.MailQueries._settle = die
elif where == "after-commit":
    campaignd.directmail.publish = die
from campaignd.cli import main
sys.argv[0] = "campaignd"
main()
"""


def export_killed_at(config: Path, where: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    return subprocess.run(
        [sys.executable, "-c", KILLER, where, "--config", str(config), "mail", "export"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("where", ["merging", "before-commit", "in-commit", "after-commit"])
def test_an_export_killed_leaves_no_half_batch(tmp_path: Path, db_url: str, where: str) -> None:
    config = prepare(tmp_path, db_url, leads=write_leads(tmp_path / "leads.csv", 12))
    ok(campaignd(config, "run", "--once"))
    print_dir = tmp_path / "state" / "print"

    killed = export_killed_at(config, where)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (print_dir / "batch-000001").exists()
    touches, batches = statuses(config)
    if where == "after-commit":
        # Recorded: the complete folder waits under its temporary name.
        assert touches == {"queued": 12} and batches == [(1, "exported")]
        assert (print_dir / ".batch-000001.partial" / "batch-000001.pdf").is_file()
    else:
        assert touches == {"pending": 12} and batches == [(1, "exporting")]
    assert_no_half_batch(config)

    # The next export (or the daemon's start) finishes or discards it, then carries on.
    after = ok(campaignd(config, "mail", "export"))
    touches, batches = statuses(config)
    assert touches == {"queued": 12}
    assert sorted(p.name for p in print_dir.iterdir()) == [
        ".export.lock",
        "batch-000001" if where == "after-commit" else "batch-000002",
    ]
    if where == "after-commit":
        assert batches == [(1, "exported")] and after.strip() == "no pieces are waiting for a print batch"
    else:
        assert batches == [(2, "exported"), (1, "failed")]
        assert "print batch 2: 12 pieces, 24 pages" in after
        shown = ok(campaignd(config, "mail", "show", "1"))
        assert "the export stopped before it finished" in shown
    assert_no_half_batch(config)


def test_exports_killed_at_random_moments_never_leave_a_half_batch(tmp_path: Path, db_url: str) -> None:
    # Laid out by two processes, as on a machine with several CPUs: killing the export
    # kills its parent, and the layout processes must go away by themselves.
    config = prepare(tmp_path, db_url, leads=write_leads(tmp_path / "leads.csv", 40), workers=2)
    ok(campaignd(config, "run", "--once"))
    print_dir = tmp_path / "state" / "print"
    rnd = random.Random(20261125)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    for attempt in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "campaignd", "--config", str(config), "mail", "export"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        # Kill it somewhere between its start and well into the layout of the pieces.
        deadline = time.monotonic() + 120
        while not list(print_dir.glob(".batch-*.partial")) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The first kill lands as the layout starts, so at least one export is surely
        # caught in the middle; the others anywhere up to its end (or after it).
        time.sleep(rnd.uniform(0.0, 4.0) if attempt else 0.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        assert_no_half_batch(config)
        touches, _ = statuses(config)
        assert touches in ({"pending": 40}, {"queued": 40})
    ok(campaignd(config, "mail", "export"))
    touches, batches = statuses(config)
    assert touches == {"queued": 40}
    exported = [b for b, status in batches if status == "exported"]
    assert len(exported) == 1 and all(status in ("exported", "failed") for _, status in batches)
    assert [p.name for p in print_dir.glob("batch-*")] == [f"batch-{exported[0]:06d}"]
    assert not list(print_dir.glob(".batch-*"))
    assert_no_half_batch(config)
    # At least one export was really caught in the middle.
    assert any(status == "failed" for _, status in batches)


def test_cancelling_from_the_command_line_marks_the_folder_and_requeues(tmp_path: Path, db_url: str) -> None:
    config = prepare(tmp_path, db_url, leads=write_leads(tmp_path / "leads.csv", 3))
    ok(campaignd(config, "run", "--once"))
    ok(campaignd(config, "mail", "export"))
    out = ok(campaignd(config, "mail", "cancel", "1"))
    assert "print batch 1 cancelled: 3 pieces due again" in out
    note = tmp_path / "state" / "print" / "batch-000001" / "CANCELLED.txt"
    assert "do not print or mail it" in note.read_text()
    shown = ok(campaignd(config, "mail", "show", "1"))
    assert "its 3 pieces went back to the queue" in shown
    ok(campaignd(config, "run", "--once"))
    out = ok(campaignd(config, "mail", "export"))
    assert "print batch 2: 3 pieces, 6 pages" in out
    touches, batches = statuses(config)
    assert touches == {"queued": 3} and batches == [(2, "exported"), (1, "cancelled")]
