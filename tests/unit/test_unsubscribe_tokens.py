"""Unsubscribe tokens, links and keys: what a link may look like and who can make one.

Pure except for the key-file tests, which use a temporary state directory.
"""

from __future__ import annotations

import logging
import re
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaignd.config import Settings, Unsubscribe, load_settings
from campaignd.exceptions import ConfigError
from campaignd.unsubscribe import KEY_FILE, Links, Signer, load_keys, make_token, token_lead_id, verify_token

KEY = b"k" * 32
OTHER = b"o" * 32
EMAIL = "maria.gonzalez@lakeview-dental.example"
TOKEN_SHAPE = re.compile(r"[1-9][0-9]*\.[A-Za-z0-9_-]{24}")

lead_ids = st.integers(min_value=1, max_value=10**18 - 1)
emails = st.emails().map(str.lower)


def test_the_token_format_is_stable() -> None:
    # Links already in people's mailboxes must keep working: never change this value.
    assert make_token(KEY, 42, EMAIL) == "42.93BVZB9elL7Oqz_y9ZrwD6wy"


@given(lead_id=lead_ids, email=emails)
def test_a_token_verifies_for_its_lead_and_address_only(lead_id: int, email: str) -> None:
    token = make_token(KEY, lead_id, email)
    assert TOKEN_SHAPE.fullmatch(token)
    assert token_lead_id(token) == lead_id
    assert verify_token([KEY], token, email)
    assert not verify_token([OTHER], token, email)
    assert not verify_token([KEY], token, "x" + email)
    other_id = f"{lead_id + 1}.{token.partition('.')[2]}"
    assert not verify_token([KEY], other_id, email)


@given(lead_id=lead_ids, email=emails, data=st.data())
def test_changing_any_character_breaks_the_token(lead_id: int, email: str, data: st.DataObject) -> None:
    token = make_token(KEY, lead_id, email)
    i = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.characters(codec="utf-8").filter(lambda c: c != token[i]))
    forged = token[:i] + replacement + token[i + 1 :]
    assert not verify_token([KEY], forged, email)


@given(token=st.text(max_size=80), email=emails)
def test_any_input_is_refused_without_an_error(token: str, email: str) -> None:
    assert verify_token([KEY], token, email) is False


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "42",
        "42.",
        ".93BVZB9elL7Oqz_y9ZrwD6wy",
        "042.93BVZB9elL7Oqz_y9ZrwD6wy",  # leading zero: same id, not the canonical token
        "+42.93BVZB9elL7Oqz_y9ZrwD6wy",
        "٤٢.93BVZB9elL7Oqz_y9ZrwD6wy",  # Arabic-Indic digits, which int() would accept
        "42.93BVZB9elL7Oqz_y9ZrwD6w",  # truncated
        "42.93BVZB9elL7Oqz_y9ZrwD6wy=",
        "42.93BVZB9elL7Oqz_y9ZrwD6wé",
        "42.93BVZB9elL7Oqz/y9ZrwD6wy",
        " 42.93BVZB9elL7Oqz_y9ZrwD6wy",
        "1" * 19 + ".93BVZB9elL7Oqz_y9ZrwD6wy",
    ],
)
def test_malformed_tokens_name_no_lead_and_never_verify(token: str) -> None:
    assert token_lead_id(token) is None
    assert verify_token([KEY], token, EMAIL) is False


def test_the_address_is_compared_as_stored_lower_case_and_trimmed() -> None:
    token = make_token(KEY, 42, EMAIL)
    assert verify_token([KEY], token, " Maria.Gonzalez@Lakeview-Dental.example ")


def test_every_key_is_accepted_and_the_first_signs() -> None:
    signer = Signer(keys=[KEY, OTHER], base_url="https://example.com/c/", mailto="")
    assert signer.token(42, EMAIL) == make_token(KEY, 42, EMAIL)
    assert signer.verify(make_token(OTHER, 42, EMAIL), EMAIL)
    assert not Signer(keys=[KEY], base_url="https://example.com", mailto="").verify(
        make_token(OTHER, 42, EMAIL), EMAIL
    )
    with pytest.raises(ValueError, match="at least one"):
        Signer(keys=[], base_url="https://example.com", mailto="")


def test_links_and_the_list_unsubscribe_header() -> None:
    signer = Signer(
        keys=[KEY], base_url="https://harborhome.example/campaignd/", mailto="unsub@harborhome.example"
    )
    links = signer.links(42, EMAIL)
    token = make_token(KEY, 42, EMAIL)
    assert links.url == f"https://harborhome.example/campaignd/u/{token}"
    assert urlsplit(links.mailto).path == "unsub@harborhome.example"
    assert unquote(urlsplit(links.mailto).query) == f"subject=unsubscribe {token}"
    assert links.header() == f"<{links.url}>, <{links.mailto}>"
    assert Links(url="https://x.example/u/1.a", mailto="").header() == "<https://x.example/u/1.a>"
    assert " " not in links.mailto and "<" not in links.url and ">" not in links.mailto


