"""Report queries: what ``campaignd status`` shows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from campaignd.models import LeadStatus, TouchStatus
from campaignd.store.base import StoreBase, leads_t, suppressions_t, touches_t
from campaignd.store.records import StatusReport, TouchRecord, lead_record, touch_record


class ReportQueries(StoreBase):
    def status_report(self, *, now: datetime, recent: timedelta = timedelta(days=1)) -> StatusReport:
        since = now - recent
        with self.reader.connect() as conn:
            by = {
                (r.tier, r.status): r.n
                for r in conn.execute(
                    sa.select(leads_t.c.tier, leads_t.c.status, sa.func.count().label("n")).group_by(
                        leads_t.c.tier, leads_t.c.status
                    )
                )
            }
            active_due = [leads_t.c.status == LeadStatus.ACTIVE.value, leads_t.c.next_due_at.is_not(None)]
            due_now = conn.execute(
                sa.select(sa.func.count()).where(*active_due, leads_t.c.next_due_at <= now)
            ).scalar_one()
            next_due = conn.execute(
                sa.select(sa.func.min(leads_t.c.next_due_at)).where(*active_due, leads_t.c.next_due_at > now)
            ).scalar()
            if next_due is not None and next_due.tzinfo is None:
                next_due = next_due.replace(tzinfo=UTC)  # aggregates bypass the column type
            sent = conn.execute(
                sa.select(sa.func.count()).where(
                    touches_t.c.status == TouchStatus.SENT.value, touches_t.c.sent_at >= since
                )
            ).scalar_one()
            touch_status: dict[str, int] = {
                r[0]: int(r[1])
                for r in conn.execute(
                    sa.select(touches_t.c.status, sa.func.count()).group_by(touches_t.c.status)
                )
            }

            def attention(status: TouchStatus) -> list[tuple[TouchRecord, str]]:
                rows = conn.execute(
                    sa.select(touches_t, leads_t.c.email.label("lead_email"))
                    .join(leads_t, leads_t.c.id == touches_t.c.lead_id)
                    .where(touches_t.c.status == status.value)
                    .order_by(touches_t.c.id)
                    .limit(200)
                )
                return [(touch_record(r), r.lead_email) for r in rows]

            flagged = [
                lead_record(r)
                for r in conn.execute(
                    sa.select(leads_t)
                    .where(leads_t.c.flagged_at >= since, leads_t.c.status == LeadStatus.FLAGGED.value)
                    .order_by(leads_t.c.flagged_at.desc())
                    .limit(200)
                )
            ]
            suppressed = conn.execute(sa.select(sa.func.count()).select_from(suppressions_t)).scalar_one()
            by_channel = {
                (r.channel, r.status): int(r.n)
                for r in conn.execute(
                    sa.select(touches_t.c.channel, touches_t.c.status, sa.func.count().label("n")).group_by(
                        touches_t.c.channel, touches_t.c.status
                    )
                )
            }
            return StatusReport(
                by_tier_status=by,
                due_now=int(due_now),
                next_due_at=next_due,
                sent_last_day=int(sent),
                touches_by_status={k: int(v) for k, v in touch_status.items()},
                unknown=attention(TouchStatus.UNKNOWN),
                failed=attention(TouchStatus.FAILED),
                flagged_recent=flagged,
                suppressed=int(suppressed),
                touches_by_channel=by_channel,
            )
