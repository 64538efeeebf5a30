"""Unsubscribe links: signed tokens naming a lead, and the URLs and headers built from them.

Owns the token format, the signing keys, and the one place where the https link, the
``mailto:`` variant and the RFC 8058 headers are built. Imports nothing that does I/O
beyond reading (or once creating) the key file; the endpoint that honours the links is
``web.py``.

A token is ``<lead id>.<signature>``: the lead's decimal id, a dot, and 24 characters of
unpadded URL-safe base64 (144 bits of HMAC-SHA256 over the lead's id *and* address).
Only URL-safe characters, so it survives in a URL path, a ``mailto:`` subject and a
plain-text email without escaping. Tokens never expire: the law wants an opt-out that
works as long as the message may be read. They cannot be guessed or altered: changing
either half breaks the signature.

Why the address is signed too: ids are only unique within one database. After a restore
from backup, or on SQLite when the newest lead is deleted, an id can come back for
another person, and a link signed over the id alone would unsubscribe that person. An
import never changes a known lead's address (leads are matched on it), so the address a
link was signed for is the lead's address for as long as the lead exists.

Keys: ``unsubscribe.secret_key`` signs; ``unsubscribe.previous_secret_key`` is still
accepted, so that rotating keys leaves the links already sent working. With no key
configured, one is generated once in the state directory (``unsubscribe.key``, mode
0600); once a key is configured, that file's key is still accepted as long as it exists.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from campaignd.config import Settings
from campaignd.exceptions import ConfigError, Problem

logger = logging.getLogger(__name__)

KEY_FILE = "unsubscribe.key"
MIN_KEY_LENGTH = 32
_SIG_BYTES = 18
_SIG_CHARS = 24  # base64 of 18 bytes, no padding needed
# Canonical form only: no leading zeros, no sign, no non-ASCII digits, the exact length.
_TOKEN = re.compile(rf"([1-9][0-9]{{0,17}})\.([A-Za-z0-9_-]{{{_SIG_CHARS}}})")


def _sign(key: bytes, lead_id: int, email: str) -> bytes:
    message = f"unsubscribe:v1:{lead_id}:{email.strip().lower()}".encode()
    mac = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:_SIG_BYTES])


def make_token(key: bytes, lead_id: int, email: str) -> str:
    """The token for this lead and address, signed with ``key``."""
    return f"{lead_id}.{_sign(key, lead_id, email).decode()}"


def token_lead_id(token: str) -> int | None:
    """The lead id a token claims to name (not yet verified), or None if it is malformed."""
    match = _TOKEN.fullmatch(token)
    return int(match.group(1)) if match else None


def verify_token(keys: list[bytes], token: str, email: str) -> bool:
    """True when ``token`` was signed by one of ``keys`` for its lead id and ``email``.

    Malformed tokens (wrong length, other characters, non-ASCII) are refused without
    being compared; the comparison itself is constant-time.
    """
    match = _TOKEN.fullmatch(token)
    if match is None:
        return False
    lead_id, sig = int(match.group(1)), match.group(2).encode()
    # Check every key even after a match, so the time taken does not tell which key signed.
    found = False
    for key in keys:
        found |= hmac.compare_digest(sig, _sign(key, lead_id, email))
    return found


@dataclass(frozen=True, slots=True)
class Links:
    """What a message needs to let its reader opt out."""

    url: str
    mailto: str

    def header(self) -> str:
        """The ``List-Unsubscribe`` value: the https link first (RFC 8058), then the mailbox."""
        parts = [f"<{self.url}>"]
        if self.mailto:
            parts.append(f"<{self.mailto}>")
        return ", ".join(parts)


class Signer:
    """Builds and checks unsubscribe links with the configured keys.

    :param keys: signing keys, the one that signs first; every one is accepted.
    :param base_url: the endpoint's public URL; links are ``<base_url>/u/<token>``.
    :param mailto: a mailbox for the ``mailto:`` variant, or empty for none.
    """

    def __init__(self, *, keys: list[bytes], base_url: str, mailto: str) -> None:
        if not keys:
            raise ValueError("at least one signing key is needed")
        self.keys = keys
        self.base_url = base_url.rstrip("/")
        self.mailto = mailto

    def token(self, lead_id: int, email: str) -> str:
        return make_token(self.keys[0], lead_id, email)

    def links(self, lead_id: int, email: str) -> Links:
        token = self.token(lead_id, email)
        mailto = ""
        if self.mailto:
            # A token is digits, a dot and base64url: nothing in it needs quoting.
            mailto = f"mailto:{self.mailto}?subject=unsubscribe%20{token}"
        return Links(url=f"{self.base_url}/u/{token}", mailto=mailto)

    def verify(self, token: str, email: str) -> bool:
        return verify_token(self.keys, token, email)


def load_keys(settings: Settings, *, create: bool = True) -> list[bytes]:
    """The signing keys, the one that signs first.

    The configured secret signs and the previous one is still accepted. A key generated
    earlier in the state directory stays accepted after a secret is configured, so that
    moving from the zero-config key to one in the environment breaks no link.

    With no secret configured, a random key is created once in the state directory (mode
    0600) so that links keep working across restarts of a zero-config install. With
    ``create=False`` (checks that must not write anything) a missing key file gives a
    throw-away key instead.

    :raises ConfigError: when the key file exists but is damaged.
    """
    keys = [
        k.get_secret_value().encode()
        for k in (settings.unsubscribe.secret_key, settings.unsubscribe.previous_secret_key)
        if k.get_secret_value()
    ]
    path = settings.state_dir / KEY_FILE
    if keys:
        if path.exists():
            old = _read_key(path)
            if old not in keys:
                keys.append(old)
        return keys
    if not path.exists():
        if not create:
            return [secrets.token_urlsafe(32).encode()]
        return [_create_key(path)]
    return [_read_key(path)]


def _read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(
            [Problem(str(path), "", f"cannot read the unsubscribe key: {exc.strerror}")]
        ) from None
    if len(key) < MIN_KEY_LENGTH:
        # An empty key would let anyone sign links: refuse rather than sign with it.
        raise ConfigError(
            [
                Problem(
                    str(path),
                    "",
                    "the unsubscribe signing key is damaged (too short); restore it from a backup, "
                    "or delete the file to make a new one (links in mail already sent then stop working)",
                )
            ]
        )
    if mode & 0o077:
        logger.warning("%s can be read by other users; make it private: chmod 600 %s", path, path)
    return key


def _create_key(path: Path) -> bytes:
    """Create the key file atomically: it appears complete, or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created it meanwhile
    except FileExistsError:
        return _read_key(path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    logger.info("created the unsubscribe signing key %s (back it up with the database)", path)
    return key
