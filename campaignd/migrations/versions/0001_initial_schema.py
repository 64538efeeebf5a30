"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 22:52:49.126505
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import campaignd.models

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "digest_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("scheduled_for", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("period_start", campaignd.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("period_end", campaignd.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("leads", sa.Integer(), nullable=False),
        sa.Column("recipients", sa.Text(), nullable=False),
        sa.Column("deliveries", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("lease_until", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("message_id", sa.String(length=255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", campaignd.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_digest_runs")),
        sa.UniqueConstraint("scheduled_for", name=op.f("uq_digest_runs_scheduled_for")),
    )
    op.create_table(
        "leads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("first_name", sa.String(length=200), nullable=False),
        sa.Column("last_name", sa.String(length=200), nullable=False),
        sa.Column("company", sa.String(length=200), nullable=False),
        sa.Column("phone", sa.String(length=64), nullable=False),
        sa.Column("address_line1", sa.String(length=200), nullable=False),
        sa.Column("address_line2", sa.String(length=200), nullable=False),
        sa.Column("city", sa.String(length=100), nullable=False),
        sa.Column("region", sa.String(length=100), nullable=False),
        sa.Column("postal_code", sa.String(length=32), nullable=False),
        sa.Column("country", sa.String(length=2), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("touch_count", sa.Integer(), nullable=False),
        sa.Column("tier_since", campaignd.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_touch_at", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("next_step", sa.String(length=64), nullable=True),
        sa.Column("next_due_at", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("flagged_at", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("flag_reason", sa.String(length=500), nullable=True),
        sa.Column("converted_at", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("custom", sa.JSON(), nullable=False),
        sa.Column("created_at", campaignd.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", campaignd.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leads")),
        sa.UniqueConstraint("email", name=op.f("uq_leads_email")),
    )
    with op.batch_alter_table("leads", schema=None) as batch_op:
        batch_op.create_index("ix_leads_due", ["status", "next_due_at"], unique=False)
        batch_op.create_index("ix_leads_flagged_at", ["flagged_at"], unique=False)

    op.create_table(
        "meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_meta")),
    )
    op.create_table(
        "print_batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("pieces", sa.Integer(), nullable=False),
        sa.Column("pages", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_at", campaignd.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("exported_at", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("confirmed_at", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_print_batches")),
    )
    op.create_table(
        "suppressions",
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_at", campaignd.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("email", name=op.f("pk_suppressions")),
    )
    op.create_table(
        "lead_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lead_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("at", campaignd.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["lead_id"], ["leads.id"], name=op.f("fk_lead_events_lead_id_leads"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lead_events")),
    )
    with op.batch_alter_table("lead_events", schema=None) as batch_op:
        batch_op.create_index("ix_lead_events_kind_at", ["kind", "at"], unique=False)
        batch_op.create_index(batch_op.f("ix_lead_events_lead_id"), ["lead_id"], unique=False)

    op.create_table(
        "touches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lead_id", sa.Integer(), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("step", sa.String(length=64), nullable=True),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("template", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("lease_until", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("message_id", sa.String(length=255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("batch_id", sa.Integer(), nullable=True),
        sa.Column("created_at", campaignd.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("sent_at", campaignd.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", campaignd.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["print_batches.id"],
            name=op.f("fk_touches_batch_id_print_batches"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["lead_id"], ["leads.id"], name=op.f("fk_touches_lead_id_leads"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_touches")),
        sa.UniqueConstraint("lead_id", "tier", "step", name="uq_touches_lead_step"),
    )
    with op.batch_alter_table("touches", schema=None) as batch_op:
        batch_op.create_index("ix_touches_batch_id", ["batch_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_touches_lead_id"), ["lead_id"], unique=False)
        batch_op.create_index("ix_touches_sent_at", ["sent_at"], unique=False)
        batch_op.create_index("ix_touches_status_lease", ["status", "lease_until"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("touches", schema=None) as batch_op:
        batch_op.drop_index("ix_touches_status_lease")
        batch_op.drop_index("ix_touches_sent_at")
        batch_op.drop_index(batch_op.f("ix_touches_lead_id"))
        batch_op.drop_index("ix_touches_batch_id")

    op.drop_table("touches")
    with op.batch_alter_table("lead_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_lead_events_lead_id"))
        batch_op.drop_index("ix_lead_events_kind_at")

    op.drop_table("lead_events")
    op.drop_table("suppressions")
    op.drop_table("print_batches")
    op.drop_table("meta")
    with op.batch_alter_table("leads", schema=None) as batch_op:
        batch_op.drop_index("ix_leads_flagged_at")
        batch_op.drop_index("ix_leads_due")

    op.drop_table("leads")
    op.drop_table("digest_runs")
