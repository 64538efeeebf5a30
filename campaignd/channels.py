"""The channel seam: how a rendered touch leaves campaignd.

Owns the small protocol every channel implements (SMTP relay, local Maildir outbox,
direct-mail print outbox, the in-memory channel in ``testing.py``) and the value types
that cross it. The dispatcher talks to this protocol only and never knows which channel
it holds. Imports no database, scheduler or SMTP module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message ready to leave: the exact bytes and the envelope.

    :param touch_id: the touch row this message is, for logs and results.
    :param sender: envelope sender (MAIL FROM).
    :param recipient: envelope recipient (RCPT TO); one per message.
    :param data: the complete RFC 5322 message (email) or document (direct mail).
    :param message_id: the Message-ID header value, recorded with the touch.
    :param kind: ``email`` or ``mail``.
    :param filename_hint: a readable name for channels that write files.
    :param lead: the lead as templates see it (contact fields, postal address), for
        channels that need more than an address, such as direct mail.
    :param crlf: every line of ``data`` already ends in CRLF (as ``build_email`` makes
        them), so a channel need not check.
    """

    touch_id: int
    sender: str
    recipient: str
    data: bytes
    message_id: str
    kind: str = "email"
    filename_hint: str = ""
    lead: Mapping[str, Any] = field(default_factory=dict)
    crlf: bool = False


class Outcome(StrEnum):
    SENT = "sent"
    TEMPORARY = "temporary"
    """Not delivered and safe to retry: a 4xx, or the link failing before the data."""
    UNAVAILABLE = "unavailable"
    """The channel itself cannot be reached (relay down, login refused): nothing was tried
    for this message, so it costs no attempt; the channel is backed off as a whole."""
    PERMANENT = "permanent"
    """Refused for good (5xx for the recipient): the address is suppressed."""
    REJECTED = "rejected"
    """Refused for good, but not because of the address (the content, the sender): failed,
    the address is not suppressed."""
    UNKNOWN = "unknown"
    """The message may or may not have been accepted (the link died after the data)."""
    SKIPPED = "skipped"
    """Not sent on purpose, for a reason given in the detail; the sequence moves on."""
    PENDING = "pending"
    """Accepted for later delivery by the channel itself (a letter waiting for its print batch)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a channel says happened to one :class:`Outgoing`."""

    touch_id: int
    outcome: Outcome
    detail: str = ""
    code: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


FALLBACK = "fallback"
"""The key of :attr:`Delivery.extra` by which a channel that skipped a message asks for it
to go by another channel instead (``"email"``): the dispatcher then sends the step's email."""


class Channel(Protocol):
    """Something that delivers :class:`Outgoing` messages.

    ``open`` is called before a dispatch pass and ``close`` after it, so SMTP
    connections live for one pass and are never left idle between passes. ``send``
    may be called concurrently, up to ``concurrency`` at a time; it never raises for a
    delivery problem, it returns a :class:`Delivery` saying what happened.
    """

    name: str
    concurrency: int

    async def open(self) -> None: ...

    async def send(self, message: Outgoing) -> Delivery: ...

    async def close(self) -> None: ...
