"""Postal addresses: each country's required fields, normalising, and its address block."""

from __future__ import annotations

from typing import Any

import pytest

from campaignd.addresses import SUPPORTED, address_block, check_address, rules_for


def lead(**fields: Any) -> dict[str, Any]:
    base = {
        "first_name": "Jane",
        "last_name": "Sample",
        "company": "",
        "address_line1": "",
        "address_line2": "",
        "city": "",
        "region": "",
        "postal_code": "",
        "country": "",
    }
    return {**base, **fields}


# Each country's post, sent from the United States: the block as its post wants it.
BLOCKS = [
    pytest.param(
        lead(
            first_name="Maria",
            last_name="Gonzalez",
            company="Lakeview Dental",
            address_line1="22 Elm St.",
            address_line2="Suite 4",
            city="Springfield",
            region="Illinois",
            postal_code="627011234",
            country="US",
        ),
        ["Maria Gonzalez", "Lakeview Dental", "SUITE 4", "22 ELM ST", "SPRINGFIELD IL 62701-1234"],
        id="US: unit above the street, capitals without punctuation, ZIP+4",
    ),
    pytest.param(
        lead(address_line1="10 Main Street", city="Boston", region="ma", postal_code="2134"),
        ["Jane Sample", "10 MAIN STREET", "BOSTON MA 02134"],
        id="US by default: a ZIP that lost its leading zero in a spreadsheet",
    ),
    pytest.param(
        lead(
            first_name="Oliver",
            last_name="Hughes",
            address_line1="14 Mill Lane",
            address_line2="Headingley",
            city="Leeds",
            region="West Yorkshire",
            postal_code="ls62ab",
            country="United Kingdom",
        ),
        ["Oliver Hughes", "14 Mill Lane", "Headingley", "LEEDS", "LS6 2AB", "UNITED KINGDOM"],
        id="UK: locality after the street, POST TOWN, postcode on its own line, no county",
    ),
    pytest.param(
        lead(
            first_name="Chloé",
            last_name="Tremblay",
            address_line1="350 Rue Saint-Paul O.",
            address_line2="Bureau 200",
            city="Montréal",
            region="Québec",
            postal_code="h2y2a7",
            country="CA",
        ),
        ["Chloé Tremblay", "BUREAU 200", "350 RUE SAINT-PAUL O", "MONTRÉAL QC  H2Y 2A7", "CANADA"],
        id="Canada: two spaces before the postal code",
    ),
    pytest.param(
        lead(
            first_name="Jürgen",
            last_name="Müller",
            company="Bäckerei Müller GmbH",
            address_line1="Hauptstraße 12",
            address_line2="Hinterhaus",
            city="Dresden",
            postal_code="1067",
            country="Deutschland",
        ),
        ["Jürgen Müller", "Bäckerei Müller GmbH", "Hinterhaus", "Hauptstraße 12", "01067 Dresden", "GERMANY"],
        id="Germany: additions above the street, PLZ Ort",
    ),
    pytest.param(
        lead(
            first_name="Camille",
            last_name="Durand",
            address_line1="8 rue de l'Église",
            address_line2="Bâtiment B",
            city="Lyon",
            postal_code="69002",
            country="FR",
        ),
        ["Camille Durand", "Bâtiment B", "8 RUE DE L'EGLISE", "69002 LYON", "FRANCE"],
        id="France: street and last line in capitals without accents",
    ),
    pytest.param(
        lead(
            first_name="Jack",
            last_name="Wilson",
            address_line1="27 George Street",
            address_line2="Unit 3",
            city="Parramatta",
            region="New South Wales",
            postal_code="2150",
            country="AU",
        ),
        ["Jack Wilson", "Unit 3", "27 George Street", "PARRAMATTA NSW 2150", "AUSTRALIA"],
        id="Australia: LOCALITY STATE POSTCODE",
    ),
    pytest.param(
        lead(address_line1="Damrak 1", city="Amsterdam", postal_code="1012 LG", country="NL"),
        ["Jane Sample", "Damrak 1", "1012 LG Amsterdam", "NETHERLANDS"],
        id="another European country: postcode before the town",
    ),
    pytest.param(
        lead(
            first_name="",
            last_name="",
            company="Sample & Co",
            address_line1="1 Quay St",
            city="Auckland",
            postal_code="1010",
            country="NZ",
        ),
        ["Sample & Co", "1 Quay St", "Auckland 1010", "NEW ZEALAND"],
        id="a company without a contact name; town then postcode",
    ),
]


@pytest.mark.parametrize(("fields", "block"), BLOCKS)
def test_each_country_gets_the_block_its_post_wants(fields: dict[str, Any], block: list[str]) -> None:
    checked = check_address(fields, home_country="US")
    assert checked.problems == ()
    assert list(checked.block) == block


@pytest.mark.parametrize(
    ("home", "country", "last"),
    [("DE", "DE", "01067 Dresden"), ("US", "DE", "GERMANY"), ("GB", "US", "UNITED STATES OF AMERICA")],
)
def test_the_country_line_is_only_for_mail_abroad(home: str, country: str, last: str) -> None:
    fields = lead(address_line1="Hauptstraße 12", city="Dresden", postal_code="01067", country=country)
    if country == "US":
        fields.update(address_line1="1 Main St", city="Springfield", region="IL", postal_code="62701")
        last = "UNITED STATES OF AMERICA"
    checked = check_address(fields, home_country=home)
    assert checked.complete
    assert checked.block[-1] == last


