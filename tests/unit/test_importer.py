"""The importer's pure parts: addresses, header mapping, row validation, countries.

Files and databases are in ``tests/integration/test_import.py``.
"""

from __future__ import annotations

import gc
import string

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from campaignd import importer
from campaignd.countries import country_code
from campaignd.exceptions import ImportFileError
from campaignd.importer import (
    ColumnMap,
    ImportReport,
    RowParser,
    RowRejected,
    email_from_cell,
    normalise_email,
)
from campaignd.store import LeadInput

# -- addresses ---------------------------------------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"


def _reference(text: str) -> str | None:
    try:
        return validate_email(text.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError:
        return None


def _ours(text: str) -> str | None:
    try:
        return normalise_email(text)
    except ValueError:
        return None


_local = st.text(alphabet=ATEXT + ".", max_size=70)
_label = st.text(alphabet=string.ascii_letters + string.digits + "-", max_size=66)
_TLDS = ["com", "COM", "org", "example", "test", "local", "localhost", "arpa", "onion", "invalid"]
_tld = st.sampled_from([*_TLDS, "x1", "c", "xn--p1ai", "museum", "co", "a" * 63, "a" * 64]) | st.text(
    alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=8
)
# Shaped like the plain ASCII addresses the shortcut takes, with its edges: label and
# local-part lengths, hyphens and '--', special-use and numeric top-level domains, case.
_ascii_address = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join([*labels, tld])}",
    _local,
    st.lists(_label, min_size=1, max_size=4),
    _tld,
)
_noise = st.text(alphabet=ATEXT + '.@ -_"()<>[]:;,\\éüß\u00a0\u200bİ', max_size=80)


_inputs = st.one_of(_ascii_address, _ascii_address.map(lambda a: f"  {a.upper()} "), _noise, st.emails())


@settings(max_examples=1500, deadline=None)
@given(_inputs)
@example("Maria.Gonzalez@Lakeview-Dental.Example")
@example("a@b.test")
@example("a@xn--mnchen-3ya.de")
@example("a@b--c.com")
@example("x@localhost")
@example("a..b@example.com")
@example(("l" * 64) + "@example.com")
@example(("l" * 65) + "@example.com")
@example("a@" + ".".join(["d" * 63] * 4) + ".com")
def test_normalise_email_agrees_with_email_validator(text: str) -> None:
    assert _ours(text) == _reference(text)


@pytest.mark.slow
@settings(max_examples=100_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_inputs)
def test_normalise_email_agrees_with_email_validator_long_run(long_run: None, text: str) -> None:
    assert _ours(text) == _reference(text)


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> None:
    """Long variants run only when asked for with ``-m slow``."""
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("a long variant: run it with -m slow")


def test_plain_addresses_take_the_shortcut_without_the_validator(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the full validator was called")

    monkeypatch.setattr(importer, "validate_email", refuse)
    assert (
        normalise_email(" Maria.Gonzalez@Lakeview-Dental.Example ")
        == "maria.gonzalez@lakeview-dental.example"
    )
    assert normalise_email("o'connor+leads@mail.example.co.uk") == "o'connor+leads@mail.example.co.uk"


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("maria@example.com", "maria@example.com"),
        ("Maria Gonzalez <Maria@Example.com>", "maria@example.com"),
        ('"Gonzalez, Maria" <maria@example.com>', "maria@example.com"),
        ("mailto:maria@example.com", "maria@example.com"),
        ("MAILTO:maria@example.com?subject=hi", "maria@example.com"),
        ("josé@münchen.example", "josé@münchen.example"),
    ],
)
def test_addresses_come_out_of_what_mail_programs_put_in_a_cell(cell: str, expected: str) -> None:
    assert email_from_cell(cell) == expected