# -- keys ---------------------------------------------------------------------------------------------


def settings(tmp_path: Path, **env: str) -> Settings:
    environ = {f"CAMPAIGND_UNSUBSCRIBE__{k.upper()}": v for k, v in env.items()}
    environ["CAMPAIGND_STATE_DIR"] = str(tmp_path / "state")
    return load_settings(None, environ=environ, dotenv=None)


SECRET = "s" * 40
PREVIOUS = "p" * 40


def test_the_configured_key_signs_and_the_previous_one_is_accepted(tmp_path: Path) -> None:
    assert load_keys(settings(tmp_path, secret_key=SECRET)) == [SECRET.encode()]
    keys = load_keys(settings(tmp_path, secret_key=SECRET, previous_secret_key=PREVIOUS))
    assert keys == [SECRET.encode(), PREVIOUS.encode()]
    assert not (tmp_path / "state" / KEY_FILE).exists()


def test_without_a_key_one_is_generated_once_private_and_kept(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert load_keys(s, create=False) != load_keys(s, create=False)  # throw-away, nothing written
    assert not (tmp_path / "state" / KEY_FILE).exists()
    [key] = load_keys(s)
    path = tmp_path / "state" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 32
    assert load_keys(s) == [key] == load_keys(s, create=False)
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]  # no temporary file left


def test_a_generated_key_stays_accepted_after_a_key_is_configured(tmp_path: Path) -> None:
    [generated] = load_keys(settings(tmp_path))
    keys = load_keys(settings(tmp_path, secret_key=SECRET))
    assert keys == [SECRET.encode(), generated]


def test_a_damaged_key_file_stops_instead_of_signing_with_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / KEY_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\n")
    with pytest.raises(ConfigError, match="damaged"):
        load_keys(settings(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_keys(settings(tmp_path, secret_key=SECRET))


def test_a_key_file_others_can_read_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    [key] = load_keys(settings(tmp_path))
    (tmp_path / "state" / KEY_FILE).chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="campaignd.unsubscribe"):
        assert load_keys(settings(tmp_path)) == [key]
    assert "chmod 600" in caplog.text


# -- the [unsubscribe] settings ------------------------------------------------------------------------


def problems(tmp_path: Path, **env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        settings(tmp_path, **env)
    return str(caught.value)


def test_short_keys_and_a_previous_key_alone_are_refused(tmp_path: Path) -> None:
    text = problems(tmp_path, secret_key="too-short")
    assert "CAMPAIGND_UNSUBSCRIBE__SECRET_KEY" in text and "at least 32 characters" in text
    assert "too-short" not in text  # a secret is never echoed
    assert "rotation needs the new key" in problems(tmp_path, previous_secret_key=PREVIOUS)


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:8025", ("127.0.0.1", 8025)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:8025", ("::1", 8025)),
        ("localhost:0", ("localhost", 0)),
        ("", None),
    ],
)
def test_listen(tmp_path: Path, listen: str, address: tuple[str, int] | None) -> None:
    assert settings(tmp_path, listen=listen).unsubscribe.listen_address == address


@pytest.mark.parametrize("listen", ["8025", "127.0.0.1", "127.0.0.1:http", "::1:8025", "host:70000", "a b:1"])
def test_bad_listen(tmp_path: Path, listen: str) -> None:
    assert "unsubscribe.listen" in problems(tmp_path, listen=listen)


def test_other_unsubscribe_settings(tmp_path: Path) -> None:
    s = settings(tmp_path, mailto="mailto:Unsub@Example.com", trusted_proxies='["10.0.0.0/8", "192.0.2.1"]')
    assert s.unsubscribe.mailto == "Unsub@Example.com"
    assert s.unsubscribe.trusted_proxies == ("10.0.0.0/8", "192.0.2.1/32")
    assert Unsubscribe().trusted_proxies == ("127.0.0.1", "::1")
    assert "not an IP address" in problems(tmp_path, trusted_proxies='["proxy.local"]')
    assert "not a plain email address" in problems(tmp_path, mailto="a@b.c?subject=x")
    assert "query" in problems(tmp_path, base_url="https://example.com/u?x=1")
    assert "unsubscribe.rate_limit" in problems(tmp_path, rate_limit="-1")
