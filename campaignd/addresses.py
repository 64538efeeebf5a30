"""Postal addresses: what each country's post needs, normalising it, and the address block.

Owns the rules for the countries campaignd knows by name (the United States, the United
Kingdom, Canada, Germany, France, Australia) and a general rule for the others: which
fields must be there, what a valid region and postal code look like, how they are
written (``62701-1234``, ``K1A 0B1``, ``SW1A 1AA``), and the order and case of the lines
in the block the post reads through an envelope window or on a postcard:

- United States (USPS Publication 28) and Canada (Canada Post): secondary unit above the
  street line, upper-case delivery lines without punctuation, ``CITY ST ZIP`` (Canada:
  two spaces before the postal code);
- United Kingdom (Royal Mail): street, locality, POST TOWN in capitals, postcode on a
  line of its own; no county;
- Germany (DIN 5008, Deutsche Post): additions above the street, ``PLZ Ort``;
- France (NF Z10-011, La Poste): additions above the street, street and
  ``CODE POSTAL LOCALITE`` in capitals without accents;
- Australia (Australia Post): ``LOCALITY STATE POSTCODE`` in capitals;
- everywhere else: street lines, then the postal code and town in that country's order.

Mail to another country than the one it is posted from ends with the destination's name
in capitals, as the Universal Postal Union asks; domestic mail has no country line.

Pure: no I/O, no clock. Imports only :mod:`campaignd.countries`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from campaignd.countries import country_code

# -- regions -----------------------------------------------------------------------------------

US_STATES = {
    "AL": "Alabama",
    "AK": "Alaska",
    "AZ": "Arizona",
    "AR": "Arkansas",
    "CA": "California",
    "CO": "Colorado",
    "CT": "Connecticut",
    "DE": "Delaware",
    "DC": "District of Columbia",
    "FL": "Florida",
    "GA": "Georgia",
    "HI": "Hawaii",
    "ID": "Idaho",
    "IL": "Illinois",
    "IN": "Indiana",
    "IA": "Iowa",
    "KS": "Kansas",
    "KY": "Kentucky",
    "LA": "Louisiana",
    "ME": "Maine",
    "MD": "Maryland",
    "MA": "Massachusetts",
    "MI": "Michigan",
    "MN": "Minnesota",
    "MS": "Mississippi",
    "MO": "Missouri",
    "MT": "Montana",
    "NE": "Nebraska",
    "NV": "Nevada",
    "NH": "New Hampshire",
    "NJ": "New Jersey",
    "NM": "New Mexico",
    "NY": "New York",
    "NC": "North Carolina",
    "ND": "North Dakota",
    "OH": "Ohio",
    "OK": "Oklahoma",
    "OR": "Oregon",
    "PA": "Pennsylvania",
    "RI": "Rhode Island",
    "SC": "South Carolina",
    "SD": "South Dakota",
    "TN": "Tennessee",
    "TX": "Texas",
    "UT": "Utah",
    "VT": "Vermont",
    "VA": "Virginia",
    "WA": "Washington",
    "WV": "West Virginia",
    "WI": "Wisconsin",
    "WY": "Wyoming",
    # Territories and freely associated states served by USPS.
    "AS": "American Samoa",
    "GU": "Guam",
    "MP": "Northern Mariana Islands",
    "PR": "Puerto Rico",
    "VI": "Virgin Islands",
    "FM": "Federated States of Micronesia",
    "MH": "Marshall Islands",
    "PW": "Palau",
    # Military post offices.
    "AA": "Armed Forces Americas",
    "AE": "Armed Forces Europe",
    "AP": "Armed Forces Pacific",
}
# ZIP codes that start with 0: a spreadsheet that stored them as numbers dropped it.
_US_ZERO_ZIP = frozenset({"CT", "MA", "ME", "NH", "NJ", "RI", "VT", "PR", "VI", "AE"})

CA_PROVINCES = {
    "AB": ("Alberta",),
    "BC": ("British Columbia", "Colombie-Britannique"),
    "MB": ("Manitoba",),
    "NB": ("New Brunswick", "Nouveau-Brunswick"),
    "NL": ("Newfoundland and Labrador", "Newfoundland", "Terre-Neuve-et-Labrador"),
    "NS": ("Nova Scotia", "Nouvelle-Écosse"),
    "NT": ("Northwest Territories", "Territoires du Nord-Ouest"),
    "NU": ("Nunavut",),
    "ON": ("Ontario",),
    "PE": ("Prince Edward Island", "Île-du-Prince-Édouard"),
    "QC": ("Quebec", "Québec", "PQ"),
    "SK": ("Saskatchewan",),
    "YT": ("Yukon", "Yukon Territory"),
}

AU_STATES = {
    "NSW": "New South Wales",
    "VIC": "Victoria",
    "QLD": "Queensland",
    "SA": "South Australia",
    "WA": "Western Australia",
    "TAS": "Tasmania",
    "NT": "Northern Territory",
    "ACT": "Australian Capital Territory",
}

# Destination names for the country line, in English capitals (the UPU asks for the
# name in the language of the country of posting, or in English or French).
COUNTRY_NAMES = {
    "AE": "United Arab Emirates",
    "AR": "Argentina",
    "AT": "Austria",
    "AU": "Australia",
    "BE": "Belgium",
    "BR": "Brazil",
    "CA": "Canada",
    "CH": "Switzerland",
    "CL": "Chile",
    "CN": "China",
    "CZ": "Czech Republic",
    "DE": "Germany",
    "DK": "Denmark",
    "EE": "Estonia",
    "ES": "Spain",
    "FI": "Finland",
    "FR": "France",
    "GB": "United Kingdom",
    "GR": "Greece",
    "HK": "Hong Kong",
    "HR": "Croatia",
    "HU": "Hungary",
    "IE": "Ireland",
    "IL": "Israel",
    "IN": "India",
    "IS": "Iceland",
    "IT": "Italy",
    "JP": "Japan",
    "KR": "Republic of Korea",
    "LT": "Lithuania",
    "LU": "Luxembourg",
    "LV": "Latvia",
    "MC": "Monaco",
    "MT": "Malta",
    "MX": "Mexico",
    "NL": "Netherlands",
    "NO": "Norway",
    "NZ": "New Zealand",
    "PL": "Poland",
    "PT": "Portugal",
    "RO": "Romania",
    "SE": "Sweden",
    "SG": "Singapore",
    "SI": "Slovenia",
    "SK": "Slovakia",
    "US": "United States of America",
    "ZA": "South Africa",
}

# Countries whose last line is "POSTCODE TOWN" (most of continental Europe).
_POSTCODE_FIRST = frozenset(
    {"AT", "BE", "CH", "CZ", "DK", "EE", "ES", "FI", "GR", "HR", "HU", "IS", "IT", "LT", "LU", "LV", "MC"}
    | {"NL", "NO", "PL", "PT", "RO", "SE", "SI", "SK", "MX", "IL", "AR", "CL", "BR", "DE", "FR"}
)
# Countries without postal codes in common use: their absence is no problem.
_NO_POSTCODE = frozenset({"AE", "HK", "IE"})


# -- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """A postal address with every field normalised.

    :param country: the ISO 3166-1 alpha-2 code of the destination.
    :param region: the state, province or territory as its post abbreviates it (US, CA,
        AU); as written elsewhere.
    """

    name: str
    company: str
    line1: str
    line2: str
    city: str
    region: str
    postal_code: str
    country: str


@dataclass(frozen=True, slots=True)
class AddressCheck:
    """What checking one lead's postal address found.

    :param address: the address, normalised as far as it could be.
    :param block: the lines to print, in order (best effort when incomplete).
    :param problems: what is missing or wrong, each naming the lead field to fix; empty
        when the address is complete.
    """

    address: Address
    block: tuple[str, ...]
    problems: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.problems

    @property
    def reason(self) -> str:
        """One sentence for the operator: why this lead cannot get a letter."""
        where = country_name(self.address.country) or self.address.country or "an unknown country"
        return f"no complete postal address for {where}: {'; '.join(self.problems)}"


def country_name(code: str) -> str:
    """The English name of a destination (``Germany``), or empty when campaignd does not know it."""
    return COUNTRY_NAMES.get(code.upper(), "")


# -- normalising ---------------------------------------------------------------------------------

_SPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clean(value: Any) -> str:
    """A field as one line: control characters dropped, runs of space made one space."""
    if value is None:
        return ""
    return _SPACE.sub(" ", _CONTROL.sub(" ", str(value))).strip()


def _key(text: str) -> str:
    """A region as typed, reduced for lookup: no accents, no dots, lower case."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return _SPACE.sub(" ", plain.replace(".", "").replace("-", " ")).strip().lower()


