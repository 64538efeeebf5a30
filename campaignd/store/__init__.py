"""Store: every query campaignd runs, with methods named for what they mean.

The only package that builds SQL or opens transactions. It returns plain read models
(frozen dataclasses from ``records``), never live ORM rows. Queries are grouped by
concern, one module each, and :class:`Store` combines the groups:

- ``leads``: importing, reading, changes by hand, the suppression list;
- ``dispatch``: planning, claiming, marking as leaving, recording answers, recovery;
- ``reports``: what ``campaignd status`` shows;
- ``digest``: the flagged-lead digest and its runs;
- ``optout``: what the unsubscribe endpoint reads and records, in batches;
- ``mail``: direct-mail print batches.
"""

from __future__ import annotations

from campaignd.store.digest import DigestQueries
from campaignd.store.dispatch import DispatchQueries
from campaignd.store.leads import CONTACT_FIELDS, LeadQueries
from campaignd.store.mail import MailQueries
from campaignd.store.optout import OptOutQueries
from campaignd.store.records import (
    Claim,
    ClaimPass,
    EventRecord,
    LeadInput,
    LeadRecord,
    Recorded,
    Result,
    StatusReport,
    SuppressionRecord,
    TouchRecord,
    UpsertCounts,
)
from campaignd.store.reports import ReportQueries


class Store(LeadQueries, DispatchQueries, ReportQueries, DigestQueries, MailQueries, OptOutQueries):
    """All reads and writes of the lead database.

    :param engine: a SQLAlchemy engine from :func:`campaignd.database.create_engine`.
    """


__all__ = [
    "CONTACT_FIELDS",
    "Claim",
    "ClaimPass",
    "EventRecord",
    "LeadInput",
    "LeadRecord",
    "Recorded",
    "Result",
    "StatusReport",
    "Store",
    "SuppressionRecord",
    "TouchRecord",
    "UpsertCounts",
]
