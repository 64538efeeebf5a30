"""Importing leads from CSV: header mapping, row validation and streaming upserts.

Owns reading a lead file of any size with flat memory (rows are validated and written in
chunks, each in its own transaction, so an interrupted import keeps what it wrote and a
re-run is harmless), mapping the header spellings that spreadsheets and CRMs export,
validating and normalising every field, and reporting each bad row with its line number
and reason while every good row goes in. The database work is the store's
(:meth:`Store.upsert_leads`): an import never resets a lead's tier, status, touch count
or history, and suppressed addresses stay suppressed.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

from campaignd.countries import country_code
from campaignd.exceptions import ImportFileError
from campaignd.store import LeadInput, Store, UpsertCounts

CHUNK_ROWS = 2000
MAX_LISTED = 200
"""Rejected rows and warnings kept for the report; the counts are always complete."""

# Target field -> header spellings, compared after _header_key().
ALIASES: dict[str, tuple[str, ...]] = {
    "email": ("email", "e mail", "email address", "e mail address", "mail", "emailaddress", "email 1"),
    "first_name": ("first name", "firstname", "first", "given name", "forename", "vorname", "prenom"),
    "last_name": ("last name", "lastname", "last", "surname", "family name", "nachname", "nom"),
    "name": ("name", "full name", "contact name", "contact"),
    "company": (
        "company",
        "company name",
        "organisation",
        "organization",
        "business",
        "account name",
        "employer",
        "firma",
    ),
    "phone": ("phone", "phone number", "telephone", "tel", "mobile", "mobile phone", "cell", "work phone"),
    "address_line1": (
        "address",
        "address 1",
        "address line 1",
        "address1",
        "street",
        "street address",
        "mailing street",
        "street 1",
    ),
    "address_line2": ("address 2", "address line 2", "address2", "street 2", "suite", "apartment"),
    "city": ("city", "town", "locality", "mailing city"),
    "region": (
        "state",
        "region",
        "province",
        "county",
        "state province",
        "state region",
        "mailing state",
        "state code",
    ),
    "postal_code": (
        "zip",
        "zip code",
        "zipcode",
        "postal code",
        "postcode",
        "post code",
        "mailing zip",
        "mailing postal code",
        "plz",
    ),
    "country": ("country", "country code", "mailing country"),
    "timezone": ("time zone", "timezone", "tz"),
    "tier": ("tier", "lead tier"),
}
_ALIAS_INDEX = {alias: target for target, aliases in ALIASES.items() for alias in aliases}
CUSTOM_PREFIXES = ("custom.", "custom:", "custom_")

# Longest value each field may hold (the database column sizes).
MAX_LENGTH = {
    "first_name": 200,
    "last_name": 200,
    "company": 200,
    "phone": 64,
    "address_line1": 200,
    "address_line2": 200,
    "city": 100,
    "region": 100,
    "postal_code": 32,
    "timezone": 64,
}
LABEL = {
    "first_name": "first name",
    "last_name": "last name",
    "address_line1": "address",
    "address_line2": "address line 2",
    "postal_code": "postal code",
    "timezone": "time zone",
}
TIERS = ("cold", "warm", "hot")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPACE = re.compile(r"\s+")
_CUSTOM_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")

# Plain ASCII addresses that email-validator would accept unchanged apart from the
# domain's case; everything else takes the full validator (its own speed is ~15k/s).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_FAST_EMAIL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@(?:{_LABEL}\.)+[A-Za-z]{{1,63}}")
_SPECIAL_USE = frozenset(SPECIAL_USE_DOMAIN_NAMES)


def normalise_email(value: str) -> str:
    """The address as campaignd stores it (lower-case), or ValueError with the reason."""
    text = value.strip()
    if (
        _FAST_EMAIL.fullmatch(text)
        and len(text) <= 254
        and text.index("@") <= 64
        and "--" not in text[text.index("@") :]
    ):
        domain = text[text.index("@") + 1 :].lower()
        if not any(domain == s or domain.endswith("." + s) for s in _SPECIAL_USE):
            return text.lower()
    try:
        checked = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None
    return checked.normalized.lower()


@lru_cache(maxsize=1024)
def _zone_ok(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _header_key(name: str) -> str:
    return _SPACE.sub(" ", re.sub(r"[_\-./()]+", " ", name.strip().lower())).strip()


@dataclass(frozen=True, slots=True)
class ColumnMap:
    """How the header's columns map onto lead fields."""

    fields: dict[int, str]
    """Column index -> a lead field, ``name`` (a full name to split) or ``custom:<key>``."""
    ignored: list[str]
    header: list[str]

    @classmethod
    def from_header(cls, header: list[str], source: str) -> ColumnMap:
        fields: dict[int, str] = {}
        ignored: list[str] = []
        taken: dict[str, int] = {}
        for index, raw in enumerate(header):
            name = raw.strip().lstrip("\ufeff")
            lowered = name.lower()
            target: str | None = None
            for prefix in CUSTOM_PREFIXES:
                if lowered.startswith(prefix):
                    key = re.sub(r"[\s\-]+", "_", lowered[len(prefix) :].strip())
                    if not _CUSTOM_KEY.match(key):
                        raise ImportFileError(
                            f"{source}: column {name!r}: custom field names are letters, digits and "
                            "underscores, starting with a letter (templates use them as "
                            "{{ lead.custom.NAME }})"
                        )
                    target = f"custom:{key}"
            if target is None:
                target = _ALIAS_INDEX.get(_header_key(name))
            if target is None or not name:
                if name:
                    ignored.append(name)
                continue
            if target in taken:
                raise ImportFileError(
                    f"{source}: columns {header[taken[target]]!r} and {name!r} both mean "
                    f"{target.replace('_', ' ')}; keep one"
                )
            taken[target] = index
            fields[index] = target
        if "email" not in taken:
            found = ", ".join(repr(h) for h in header if h.strip()) or "none"
            raise ImportFileError(
                f"{source}: no email column in the header (columns found: {found}); "
                "name one of: email, e-mail, email address"
            )
        return cls(fields=fields, ignored=ignored, header=header)


