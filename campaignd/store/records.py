"""Read models: the plain, frozen values the store returns and takes.

Nothing here touches the database; callers never see live ORM rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


@dataclass(frozen=True, slots=True)
class LeadRecord:
    id: int
    email: str
    first_name: str
    last_name: str
    company: str
    phone: str
    address_line1: str
    address_line2: str
    city: str
    region: str
    postal_code: str
    country: str
    timezone: str
    tier: str
    status: str
    touch_count: int
    tier_since: datetime
    last_touch_at: datetime | None
    next_step: str | None
    next_due_at: datetime | None
    flagged_at: datetime | None
    flag_reason: str | None
    converted_at: datetime | None
    custom: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}".strip()

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class TouchRecord:
    id: int
    lead_id: int
    tier: str
    step: str | None
    channel: str
    template: str | None
    status: str
    attempts: int
    message_id: str | None
    error: str | None
    note: str | None
    batch_id: int | None
    created_at: datetime
    sent_at: datetime | None
    next_attempt_at: datetime | None
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class SuppressionRecord:
    email: str
    reason: str
    detail: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class LeadInput:
    """One validated lead from an import: contact fields only, never state."""

    email: str
    first_name: str = ""
    last_name: str = ""
    company: str = ""
    phone: str = ""
    address_line1: str = ""
    address_line2: str = ""
    city: str = ""
    region: str = ""
    postal_code: str = ""
    country: str = ""
    timezone: str = ""
    tier: str | None = None
    custom: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class UpsertCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    suppressed: int = 0
    """Of the inserted, how many arrived already suppressed (kept that way)."""

    def add(self, other: UpsertCounts) -> None:
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.suppressed += other.suppressed


@dataclass(frozen=True, slots=True)
class Claim:
    """A step claimed for sending by this daemon."""

    touch_id: int
    lead: LeadRecord
    tier: str
    step: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Result:
    """What happened to one claimed touch, as the dispatcher reports it."""

    touch_id: int
    outcome: str
    """A channel outcome (``sent``, ``temporary``, ``permanent``, ``rejected``, ``unknown``,
    ``skipped``, ``pending``) or ``render`` for a message that could not be built."""
    detail: str = ""
    message_id: str | None = None
    retry_after: timedelta | None = None
    """For ``unavailable``: how long the channel is backed off."""
    channel: str | None = None
    """The channel the step went by when not its own (a letter sent as an email)."""


@dataclass(frozen=True, slots=True)
class Recorded:
    """What recording one result did, for the log."""

    touch_id: int
    email: str
    tier: str
    step: str
    status: str
    touch_count: int = 0
    promoted: bool = False
    flagged: bool = False
    retry_at: datetime | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ClaimPass:
    claims: list[Claim]
    planned: int
    """Leads looked at that were not due after all (rescheduled or finished)."""


@dataclass(frozen=True, slots=True)
class StatusReport:
    by_tier_status: dict[tuple[str, str], int]
    due_now: int
    next_due_at: datetime | None
    sent_last_day: int
    touches_by_status: dict[str, int]
    unknown: list[tuple[TouchRecord, str]]
    failed: list[tuple[TouchRecord, str]]
    flagged_recent: list[LeadRecord]
    suppressed: int
    touches_by_channel: dict[tuple[str, str], int]
    """(channel, status) -> how many touches: direct mail waiting for a batch is
    ``("mail", "pending")``, exported and not yet confirmed ``("mail", "queued")``."""


@dataclass(frozen=True, slots=True)
class EventRecord:
    """Something that happened to a lead other than a touch."""

    id: int
    lead_id: int
    kind: str
    at: datetime
    detail: str


def lead_record(row: Any) -> LeadRecord:
    m = row._mapping
    return LeadRecord(**{f: m[f] for f in LeadRecord.__slots__})


def touch_record(row: Any) -> TouchRecord:
    m = row._mapping
    return TouchRecord(**{f: m[f] for f in TouchRecord.__slots__})
