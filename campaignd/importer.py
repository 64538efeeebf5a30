"""Importing leads from CSV: reading the file, mapping its header, validating each row.

Owns reading a lead file of any size with flat memory (rows are validated and written in
chunks, each in its own transaction, so an interrupted import keeps what it wrote and a
re-run is harmless); recognising what is not a CSV file at all (a workbook, a PDF) and
the encodings, delimiters and header spellings that spreadsheets and CRMs export;
validating and normalising every field; and reporting each bad row with its line number
and reason while every good row goes in. The database work is the store's
(:meth:`Store.upsert_leads`): an import never resets a lead's tier, status, touch count
or history, and suppressed addresses stay suppressed.

Imports the store's read models, never SQLAlchemy; never reads the clock (``now`` is
passed in).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import gc
import io
import re
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

from campaignd.countries import country_code
from campaignd.exceptions import DatabaseError, ImportFileError
from campaignd.store import LeadInput, Store, UpsertCounts

CHUNK_ROWS = 2000
"""Rows per transaction: small enough that a running daemon never waits long for the lock."""
MAX_LISTED = 200
"""Rejected rows and notes kept for the report; the counts are always complete."""
MAX_LINE = 1_000_000
"""Characters in one physical line; a longer line is rejected without being held in memory."""
MAX_CUSTOM = 1000
"""Characters in one custom field's value."""
_SAMPLE = 65536

# Target field -> header spellings, best first, compared after _header_key(). When several
# columns mean the same field, the better spelling is used and the others fill in where it
# is blank (Phone, then Mobile).
# fmt: off
ALIASES: dict[str, tuple[str, ...]] = {
    "email": (
        "email", "e mail", "email address", "e mail address", "emailaddress", "email 1", "e mail 1",
        "email 1 value", "e mail 1 value", "primary email", "work email", "business email", "personal email",
        "mail", "courriel", "correo", "correo electronico",
    ),
    "first_name": (
        "first name", "firstname", "first", "given name", "forename", "fname", "vorname", "prenom", "prénom",
        "nombre",
    ),
    "last_name": (
        "last name", "lastname", "last", "surname", "family name", "lname", "nachname", "nom",
        "nom de famille", "apellido", "apellidos",
    ),
    "name": ("name", "full name", "fullname", "contact name", "display name", "contact"),
    "company": (
        "company", "company name", "organisation", "organization", "organisation name", "organization name",
        "organization 1 name", "business", "business name", "account name", "account", "employer", "firma",
        "unternehmen", "société", "societe", "empresa",
    ),
    "phone": (
        "phone", "phone number", "telephone", "telephone number", "tel", "work phone", "business phone",
        "office phone", "primary phone", "phone 1 value", "telefon", "téléphone", "mobile", "mobile phone",
        "mobile phone number", "mobile number", "cell", "cell phone", "handy",
    ),
    "address_line1": (
        "address", "address 1", "address line 1", "address1", "street", "street address", "street 1",
        "address street", "address 1 street", "mailing street", "business street", "billing street",
        "strasse", "straße", "adresse",
    ),
    "address_line2": (
        "address 2", "address line 2", "address2", "street 2", "street address 2",
        "address 1 extended address", "business street 2", "suite", "apartment",
    ),
    "city": (
        "city", "town", "locality", "address 1 city", "mailing city", "business city", "billing city", "ort",
        "stadt", "ville", "ciudad",
    ),
    "region": (
        "state", "region", "province", "state province", "state region", "state code", "address 1 region",
        "mailing state", "mailing state province", "business state", "billing state",
        "billing state province", "bundesland", "county",
    ),
    "postal_code": (
        "zip", "zip code", "zipcode", "postal code", "postcode", "post code", "zip postal code",
        "address 1 postal code", "mailing zip", "mailing postal code", "mailing zip postal code",
        "business postal code", "billing zip", "billing postal code", "billing zip postal code", "plz",
        "code postal",
    ),
    "country": (
        "country", "country code", "country region", "address 1 country", "mailing country",
        "business country region", "billing country", "land", "pays", "pais",
    ),
    "timezone": ("time zone", "timezone", "tz"),
    "tier": ("tier", "lead tier"),
    "opt_out": (
        "email opt out", "email optout", "email opted out", "opted out", "opted out of email", "opt out",
        "optout", "has opted out of email", "hasoptedoutofemail", "unsubscribed",
        "unsubscribed from all email", "do not email", "do not contact", "marketing opt out",
    ),
}
# fmt: on
_ALIAS_INDEX = {
    alias: (target, rank) for target, aliases in ALIASES.items() for rank, alias in enumerate(aliases)
}
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
    "opt_out": "email opt-out",
}
_SHORTEST_LIMIT = min(MAX_LENGTH.values())

