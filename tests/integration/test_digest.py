"""The flagged-lead digest against the real databases, a real SMTP server and the CLI.

The digest service runs with a clock the test moves: each scheduled digest is asked for by
its fire time, as the daemon's job does, and the settle delay is zero, so nothing sleeps.
Messages are read back from the in-package memory channel or from a real aiosmtpd server,
and the leads each digest lists are read from its attached CSV.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from campaignd.channels import Outcome
from campaignd.config import Settings, Smtp
from campaignd.digest import BEGINNING
from campaignd.digest_job import JOB_ID, LEASE, DigestService
from campaignd.exceptions import TemplateError
from campaignd.mailer import SmtpChannel
from campaignd.models import LeadStatus, TouchStatus
from campaignd.services import ServiceContext
from campaignd.store import LeadInput, Store
from campaignd.store.digest import RunKind, RunStatus
from campaignd.testing import MemoryChannel
from tests.factories import TEMPLATES, make_settings, write_config
from tests.smtp import SmtpServer

MON = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)  # Monday 2 March 2026, 08:00 in Chicago
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
TUE, WED, THU = MON + DAY, MON + 2 * DAY, MON + 3 * DAY
RECIPIENTS = ["sales@harborhome.example", "ann@harborhome.example"]
DIGEST = """
[digest]
schedule = "0 8 * * mon-fri"
recipients = ["Sales Team <sales@harborhome.example>", "ann@harborhome.example"]
"""


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def settings_for(tmp_path: Path, db_url: str, extra: str = "", **config: Any) -> Settings:
    return make_settings(
        tmp_path, db_url=db_url if db_url.startswith("postgresql") else "", extra=DIGEST + extra, **config
    )


class Harness:
    """One daemon's digest service, with its own scheduler (never started: the test runs
    the jobs' work itself) and an email channel."""

    def __init__(self, settings: Settings, store: Store, clock: Clock, channel: Any = None) -> None:
        self.channel = channel if channel is not None else MemoryChannel()
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.ctx = ServiceContext(
            settings=settings,
            store=store,
            scheduler=self.scheduler,
            channels={"email": self.channel},
            clock=clock,
            health=dict,
        )
        self.service = DigestService(settle=timedelta(0))

    async def start(self) -> None:
        await self.service.start(self.ctx)
        await self.service.start_up()


def add_leads(store: Store, *emails: str, at: datetime = MON - 30 * DAY) -> None:
    rows = [
        LeadInput(
            email=e,
            first_name=e.split("@")[0].title(),
            company="Acme",
            phone="+1 217 555 0100",
            address_line1="1 Main St",
            city="Springfield",
            region="IL",
            postal_code="62701",
            country="US",
        )
        for e in emails
    ]
    store.upsert_leads(rows, tier="cold", now=at)


def flag(store: Store, email: str, at: datetime) -> None:
    store.set_status(email, LeadStatus.FLAGGED, now=at, reason="asked for a call")


def parse(data: bytes) -> EmailMessage:
    msg = message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def listed(data: bytes) -> list[str]:
    """The leads a digest lists, newest flag first, from its attached CSV (zipped or not)."""
    for part in parse(data).walk():
        if part.get_content_type() in ("text/csv", "application/zip"):
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            if part.get_content_type() == "application/zip":
                with zipfile.ZipFile(io.BytesIO(payload)) as archive:
                    payload = archive.read(archive.namelist()[0])
            return [row["email"] for row in csv.DictReader(io.StringIO(payload.decode("utf-8-sig")))]
    return []


def digests(channel: MemoryChannel) -> list[list[str]]:
    """The leads of each digest sent, once per digest (each goes to two recipients)."""
    by_id: dict[str, list[str]] = {}
    for out in channel.outbox:
        by_id.setdefault(out.message_id, listed(out.data))
    return list(by_id.values())


# -- periods ------------------------------------------------------------------------------------------


