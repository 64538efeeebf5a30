"""Importing lead files into the real databases, and ``campaignd leads import`` as a process.

Every test of the store runs on a fresh SQLite file and a fresh PostgreSQL schema. The
files are what marketers export: Excel (BOMs, semicolons, Windows-1252, UTF-16 text),
Google Sheets, CRMs, and the broken ones (a workbook renamed .csv, a quote left open,
a 10 MB line).
"""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import pty
import select
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from campaignd import database, importer
from campaignd.exceptions import DatabaseError, ImportFileError
from campaignd.importer import ImportReport, import_leads
from campaignd.models import LeadStatus, SuppressionReason
from campaignd.sequences import Policy
from campaignd.store import LeadInput, LeadRecord, Store, UpsertCounts
from tests.factories import make_settings, write_config

NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=7)

HEADER = "Email Address,First Name,Last Name,Company,Phone,City,Country,Time Zone,Tier,Lead Source\n"
MARIA = (
    "maria@lakeview-dental.example,Maria,Gonzalez,Lakeview Dental,+1 217 555 0142,Springfield,US,"
    "America/Chicago,,fair\n"
)
TOM = "tom@becker-bakery.example,Tom,Becker,Becker Bakery,+1 217 555 0199,Springfield,US,,warm,web\n"


def write(tmp_path: Path, content: str | bytes, name: str = "leads.csv") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    return path


def run(store: Store, path: Path, *, now: datetime = NOW, **kwargs: object) -> ImportReport:
    report = import_leads(store, path, default_tier="cold", now=now, **kwargs)  # type: ignore[arg-type]
    c = report.counts
    assert report.rows == c.inserted + c.updated + c.unchanged + report.rejected_count
    assert gc.isenabled()  # paused during the import only
    return report


def leads(store: Store) -> dict[str, LeadRecord]:
    return {lead.email: lead for lead in store.list_leads()}


# -- good rows -------------------------------------------------------------------------------------


def test_good_rows_are_imported_with_every_field(store: Store, tmp_path: Path) -> None:
    report = run(store, write(tmp_path, HEADER + MARIA + TOM))
    assert report.summary().endswith("2 rows: 2 inserted, 0 updated, 0 unchanged, 0 rejected")
    assert report.ignored_columns == ["Lead Source"]
    maria = store.get_lead("maria@lakeview-dental.example")
    assert (maria.first_name, maria.last_name, maria.company) == ("Maria", "Gonzalez", "Lakeview Dental")
    assert (maria.phone, maria.city, maria.country, maria.timezone) == (
        "+1 217 555 0142",
        "Springfield",
        "US",
        "America/Chicago",
    )
    assert (maria.tier, maria.status, maria.touch_count) == ("cold", "active", 0)
    assert maria.created_at == NOW and maria.next_due_at == NOW
    assert store.get_lead("tom@becker-bakery.example").tier == "warm"


def test_custom_columns_are_kept_for_templates(store: Store, tmp_path: Path) -> None:
    run(store, write(tmp_path, "email,custom.industry,custom.booth\na@example.com,dental,B12\n"))
    assert store.get_lead("a@example.com").custom == {"industry": "dental", "booth": "B12"}
    run(store, write(tmp_path, "email,custom.booth,custom.size\na@example.com,C3,12\n"), now=LATER)
    assert store.get_lead("a@example.com").custom == {"industry": "dental", "booth": "C3", "size": "12"}


# -- bad rows ----------------------------------------------------------------------------------------