# The lead's contact fields in LeadInput's own order, and every field a column can feed.
_LEAD_FIELDS = tuple(f.name for f in dataclasses.fields(LeadInput))
_CONTACT_FIELDS = tuple(f for f in _LEAD_FIELDS if f not in ("email", "tier", "custom"))
if _LEAD_FIELDS[:1] != ("email",) or _LEAD_FIELDS[-2:] != ("tier", "custom") or len(_CONTACT_FIELDS) != 11:
    # RowParser.lead builds LeadInput by position.
    raise RuntimeError(f"LeadInput's fields have changed ({_LEAD_FIELDS}): update RowParser.lead")
_TARGETS = ("email", *_CONTACT_FIELDS, "name", "tier", "opt_out")
_EMAIL, _CONTACT_START, _CONTACT_END = 0, 1, 1 + len(_CONTACT_FIELDS)
_NAME, _TIER, _OPT_OUT = (_TARGETS.index(t) for t in ("name", "tier", "opt_out"))
_FIRST, _LAST, _COUNTRY, _ZONE = (
    _TARGETS.index(t) for t in ("first_name", "last_name", "country", "timezone")
)


TIERS = ("cold", "warm", "hot")
_YES = frozenset({"1", "yes", "y", "true", "t", "x", "opted out", "unsubscribed", "ja", "oui", "si", "sí"})
_NO = frozenset({"", "0", "no", "n", "false", "f", "subscribed", "nein", "non"})

# Control characters that are not white space are dropped; white space becomes one space.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")
_INVISIBLE = re.compile(r"[\u200b-\u200d\u2060\ufeff]")
_SPACE = re.compile(r"\s+")
_UNDECODED = re.compile(r"[\udc80-\udcff]")
# A row with none of these (control characters, Unicode spaces and invisible characters,
# undecodable bytes), no double space and no Excel ="..." guard needs only strip().
_UNUSUAL = re.compile(
    r"[\x00-\x1f\x7f\x85\xa0\u1680\u2000-\u200d\u2028\u2029\u202f\u205f\u2060\u3000\ufeff\udc80-\udcff]"
)
_CUSTOM_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
_SEP_LINE = re.compile(r"sep=(.)\s*$")

# Plain ASCII addresses that email-validator would accept unchanged apart from the
# domain's case; everything else takes the full validator (its own speed is ~15k/s).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_FAST_EMAIL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@(?:{_LABEL}\.)+[A-Za-z]{{1,63}}")
_SPECIAL_TLDS = frozenset(n for n in SPECIAL_USE_DOMAIN_NAMES if "." not in n)
_SPECIAL_SUFFIXES = tuple(n for n in SPECIAL_USE_DOMAIN_NAMES if "." in n)
_DISPLAY_NAME = re.compile(r'(?:"[^"]*"|[^"<>]*)\s*<([^<>]+)>')

