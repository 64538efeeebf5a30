"""The database tables: every SQLModel table model and the enums stored in them.

Only ``store.py`` and the migrations use these classes; everything else works with the
plain read models that the store returns. Times are stored in UTC and always come back
timezone-aware, on SQLite as on PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zone type: values are stored as naive UTC and given their zone
    back on the way out. Naive datetimes are refused, so local time can never sneak in.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the database; use UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class LeadStatus(StrEnum):
    ACTIVE = "active"
    FLAGGED = "flagged"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    CONVERTED = "converted"
    PAUSED = "paused"


class TouchStatus(StrEnum):
    CLAIMED = "claimed"
    """Taken by one daemon under a lease; not yet leaving. Safe to take over after the lease."""
    SENDING = "sending"
    """Committed just before the message leaves: the only state that can become ambiguous."""
    SENT = "sent"
    RETRY = "retry"
    """A temporary failure; due again at ``next_attempt_at``. Never reached the recipient."""
    FAILED = "failed"
    UNKNOWN = "unknown"
    """The process died while the message was in flight; never resent automatically."""
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    """Not sent on purpose (a letter to a lead without a complete postal address); the reason is kept."""
    PENDING = "pending"
    """A direct-mail piece waiting for the next print batch. Holds the lead; not yet a touch."""
    QUEUED = "queued"
    """A direct-mail piece exported in a print batch, waiting for the batch to be confirmed mailed."""


class EventKind(StrEnum):
    """Things that happen to a lead besides touches; the digest's totals count them."""

    PROMOTED = "promoted"
    FLAGGED = "flagged"
    UNFLAGGED = "unflagged"
    CONVERTED = "converted"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    SUPPRESSED = "suppressed"
    UNSUPPRESSED = "unsuppressed"
    PAUSED = "paused"
    RESUMED = "resumed"
    TIER_CHANGED = "tier_changed"


class SuppressionReason(StrEnum):
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    MANUAL = "manual"


