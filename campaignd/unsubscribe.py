"""Unsubscribe links: signed tokens naming a lead, and the URLs and headers built from them.

Owns the token format (``<lead id>.<signature>``, HMAC-SHA256 over the lead's id and
address with a secret key; rotation by also accepting the previous key), and the one
place where the https link, the ``mailto:`` variant and the RFC 8058 headers are
built. Tokens never expire and cannot be altered: changing either half breaks the
signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from campaignd.config import Settings

logger = logging.getLogger(__name__)

KEY_FILE = "unsubscribe.key"
_SIG_BYTES = 18


def _sign(key: bytes, lead_id: int, email: str) -> str:
    mac = hmac.new(key, f"unsubscribe:v1:{lead_id}:{email}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:_SIG_BYTES]).decode().rstrip("=")


def make_token(key: bytes, lead_id: int, email: str) -> str:
    return f"{lead_id}.{_sign(key, lead_id, email)}"


def token_lead_id(token: str) -> int | None:
    """The lead id a token claims to name (unverified), or None if it is malformed."""
    head, dot, sig = token.partition(".")
    if not dot or not head.isdigit() or len(head) > 18 or not sig:
        return None
    return int(head)


def verify_token(keys: list[bytes], token: str, email: str) -> bool:
    """True when ``token`` was signed by one of ``keys`` for this lead id and address."""
    lead_id = token_lead_id(token)
    if lead_id is None:
        return False
    sig = token.partition(".")[2]
    return any(hmac.compare_digest(sig, _sign(key, lead_id, email)) for key in keys)


@dataclass(frozen=True, slots=True)
class Links:
    """What a message needs to let its reader opt out."""

    url: str
    mailto: str

    def header(self) -> str:
        parts = [f"<{self.url}>"]
        if self.mailto:
            parts.append(f"<{self.mailto}>")
        return ", ".join(parts)


class Signer:
    """Builds unsubscribe links for leads with the configured keys."""

    def __init__(self, *, keys: list[bytes], base_url: str, mailto: str) -> None:
        if not keys:
            raise ValueError("at least one signing key is needed")
        self.keys = keys
        self.base_url = base_url.rstrip("/")
        self.mailto = mailto

    def links(self, lead_id: int, email: str) -> Links:
        token = make_token(self.keys[0], lead_id, email)
        mailto = ""
        if self.mailto:
            mailto = f"mailto:{self.mailto}?subject={quote('unsubscribe ' + token)}"
        return Links(url=f"{self.base_url}/u/{token}", mailto=mailto)

    def verify(self, token: str, email: str) -> bool:
        return verify_token(self.keys, token, email)


def load_keys(settings: Settings, *, create: bool = True) -> list[bytes]:
    """The signing keys: the configured secret (and the previous one, for rotation).

    With no secret configured, a random key is created once in the state directory
    (mode 0600) so that links keep working across restarts of a zero-config install.
    With ``create=False`` (checks that must not write anything) a missing key file gives
    a throw-away key instead.
    """
    keys = [
        k.get_secret_value().encode()
        for k in (settings.unsubscribe.secret_key, settings.unsubscribe.previous_secret_key)
        if k.get_secret_value()
    ]
    if keys:
        return keys
    path = settings.state_dir / KEY_FILE
    if not create and not path.exists():
        return [secrets.token_urlsafe(32).encode()]
    return [_state_key(path)]


def _state_key(path: Path) -> bytes:
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created by another process meanwhile
        return path.read_bytes().strip()
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    logger.info("created the unsubscribe signing key %s", path)
    return key