# Files that are not CSV, by their first bytes: what they are, and what to do instead.
_NOT_CSV = (
    (b"PK\x03\x04", "a ZIP archive (an Excel .xlsx, LibreOffice .ods or Numbers workbook?)"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Excel 97-2003 .xls workbook"),
    (b"%PDF-", "a PDF document"),
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"{\\rtf", "an RTF document"),
)
# Every byte but the control bytes that never occur in text (NUL and the like).
_TEXT_BYTES = bytes(b for b in range(256) if not (b <= 8 or (14 <= b <= 31 and b != 27)))
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def normalise_email(value: str) -> str:
    """The address as campaignd stores it (lower-case), or ValueError with the reason.

    Agrees exactly with email-validator (without network look-ups) on every input; plain
    ASCII addresses take a shortcut that gives the same answer five times faster.
    """
    text = value.strip()
    if _FAST_EMAIL.fullmatch(text) and len(text) <= 254:
        at = text.index("@")
        domain = text[at + 1 :].lower()
        if at <= 64 and "--" not in domain and not _special_use(domain):
            return text.lower()
    try:
        checked = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None
    return checked.normalized.lower()


def _special_use(domain: str) -> bool:
    """Whether email-validator refuses ``domain`` as reserved (``localhost``, ``*.test``...)."""
    if domain.rpartition(".")[2] in _SPECIAL_TLDS:
        return True
    return bool(_SPECIAL_SUFFIXES) and any(domain == n or domain.endswith("." + n) for n in _SPECIAL_SUFFIXES)


def email_from_cell(value: str) -> str:
    """The address in a spreadsheet cell, normalised; ValueError with the reason otherwise.

    Besides a bare address, takes what mail programs and CRMs put in such cells:
    ``Maria Gonzalez <maria@example.com>`` and ``mailto:maria@example.com``.
    """
    try:
        return normalise_email(value)
    except ValueError:
        if value.count("@") > 1 and re.search(r"[,;\s]", value):
            raise ValueError("the cell holds more than one address; give each lead its own row") from None
        inner = _DISPLAY_NAME.fullmatch(value)
        if inner is not None:
            return normalise_email(inner.group(1))
        if value[:7].lower() == "mailto:":
            return normalise_email(value[7:].split("?", 1)[0])
        raise