async def test_the_first_digest_lists_every_lead_still_flagged(
    tmp_path: Path, db_url: str, store: Store
) -> None:
    add_leads(store, "old@x.com", "mid@x.com", "new@x.com", "sold@x.com", "back@x.com", "quiet@x.com")
    flag(store, "old@x.com", MON - 20 * DAY)
    flag(store, "mid@x.com", MON - 2 * HOUR)
    flag(store, "new@x.com", MON - HOUR)
    flag(store, "sold@x.com", MON - 3 * HOUR)
    store.set_status("sold@x.com", LeadStatus.CONVERTED, now=MON - 2 * HOUR, reason="signed")
    flag(store, "back@x.com", MON - 5 * HOUR)
    store.set_status("back@x.com", LeadStatus.ACTIVE, now=MON - 4 * HOUR)  # unflagged
    clock = Clock(MON + timedelta(seconds=30))
    h = Harness(settings_for(tmp_path, db_url), store, clock)
    await h.start()

    assert sorted(m.recipient for m in h.channel.outbox) == sorted(RECIPIENTS)
    assert digests(h.channel) == [["new@x.com", "mid@x.com", "old@x.com"]]
    (run,) = store.digest_runs()
    assert (run.kind, run.status, run.leads) == (RunKind.SCHEDULED, RunStatus.SENT, 3)
    assert run.scheduled_for == MON and run.period_start == BEGINNING and run.period_end == MON
    assert dict(run.deliveries) == {r: "sent" for r in RECIPIENTS}
    msg = parse(h.channel.outbox[0].data)
    assert msg["Subject"] == "3 leads to call — Mon 2 Mar"
    assert msg["Message-ID"] == f"<campaignd.digest.{run.id}@harborhome.example>"
    text = msg.get_body(preferencelist=("plain",))
    assert text is not None
    content = text.get_content()
    assert "Flagged for sales                5" in content or "Flagged for sales          5" in content
    assert "Converted                  1" in content


async def test_consecutive_days_list_each_flag_exactly_once(
    tmp_path: Path, db_url: str, store: Store
) -> None:
    add_leads(store, *(f"l{i}@x.com" for i in range(6)))
    clock = Clock(MON)
    h = Harness(settings_for(tmp_path, db_url), store, clock)
    flag(store, "l0@x.com", MON - HOUR)
    await h.start()  # Monday's digest
    flag(store, "l1@x.com", MON + 4 * HOUR)
    flag(store, "l2@x.com", TUE - HOUR)
    clock.now = TUE
    await h.service.run_scheduled(TUE)
    flag(store, "l3@x.com", TUE + HOUR)
    flag(store, "l4@x.com", WED - timedelta(seconds=1))
    clock.now = WED
    await h.service.run_scheduled(WED)
    await h.service.run_scheduled(WED)  # the job firing twice changes nothing

    assert digests(h.channel) == [["l0@x.com"], ["l2@x.com", "l1@x.com"], ["l4@x.com", "l3@x.com"]]
    runs = sorted(store.digest_runs(), key=lambda r: r.period_end)
    assert [(r.period_start, r.period_end) for r in runs] == [(BEGINNING, MON), (MON, TUE), (TUE, WED)]
    assert len(h.channel.outbox) == 3 * 2


async def test_a_lead_flagged_exactly_at_the_boundary_is_in_the_earlier_digest(
    tmp_path: Path, db_url: str, store: Store
) -> None:
    add_leads(store, "on@x.com", "after@x.com", "before@x.com")
    clock = Clock(MON)
    h = Harness(settings_for(tmp_path, db_url), store, clock)
    await h.start()  # nothing flagged yet: an empty digest, not sent
    flag(store, "before@x.com", TUE - timedelta(microseconds=1))
    flag(store, "on@x.com", TUE)
    flag(store, "after@x.com", TUE + timedelta(microseconds=1))
    clock.now = TUE + timedelta(seconds=5)
    await h.service.run_scheduled(TUE)
    clock.now = WED
    await h.service.run_scheduled(WED)
    assert digests(h.channel) == [["on@x.com", "before@x.com"], ["after@x.com"]]