class Lead(SQLModel, table=True):
    __tablename__ = "leads"
    __table_args__ = (
        sa.Index("ix_leads_due", "status", "next_due_at"),
        sa.Index("ix_leads_flagged_at", "flagged_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(sa_type=sa.String(320), unique=True)
    first_name: str = Field(default="", sa_type=sa.String(200))
    last_name: str = Field(default="", sa_type=sa.String(200))
    company: str = Field(default="", sa_type=sa.String(200))
    phone: str = Field(default="", sa_type=sa.String(64))
    address_line1: str = Field(default="", sa_type=sa.String(200))
    address_line2: str = Field(default="", sa_type=sa.String(200))
    city: str = Field(default="", sa_type=sa.String(100))
    region: str = Field(default="", sa_type=sa.String(100))
    postal_code: str = Field(default="", sa_type=sa.String(32))
    country: str = Field(default="", sa_type=sa.String(2))
    timezone: str = Field(default="", sa_type=sa.String(64))
    tier: str = Field(default="cold", sa_type=sa.String(16))
    status: str = Field(default=LeadStatus.ACTIVE.value, sa_type=sa.String(16))
    touch_count: int = 0
    tier_since: datetime = Field(sa_type=UTCDateTime)
    """When the lead entered its current tier: the start of that tier's sequence."""
    last_touch_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    next_step: str | None = Field(default=None, sa_type=sa.String(64))
    """The step the plan says comes next (materialised by the decision core)."""
    next_due_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    """When the next step is due, already moved into its send window; NULL when nothing is."""
    flagged_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    flag_reason: str | None = Field(default=None, sa_type=sa.String(500))
    converted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    custom: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class Touch(SQLModel, table=True):
    """One contact with a lead: an automated step (email or direct mail) or a manual touch."""

    __tablename__ = "touches"
    # The database itself makes a second touch of the same step for the same lead
    # impossible. Manual touches have no step (NULL), and NULLs never collide.
    __table_args__ = (
        sa.UniqueConstraint("lead_id", "tier", "step", name="uq_touches_lead_step"),
        sa.Index("ix_touches_status_lease", "status", "lease_until"),
        sa.Index("ix_touches_sent_at", "sent_at"),
        sa.Index("ix_touches_batch_id", "batch_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    lead_id: int = Field(
        sa_column_kwargs={"nullable": False},
        foreign_key="leads.id",
        ondelete="CASCADE",
        index=True,
    )
    tier: str = Field(sa_type=sa.String(16))
    step: str | None = Field(default=None, sa_type=sa.String(64))
    channel: str = Field(sa_type=sa.String(16))
    template: str | None = Field(default=None, sa_type=sa.String(200))
    status: str = Field(sa_type=sa.String(16))
    attempts: int = 0
    claimed_by: str | None = Field(default=None, sa_type=sa.String(128))
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    message_id: str | None = Field(default=None, sa_type=sa.String(255))
    error: str | None = Field(default=None, sa_type=sa.Text)
    note: str | None = Field(default=None, sa_type=sa.Text)
    batch_id: int | None = Field(default=None, foreign_key="print_batches.id", ondelete="SET NULL")
    """The print batch a direct-mail piece was exported in."""
    created_at: datetime = Field(sa_type=UTCDateTime)
    sent_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class Suppression(SQLModel, table=True):
    """An address that must never be contacted again; outlives its lead row."""

    __tablename__ = "suppressions"

    email: str = Field(sa_type=sa.String(320), primary_key=True)
    reason: str = Field(sa_type=sa.String(16))
    detail: str = Field(default="", sa_type=sa.Text)
    created_at: datetime = Field(sa_type=UTCDateTime)


class LeadEvent(SQLModel, table=True):
    """Something that happened to a lead other than a touch: promoted, flagged, unsubscribed, ..."""

    __tablename__ = "lead_events"
    __table_args__ = (sa.Index("ix_lead_events_kind_at", "kind", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    lead_id: int = Field(
        sa_column_kwargs={"nullable": False}, foreign_key="leads.id", ondelete="CASCADE", index=True
    )
    kind: str = Field(sa_type=sa.String(16))
    at: datetime = Field(sa_type=UTCDateTime)
    detail: str = Field(default="", sa_type=sa.Text)


class DigestRun(SQLModel, table=True):
    """One flagged-lead digest: what period it covered and whether it went out.

    ``status`` is ``pending`` (recorded, being built; nothing has left), ``sending``
    (committed just before the message leaves), ``sent`` (every recipient took it),
    ``partial`` (some did), ``retry`` (a recipient's server was unavailable; tried again at
    ``next_attempt_at``), ``failed`` (nobody got it), ``unknown`` (campaignd stopped while
    it was on the wire; never resent by itself) or ``empty`` (nothing was flagged, and
    empty digests are not sent).
    """

    __tablename__ = "digest_runs"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(sa_type=sa.String(16))
    """``scheduled`` (the daemon's job) or ``manual`` (``campaignd digest --send``)."""
    scheduled_for: datetime | None = Field(default=None, sa_type=UTCDateTime, unique=True)
    """The schedule's fire time; unique, so one scheduled digest can never be sent twice."""
    period_start: datetime = Field(sa_type=UTCDateTime)
    period_end: datetime = Field(sa_type=UTCDateTime)
    status: str = Field(sa_type=sa.String(16))
    leads: int = 0
    recipients: str = Field(default="", sa_type=sa.Text)
    """Everyone it is addressed to, comma-separated, as configured when it was recorded."""
    deliveries: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    """Per recipient address: ``sent``, ``refused``, ``retry``, ``failed`` or ``unknown``."""
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    """While ``pending`` or ``sending``: when a stopped sender's run may be recovered."""
    message_id: str | None = Field(default=None, sa_type=sa.String(255))
    error: str | None = Field(default=None, sa_type=sa.Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class PrintBatch(SQLModel, table=True):
    """A batch of direct-mail pieces exported for the print shop or mailing house."""

    __tablename__ = "print_batches"

    id: int | None = Field(default=None, primary_key=True)
    status: str = Field(sa_type=sa.String(16))
    pieces: int = 0
    pages: int = 0
    path: str = Field(default="", sa_type=sa.Text)
    detail: str = Field(default="", sa_type=sa.Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
    exported_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    confirmed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cancelled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Meta(SQLModel, table=True):
    """Small named values campaignd keeps for itself (the plan fingerprint, …)."""

    __tablename__ = "meta"

    key: str = Field(sa_type=sa.String(64), primary_key=True)
    value: str = Field(default="", sa_type=sa.Text)