@lru_cache(maxsize=1024)
def _zone_ok(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _header_key(name: str) -> str:
    return _SPACE.sub(" ", re.sub(r"[_\-./()]+", " ", name.strip().lower())).strip()


class RowRejected(Exception):
    """A row cannot be imported; the message is the reason."""


@dataclass(frozen=True, slots=True)
class ColumnMap:
    """Which columns of the file feed which lead field."""

    header: list[str]
    fields: list[tuple[str, tuple[int, ...]]]
    """(field, column indexes best first) for each lead field the file has; ``name`` is a
    full name to split, ``opt_out`` the email opt-out flag."""
    custom: list[tuple[str, tuple[int, ...]]]
    """(custom field name, column indexes) for the ``custom.NAME`` columns."""
    ignored: list[str]
    """Columns that feed nothing."""

    @classmethod
    def from_header(cls, header: list[str], source: str) -> ColumnMap:
        """Map a header row; raises :class:`ImportFileError` when it has no email column."""
        found: dict[str, list[tuple[int, int]]] = {}
        custom: dict[str, list[int]] = {}
        ignored: list[str] = []
        for index, raw in enumerate(header):
            name = raw.strip()
            lowered = name.lower()
            if not name:
                continue
            prefix = next((p for p in CUSTOM_PREFIXES if lowered.startswith(p)), None)
            if prefix is not None:
                key = re.sub(r"[\s\-.]+", "_", lowered[len(prefix) :].strip())
                if not _CUSTOM_KEY.match(key):
                    raise ImportFileError(
                        f"{source}: column {name!r}: custom field names are letters, digits and "
                        "underscores, starting with a letter (templates use them as "
                        "{{ lead.custom.NAME }})"
                    )
                custom.setdefault(key, []).append(index)
                continue
            hit = _ALIAS_INDEX.get(_header_key(name))
            if hit is None:
                ignored.append(name)
                continue
            target, rank = hit
            found.setdefault(target, []).append((rank, index))
        if "email" not in found:
            raise ImportFileError(_no_email_column(header, source))
        fields = [(target, tuple(i for _, i in sorted(hits))) for target, hits in found.items()]
        return cls(
            header=header,
            fields=fields,
            custom=[(key, tuple(indexes)) for key, indexes in custom.items()],
            ignored=ignored,
        )

    def describe(self) -> list[tuple[str, str]]:
        """(column, what it feeds) for every column used, in the file's order."""
        used = [(i, LABEL.get(t, t.replace("_", " "))) for t, idx in self.fields for i in idx]
        used += [(i, f"custom.{key}") for key, idx in self.custom for i in idx]
        return [(self.header[i].strip(), what) for i, what in sorted(used)]


def _no_email_column(header: list[str], source: str) -> str:
    for cell in header:
        if "@" in cell:
            try:
                email_from_cell(cell.strip())
            except ValueError:
                continue
            return (
                f"{source}: the first row holds an email address ({cell.strip()!r}), not column "
                "names: add a header row such as 'email,first_name,last_name,company'"
            )
    found = ", ".join(repr(h.strip()) for h in header if h.strip()) or "none"
    return (
        f"{source}: no email column in the header (columns found: {found}); "
        "name one of: email, e-mail, email address"
    )


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
    """Rows whose address an earlier row of the file already had."""
    opted_out: int = 0
    """Rows whose opt-out column says the person opted out of email."""
    undecodable: int = 0
    """Rows rejected because they are not valid text in the file's encoding."""
    encoding: str = "utf-8"
    delimiter: str = ","
    columns: list[tuple[str, str]] = field(default_factory=list)
    """(column, lead field) for every column used."""
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
            extra.append(f"{self.duplicates} repeated an earlier row's address (applied in file order)")
        if c.suppressed:
            extra.append(f"{c.suppressed} new leads are on the suppression list and stay suppressed")
        if self.opted_out:
            extra.append(f"{self.opted_out} opted out of email and are on the suppression list")
        if self.undecodable:
            extra.append(
                f"{self.undecodable} rows are not valid {self.encoding}: if the file comes from Excel "
                "on Windows, import it again with --encoding cp1252"
            )
        return text + (f"; {'; '.join(extra)}" if extra else "")


class _Seen:
    """Which line each address was first seen on, kept in a temporary SQLite file.

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
        self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", pairs)

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()


class _LongLine(Exception):
    def __init__(self, line: int, length: int) -> None:
        super().__init__(line, length)
        self.line = line
        self.length = length


class _Lines:
    """The file's physical lines, counted; a line longer than MAX_LINE is skipped unread.

    The csv reader pulls from this instead of the file, so one enormous line (a binary
    blob, a runaway field) costs MAX_LINE characters of memory at most, and its record
    is rejected with its line number instead of stopping the import.
    """

    def __init__(self, text: IO[str], count: int = 0) -> None:
        self._readline = text.readline
        self.count = count

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._readline(MAX_LINE)
        if not line:
            raise StopIteration
        self.count += 1
        if len(line) == MAX_LINE and line[-1] not in "\r\n":
            length = len(line)
            while True:
                more = self._readline(MAX_LINE)
                length += len(more)
                if len(more) < MAX_LINE or more[-1] in "\r\n":
                    break
            raise _LongLine(self.count, length)
        return line


Progress = Callable[[int, int], None]
Record = tuple[int, list[str] | None, str]
"""(first line, cells or None, why the record cannot be read)."""


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
    :param encoding: the file's text encoding when it has no byte-order mark (a BOM
        always wins: UTF-8, UTF-16 and UTF-32 files are recognised by it).
    :param progress: called with (bytes read, file size) after each chunk.
    :param rejects: write every rejected row there, as CSV with its line and reason, in
        the file's own encoding and delimiter, ready to fix and import again.
    :raises ImportFileError: when the file cannot be used at all (missing, not CSV, no
        email column); nothing is written then. A read error part-way keeps what was
        already imported and says where it stopped.
    """
    source = str(path)
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        raise ImportFileError(f"unknown encoding {encoding!r}; try utf-8, cp1252 or latin-1") from None
    if not getattr(info, "_is_text_encoding", True):
        raise ImportFileError(f"{encoding!r} is not a text encoding; try utf-8, cp1252 or latin-1")
    if rejects is not None and _same_file(rejects, path):
        raise ImportFileError(
            f"--rejects {rejects} would overwrite the file being imported; name another file"
        )
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise ImportFileError(f"{source}: cannot open: {exc.strerror or exc}") from None
    report = ImportReport(source=source, dry_run=dry_run)
    paused = False
    seen: _Seen | None = None
    reject_out: IO[str] | None = None
    lines: _Lines | None = None
    try:
        total = path.stat().st_size
        sample = raw.read(_SAMPLE)
        codec = _codec(sample, info.name, source)
        report.encoding = "utf-8" if codec == "utf-8-sig" else codec
        raw.seek(0)
        text = io.TextIOWrapper(raw, encoding=codec, errors="surrogateescape", newline="")
        delimiter, skip = _delimiter(sample, codec)
        report.delimiter = delimiter
        if skip:
            text.readline()
        lines = _Lines(text, count=int(skip))
        records = _records(lines, delimiter)
        header = _header(records, source, report.encoding)
        columns = ColumnMap.from_header(header, source)
        report.ignored_columns = columns.ignored
        report.columns = columns.describe()
        rows_out = None
        if rejects is not None:
            # A BOM only if the file had one: utf-8-sig reads both, but writes one always.
            plain_utf8 = codec == "utf-8-sig" and not sample.startswith(codecs.BOM_UTF8)
            reject_out = _open_rejects(rejects, "utf-8" if plain_utf8 else codec)
            rows_out = csv.writer(reject_out, delimiter=delimiter)
            rows_out.writerow(["line", "reason", *header])
        seen = _Seen()
        parser = RowParser(columns, delimiter, report)
        _collector.pause()
        paused = True
        chunks = 0
        chunk: list[tuple[int, LeadInput, bool]] = []
        for line, cells, problem in records:
            if cells is not None:
                joined = "".join(cells)
                if not joined or joined.isspace():
                    continue  # blank lines and rows of empty cells (Excel writes ",,,,")
                try:
                    lead, opted_out = parser.lead(cells, joined, line)
                except RowRejected as exc:
                    problem = str(exc)
                else:
                    report.rows += 1
                    chunk.append((line, lead, opted_out))
                    if len(chunk) >= CHUNK_ROWS:
                        _write(store, _plan(chunk, seen, report, dry_run), report, default_tier, now)
                        chunk = []
                        chunks += 1
                        if chunks % 50 == 0:
                            gc.collect(1)  # the young objects, once per 100,000 rows
                        if progress is not None:
                            progress(raw.tell(), total)
                    continue
            report.rows += 1
            report.reject(line, problem)
            if rows_out is not None:
                rows_out.writerow([line, problem, *(cells or ())])
        if chunk:
            _write(store, _plan(chunk, seen, report, dry_run), report, default_tier, now)
        if progress is not None:
            progress(total, total)
    except _WriteFailed as exc:
        raise DatabaseError(f"{source}: stopped at line {exc.line}: {exc.error}{_kept(report)}") from None
    except OSError as exc:
        where = f" after line {lines.count}" if lines is not None and lines.count else ""
        raise ImportFileError(f"{source}: stopped{where}: {exc.strerror or exc}{_kept(report)}") from None
    finally:
        if paused:
            _collector.resume()
        raw.close()
        if seen is not None:
            seen.close()
        if reject_out is not None:
            reject_out.close()
    return report


def _kept(report: ImportReport) -> str:
    c = report.counts
    if report.dry_run or not (c.inserted or c.updated or c.unchanged):
        return ""
    return "; the rows before it are imported: run the same import again to finish"


def _open_rejects(path: Path, codec: str) -> IO[str]:
    # The input's encoding and undecodable bytes as they were: the file opens like the original.
    try:
        return path.open("w", newline="", encoding=codec, errors="surrogateescape")
    except OSError as exc:
        raise ImportFileError(f"--rejects {path}: cannot write: {exc.strerror or exc}") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and a.samefile(b)
    except OSError:
        return False


def _codec(sample: bytes, given: str, source: str) -> str:
    """The codec to read with: the byte-order mark's if there is one, else ``given``.

    Refuses files that are plainly not text, before anything is read as rows.
    """
    for magic, what in _NOT_CSV:
        if sample.startswith(magic):
            raise ImportFileError(
                f"{source}: this is {what}, not a CSV file; open it in its program and save "
                "(or export) it as 'CSV UTF-8', then import that file"
            )
    for bom, codec in _BOMS:
        if sample.startswith(bom):
            return codec
    # A stray control byte is a bad cell (cleaned, or rejected with its row); a sample
    # one part in twenty made of them is a binary file, or UTF-16 text without its BOM.
    if len(sample.translate(None, _TEXT_BYTES)) > len(sample) // 20 and not given.startswith(
        ("utf-16", "utf-32")
    ):
        raise ImportFileError(
            f"{source}: this is not a text file (it is full of control bytes; a UTF-16 file without a "
            "byte-order mark?); save it as 'CSV UTF-8', or name its encoding with --encoding"
        )
    return "utf-8-sig" if given == "utf-8" else given