def test_every_bad_row_is_reported_with_its_line_and_every_good_row_goes_in(
    store: Store, tmp_path: Path
) -> None:
    text = (
        "email,name,country,tier\r\n"
        "ann@example.com,Ann Lee,US,cold\r\n"
        "not-an-address,Bad Address,US,cold\r\n"
        'bo@example.com,"Bo\r\nNilsson",SE,\r\n'  # a quoted line break: lines 4-5
        "cy@example.com,Cy,Narnia,\r\n"
        ",No Address,US,\r\n"
        "\r\n"
        "di@example.com,Di,US,lukewarm\r\n"
        "ed@example.com,Ed,US,cold,surplus\r\n"
        "fay@example.com,Fay,,\r\n"
    )
    report = run(store, write(tmp_path, text))
    assert [line for line, _ in report.rejected] == [3, 6, 7, 9, 10]
    reasons = dict(report.rejected)
    assert "'not-an-address' is not a valid email address" in reasons[3]
    assert "unknown country 'Narnia'" in reasons[6]
    assert reasons[7] == "no email address"
    assert "tier 'lukewarm' is not one of cold, warm, hot" in reasons[9]
    assert "has 5 fields but the header has 4" in reasons[10]
    assert report.warnings == [(4, "line break in 'name' replaced by a space")]
    assert set(leads(store)) == {"ann@example.com", "bo@example.com", "fay@example.com"}
    assert store.get_lead("bo@example.com").name == "Bo Nilsson"
    assert report.rows == 8 and report.counts.inserted == 3


def test_a_crlf_inside_a_name_keeps_the_lead_whole_and_the_line_numbers_right(
    store: Store, tmp_path: Path
) -> None:
    text = (
        'Email,First Name,Last Name\r\na@example.com,"Anne\r\nMarie",Lee\r\nbad,B,C\r\nc@example.com,C,D\r\n'
    )
    report = run(store, write(tmp_path, text))
    assert store.get_lead("a@example.com").first_name == "Anne Marie"
    assert report.rejected[0][0] == 4  # the row after the two-line record
    assert report.counts.inserted == 2


# -- re-import ----------------------------------------------------------------------------------------


def test_reimport_updates_contact_fields_and_never_resets_state_or_history(
    store: Store, tmp_path: Path
) -> None:
    run(store, write(tmp_path, HEADER + MARIA))
    email = "maria@lakeview-dental.example"
    store.set_tier(email, "warm", now=NOW + timedelta(hours=1))
    policy = Policy.from_settings(make_settings(tmp_path))
    store.log_manual_touch(
        email, channel="call", note="asked for a quote", at=NOW + timedelta(hours=2), policy=policy
    )
    store.set_status(email, LeadStatus.FLAGGED, now=NOW + timedelta(hours=3), reason="wants a proposal")
    before = store.get_lead(email)
    events_before = store.events_for(before.id)

    changed = "maria@lakeview-dental.example,Maria,Gonzalez,,+1 217 555 0000,Chatham,US,,cold,fair\n"
    report = run(store, write(tmp_path, HEADER + changed), now=LATER)

    assert (report.counts.updated, report.counts.inserted) == (1, 0)
    after = store.get_lead(email)
    assert after.phone == "+1 217 555 0000" and after.city == "Chatham"
    assert after.company == "Lakeview Dental"  # a blank cell never erases
    assert (after.tier, after.status, after.touch_count) == ("warm", "flagged", 1)
    assert (after.tier_since, after.flagged_at, after.flag_reason) == (
        before.tier_since,
        before.flagged_at,
        "wants a proposal",
    )
    assert after.last_touch_at == before.last_touch_at and after.created_at == before.created_at
    assert after.updated_at == LATER
    assert [t.note for t in store.touches_for(after.id)] == ["asked for a quote"]
    assert store.events_for(after.id) == events_before


def test_the_same_file_again_changes_nothing(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + MARIA + TOM)
    run(store, path)
    first = leads(store)
    report = run(store, path, now=LATER)
    assert (report.counts.unchanged, report.counts.updated, report.counts.inserted) == (2, 0, 0)
    assert leads(store) == first


# -- suppression -----------------------------------------------------------------------------------------