@pytest.mark.parametrize(
    ("cell", "reason"),
    [
        ("a@example.com; b@example.com", "more than one address"),
        ("a@example.com, b@example.com", "more than one address"),
        ("not-an-email", "@-sign"),
        ("maria@localhost", "period"),
        ("Maria <not an address>", "@-sign"),
    ],
)
def test_cells_without_one_good_address_say_why(cell: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        email_from_cell(cell)


# -- header --------------------------------------------------------------------------------------


def _fields(header: list[str]) -> dict[str, list[str]]:
    columns = ColumnMap.from_header(header, "leads.csv")
    return {target: [header[i] for i in indexes] for target, indexes in columns.fields}


@pytest.mark.parametrize(
    ("export", "header", "expected"),
    [
        (
            "Salesforce contacts",
            ["First Name", "Last Name", "Account Name", "Mailing Street", "Mailing City",
             "Mailing State/Province", "Mailing Zip/Postal Code", "Mailing Country", "Phone",
             "Mobile", "Email", "Email Opt Out", "Lead Source"],
            {"email": ["Email"], "company": ["Account Name"], "region": ["Mailing State/Province"],
             "postal_code": ["Mailing Zip/Postal Code"], "phone": ["Phone", "Mobile"],
             "opt_out": ["Email Opt Out"]},
        ),
        (
            "HubSpot contacts",
            ["Record ID", "First Name", "Last Name", "Email", "Phone Number", "Company Name",
             "Street Address", "City", "State/Region", "Postal Code", "Country/Region",
             "Unsubscribed from all email", "Lifecycle Stage"],
            {"email": ["Email"], "phone": ["Phone Number"], "address_line1": ["Street Address"],
             "region": ["State/Region"], "country": ["Country/Region"],
             "opt_out": ["Unsubscribed from all email"]},
        ),
        (
            "Google Contacts",
            ["First Name", "Middle Name", "Last Name", "Organization Name", "E-mail 1 - Label",
             "E-mail 1 - Value", "Phone 1 - Label", "Phone 1 - Value", "Address 1 - Street",
             "Address 1 - City", "Address 1 - Region", "Address 1 - Postal Code", "Address 1 - Country"],
            {"email": ["E-mail 1 - Value"], "company": ["Organization Name"], "phone": ["Phone 1 - Value"],
             "address_line1": ["Address 1 - Street"], "city": ["Address 1 - City"],
             "postal_code": ["Address 1 - Postal Code"]},
        ),
        (
            "Outlook",
            ["First Name", "Last Name", "Company", "Business Street", "Business City", "Business State",
             "Business Postal Code", "Business Country/Region", "Business Phone", "Mobile Phone",
             "E-mail Address", "E-mail 2 Address"],
            {"email": ["E-mail Address"], "phone": ["Business Phone", "Mobile Phone"],
             "country": ["Business Country/Region"]},
        ),
        (
            "Mailchimp audience",
            ["Email Address", "First Name", "Last Name", "Address", "Phone Number", "TAGS"],
            {"email": ["Email Address"], "address_line1": ["Address"], "phone": ["Phone Number"]},
        ),
        (
            "German Excel",
            ["E-Mail", "Vorname", "Nachname", "Firma", "Straße", "PLZ", "Ort", "Land", "Telefon"],
            {"email": ["E-Mail"], "first_name": ["Vorname"], "last_name": ["Nachname"], "company": ["Firma"],
             "address_line1": ["Straße"], "postal_code": ["PLZ"], "city": ["Ort"], "country": ["Land"]},
        ),
    ],
)  # fmt: skip
def test_headers_of_common_exports_map_onto_lead_fields(
    export: str, header: list[str], expected: dict[str, list[str]]
) -> None:
    fields = _fields(header)
    for target, columns in expected.items():
        assert fields[target] == columns, f"{export}: {target}"


def test_the_better_spelling_wins_whatever_the_column_order() -> None:
    # Mobile before Phone in the file: Phone is still the phone, Mobile fills in.
    assert _fields(["Email", "Mobile", "Phone"])["phone"] == ["Phone", "Mobile"]
    assert _fields(["County", "Email", "State"])["region"] == ["State", "County"]


def test_unknown_columns_are_listed_as_ignored_and_custom_columns_kept() -> None:
    columns = ColumnMap.from_header(
        ["Email", "Lead Source", "custom.Industry", "Custom: Booth number", "", "Notes"], "leads.csv"
    )
    assert columns.ignored == ["Lead Source", "Notes"]
    assert columns.custom == [("industry", (2,)), ("booth_number", (3,))]
    assert columns.describe() == [
        ("Email", "email"),
        ("custom.Industry", "custom.industry"),
        ("Custom: Booth number", "custom.booth_number"),
    ]


def test_a_custom_column_needs_a_name_templates_can_use() -> None:
    with pytest.raises(ImportFileError, match=r"column 'custom.2024 spend': custom field names"):
        ColumnMap.from_header(["email", "custom.2024 spend"], "leads.csv")


def test_a_header_without_an_email_column_lists_what_it_found() -> None:
    with pytest.raises(ImportFileError) as caught:
        ColumnMap.from_header(["Name", "Phone", ""], "leads.csv")
    assert str(caught.value) == (
        "leads.csv: no email column in the header (columns found: 'Name', 'Phone'); "
        "name one of: email, e-mail, email address"
    )


def test_a_file_without_a_header_row_is_recognised() -> None:
    with pytest.raises(ImportFileError, match=r"the first row holds an email address \('ann@example.com'\)"):
        ColumnMap.from_header(["ann@example.com", "Ann", "Lee"], "leads.csv")


# -- rows ------------------------------------------------------------------------------------------

HEADER = ["Email", "Name", "Company", "Phone", "Mobile", "Country", "Time Zone", "Tier", "Opted out",
          "custom.industry"]  # fmt: skip


def _parse(*cells: str, header: list[str] = HEADER, line: int = 2) -> tuple[LeadInput, bool, ImportReport]:
    report = ImportReport(source="leads.csv")
    parser = RowParser(ColumnMap.from_header(header, "leads.csv"), ",", report)
    row = list(cells)
    lead, opted_out = parser.lead(row, "".join(row), line)
    return lead, opted_out, report


def _reason(*cells: str, header: list[str] = HEADER) -> str:
    with pytest.raises(RowRejected) as caught:
        _parse(*cells, header=header)
    return str(caught.value)


def test_a_good_row_becomes_a_lead() -> None:
    lead, opted_out, _ = _parse(
        " Maria@Lakeview-Dental.example ", "Maria Gonzalez", "Lakeview Dental", "+1 217 555 0142", "",
        "United States", "America/Chicago", "Warm", "no", "dental",
    )  # fmt: skip
    assert lead == LeadInput(
        email="maria@lakeview-dental.example",
        first_name="Maria",
        last_name="Gonzalez",
        company="Lakeview Dental",
        phone="+1 217 555 0142",
        country="US",
        timezone="America/Chicago",
        tier="warm",
        custom={"industry": "dental"},
    )
    assert opted_out is False


def test_a_blank_cell_falls_back_to_the_next_column_for_the_field() -> None:
    lead, _, _ = _parse("a@example.com", "", "", "", "+49 170 1234567", "", "", "", "", "")
    assert lead.phone == "+49 170 1234567"
    assert lead.custom == {} and lead.tier is None and lead.country == ""


def test_names_in_last_first_order_are_split_at_the_comma() -> None:
    lead, _, _ = _parse("a@example.com", "Gonzalez, Maria", *[""] * 8)
    assert (lead.first_name, lead.last_name) == ("Maria", "Gonzalez")


def test_cells_are_tidied() -> None:
    lead, _, report = _parse(
        "a@example.com\u200b", "Ann\r\n  Lee", "Brook\u00a0&\tSons", '="0049 30 1234"', *[""] * 6, line=7
    )
    assert lead.email == "a@example.com"
    assert (lead.first_name, lead.last_name) == ("Ann", "Lee")
    assert lead.company == "Brook & Sons"
    assert lead.phone == "0049 30 1234"
    assert report.warnings == [(7, "line break in 'Name' replaced by a space")]


@pytest.mark.parametrize(
    ("flag", "expected"),
    [("1", True), ("TRUE", True), ("Yes", True), ("x", True), ("0", False), ("false", False), ("", False)],
)
def test_the_opt_out_column_reads_yes_and_no(flag: str, expected: bool) -> None:
    _, opted_out, report = _parse("a@example.com", *[""] * 7, flag, "")
    assert opted_out is expected
    assert report.opted_out == int(expected)


@pytest.mark.parametrize(
    ("cells", "reason"),
    [
        (["", "Ann"], "no email address"),
        (
            ["ann.example.com"],
            "'ann.example.com' is not a valid email address: An email address must have an @-sign.",
        ),
        (["a@example.com", *[""] * 6, "lukewarm"], "tier 'lukewarm' is not one of cold, warm, hot"),
        (["a@example.com", *[""] * 4, "Narnia"], "unknown country 'Narnia': use its two-letter code"),
        (["a@example.com", *[""] * 5, "America/Springfield"], "unknown time zone 'America/Springfield'"),
        (["a@example.com", *[""] * 7, "maybe"], "email opt-out 'maybe' is not yes or no"),
        (["a@example.com", "", "x" * 201], "company is longer than 200 characters"),
        (["a@example.com", "", "", "1" * 65], "phone is longer than 64 characters"),
        (["a@example.com", *[""] * 8, "y" * 1001], "custom.industry is longer than 1000 characters"),
        (["a@example.com", *[""] * 9, "surplus"], "has 11 fields but the header has 10"),
        (["a@example.com", "Ren\udce9"], "column 'Name' is not valid utf-8 text"),
    ],
)
def test_each_kind_of_bad_row_gets_its_reason(cells: list[str], reason: str) -> None:
    padded = cells + [""] * (len(HEADER) - len(cells))
    assert reason in _reason(*padded)


def test_empty_trailing_cells_beyond_the_header_are_harmless() -> None:
    lead, _, _ = _parse("a@example.com", "Ann", *[""] * 8, "", "")
    assert lead.first_name == "Ann"


def test_a_short_row_is_read_as_far_as_it_goes() -> None:
    lead, _, _ = _parse("a@example.com", "Ann Lee")
    assert (lead.first_name, lead.last_name, lead.company) == ("Ann", "Lee", "")


def test_a_quote_left_open_over_whole_rows_is_rejected_with_the_lines_it_covers() -> None:
    swallowed = "Ann\nb@example.com,Bob,,,,,,,,\nc@example.com,Cy,,,,,,,,\n"
    reason = _reason("a@example.com", swallowed, *[""] * 8)
    assert reason.startswith("a quote opened in column 'Name' is never closed on its line")
    assert "runs on to line 4" in reason and "import lines 2-4 again" in reason


def test_a_real_multi_line_address_is_not_mistaken_for_swallowed_rows() -> None:
    header = ["Email", "Address", "City", "Country"]
    lead, _, _ = _parse("a@example.com", "Flat 2,\n14 Mill Lane", "Leeds", "GB", header=header)
    assert lead.address_line1 == "Flat 2, 14 Mill Lane"


def test_summary_line_names_every_count() -> None:
    report = ImportReport(source="leads.csv", rows=10, rejected_count=2, duplicates=1, opted_out=1)
    report.counts.inserted, report.counts.updated, report.counts.unchanged = 5, 2, 1
    assert report.summary() == (
        "leads.csv: 10 rows: 5 inserted, 2 updated, 1 unchanged, 2 rejected; 1 repeated an earlier "
        "row's address (applied in file order); 1 opted out of email and are on the suppression list"
    )


# -- countries --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code"),
    [("us", "US"), (" GB ", "GB"), ("United States", "US"), ("U.S.A.", "US"), ("Deutschland", "DE"),
     ("the netherlands", "NL"), ("", ""), ("Narnia", None), ("XX", None)],
)  # fmt: skip
def test_countries_are_stored_as_iso_codes(text: str, code: str | None) -> None:
    assert country_code(text) == code


# -- the garbage collector ------------------------------------------------------------------------


def test_the_collector_runs_again_when_the_last_import_ends_and_only_if_it_ran_before() -> None:
    pause = importer._CollectorPause()
    assert gc.isenabled()
    pause.pause()
    pause.pause()  # a second import in another thread
    pause.resume()
    assert not gc.isenabled()
    pause.resume()
    assert gc.isenabled()
    gc.disable()
    try:
        pause.pause()
        pause.resume()
        assert not gc.isenabled()  # an application that runs without it keeps it that way
    finally:
        gc.enable()