def _delimiter(sample: bytes, codec: str) -> tuple[str, bool]:
    """Comma, semicolon (European Excel), tab or pipe: whichever the header line uses most.

    An Excel ``sep=;`` line names it outright; the second value says such a line is there.
    """
    lines = sample.decode(codec, errors="replace").lstrip("\ufeff").splitlines()
    hint = _SEP_LINE.match(lines[0]) if lines else None
    if hint:
        return hint.group(1), True
    header = next((line for line in lines if line.strip()), "")
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=lambda d: counts[d])
    return (best if counts[best] else ","), False


def _records(lines: _Lines, delimiter: str) -> Iterator[Record]:
    """Every CSV record with the line it starts on; unreadable ones carry the reason."""
    reader = csv.reader(lines, delimiter=delimiter, doublequote=True, quotechar='"', strict=False)
    while True:
        start = lines.count + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except _LongLine as exc:
            where = "" if exc.line == start else f"runs on to line {exc.line}, which "
            yield (
                start,
                None,
                (
                    f"{where}is {exc.length:,} characters long, longer than any lead row can be "
                    f"(the limit is {MAX_LINE:,}); skipped unread"
                ),
            )
            continue
        except csv.Error as exc:
            message = str(exc)
            if "field larger than field limit" in message:
                message = f"a value is longer than {csv.field_size_limit():,} characters"
            yield start, None, f"cannot be read as CSV: {message}"
            continue
        yield start, cells, ""