@dataclass(slots=True)
class ImportReport:
    """What an import did. ``rows`` = inserted + updated + unchanged + rejected."""

    source: str
    rows: int = 0
    counts: UpsertCounts = field(default_factory=UpsertCounts)
    rejected_count: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """(line, reason) for the first rejected rows; ``rejected_count`` counts them all."""
    warning_count: int = 0
    warnings: list[tuple[int, str]] = field(default_factory=list)
    duplicates: int = 0
    ignored_columns: list[str] = field(default_factory=list)
    dry_run: bool = False

    def reject(self, line: int, reason: str) -> None:
        self.rejected_count += 1
        if len(self.rejected) < MAX_LISTED:
            self.rejected.append((line, reason))

    def warn(self, line: int, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < MAX_LISTED:
            self.warnings.append((line, message))

    def summary(self) -> str:
        c = self.counts
        text = (
            f"{self.source}: {self.rows} rows: {c.inserted} inserted, {c.updated} updated, "
            f"{c.unchanged} unchanged, {self.rejected_count} rejected"
        )
        extra = []
        if self.duplicates:
            extra.append(f"{self.duplicates} repeated an earlier row's address (the later row wins)")
        if c.suppressed:
            extra.append(f"{c.suppressed} new leads are on the suppression list and stay suppressed")
        return text + (f"; {'; '.join(extra)}" if extra else "")


class _Seen:
    """Which address each earlier row had, kept in a temporary SQLite file.

    A million addresses would cost ~100 MB in a Python dict; on disk the import's memory
    stays flat whatever the file's size.
    """

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="campaignd-import-")
        self._db = sqlite3.connect(Path(self._dir.name) / "seen.db")
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (email TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")

    def lines(self, emails: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for start in range(0, len(emails), 500):
            part = emails[start : start + 500]
            marks = ",".join("?" * len(part))
            out.update(self._db.execute(f"SELECT email, line FROM seen WHERE email IN ({marks})", part))  # noqa: S608
        return out

    def add(self, pairs: list[tuple[str, int]]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO seen VALUES (?, ?)", pairs)

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()


Progress = Callable[[int, int], None]


def import_leads(
    store: Store,
    path: Path,
    *,
    default_tier: str,
    now: datetime,
    dry_run: bool = False,
    encoding: str = "utf-8",
    progress: Progress | None = None,
    rejects: Path | None = None,
) -> ImportReport:
    """Import the leads in the CSV file ``path``.

    :param default_tier: the tier of new leads whose row has no tier.
    :param now: the import's time: created/updated time of what it writes.
    :param dry_run: validate and count, write nothing.
    :param encoding: the file's text encoding (``utf-8`` also accepts a BOM).
    :param progress: called with (bytes read, file size) after each chunk.
    :param rejects: write every rejected row there, as CSV with its line and reason.
    :raises ImportFileError: when the file cannot be used at all (missing, no email column).
    """
    source = str(path)
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise ImportFileError(f"unknown encoding {encoding!r}; try utf-8, cp1252 or latin-1") from None
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise ImportFileError(f"{source}: cannot open: {exc.strerror or exc}") from None
    report = ImportReport(source=source, dry_run=dry_run)
    seen = _Seen()
    reject_out: IO[str] | None = None
    try:
        total = path.stat().st_size
        dialect = _sniff(raw.read(65536))
        raw.seek(0)
        text = io.TextIOWrapper(
            raw, encoding="utf-8-sig" if codec == "utf-8" else codec, errors="surrogateescape", newline=""
        )
        rows = _rows(text, report, dialect)
        header = _header(rows, source, codec)
        columns = ColumnMap.from_header(header, source)
        report.ignored_columns = columns.ignored
        writer = None
        if rejects is not None:
            reject_out = rejects.open("w", newline="", encoding="utf-8")
            writer = csv.writer(reject_out)
            writer.writerow(["line", "reason", *header])
        chunk: list[tuple[int, LeadInput]] = []
        for line, cells in rows:
            if not any(c.strip() for c in cells):
                continue
            report.rows += 1
            lead, reason = _lead(cells, columns, line, report)
            if lead is None:
                report.reject(line, reason)
                if writer is not None:
                    writer.writerow([line, reason, *cells])
                continue
            chunk.append((line, lead))
            if len(chunk) >= CHUNK_ROWS:
                _flush(store, chunk, seen, report, default_tier, now, dry_run)
                chunk = []
                if progress is not None:
                    progress(raw.tell(), total)
        _flush(store, chunk, seen, report, default_tier, now, dry_run)
        if progress is not None:
            progress(total, total)
    finally:
        raw.close()
        seen.close()
        if reject_out is not None:
            reject_out.close()
    return report


def _sniff(sample: bytes) -> type[csv.Dialect]:
    """Comma, semicolon (European Excel), tab or pipe: whichever the header line uses most."""
    first = sample.split(b"\n", 1)[0]
    counts = {d: first.count(d.encode()) for d in (",", ";", "\t", "|")}
    delimiter = max(counts, key=lambda d: counts[d])
    if counts[delimiter] == 0:
        delimiter = ","

    return type("SniffedDialect", (csv.excel,), {"delimiter": delimiter})


def _rows(
    text: io.TextIOWrapper, report: ImportReport, dialect: type[csv.Dialect]
) -> Iterator[tuple[int, list[str]]]:
    """(first line number, cells) per CSV record; unreadable records are reported and skipped."""
    reader = csv.reader(text, dialect=dialect)
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            report.rows += 1
            report.reject(start, f"cannot be read as CSV: {exc}")
            continue
        yield start, cells


def _header(rows: Iterator[tuple[int, list[str]]], source: str, codec: str) -> list[str]:
    for line, cells in rows:
        if not any(c.strip() for c in cells):
            continue
        if any(_has_bad_bytes(c) for c in cells):
            raise ImportFileError(
                f"{source}: line {line}: the header is not valid {codec}; save the file as UTF-8 "
                "or name its encoding with --encoding (for example cp1252 for Excel on Windows)"
            )
        return cells
    raise ImportFileError(f"{source}: the file is empty: expected a header row, then one row per lead")


def _has_bad_bytes(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


def _lead(
    cells: list[str], columns: ColumnMap, line: int, report: ImportReport
) -> tuple[LeadInput | None, str]:
    """One row as a validated lead, or None and the reason it was rejected."""
    if len(cells) > len(columns.header) and any(c.strip() for c in cells[len(columns.header) :]):
        return None, (
            f"has {len(cells)} fields but the header has {len(columns.header)} "
            "(a comma or quote inside an unquoted value?)"
        )
    values: dict[str, str] = {}
    custom: dict[str, Any] = {}
    for index, target in columns.fields.items():
        raw = cells[index] if index < len(cells) else ""
        if _has_bad_bytes(raw):
            return None, (
                f"column {columns.header[index]!r} is not valid text in this encoding; save the file as "
                "UTF-8 or name its encoding with --encoding (for example cp1252)"
            )
        value = raw
        if _CONTROL.search(raw):
            value = _CONTROL.sub(" ", raw)
            if "\n" in raw or "\r" in raw:
                report.warn(line, f"line break in {columns.header[index]!r} replaced by a space")
        value = _SPACE.sub(" ", value).strip()
        if target.startswith("custom:"):
            if value:
                custom[target[7:]] = value
        else:
            values[target] = value
    email_text = values.pop("email", "")
    if not email_text:
        return None, "no email address"
    try:
        email = normalise_email(email_text)
    except ValueError as exc:
        return None, f"{email_text!r} is not a valid email address: {exc}"
    full = values.pop("name", "")
    if full and not values.get("first_name") and not values.get("last_name"):
        first, _, last = full.partition(" ")
        values["first_name"], values["last_name"] = first, last
    tier = values.pop("tier", "").lower()
    if tier and tier not in TIERS:
        return None, f"tier {tier!r} is not one of {', '.join(TIERS)}"
    country = country_code(values.get("country", ""))
    if country is None:
        return None, f"unknown country {values['country']!r}: use its two-letter code, such as US, GB or DE"
    values["country"] = country
    zone = values.get("timezone", "")
    if zone and not _zone_ok(zone):
        return None, f"unknown time zone {zone!r}: use an IANA name such as America/Chicago or Europe/Berlin"
    for name, limit in MAX_LENGTH.items():
        if len(values.get(name, "")) > limit:
            return None, f"{LABEL.get(name, name)} is longer than {limit} characters"
    return LeadInput(email=email, tier=tier or None, custom=custom, **values), ""


def _flush(
    store: Store,
    chunk: list[tuple[int, LeadInput]],
    seen: _Seen,
    report: ImportReport,
    tier: str,
    now: datetime,
    dry_run: bool,
) -> None:
    """Write one chunk; a row repeating an earlier row's address is applied after it."""
    if not chunk:
        return
    earlier = seen.lines([lead.email for _, lead in chunk])
    batch: list[LeadInput] = []
    in_batch: set[str] = set()
    repeated = 0
    for line, lead in chunk:
        first = earlier.get(lead.email)
        earlier[lead.email] = line
        if first is not None:
            report.duplicates += 1
            report.warn(line, f"same address as line {first} ({lead.email}); this later row wins")
            if dry_run:
                # Nothing of the earlier row was written: count this one as the update it would be.
                repeated += 1
                continue
        if lead.email in in_batch:
            # One transaction per distinct address: write what came before, then this row.
            report.counts.add(store.upsert_leads(batch, tier=tier, now=now, dry_run=dry_run))
            batch, in_batch = [], set()
        batch.append(lead)
        in_batch.add(lead.email)
    if batch:
        report.counts.add(store.upsert_leads(batch, tier=tier, now=now, dry_run=dry_run))
    report.counts.updated += repeated
    seen.add([(lead.email, line) for line, lead in chunk])