def test_suppressed_addresses_stay_suppressed_through_imports(store: Store, tmp_path: Path) -> None:
    store.suppress("maria@lakeview-dental.example", reason=SuppressionReason.UNSUBSCRIBED, detail="", now=NOW)
    store.suppress("tom@becker-bakery.example", reason=SuppressionReason.BOUNCED, detail="550", now=NOW)
    report = run(store, write(tmp_path, HEADER + MARIA + TOM))
    assert report.counts.inserted == 2 and report.counts.suppressed == 2
    assert "2 new leads are on the suppression list and stay suppressed" in report.summary()
    maria, tom = store.get_lead("maria@lakeview-dental.example"), store.get_lead("tom@becker-bakery.example")
    assert (maria.status, maria.next_due_at) == ("unsubscribed", None)
    assert (tom.status, tom.next_due_at) == ("bounced", None)

    # A known lead unsubscribed later stays so when the file is imported again.
    run(store, write(tmp_path, HEADER + "ann@example.com,Ann,Lee,,,,,,,\n", name="ann.csv"))
    store.suppress("ann@example.com", reason=SuppressionReason.UNSUBSCRIBED, detail="link", now=NOW)
    again = run(store, write(tmp_path, HEADER + "ann@example.com,Ann,Lee,Lee Co,,,,,,\n", name="ann.csv"))
    assert again.counts.updated == 1
    ann = store.get_lead("ann@example.com")
    assert (ann.status, ann.company) == ("unsubscribed", "Lee Co")
    assert store.is_suppressed("ann@example.com")


def test_an_opt_out_column_puts_the_address_on_the_suppression_list(store: Store, tmp_path: Path) -> None:
    run(store, write(tmp_path, "Email,Email Opt Out\nknown@example.com,0\n"))
    text = "Email,Email Opt Out\nknown@example.com,1\nnew@example.com,true\nkeen@example.com,false\n"
    report = run(store, write(tmp_path, text), now=LATER)
    assert report.opted_out == 2
    assert (report.counts.inserted, report.counts.updated) == (2, 1)
    known = store.get_lead("known@example.com")
    assert known.status == "unsubscribed" and known.next_due_at is None
    assert [e.kind for e in store.events_for(known.id)] == ["unsubscribed"]
    assert store.get_lead("new@example.com").status == "unsubscribed"
    assert store.is_suppressed("known@example.com") and store.is_suppressed("new@example.com")
    assert store.get_lead("keen@example.com").status == "active"

    # "No" in a later file never takes an address off the list.
    run(store, write(tmp_path, "Email,Email Opt Out\nknown@example.com,no\n"), now=LATER)
    assert store.is_suppressed("known@example.com")
    assert store.get_lead("known@example.com").status == "unsubscribed"