def _header(records: Iterator[Record], source: str, encoding: str) -> list[str]:
    for line, cells, problem in records:
        if cells is None:
            raise ImportFileError(f"{source}: line {line}: the header row cannot be used: {problem}")
        if not "".join(cells).strip():
            continue
        if any(_UNDECODED.search(c) for c in cells):
            raise ImportFileError(
                f"{source}: line {line}: the header is not valid {encoding}; save the file as "
                "'CSV UTF-8' or name its encoding with --encoding (for example cp1252 for Excel "
                "on Windows)"
            )
        return [c.strip().lstrip("\ufeff") for c in cells]
    raise ImportFileError(f"{source}: the file is empty: expected a header row, then one row per lead")


class RowParser:
    """Turns a data row into a validated lead, or raises :class:`RowRejected` with the reason."""

    def __init__(self, columns: ColumnMap, delimiter: str, report: ImportReport) -> None:
        self.header = columns.header
        self.width = len(columns.header)
        self.delimiter = delimiter
        self.report = report
        self.custom = columns.custom
        found = dict(columns.fields)
        self.has = frozenset(found)
        # Per target (in _TARGETS order): its columns, best first; none when the file lacks it.
        self.indexes = [found.get(target, ()) for target in _TARGETS]
        # The common shape, at most one column per field, takes a shorter path: the index of
        # each target's column, or -1, which points at the blank cell put after the row.
        self.single = (
            [i[0] if i else -1 for i in self.indexes] if all(len(i) <= 1 for i in self.indexes) else None
        )

    def lead(self, cells: list[str], joined: str, line: int) -> tuple[LeadInput, bool]:
        """The row as a lead and whether it opted out of email.

        :param joined: the cells joined together (the caller has it at hand).
        """
        n, width = len(cells), self.width
        if n > width and "".join(cells[width:]).strip():
            raise RowRejected(
                f"has {n} fields but the header has {width} (a delimiter or quote inside an unquoted value?)"
            )
        plain = _UNUSUAL.search(joined) is None and "  " not in joined and '="' not in joined
        if not plain and ("\n" in joined or "\r" in joined):
            self._check_runaway(cells, line)
        if plain and self.single is not None:
            # A copy with blanks up to the header's width and one more, which -1 points at.
            row = cells + [""] * (width - n + 1) if n < width else [*cells, ""]
            values = [row[i].strip() for i in self.single]
        else:
            values = [self._cell(cells, indexes, plain, line) for indexes in self.indexes]
        custom: dict[str, Any] = {}
        for key, indexes in self.custom:
            value = self._cell(cells, indexes, plain, line)
            if value:
                if len(value) > MAX_CUSTOM:
                    raise RowRejected(f"custom.{key} is longer than {MAX_CUSTOM} characters")
                custom[key] = value

        email_text = values[_EMAIL]
        if not email_text:
            raise RowRejected("no email address")
        try:
            email = email_from_cell(email_text)
        except ValueError as exc:
            raise RowRejected(f"{email_text!r} is not a valid email address: {exc}") from None
        full = values[_NAME]
        if full and not values[_FIRST] and not values[_LAST]:
            if "," in full:  # "Gonzalez, Maria", as CRMs sort names
                last, _, first = full.partition(",")
            else:
                first, _, last = full.partition(" ")
            values[_FIRST], values[_LAST] = first.strip(), last.strip()
        tier = values[_TIER].lower()
        if tier and tier not in TIERS:
            raise RowRejected(f"tier {tier!r} is not one of {', '.join(TIERS)}")
        opted_out = False
        flag = values[_OPT_OUT].lower()
        if flag:
            if flag in _YES:
                opted_out = True
            elif flag not in _NO:
                raise RowRejected(f"email opt-out {flag!r} is not yes or no (or 1/0, true/false)")
        if values[_COUNTRY]:
            country = country_code(values[_COUNTRY])
            if country is None:
                raise RowRejected(
                    f"unknown country {values[_COUNTRY]!r}: use its two-letter code, such as US, GB or DE"
                )
            values[_COUNTRY] = country
        zone = values[_ZONE]
        if zone and not _zone_ok(zone):
            raise RowRejected(
                f"unknown time zone {zone!r}: use an IANA name such as America/Chicago or Europe/Berlin"
            )
        contact = values[_CONTACT_START:_CONTACT_END]
        if max(map(len, contact)) > _SHORTEST_LIMIT:
            for name, value in zip(_CONTACT_FIELDS, contact, strict=True):
                limit = MAX_LENGTH.get(name)
                if limit is not None and len(value) > limit:
                    label = LABEL.get(name, name.replace("_", " "))
                    raise RowRejected(f"{label} is longer than {limit} characters")
        if opted_out:
            self.report.opted_out += 1
        c = contact
        # By position, twice as fast as by keyword: a big import builds a million of them.
        lead = LeadInput(
            email, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], tier or None, custom
        )
        return lead, opted_out

    def _cell(self, cells: list[str], indexes: tuple[int, ...], plain: bool, line: int) -> str:
        """The first non-blank of the columns that mean one field, tidied."""
        for i in indexes:
            if i < len(cells):
                value = cells[i].strip() if plain else self._tidy(cells[i], self.header[i], line)
                if value:
                    return value
        return ""

    def _tidy(self, raw: str, column: str, line: int) -> str:
        """A cell's text with line breaks, control and invisible characters and runs of spaces
        collapsed, and Excel's ``="..."`` text guard taken off."""
        if _UNDECODED.search(raw):
            self.report.undecodable += 1
            raise RowRejected(
                f"column {column!r} is not valid {self.report.encoding} text; save the file as "
                "'CSV UTF-8' or name its encoding with --encoding (cp1252 for most files from "
                "Excel on Windows)"
            )
        if "\n" in raw or "\r" in raw:
            self.report.warn(line, f"line break in {column!r} replaced by a space")
        value = _SPACE.sub(" ", _CONTROL.sub("", _INVISIBLE.sub("", raw))).strip()
        if value.startswith('="') and value.endswith('"') and len(value) >= 3:
            value = value[2:-1].strip()
        return value

    def _check_runaway(self, cells: list[str], line: int) -> None:
        """Reject a row whose quoted value ran over what look like whole rows.

        A real multi-line value (an address, a note) does not hold a line with as many
        delimiters as the file has columns; a quote left open that swallowed the next
        rows does.
        """
        needed = max(1, self.width - 1)
        for index, cell in enumerate(cells):
            if "\n" not in cell and "\r" not in cell:
                continue
            if any(part.count(self.delimiter) >= needed for part in cell.splitlines()[1:]):
                column = self.header[index] if index < self.width else f"#{index + 1}"
                end = line + sum(len(c.splitlines()) - 1 for c in cells if c)
                raise RowRejected(
                    f"a quote opened in column {column!r} is never closed on its line, so this row "
                    f"runs on to line {end} and takes in what look like whole rows; close or remove "
                    f"that quote and import lines {line}-{end} again"
                )