async def test_a_missed_day_is_caught_up_once_at_start_up(tmp_path: Path, db_url: str, store: Store) -> None:
    add_leads(store, "mon@x.com", "tue@x.com", "wed@x.com")
    settings = settings_for(tmp_path, db_url)
    clock = Clock(MON)
    first = Harness(settings, store, clock)
    flag(store, "mon@x.com", MON - HOUR)
    await first.start()
    await first.service.stop()
    # The daemon is down from Monday noon to Wednesday 10:00: Tuesday's and Wednesday's
    # 08:00 pass without it.
    flag(store, "tue@x.com", MON + 6 * HOUR)
    flag(store, "wed@x.com", TUE + 6 * HOUR)
    clock.now = WED + 2 * HOUR
    second = Harness(settings, store, clock)
    await second.start()

    assert digests(second.channel) == [["wed@x.com", "tue@x.com"]]
    runs = sorted(store.digest_runs(kind="scheduled"), key=lambda r: r.period_end)
    assert [r.scheduled_for for r in runs] == [MON, WED]  # Tuesday's is not sent late as well
    assert (runs[1].period_start, runs[1].period_end) == (MON, WED)
    clock.now = THU
    await second.service.run_scheduled(THU)
    assert len(digests(second.channel)) == 1  # nothing flagged since: not sent
    assert store.digest_runs(limit=1)[0].status == RunStatus.EMPTY


async def test_a_restart_mid_day_sends_nothing_again(tmp_path: Path, db_url: str, store: Store) -> None:
    add_leads(store, "a@x.com")
    settings = settings_for(tmp_path, db_url)
    clock = Clock(TUE)
    flag(store, "a@x.com", TUE - HOUR)
    first = Harness(settings, store, clock)
    await first.start()
    assert len(first.channel.outbox) == 2
    for hour in (2, 6, 9):
        clock.now = TUE + hour * HOUR
        again = Harness(settings, store, clock)
        await again.start()
        assert again.channel.outbox == []
    assert len(store.digest_runs()) == 1