# -- repeated addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [2, 2000])
def test_repeated_addresses_are_applied_in_file_order(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(importer, "CHUNK_ROWS", chunk)
    text = (
        "email,phone,city\n"
        "ann@example.com,111,\n"
        "bo@example.com,222,\n"
        "ANN@Example.com,,Leeds\n"
        "ann@example.com,,Leeds\n"
    )
    report = run(store, write(tmp_path, text))
    assert (report.counts.inserted, report.counts.updated, report.counts.unchanged) == (2, 1, 1)
    assert report.duplicates == 2
    assert [w for w in report.warnings] == [
        (4, "same address as line 2 (ann@example.com); applied after it"),
        (5, "same address as line 2 (ann@example.com); applied after it"),
    ]
    ann = store.get_lead("ann@example.com")
    assert (ann.phone, ann.city) == ("111", "Leeds")


def test_a_dry_run_writes_nothing_and_counts_like_the_real_run(store: Store, tmp_path: Path) -> None:
    run(store, write(tmp_path, HEADER + MARIA))
    path = write(
        tmp_path, HEADER + MARIA.replace("+1 217 555 0142", "+1 217 555 9999") + TOM + "bad,,,,,,,,,\n"
    )
    before = leads(store)
    dry = run(store, path, dry_run=True, now=LATER)
    assert leads(store) == before
    real = run(store, path, now=LATER)
    assert dry.summary() == real.summary()
    assert real.summary().endswith("3 rows: 1 inserted, 1 updated, 0 unchanged, 1 rejected")


# -- encodings and dialects ------------------------------------------------------------------------------


def test_a_windows_1252_file_names_the_fix_and_imports_fully_with_it(store: Store, tmp_path: Path) -> None:
    text = "Email;Prenom;Nom\r\nrene@example.fr;René;Lefèvre\r\nann@example.com;Ann;Lee\r\n"
    path = write(tmp_path, text.encode("cp1252"))
    report = run(store, path)
    assert report.delimiter == ";"
    assert report.rejected == [
        (
            2,
            "column 'Prenom' is not valid utf-8 text; save the file as 'CSV UTF-8' or name its "
            "encoding with --encoding (cp1252 for most files from Excel on Windows)",
        )
    ]
    assert "1 rows are not valid utf-8: if the file comes from Excel on Windows, import it again with " \
        "--encoding cp1252" in report.summary()  # fmt: skip
    assert set(leads(store)) == {"ann@example.com"}

    again = run(store, path, encoding="cp1252", now=LATER)
    assert (again.counts.inserted, again.counts.unchanged, again.rejected_count) == (1, 1, 0)
    rene = store.get_lead("rene@example.fr")
    assert (rene.first_name, rene.last_name) == ("René", "Lefèvre")


SPREADSHEET_FILES = {
    "utf-8 with BOM, semicolons": "\ufeffE-Mail;Vorname;Nachname\r\nzoe@example.de;Zoë;Müller\r\n".encode(),
    "Excel sep= line": "sep=|\r\nEmail|First Name|Last Name\r\nzoe@example.de|Zoë|Müller\r\n".encode(),
    "Excel Unicode text": "Email\tFirst Name\tLast Name\r\nzoe@example.de\tZoë\tMüller\r\n".encode("utf-16"),
    "Google Sheets": "Email,First name,Last name,,\r\nzoe@example.de,Zoë,Müller,,\r\n,,,,\r\n".encode(),
    "old Mac line ends": "Email,First Name,Last Name\rzoe@example.de,Zoë,Müller\r".encode(),
    "blank lines first": "\r\n\r\nEmail;First Name;Last Name\r\nzoe@example.de;Zoë;Müller\r\n".encode(),
}


@pytest.mark.parametrize("name", list(SPREADSHEET_FILES))
def test_what_spreadsheets_write_imports_the_same(store: Store, tmp_path: Path, name: str) -> None:
    report = run(store, write(tmp_path, SPREADSHEET_FILES[name]))
    assert report.rows == 1 and report.counts.inserted == 1
    zoe = store.get_lead("zoe@example.de")
    assert (zoe.first_name, zoe.last_name) == ("Zoë", "Müller")


def _xlsx() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        z.writestr("xl/workbook.xml", "<workbook/>")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty: expected a header row"),
        (b"\r\n\r\n", "the file is empty"),
        (b"Name,Phone\nAnn,123\n", "no email column in the header (columns found: 'Name', 'Phone')"),
        (b"ann@example.com,Ann\n", "the first row holds an email address"),
        (_xlsx(), "this is a ZIP archive (an Excel .xlsx, LibreOffice .ods or Numbers workbook?), not a CSV"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(512), "this is an Excel 97-2003 .xls workbook"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "this is a PDF document, not a CSV file"),
        (bytes(range(256)) * 64, "this is not a text file"),
        ("Émail,Prénom\n".encode("cp1252"), "line 1: the header is not valid utf-8"),
        (b'"email\n' + b"x" * 200_000 + b"\n", "line 1: the header row cannot be used"),
    ],
)
def test_files_that_cannot_be_imported_are_refused_and_change_nothing(
    store: Store, tmp_path: Path, content: bytes, message: str
) -> None:
    run(store, write(tmp_path, HEADER + MARIA, name="first.csv"))
    before = leads(store)
    path = write(tmp_path, content)
    with pytest.raises(ImportFileError) as caught:
        run(store, path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert leads(store) == before


def test_a_header_only_file_imports_nothing(store: Store, tmp_path: Path) -> None:
    report = run(store, write(tmp_path, HEADER))
    assert report.summary().endswith("0 rows: 0 inserted, 0 updated, 0 unchanged, 0 rejected")


def test_a_10_mb_line_is_rejected_without_being_held_in_memory(store: Store, tmp_path: Path) -> None:
    run(store, write(tmp_path, HEADER + MARIA, name="first.csv"))
    path = tmp_path / "leads.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write("email,first name\n")
        fh.write("a@example.com,Ann\n")
        fh.write("b@example.com," + "B" * 10_000_000 + "\n")
        fh.write("c@example.com,Cy\n")
    tracemalloc.start()
    try:
        report = run(store, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6_000_000, f"peak {peak:,} bytes"
    assert report.rejected == [
        (3, "is 10,000,015 characters long, longer than any lead row can be (the limit is 1,000,000); "
            "skipped unread"),
    ]  # fmt: skip
    assert report.counts.inserted == 2
    assert set(leads(store)) == {"maria@lakeview-dental.example", "a@example.com", "c@example.com"}


def test_a_quote_left_open_is_caught_before_it_eats_the_rows_after_it(store: Store, tmp_path: Path) -> None:
    text = (
        'email,first name,last name\na@example.com,"Ann,Lee\nb@example.com,Bo,Berg\nc@example.com,Cy,"Cole"\n'
    )
    report = run(store, write(tmp_path, text))
    assert report.rejected_count == 1
    line, reason = report.rejected[0]
    assert line == 2 and "a quote opened in column 'first name' is never closed" in reason
    assert leads(store) == {}


# -- the rejects file -------------------------------------------------------------------------------------


def test_rejected_rows_go_to_a_file_that_can_be_fixed_and_imported(store: Store, tmp_path: Path) -> None:
    content = (
        "Email;Name\r\nann@example.com;Ann\r\nbo@example;Bo\r\ncy@example.com;Cy\xe9\r\ndee@\r\n".encode()
    )
    content = content.replace(b"Cy\xc3\xa9", b"Cy\xe9")  # one undecodable byte, kept as it was
    rejects = tmp_path / "rejects.csv"
    run(store, write(tmp_path, content), rejects=rejects)
    raw = rejects.read_bytes()
    assert raw.startswith(b"line;reason;Email;Name\r\n")
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8", "surrogateescape")), delimiter=";"))
    assert [r[:1] + r[2:] for r in rows[1:]] == [
        ["3", "bo@example", "Bo"],
        ["4", "cy@example.com", "Cy\udce9"],
        ["5", "dee@"],  # as it was: no cells added
    ]
    assert b"cy@example.com;Cy\xe9\r\n" in raw

    fixed = raw.replace(b"bo@example;", b"bo@example.com;").replace(b"Cy\xe9", b"Cy\xc3\xa9")
    fixed = fixed.replace(b";dee@\r\n", b";dee@example.com\r\n")
    report = run(store, write(tmp_path, fixed, name="fixed.csv"))
    assert report.ignored_columns == ["line", "reason"]
    assert (report.counts.inserted, report.rejected_count) == (3, 0)
    assert store.get_lead("cy@example.com").first_name == "Cyé"


def test_the_rejects_file_may_not_be_the_file_being_imported(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + MARIA)
    with pytest.raises(ImportFileError, match="would overwrite the file being imported"):
        run(store, path, rejects=path)
    assert path.read_text() == HEADER + MARIA


# -- big files, interruptions, a running daemon ------------------------------------------------------------


def _many(count: int, start: int = 0) -> str:
    return "email,first name,company\n" + "".join(
        f"lead{n}@example.com,Lead {n},Company {n % 97}\n" for n in range(start, start + count)
    )


def test_an_interrupted_import_keeps_what_it_wrote_and_a_rerun_finishes(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importer, "CHUNK_ROWS", 3)
    path = write(tmp_path, _many(10))
    calls: list[int] = []

    def interrupt(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(store, path, progress=interrupt)
    assert gc.isenabled()
    assert store.count_leads() == 6
    report = run(store, path, now=LATER)
    assert (report.counts.unchanged, report.counts.inserted) == (6, 4)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_database_that_stays_locked_stops_the_import_with_what_it_wrote_kept(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importer, "CHUNK_ROWS", 2)
    engine = database.create_engine(db_url, busy_timeout_s=0.2)
    database.upgrade(engine)
    store = Store(engine=engine)
    path = write(tmp_path, _many(6))
    blocker = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)

    def lock_after_the_first_chunk(done: int, total: int) -> None:
        # Chunks are written in a thread of their own: wait for the first one, then lock.
        deadline = time.monotonic() + 30
        while blocker.execute("SELECT count(*) FROM leads").fetchone()[0] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if not blocker.in_transaction:
            blocker.execute("BEGIN IMMEDIATE")

    try:
        with pytest.raises(DatabaseError) as caught:
            run(store, path, progress=lock_after_the_first_chunk)
        assert str(caught.value) == (
            f"{path}: stopped at line 4: the database refused the write: database is locked; the rows "
            "before it are imported: run the same import again to finish"
        )
        assert gc.isenabled()
        blocker.rollback()
        assert store.count_leads() == 2
        report = run(store, path, now=LATER)
        assert (report.counts.unchanged, report.counts.inserted) == (2, 4)
    finally:
        blocker.close()
        engine.dispose()


def test_progress_is_reported_up_to_the_file_size(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path, _many(5000))
    seen: list[tuple[int, int]] = []
    run(store, path, progress=lambda done, total: seen.append((done, total)))
    size = path.stat().st_size
    assert len(seen) >= 3 and seen[-1] == (size, size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_an_import_leaves_the_database_to_the_daemon_between_chunks(
    db_url: str, store: Store, tmp_path: Path
) -> None:
    # A daemon writing with a one-second busy timeout must never wait that long.
    path = write(tmp_path, _many(30_000))
    other = database.create_engine(db_url, busy_timeout_s=1.0)
    daemon = Store(engine=other)
    done = threading.Event()
    waits: list[float] = []
    errors: list[BaseException] = []

    def write_like_a_daemon() -> None:
        n = 0
        while not done.is_set():
            started = time.monotonic()
            try:
                daemon.suppress(f"d{n}@example.org", reason=SuppressionReason.MANUAL, detail="", now=NOW)
            except Exception as exc:
                errors.append(exc)
                return
            waits.append(time.monotonic() - started)
            n += 1

    thread = threading.Thread(target=write_like_a_daemon)
    thread.start()
    try:
        report = run(store, path)
    finally:
        done.set()
        thread.join()
        other.dispose()
    assert not errors, errors
    assert report.counts.inserted == 30_000
    assert len(waits) > 10 and max(waits) < 1.0


def test_two_imports_of_overlapping_files_at_once(store: Store, tmp_path: Path) -> None:
    first, second = write(tmp_path, _many(3000), "a.csv"), write(tmp_path, _many(3000, start=1500), "b.csv")
    reports: list[ImportReport] = []
    errors: list[BaseException] = []

    def one(path: Path) -> None:
        try:
            reports.append(import_leads(store, path, default_tier="cold", now=NOW))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,)) for p in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert gc.isenabled()  # paused while either ran, running again once both ended
    assert store.count_leads() == 4500
    assert sum(r.counts.inserted for r in reports) == 4500
    assert sum(r.counts.unchanged + r.counts.updated for r in reports) == 1500


# -- the command line ------------------------------------------------------------------------------------


def campaignd(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    env.pop("JOURNAL_STREAM", None)
    env.pop("CI", None)
    cmd = [sys.executable, "-m", "campaignd", "--config", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    path = write_config(tmp_path, db_url=db_url if db_url.startswith("postgresql") else "")
    assert campaignd("db", "upgrade", config=path).returncode == 0
    return path


def _json_leads(config: Path) -> dict[str, dict[str, object]]:
    result = campaignd("leads", "list", "--json", config=config)
    assert result.returncode == 0, result.stderr
    return {lead["email"]: lead for lead in json.loads(result.stdout)}


def test_cli_import_reports_each_rejected_row_and_ends_with_one_summary_line(
    config: Path, tmp_path: Path
) -> None:
    path = write(tmp_path, HEADER + MARIA + "broken,,,,,,,,,\n" + TOM)
    result = campaignd("leads", "import", str(path), config=config)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{path}: line 3: rejected: 'broken' is not a valid email address" in result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "ignored columns: Lead Source (name a column custom.NAME to keep it for templates)"
    assert lines[-1] == f"{path}: 3 rows: 2 inserted, 0 updated, 0 unchanged, 1 rejected"
    assert set(_json_leads(config)) == {"maria@lakeview-dental.example", "tom@becker-bakery.example"}

    # A later file with a custom field: the lead commands show it with the rest.
    update = write(
        tmp_path, "E-mail,custom.industry\nMaria@Lakeview-Dental.example,dental\n", name="more.csv"
    )
    assert (
        campaignd("leads", "import", str(update), config=config)
        .stdout.strip()
        .endswith("1 rows: 0 inserted, 1 updated, 0 unchanged, 0 rejected")
    )
    shown = campaignd("leads", "show", "maria@lakeview-dental.example", config=config).stdout
    assert "custom.industry dental" in shown and "Lakeview Dental" in shown and "touches        0" in shown


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_dry_run_tier_encoding_and_rejects(config: Path, tmp_path: Path) -> None:
    path = write(tmp_path, "Email,First Name\r\nrene@example.fr,Ren\xe9\r\nbad,Bad\r\n".encode("latin-1"))
    dry = campaignd("leads", "import", str(path), "--dry-run", "--encoding", "cp1252", config=config)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip().splitlines()[-1] == (
        f"dry run, nothing written: {path}: 2 rows: 1 inserted, 0 updated, 0 unchanged, 1 rejected"
    )
    assert _json_leads(config) == {}

    rejects = tmp_path / "rejects.csv"
    real = campaignd(
        "leads", "import", str(path), "--tier", "warm", "--encoding", "cp1252", "--rejects", str(rejects),
        config=config,
    )  # fmt: skip
    assert real.returncode == 0, real.stderr
    rene = _json_leads(config)["rene@example.fr"]
    assert (rene["first_name"], rene["tier"]) == ("René", "warm")
    assert rejects.read_bytes().splitlines()[1].startswith(b"3,")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_refuses_what_is_not_a_lead_file_without_a_traceback(config: Path, tmp_path: Path) -> None:
    workbook = write(tmp_path, _xlsx(), name="leads.xlsx.csv")
    result = campaignd("leads", "import", str(workbook), config=config)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{workbook}: this is a ZIP archive")

    unknown = campaignd("leads", "import", str(workbook), "--encoding", "klingon", config=config)
    assert unknown.returncode == 1 and "unknown encoding 'klingon'" in unknown.stderr

    missing = campaignd("leads", "import", str(tmp_path / "nowhere.csv"), config=config)
    assert (
        missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_shows_a_progress_bar_on_a_terminal(config: Path, tmp_path: Path) -> None:
    path = write(tmp_path, _many(20_000))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    env.pop("CI", None)
    env.update(TERM="xterm", COLUMNS="100")
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "campaignd", "--config", str(config), "leads", "import", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    terminal = b""
    try:
        while select.select([leader], [], [], 60)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the process has closed the terminal
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(leader)
        assert proc.wait(timeout=60) == 0
    text = terminal.decode(errors="replace")
    assert "importing" in text and "━" in text
    assert "20000 rows: 20000 inserted, 0 updated, 0 unchanged, 0 rejected" in text
    # Not on a terminal: no bar, only the result.
    again = campaignd("leads", "import", str(path), config=config)
    assert again.stderr == "" and "━" not in again.stdout and "20000 unchanged" in again.stdout


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_an_address_another_import_adds_meanwhile_becomes_an_update(db_url: str, store: Store) -> None:
    # PostgreSQL runs imports side by side: the second writer of a new address waits for
    # the first and then updates the lead instead of failing on the unique email.
    other = database.create_engine(db_url)
    result: list[UpsertCounts] = []
    try:
        with other.begin() as conn:
            Store(engine=other)._upsert_chunk(
                conn, [LeadInput(email="x@example.com", city="Leeds")], "cold", NOW, UpsertCounts()
            )
            writer = threading.Thread(
                target=lambda: result.append(
                    store.upsert_leads(
                        [LeadInput(email="x@example.com", phone="0113 496 0000")], tier="cold", now=LATER
                    )
                )
            )
            writer.start()
            deadline = time.monotonic() + 30
            while not conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
            ).scalar():
                assert time.monotonic() < deadline, "the second import never waited for the first"
                time.sleep(0.05)
        writer.join(timeout=30)
    finally:
        other.dispose()
    [counts] = result
    assert (counts.inserted, counts.updated) == (0, 1)
    lead = store.get_lead("x@example.com")
    assert (lead.city, lead.phone, lead.created_at) == ("Leeds", "0113 496 0000", NOW)