@dataclass(slots=True)
class _Batch:
    """Rows written in one transaction; ``line`` is the first one's line in the file."""

    line: int
    leads: list[LeadInput] = field(default_factory=list)
    opted_out: set[str] = field(default_factory=set)


def _plan(
    chunk: list[tuple[int, LeadInput, bool]], seen: _Seen, report: ImportReport, dry_run: bool
) -> tuple[list[_Batch], int]:
    """Split a chunk into transactions so that a row repeating an earlier row's address is
    applied after it; returns the batches and, for a dry run, the repeats left out of them
    (nothing of the earlier row was written: each counts as the update it would be)."""
    earlier = seen.lines([lead.email for _, lead, _ in chunk])
    batches: list[_Batch] = []
    in_batch: set[str] = set()
    repeated = 0
    for line, lead, opted_out in chunk:
        first = earlier.get(lead.email)
        if first is None:
            earlier[lead.email] = line
        else:
            report.duplicates += 1
            report.warn(line, f"same address as line {first} ({lead.email}); applied after it")
            if dry_run:
                repeated += 1
                continue
        if not batches or lead.email in in_batch:
            # One write per address and transaction: what came before goes first.
            batches.append(_Batch(line))
            in_batch = set()
        batches[-1].leads.append(lead)
        in_batch.add(lead.email)
        if opted_out:
            batches[-1].opted_out.add(lead.email)
    seen.add([(lead.email, line) for line, lead, _ in chunk])
    return batches, repeated


class _CollectorPause:
    """Pauses Python's cyclic garbage collector while imports run in this process.

    Rows stream through an import, die young and form no cycles, yet the collector's
    passes over them cost a tenth of its time. The first import to start pauses it and
    the last to end lets it run again, as it was; imports in several threads share it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._was_enabled = False

    def pause(self) -> None:
        with self._lock:
            if self._running == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._running += 1

    def resume(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0 and self._was_enabled:
                gc.enable()


_collector = _CollectorPause()


class _WriteFailed(Exception):
    def __init__(self, line: int, error: DatabaseError) -> None:
        super().__init__(line, error)
        self.line = line
        self.error = error


def _write(
    store: Store, planned: tuple[list[_Batch], int], report: ImportReport, tier: str, now: datetime
) -> None:
    """Write the planned batches in file order, each in its own transaction."""
    batches, repeated = planned
    for batch in batches:
        try:
            written = store.upsert_leads(
                batch.leads, tier=tier, now=now, dry_run=report.dry_run, opted_out=batch.opted_out
            )
        except DatabaseError as exc:
            raise _WriteFailed(batch.line, exc) from None
        report.counts.add(written)
    report.counts.updated += repeated