async def test_a_digest_on_the_wire_when_the_daemon_died_is_never_resent(
    tmp_path: Path, db_url: str, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    add_leads(store, "a@x.com", "b@x.com")
    flag(store, "a@x.com", MON - HOUR)
    settings = settings_for(tmp_path, db_url)
    # A daemon recorded Monday's digest and committed it as leaving, then died.
    run = store.begin_scheduled_run(fire=MON, now=MON, recipients=settings.digest.recipients, lease=LEASE)
    assert run is not None
    assert store.mark_digest_sending(run.id, now=MON, lease=LEASE, leads=1, message_id="<m@x>")
    clock = Clock(MON + 2 * timedelta(minutes=1))
    h = Harness(settings, store, clock)
    with caplog.at_level(logging.ERROR):
        await h.start()
    sqlite = not db_url.startswith("postgresql")
    if not sqlite:
        # Another daemon may still be sending it: it waits for the lease to run out.
        assert store.get_digest_run(run.id).status == RunStatus.SENDING  # type: ignore[union-attr]
        clock.now = MON + LEASE + timedelta(minutes=1)
        await h.service.retry_due()
    done = store.get_digest_run(run.id)
    assert done is not None and done.status == RunStatus.UNKNOWN
    assert dict(done.deliveries) == {r: "unknown" for r in RECIPIENTS}
    assert "was being sent when campaignd stopped: marked unknown, not sent again" in caplog.text
    assert h.channel.outbox == []
    # The next digest starts where that one ended: its lead is not sent again either.
    flag(store, "b@x.com", MON + HOUR)
    clock.now = TUE
    await h.service.run_scheduled(TUE)
    assert digests(h.channel) == [["b@x.com"]]


async def test_a_digest_recorded_but_not_yet_leaving_is_sent_after_a_restart(
    tmp_path: Path, db_url: str, store: Store
) -> None:
    add_leads(store, "a@x.com")
    flag(store, "a@x.com", MON - HOUR)
    settings = settings_for(tmp_path, db_url)
    run = store.begin_scheduled_run(fire=MON, now=MON, recipients=settings.digest.recipients, lease=LEASE)
    assert run is not None  # the daemon died while building it: nothing had left
    clock = Clock(MON + LEASE + timedelta(minutes=1))
    h = Harness(settings, store, clock)
    await h.start()
    assert digests(h.channel) == [["a@x.com"]]
    assert store.get_digest_run(run.id).status == RunStatus.SENT  # type: ignore[union-attr]


# -- what a digest lists -----------------------------------------------------------------------------


async def test_no_flagged_leads_sends_nothing_unless_configured(
    tmp_path: Path, db_url: str, store: Store
) -> None:
    add_leads(store, "a@x.com")
    clock = Clock(MON)
    quiet = Harness(settings_for(tmp_path, db_url), store, clock)
    await quiet.start()
    assert quiet.channel.outbox == []
    (run,) = store.digest_runs()
    assert run.status == RunStatus.EMPTY and run.leads == 0

    loud = Harness(settings_for(tmp_path, db_url, "send_empty = true\n"), store, clock)
    await loud.service.start(loud.ctx)
    clock.now = TUE
    await loud.service.run_scheduled(TUE)
    assert len(loud.channel.outbox) == 2
    msg = parse(loud.channel.outbox[0].data)
    assert msg["Subject"] == "No new leads to call — Tue 3 Mar"
    assert not [p for p in msg.walk() if p.get_content_type() == "text/csv"]  # nothing to attach


async def test_converted_leads_drop_out_and_a_new_flag_is_listed_again(
    tmp_path: Path, db_url: str, store: Store
) -> None:
    add_leads(store, "sold@x.com", "again@x.com", "stays@x.com")
    clock = Clock(MON)
    h = Harness(settings_for(tmp_path, db_url), store, clock)
    flag(store, "again@x.com", MON - HOUR)
    await h.start()
    flag(store, "sold@x.com", MON + HOUR)
    store.set_status("sold@x.com", LeadStatus.CONVERTED, now=MON + 2 * HOUR, reason="signed")
    flag(store, "stays@x.com", MON + 3 * HOUR)
    store.set_status("again@x.com", LeadStatus.ACTIVE, now=MON + 4 * HOUR)  # unflagged...
    clock.now = TUE
    await h.service.run_scheduled(TUE)
    flag(store, "again@x.com", TUE + HOUR)  # ...and flagged again: a new flag
    clock.now = WED
    await h.service.run_scheduled(WED)
    assert digests(h.channel) == [["again@x.com"], ["stays@x.com"], ["again@x.com"]]
    digest = store.read_digest(start=MON, end=TUE)
    assert (digest.totals.flagged, digest.totals.converted) == (2, 1)


async def test_the_timeline_has_every_touch_that_counted_with_notes(
    tmp_path: Path, db_url: str, store: Store
) -> None:
    from campaignd.sequences import Policy
    from campaignd.store import Result

    settings = settings_for(tmp_path, db_url, threshold=3)
    policy = Policy.from_settings(settings)
    now = MON - 5 * DAY
    add_leads(store, "ann@x.com", at=now)

    def send_due_step(at: datetime) -> None:
        # What a dispatch pass writes: claim the due step, commit it as leaving, record it sent.
        (claim,) = store.claim(policy=policy, now=at, limit=10, worker="test:1").claims
        assert store.mark_sending([claim.touch_id], worker="test:1", now=at, lease=LEASE) == {claim.touch_id}
        store.record(
            [Result(claim.touch_id, "sent")],
            policy=policy,
            now=at,
            max_attempts=3,
            backoff=timedelta(minutes=1),
            backoff_max=HOUR,
        )

    send_due_step(now)  # cold/01-intro
    store.log_manual_touch(
        "ann@x.com", channel="call", note="Wants a quote", at=now + 2 * HOUR, policy=policy
    )
    send_due_step(now + 4 * HOUR)  # cold/02-postcard: the third touch flags her
    lead = store.get_lead("ann@x.com")
    assert lead.status == LeadStatus.FLAGGED
    digest = store.read_digest(start=BEGINNING, end=MON)
    (listed_lead,) = digest.leads
    assert [(t.channel, t.step, t.template, t.note) for t in listed_lead.timeline] == [
        ("email", "01-intro", "cold/01-intro", None),
        ("call", None, None, "Wants a quote"),
        ("mail", "02-postcard", "cold/02-postcard", None),
    ]
    assert listed_lead.flag_reason == "reached 3 touches (threshold 3)"
    assert (digest.totals.contacted, digest.totals.touches, digest.totals.flagged) == (1, 3, 1)


async def test_ten_thousand_flagged_leads(tmp_path: Path, db_url: str, store: Store) -> None:
    n, touches_each = 10_000, 8
    store.upsert_leads(
        [LeadInput(email=f"lead{i:05}@example.com", first_name="Lead", last_name=str(i)) for i in range(n)],
        tier="warm",
        now=MON - 30 * DAY,
    )
    with store.engine.connect() as conn:
        ids = dict(conn.execute(sa.text("SELECT email, id FROM leads")).all())
    leads_t = sa.table(
        "leads", sa.column("id"), sa.column("status"), sa.column("flagged_at"), sa.column("touch_count")
    )
    touches_t = sa.table(
        "touches",
        *(sa.column(c) for c in ("lead_id", "tier", "step", "channel", "template", "status", "attempts")),
        *(sa.column(c) for c in ("created_at", "sent_at", "updated_at")),
    )
    from campaignd.models import UTCDateTime

    flagged_at = {i: MON - timedelta(seconds=i + 1) for i in range(n)}
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(leads_t)
            .where(leads_t.c.id == sa.bindparam("b_id"))
            .values(
                status="flagged",
                touch_count=touches_each,
                flagged_at=sa.bindparam("b_at", type_=UTCDateTime()),
            ),
            [{"b_id": ids[f"lead{i:05}@example.com"], "b_at": flagged_at[i]} for i in range(n)],
        )
        at = sa.bindparam("at", type_=UTCDateTime())
        conn.execute(
            sa.insert(touches_t).values(
                lead_id=sa.bindparam("lead_id"),
                tier="warm",
                step=sa.bindparam("step"),
                channel="email",
                template=sa.bindparam("template"),
                status=TouchStatus.SENT.value,
                attempts=1,
                created_at=at,
                sent_at=at,
                updated_at=at,
            ),
            [
                {
                    "lead_id": ids[f"lead{i:05}@example.com"],
                    "step": f"s{k}",
                    "template": f"warm/0{k}-letter",
                    "at": flagged_at[i] - timedelta(days=touches_each - k),
                }
                for i in range(n)
                for k in range(touches_each)
            ],
        )
    clock = Clock(MON)
    h = Harness(settings_for(tmp_path, db_url), store, clock)
    started = time.monotonic()
    await h.start()
    seconds = time.monotonic() - started

    assert len(h.channel.outbox) == 2
    data = h.channel.outbox[0].data
    msg = parse(data)
    assert msg["Subject"] == "10000 leads to call — Mon 2 Mar"
    html = msg.get_body(preferencelist=("html",))
    assert html is not None
    assert len(html.get_content().encode()) < 100_000  # read whole in Gmail, on a phone
    text = msg.get_body(preferencelist=("plain",))
    assert text is not None and "... and 99" in text.get_content()
    rows = listed(data)
    assert len(rows) == n and rows[0] == "lead00000@example.com" and rows[-1] == "lead09999@example.com"
    assert len(data) < 1_000_000  # the list of 10,000 travels zipped
    assert seconds < 60, f"the digest of 10,000 leads took {seconds:.1f}s"
    sys.stderr.write(f"\n10,000-lead digest: {seconds:.2f}s, message {len(data) / 1e6:.2f} MB\n")