def test_a_lead_without_a_country_lives_in_the_home_country() -> None:
    checked = check_address(
        lead(address_line1="Hauptstraße 12", city="Berlin", postal_code="10115"), home_country="DE"
    )
    assert checked.complete
    assert checked.address.country == "DE"
    assert checked.block[-1] == "10115 Berlin"


@pytest.mark.parametrize(
    ("fields", "problems"),
    [
        pytest.param(
            lead(country="US"),
            [
                "no street address (address_line1)",
                "no town or city (city)",
                "no state (region)",
                "no ZIP code (postal_code)",
            ],
            id="US: nothing",
        ),
        pytest.param(
            lead(
                address_line1="1 Main St",
                city="Springfield",
                region="Ilinois",
                postal_code="6270",
                country="US",
            ),
            [
                "'Ilinois' is not a US state (region)",
                "'6270' is not a US ZIP code, such as 12345 or 12345-6789 (postal_code)",
            ],
            id="US: a misspelt state and a short ZIP in a state without leading zeros",
        ),
        pytest.param(
            lead(
                address_line1="24 Sussex Dr", city="Ottawa", region="ON", postal_code="K1M 1M", country="CA"
            ),
            ["'K1M 1M' is not a Canadian postal code, such as K1A 0B1 (postal_code)"],
            id="Canada: a truncated postal code",
        ),
        pytest.param(
            lead(address_line1="10 Downing Street", city="London", postal_code="SW1A", country="GB"),
            ["'SW1A' is not a UK postcode, such as SW1A 1AA (postal_code)"],
            id="UK: only the outward code",
        ),
        pytest.param(
            lead(address_line1="Hauptstraße 12", city="Berlin", country="DE"),
            ["no postal code (PLZ) (postal_code)"],
            id="Germany: no PLZ",
        ),
        pytest.param(
            lead(address_line1="8 rue de la Paix", city="Paris", postal_code="750", country="FR"),
            ["'750' is not a French code postal, 5 digits such as 75002 (postal_code)"],
            id="France: a short code",
        ),
        pytest.param(
            lead(
                address_line1="1 Macquarie St",
                city="Sydney",
                region="Sydney",
                postal_code="2000",
                country="AU",
            ),
            ["'Sydney' is not an Australian state (region)"],
            id="Australia: a town for a state",
        ),
        pytest.param(
            lead(
                first_name="",
                last_name="",
                address_line1="1 Main St",
                city="Springfield",
                region="IL",
                postal_code="62701",
                country="US",
            ),
            ["no name or company to address it to (first_name, last_name, company)"],
            id="nobody to address it to",
        ),
        pytest.param(
            lead(address_line1="1 Main St", city="Nairobi", country="KE"),
            ["campaignd has no postal rules for country KE (country)"],
            id="a country without rules",
        ),
        pytest.param(
            lead(address_line1="1 Main St", city="Nowhere", country="Atlantis"),
            ["unknown country 'Atlantis' (country)"],
            id="not a country",
        ),
    ],
)
def test_incomplete_addresses_say_what_to_fix(fields: dict[str, Any], problems: list[str]) -> None:
    checked = check_address(fields, home_country="US")
    assert not checked.complete
    assert list(checked.problems) == problems
    assert checked.reason.startswith("no complete postal address for ")
    assert "; ".join(problems) in checked.reason


def test_only_a_second_line_is_taken_as_the_street() -> None:
    checked = check_address(
        lead(address_line2="1 Main St", city="Springfield", region="IL", postal_code="62701"),
        home_country="US",
    )
    assert checked.complete
    assert list(checked.block) == ["Jane Sample", "1 MAIN ST", "SPRINGFIELD IL 62701"]


def test_control_characters_and_runs_of_space_never_reach_the_block() -> None:
    checked = check_address(
        lead(
            first_name="Jane\r\nBcc: x",
            address_line1="1   Main\tSt",
            city=" Springfield ",
            region="il",
            postal_code=" 62701 ",
        ),
        home_country="US",
    )
    assert checked.complete
    assert all("\n" not in line and "\r" not in line and "  " not in line for line in checked.block)
    assert checked.block[0] == "Jane Bcc: x Sample"


@pytest.mark.parametrize(
    ("country", "region", "code"),
    [
        ("US", "District of Columbia", "DC"),
        ("US", "p.r.", "PR"),
        ("CA", "Colombie-Britannique", "BC"),
        ("CA", "Newfoundland", "NL"),
        ("AU", "tas", "TAS"),
        ("AU", "Australian Capital Territory", "ACT"),
    ],
)
def test_regions_are_written_as_their_post_abbreviates_them(country: str, region: str, code: str) -> None:
    rules = rules_for(country)
    assert rules is not None and rules.regions is not None
    postal = {"US": "20001", "CA": "V6B 1A1", "AU": "7000"}[country]
    checked = check_address(
        lead(address_line1="1 Main St", city="Town", region=region, postal_code=postal, country=country),
        home_country=country,
    )
    assert checked.complete, checked.problems
    assert checked.address.region == code


def test_every_supported_country_has_rules_and_a_name() -> None:
    assert set(SUPPORTED) == {"US", "GB", "CA", "DE", "FR", "AU"}
    for code in SUPPORTED:
        rules = rules_for(code)
        assert rules is not None and rules.postal_required


def test_a_block_can_be_laid_out_again_from_its_address() -> None:
    checked = check_address(
        lead(address_line1="Hauptstraße 12", city="Dresden", postal_code="01067", country="DE"),
        home_country="DE",
    )
    assert address_block(checked.address, home_country="DE") == list(checked.block)
    assert address_block(checked.address, home_country="FR")[-1] == "GERMANY"