def without_accents(text: str) -> str:
    """``Crème Brûlée`` as ``Creme Brulee`` (La Poste reads its last lines without accents)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _lookup(table: Mapping[str, str | tuple[str, ...]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for code, names in table.items():
        out[_key(code)] = code
        for name in (names,) if isinstance(names, str) else names:
            out[_key(name)] = code
    return out


_US_LOOKUP = _lookup(US_STATES)
_CA_LOOKUP = _lookup(CA_PROVINCES)
_AU_LOOKUP = _lookup(AU_STATES)

_CA_POSTAL = re.compile(r"[ABCEGHJ-NPRSTVXY]\d[ABCEGHJ-NPRSTV-Z]\d[ABCEGHJ-NPRSTV-Z]\d")
_GB_POSTCODE = re.compile(r"(GIR0AA|[A-PR-UWYZ][A-HK-Y]?\d[A-Z\d]?\d[ABD-HJLNP-UW-Z]{2}|BFPO\d{1,4})")


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _us_zip(raw: str, region: str) -> tuple[str, str | None]:
    digits = _digits(raw)
    if raw and not re.fullmatch(r"[\d\s-]+", raw):
        return raw, f"{raw!r} is not a US ZIP code, such as 12345 or 12345-6789"
    if len(digits) in (3, 4, 7, 8) and region in _US_ZERO_ZIP:
        digits = digits.zfill(5 if len(digits) <= 5 else 9)
    if len(digits) == 5:
        return digits, None
    if len(digits) == 9:
        return f"{digits[:5]}-{digits[5:]}", None
    return raw, f"{raw!r} is not a US ZIP code, such as 12345 or 12345-6789"


def _ca_postal(raw: str, region: str) -> tuple[str, str | None]:
    compact = raw.replace(" ", "").replace("-", "").upper()
    if _CA_POSTAL.fullmatch(compact):
        return f"{compact[:3]} {compact[3:]}", None
    return raw, f"{raw!r} is not a Canadian postal code, such as K1A 0B1"


def _gb_postcode(raw: str, region: str) -> tuple[str, str | None]:
    compact = raw.replace(" ", "").upper()
    if not _GB_POSTCODE.fullmatch(compact):
        return raw, f"{raw!r} is not a UK postcode, such as SW1A 1AA"
    if compact.startswith("BFPO"):
        return f"BFPO {compact[4:]}", None
    return f"{compact[:-3]} {compact[-3:]}", None


def _fixed_digits(count: int, label: str, example: str) -> Callable[[str, str], tuple[str, str | None]]:
    def normalise(raw: str, region: str) -> tuple[str, str | None]:
        digits = _digits(raw)
        # One digit short: a spreadsheet dropped the leading zero (01067 Dresden, 0800 Darwin).
        if re.fullmatch(r"[\d\s]+", raw) and len(digits) == count - 1:
            digits = "0" + digits
        if re.fullmatch(r"[\d\s]+", raw) and len(digits) == count:
            return digits, None
        return raw, f"{raw!r} is not a {label}, {count} digits such as {example}"

    return normalise


def _any_postcode(raw: str, region: str) -> tuple[str, str | None]:
    return raw.upper(), None


@dataclass(frozen=True, slots=True)
class CountryRules:
    """What one country's post needs.

    :param region_label: what the region is called there (``state``), or empty when the
        address needs none.
    :param regions: names and abbreviations to the abbreviation the post wants.
    :param postal_label: what the postal code is called there (``ZIP code``).
    :param postal: normalises a postal code, or says why it is not one.
    :param postal_required: whether an address without one is incomplete.
    :param layout: how the block is laid out (see :func:`address_block`).
    """

    code: str
    region_label: str
    regions: Mapping[str, str] | None
    postal_label: str
    postal: Callable[[str, str], tuple[str, str | None]]
    postal_required: bool
    layout: str


_RULES = {
    "US": CountryRules("US", "state", _US_LOOKUP, "ZIP code", _us_zip, True, "us"),
    "CA": CountryRules("CA", "province", _CA_LOOKUP, "postal code", _ca_postal, True, "ca"),
    "GB": CountryRules("GB", "", None, "postcode", _gb_postcode, True, "gb"),
    "DE": CountryRules(
        "DE", "", None, "postal code (PLZ)", _fixed_digits(5, "German PLZ", "10115"), True, "de"
    ),
    "FR": CountryRules(
        "FR", "", None, "postal code", _fixed_digits(5, "French code postal", "75002"), True, "fr"
    ),
    "AU": CountryRules(
        "AU", "state", _AU_LOOKUP, "postcode", _fixed_digits(4, "Australian postcode", "2000"), True, "au"
    ),
}
SUPPORTED = tuple(_RULES)
"""The countries with rules of their own; every other known country gets the general rule."""


def rules_for(code: str) -> CountryRules | None:
    """The rules for a destination, or None when campaignd cannot address mail there."""
    code = code.upper()
    if code in _RULES:
        return _RULES[code]
    if code not in COUNTRY_NAMES:
        return None
    layout = "postcode_first" if code in _POSTCODE_FIRST else "postcode_last"
    return CountryRules(code, "", None, "postal code", _any_postcode, code not in _NO_POSTCODE, layout)


# -- checking -------------------------------------------------------------------------------------


def check_address(lead: Mapping[str, Any], *, home_country: str) -> AddressCheck:
    """Normalise and check the postal address of ``lead`` (the fields templates see).

    :param lead: ``first_name``, ``last_name`` (or ``name``), ``company``,
        ``address_line1``, ``address_line2``, ``city``, ``region``, ``postal_code``,
        ``country``; missing keys count as empty.
    :param home_country: the country the mail is posted from: a lead without a country
        lives there, and its block has no country line.
    """
    name = clean(lead.get("name")) or clean(f"{clean(lead.get('first_name'))} {clean(lead.get('last_name'))}")
    company = clean(lead.get("company"))
    line1, line2 = clean(lead.get("address_line1")), clean(lead.get("address_line2"))
    city, region_raw = clean(lead.get("city")), clean(lead.get("region"))
    postal_raw, country_raw = clean(lead.get("postal_code")), clean(lead.get("country"))

    problems: list[str] = []
    code = country_code(country_raw) if country_raw else home_country.upper()
    rules = rules_for(code) if code else None
    if code is None:
        problems.append(f"unknown country {country_raw!r} (country)")
        code = ""
    elif rules is None:
        problems.append(f"campaignd has no postal rules for country {code} (country)")

    if not name and not company:
        problems.append("no name or company to address it to (first_name, last_name, company)")
    if not line1:
        if line2:
            # Only a second line: it is the street line.
            line1, line2 = line2, ""
        else:
            problems.append("no street address (address_line1)")
    if not city:
        problems.append("no town or city (city)")

    region, postal = region_raw, postal_raw
    if rules is not None:
        if rules.regions is not None:
            found = rules.regions.get(_key(region_raw)) if region_raw else None
            if found is not None:
                region = found
            elif not region_raw:
                problems.append(f"no {rules.region_label} (region)")
            else:
                problems.append(f"{region_raw!r} is not {_where(code)} {rules.region_label} (region)")
        if postal_raw:
            postal, bad = rules.postal(postal_raw, region)
            if bad:
                problems.append(f"{bad} (postal_code)")
        elif rules.postal_required:
            problems.append(f"no {rules.postal_label} (postal_code)")

    address = Address(name, company, line1, line2, city, region, postal, code)
    block = address_block(
        address, home_country=home_country, layout=rules.layout if rules else "postcode_last"
    )
    return AddressCheck(address, tuple(block), tuple(problems))


def _where(code: str) -> str:
    return {"US": "a US", "CA": "a Canadian", "AU": "an Australian"}.get(code, f"a {code}")


# -- the block --------------------------------------------------------------------------------------


def _plain_line(text: str) -> str:
    """A delivery line as USPS and Canada Post read best: capitals, no periods or commas."""
    return _SPACE.sub(" ", text.replace(".", "").replace(",", " ")).strip().upper()


def address_block(address: Address, *, home_country: str, layout: str | None = None) -> list[str]:
    """The lines of the address block, top to bottom, as the destination's post wants them.

    :param layout: the country layout; the destination's own when None.
    """
    if layout is None:
        rules = rules_for(address.country)
        layout = rules.layout if rules else "postcode_last"
    a = address
    people = [x for x in (a.name, a.company) if x]
    if layout in ("us", "ca"):
        sep = "  " if layout == "ca" else " "
        last = f"{a.city.upper()} {a.region}{sep}{a.postal_code}".strip()
        street = [_plain_line(x) for x in (a.line2, a.line1) if x]
        lines = [*people, *street, _SPACE.sub(" ", last) if layout == "us" else last]
    elif layout == "au":
        street = [x for x in (a.line2, a.line1) if x]
        lines = [*people, *street, f"{a.city} {a.region} {a.postal_code}".upper().strip()]
    elif layout == "gb":
        lines = [*people, *(x for x in (a.line1, a.line2) if x), a.city.upper(), a.postal_code]
    elif layout == "de":
        lines = [*people, *(x for x in (a.line2, a.line1) if x), f"{a.postal_code} {a.city}".strip()]
    elif layout == "fr":
        street = [a.line2] if a.line2 else []
        street += [without_accents(a.line1).upper()] if a.line1 else []
        lines = [*people, *street, without_accents(f"{a.postal_code} {a.city}").upper().strip()]
    elif layout == "postcode_first":
        lines = [*people, *(x for x in (a.line1, a.line2) if x), f"{a.postal_code} {a.city}".strip()]
    else:
        last = " ".join(x for x in (a.city, a.region, a.postal_code) if x)
        lines = [*people, *(x for x in (a.line1, a.line2) if x), last]
    if a.country and a.country != home_country.upper():
        lines.append((country_name(a.country) or a.country).upper())
    return [line for line in lines if line]