# -- delivery -----------------------------------------------------------------------------------------


@pytest.fixture
def smtpd() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def smtp_channel(smtpd: SmtpServer) -> SmtpChannel:
    return SmtpChannel(settings=Smtp.model_validate(smtpd.config(timeout="2s")))


async def test_the_digest_reaches_a_real_smtp_server(
    tmp_path: Path, db_url: str, store: Store, smtpd: SmtpServer
) -> None:
    add_leads(store, "a@x.com")
    flag(store, "a@x.com", MON - HOUR)
    h = Harness(settings_for(tmp_path, db_url), store, Clock(MON), channel=smtp_channel(smtpd))
    await h.start()
    assert sorted(r for m in smtpd.received for r in m.recipients) == sorted(RECIPIENTS)
    msg = parse(smtpd.received[0].data)
    assert msg["To"] == "Sales Team <sales@harborhome.example>, ann@harborhome.example"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert smtpd.received[0].sender == "hello@harborhome.example"
    assert listed(smtpd.received[0].data) == ["a@x.com"]


async def test_an_unavailable_recipient_is_retried_and_a_refusal_is_final(
    tmp_path: Path, db_url: str, store: Store, smtpd: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    add_leads(store, "a@x.com")
    flag(store, "a@x.com", MON - HOUR)
    extra = '[digest]\nrecipients = ["sales@harborhome.example", "ann@harborhome.example", "gone@x.com"]\n'
    settings = make_settings(tmp_path, db_url=db_url if db_url.startswith("postgresql") else "", extra=extra)
    smtpd.faults.rcpt["gone@x.com"] = "550 5.1.1 no such user"
    smtpd.faults.next_rcpt.extend(["250 OK", "451 4.3.0 try again later"])
    clock = Clock(MON)
    h = Harness(settings, store, clock, channel=smtp_channel(smtpd))
    with caplog.at_level(logging.WARNING):
        await h.start()
    (run,) = store.digest_runs()
    assert run.status == RunStatus.RETRY
    assert dict(run.deliveries) == {
        "sales@harborhome.example": "sent",
        "ann@harborhome.example": "retry",
        "gone@x.com": "refused",
    }
    assert run.next_attempt_at == MON + timedelta(minutes=1)
    assert h.scheduler.get_job("digest-wakeup").trigger.run_date == MON + timedelta(minutes=1)
    assert "not delivered yet, trying again" in caplog.text
    clock.now = MON + timedelta(minutes=1)
    await h.service.retry_due()
    run = store.get_digest_run(run.id)  # type: ignore[assignment]
    assert run is not None and run.status == RunStatus.PARTIAL  # everyone but the refused address
    assert dict(run.deliveries)["ann@harborhome.example"] == "sent"
    got = Counter(r for m in smtpd.received for r in m.recipients)
    assert got == Counter({"sales@harborhome.example": 1, "ann@harborhome.example": 1})
    assert len({m.message_id for m in smtpd.received}) == 1  # the same message, retried
    assert "gone@x.com: 550 5.1.1 no such user" in (run.error or "")


async def test_a_digest_that_reached_nobody_leaves_its_leads_to_the_next(
    tmp_path: Path, db_url: str, store: Store
) -> None:
    add_leads(store, "mon@x.com", "tue@x.com")
    flag(store, "mon@x.com", MON - HOUR)
    down = MemoryChannel(answer=lambda out: Outcome.UNAVAILABLE)
    clock = Clock(MON)
    h = Harness(settings_for(tmp_path, db_url), store, clock, channel=down)
    await h.start()
    clock.now = MON + 5 * timedelta(minutes=1)
    await h.service.retry_due()
    assert store.digest_runs()[0].status == RunStatus.RETRY
    flag(store, "tue@x.com", MON + HOUR)
    h.channel.answer = None  # the relay is back by Tuesday
    clock.now = TUE
    await h.service.run_scheduled(TUE)
    await h.service.retry_due()
    monday, tuesday = sorted(store.digest_runs(), key=lambda r: r.created_at)
    assert monday.status == RunStatus.FAILED and "given up" in (monday.error or "")
    assert tuesday.period_start == BEGINNING  # Monday's period moved into Tuesday's
    assert digests(h.channel) == [["tue@x.com", "mon@x.com"]]


async def test_two_daemons_on_one_database_send_one_digest(tmp_path: Path, db_url: str, store: Store) -> None:
    from campaignd.database import create_engine

    add_leads(store, "a@x.com")
    flag(store, "a@x.com", MON - HOUR)
    settings = settings_for(tmp_path, db_url)
    other_engine = create_engine(store.engine.url.render_as_string(hide_password=False))
    try:
        clock = Clock(MON)
        one = Harness(settings, store, clock)
        two = Harness(settings, Store(engine=other_engine), clock)
        await one.service.start(one.ctx)
        await two.service.start(two.ctx)
        await asyncio.gather(one.service.run_scheduled(MON), two.service.run_scheduled(MON))
        assert len(one.channel.outbox) + len(two.channel.outbox) == 2
        assert len(store.digest_runs()) == 1
    finally:
        other_engine.dispose()


# -- the service's wiring -----------------------------------------------------------------------------


async def test_the_job_runs_on_the_configured_schedule_and_follows_reloads(
    tmp_path: Path, db_url: str, store: Store
) -> None:
    clock = Clock(MON)
    h = Harness(settings_for(tmp_path, db_url), store, clock)
    await h.service.start(h.ctx)
    job = h.scheduler.get_job(JOB_ID)
    assert job is not None and job.coalesce is True and job.max_instances == 1
    assert str(job.trigger.timezone) == "America/Chicago"
    assert job.trigger.get_next_fire_time(None, MON + timedelta(seconds=1)) == TUE
    # Friday after 08:00: next is Monday 08:00, in daylight saving time by then (13:00 UTC).
    assert job.trigger.get_next_fire_time(None, MON + 4 * DAY + HOUR) == datetime(
        2026, 3, 9, 13, 0, tzinfo=UTC
    )
    quiet = make_settings(tmp_path, db_url=db_url if db_url.startswith("postgresql") else "")
    await h.service.reload(_with(h.ctx, quiet))
    assert h.scheduler.get_job(JOB_ID) is None  # no recipients, no scheduled digest
    await h.service.stop()


def _with(ctx: ServiceContext, settings: Settings) -> ServiceContext:
    return ServiceContext(
        settings=settings,
        store=ctx.store,
        scheduler=ctx.scheduler,
        channels=ctx.channels,
        clock=ctx.clock,
        health=ctx.health,
    )


async def test_a_broken_digest_template_stops_the_start_up_with_file_and_line(
    tmp_path: Path, store: Store
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    (templates / "digest" / "digest.html.j2").write_text(
        "<p>{{ digest.count }}</p>\n<p>{% for lead in digest.leads %}{{ lead.nosuchfield }}{% endfor %}</p>\n"
    )
    settings = settings_for(tmp_path, "")
    settings = settings.model_copy(update={"templates": templates})
    h = Harness(settings, store, Clock(MON))
    with pytest.raises(TemplateError) as caught:
        await h.service.start(h.ctx)
    assert f"{templates}/digest/digest.html.j2: line 2:" in str(caught.value)
    assert "nosuchfield" in str(caught.value)


# -- the command line ---------------------------------------------------------------------------------


def campaignd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
    env.pop("JOURNAL_STREAM", None)
    env["COLUMNS"] = "100"
    return subprocess.run(
        [sys.executable, "-m", "campaignd", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def cli_store(tmp_path: Path, db_url: str) -> Iterator[tuple[Path, Store]]:
    from campaignd.database import create_engine, upgrade

    extra = DIGEST
    config = write_config(tmp_path, db_url=db_url if db_url.startswith("postgresql") else "", extra=extra)
    settings = make_settings(tmp_path, db_url=db_url if db_url.startswith("postgresql") else "", extra=extra)
    engine = create_engine(settings.database_url)
    upgrade(engine)
    try:
        yield config, Store(engine=engine)
    finally:
        engine.dispose()


def test_the_digest_command_in_every_format(cli_store: tuple[Path, Store], tmp_path: Path) -> None:
    config, store = cli_store
    now = datetime.now(UTC)
    add_leads(store, "maria.gonzalez@lakeview-dental.example", "old@x.com", at=now - 30 * DAY)
    flag(store, "maria.gonzalez@lakeview-dental.example", now - 2 * HOUR)
    flag(store, "old@x.com", now - 3 * DAY)

    table = campaignd(config, "digest")
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("1 lead flagged for sales follow-up since")  # default: the last 24h
    assert "maria.gonzalez@lakeview-dental.example" in table.stdout
    assert all(len(line) <= 100 for line in table.stdout.splitlines())

    data = json.loads(campaignd(config, "digest", "--since", "7d", "--format", "json").stdout)
    assert data["format"] == 1 and data["count"] == 2
    assert [lead["email"] for lead in data["leads"]] == [
        "maria.gonzalez@lakeview-dental.example",
        "old@x.com",
    ]

    out = tmp_path / "leads.csv"
    done = campaignd(config, "digest", "--since", "7d", "-f", "csv", "-o", str(out))
    assert done.returncode == 0 and "2 flagged leads written to" in done.stdout
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfflagged_at,")
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
    assert [r["email"] for r in rows] == ["maria.gonzalez@lakeview-dental.example", "old@x.com"]

    html = campaignd(config, "digest", "--format", "html")
    assert 'href="tel:+12175550100"' in html.stdout
    text = campaignd(config, "digest", "--format", "text")
    assert text.stdout.startswith("Subject: 1 lead to call")

    bad = campaignd(config, "digest", "--since", "last tuesday")
    assert bad.returncode == 2
    assert "'last tuesday' is neither a duration" in bad.stderr


def test_the_default_period_starts_at_the_last_scheduled_digest(cli_store: tuple[Path, Store]) -> None:
    config, store = cli_store
    now = datetime.now(UTC)
    add_leads(store, "before@x.com", "after@x.com", at=now - 30 * DAY)
    flag(store, "before@x.com", now - 10 * DAY)
    flag(store, "after@x.com", now - 5 * DAY)
    fire = now - 6 * DAY
    run = store.begin_scheduled_run(fire=fire, now=fire, recipients=["s@x.com"], lease=LEASE)
    assert run is not None
    store.settle_unsent(run.id, status=RunStatus.EMPTY, now=fire)
    data = json.loads(campaignd(config, "digest", "--format", "json").stdout)
    assert [lead["email"] for lead in data["leads"]] == ["after@x.com"]
    assert data["period"]["start"] == fire.isoformat().replace("+00:00", "Z")


def test_send_by_hand_is_recorded_and_leaves_the_schedule_alone(
    cli_store: tuple[Path, Store], smtpd: SmtpServer
) -> None:
    config, store = cli_store
    config.write_text(
        config.read_text() + f'\n[smtp]\nhost = "127.0.0.1"\nport = {smtpd.port}\ntls = "none"\n'
    )
    now = datetime.now(UTC)
    add_leads(store, "a@x.com", at=now - 30 * DAY)
    flag(store, "a@x.com", now - HOUR)
    sent = campaignd(config, "digest", "--since", "7d", "--send", "--to", "Boss <boss@harborhome.example>")
    assert sent.returncode == 0, sent.stderr
    assert "digest with 1 lead sent to boss@harborhome.example" in sent.stdout
    assert [m.recipients for m in smtpd.received] == [("boss@harborhome.example",)]
    assert listed(smtpd.received[0].data) == ["a@x.com"]
    (run,) = store.digest_runs()
    assert (run.kind, run.status, run.scheduled_for) == (RunKind.MANUAL, RunStatus.SENT, None)
    assert store.scheduled_period_start(before=now) == BEGINNING

    runs = campaignd(config, "digest", "--runs")
    assert "manual" in runs.stdout and "boss@harborhome.example (sent)" in runs.stdout

    smtpd.faults.rcpt["boss@harborhome.example"] = "550 5.1.1 no such user"
    refused = campaignd(config, "digest", "--send", "--to", "boss@harborhome.example")
    assert refused.returncode == 1
    assert "was not delivered to everyone (failed): boss@harborhome.example: 550 5.1.1" in refused.stderr

    nobody = campaignd(config, "digest", "--send", "--to", "not an address")
    assert nobody.returncode == 2 and "is not an email address" in nobody.stderr


def test_a_bad_schedule_fails_config_check_with_the_key_and_reason(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra='[digest]\nschedule = "0 25 * * mon-fri"\nrecipients = ["sales"]\n')
    done = campaignd(config, "config", "check")
    assert done.returncode == 2
    assert f"{config}: digest.schedule: '0 25 * * mon-fri' is not a valid schedule:" in done.stderr
    assert f"{config}: digest.recipients: 'sales' is not an email address" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_reload_with_broken_digest_templates_keeps_the_running_ones(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    settings = settings_for(tmp_path, "").model_copy(update={"templates": templates})
    clock = Clock(MON)
    h = Harness(settings, store, clock)
    await h.service.start(h.ctx)
    (templates / "digest" / "digest.txt.j2").write_text("{% for lead in digest.leads %}\n")
    with caplog.at_level(logging.ERROR):
        await h.service.reload(_with(h.ctx, settings))
    assert "the digest templates are broken; the digest keeps its previous configuration" in caplog.text
    assert "digest.txt.j2: line" in caplog.text
    assert h.scheduler.get_job(JOB_ID) is not None
    add_leads(store, "a@x.com")
    flag(store, "a@x.com", MON - HOUR)
    await h.service.run_scheduled(MON)  # with the templates loaded before the breakage
    assert digests(h.channel) == [["a@x.com"]]
