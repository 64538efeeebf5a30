"""The dispatcher against the real databases, with the in-package memory channel.

Time is passed in: each pass gets ``now``, and the dispatcher's clock is a variable the
test moves, so no clock is frozen and nothing sleeps.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import pytest
import sqlalchemy as sa

from campaignd.channels import Outcome, Outgoing
from campaignd.daemon import prepare
from campaignd.engine import Dispatcher
from campaignd.models import LeadStatus, SuppressionReason, TouchStatus
from campaignd.sequences import Policy
from campaignd.store import LeadInput, Result, Store
from campaignd.testing import MemoryChannel
from tests.factories import make_settings

T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)  # a Monday, 09:00 in Chicago


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_dispatcher(
    tmp_path: Path, store: Store, clock: Clock, *, email: MemoryChannel | None = None, **config: object
) -> tuple[Dispatcher, MemoryChannel, MemoryChannel]:
    settings = make_settings(tmp_path, db_url="", **config)
    renderer, signer = prepare(settings)
    email = email or MemoryChannel()
    mail = MemoryChannel(concurrency=1)
    dispatcher = Dispatcher(
        store=store,
        settings=settings,
        renderer=renderer,
        signer=signer,
        channels={"email": email, "mail": mail},
        worker="test:1",
        clock=clock,
    )
    return dispatcher, email, mail


def add_leads(store: Store, *emails: str, tier: str = "cold", now: datetime = T0) -> None:
    rows = [
        LeadInput(
            email=e,
            first_name=e.split("@")[0].title(),
            company="Acme",
            address_line1="1 Main St",
            city="Springfield",
            region="IL",
            postal_code="62701",
            country="US",
        )
        for e in emails
    ]
    store.upsert_leads(rows, tier=tier, now=now)


def parsed(out: Outgoing) -> Message:
    return message_from_bytes(out.data)


async def run_until(dispatcher: Dispatcher, clock: Clock, until: datetime, step: timedelta) -> None:
    while clock.now <= until:
        await dispatcher.run_pass(clock.now)
        clock.now += step


async def test_each_lead_gets_its_sequence_in_order_then_promotion_and_flag(
    tmp_path: Path, store: Store
) -> None:
    clock = Clock(T0)
    dispatcher, email, mail = make_dispatcher(tmp_path, store, clock, threshold=5)
    add_leads(store, "ann@example.com", "bob@example.com")
    await run_until(dispatcher, clock, T0 + timedelta(days=6), timedelta(hours=1))

    for address in ("ann@example.com", "bob@example.com"):
        steps = [parsed(m)["X-Campaignd-Step"] for m in email.outbox if m.recipient == address]
        assert steps == ["cold/01-intro", "cold/03-reminder", "warm/01-sales-letter", "warm/02-seminar"]
        assert [m.kind for m in mail.outbox if m.recipient == address] == ["mail"]
        lead = store.get_lead(address)
        assert lead.touch_count == 5
        assert lead.tier == "warm"
        assert lead.status == LeadStatus.FLAGGED
        assert lead.flag_reason == "reached 5 touches (threshold 5)"
        touches = store.touches_for(lead.id)
        assert [t.status for t in touches] == ["sent"] * 5
        # promotion happened exactly at the end of the cold sequence (third touch)
        assert lead.tier_since == touches[2].sent_at
    # the flag stops the drip: nothing more after the fifth touch
    assert len(email.outbox) == 8
    await run_until(dispatcher, clock, clock.now + timedelta(days=10), timedelta(hours=6))
    assert len(email.outbox) == 8


async def test_delays_are_measured_from_the_previous_touch(tmp_path: Path, store: Store) -> None:
    clock = Clock(T0)
    dispatcher, email, mail = make_dispatcher(tmp_path, store, clock)
    add_leads(store, "ann@example.com")
    await dispatcher.run_pass(T0)
    assert len(email.outbox) == 1
    clock.now = T0 + timedelta(minutes=59)
    await dispatcher.run_pass(clock.now)
    assert len(mail.outbox) == 0  # the postcard is due an hour after the intro
    clock.now = T0 + timedelta(hours=1)
    await dispatcher.run_pass(clock.now)
    assert len(mail.outbox) == 1


async def test_message_is_compliant_and_addressed(tmp_path: Path, store: Store) -> None:
    clock = Clock(T0)
    dispatcher, email, _ = make_dispatcher(tmp_path, store, clock)
    add_leads(store, "ann@example.com")
    await dispatcher.run_pass(T0)
    msg = parsed(email.outbox[0])
    assert msg["To"] == "Ann <ann@example.com>"
    assert msg["From"] == "Harbor Home Services <hello@harborhome.example>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "https://harborhome.example/campaignd/u/" in msg["List-Unsubscribe"]
    assert "mailto:unsubscribe@harborhome.example" in msg["List-Unsubscribe"]
    assert msg.get_content_type() == "multipart/alternative"
    text, html = (part.get_payload(decode=True).decode() for part in msg.get_payload())  # type: ignore[union-attr]
    for body in (text, html):
        assert "418 Lakeshore Drive" in body
        assert "/campaignd/u/" in body
    touch = store.touches_for(store.get_lead("ann@example.com").id)[0]
    assert touch.message_id == msg["Message-ID"]


async def test_temporary_failure_is_retried_with_backoff(tmp_path: Path, store: Store) -> None:
    clock = Clock(T0)
    answers = iter([Outcome.TEMPORARY, Outcome.TEMPORARY, Outcome.SENT])
    channel = MemoryChannel(answer=lambda _m: next(answers))
    dispatcher, email, _ = make_dispatcher(tmp_path, store, clock, email=channel)
    add_leads(store, "ann@example.com")
    lead_id = store.get_lead("ann@example.com").id

    await dispatcher.run_pass(T0)
    [touch] = store.touches_for(lead_id)
    assert touch.status == TouchStatus.RETRY and touch.attempts == 1
    assert touch.next_attempt_at == T0 + timedelta(minutes=1)
    await dispatcher.run_pass(T0 + timedelta(seconds=59))
    assert store.touches_for(lead_id)[0].attempts == 1  # not before the backoff

    clock.now = T0 + timedelta(minutes=1)
    await dispatcher.run_pass(clock.now)
    [touch] = store.touches_for(lead_id)
    assert touch.status == TouchStatus.RETRY and touch.attempts == 2
    assert touch.next_attempt_at == clock.now + timedelta(minutes=2)  # exponential

    clock.now += timedelta(minutes=2)
    await dispatcher.run_pass(clock.now)
    [touch] = store.touches_for(lead_id)
    assert touch.status == TouchStatus.SENT and touch.attempts == 3
    assert len(email.outbox) == 1
    assert store.get_lead("ann@example.com").touch_count == 1


async def test_temporary_failures_give_up_after_max_attempts(tmp_path: Path, store: Store) -> None:
    clock = Clock(T0)
    channel = MemoryChannel(answer=lambda _m: Outcome.TEMPORARY)
    dispatcher, _, _ = make_dispatcher(
        tmp_path, store, clock, email=channel, extra='[dispatch]\nmax_attempts = 2\nretry_backoff = "1m"\n'
    )
    add_leads(store, "ann@example.com")
    await run_until(dispatcher, clock, T0 + timedelta(hours=2), timedelta(minutes=1))
    lead = store.get_lead("ann@example.com")
    [touch] = store.touches_for(lead.id)
    assert touch.status == TouchStatus.FAILED and touch.attempts == 2
    assert lead.touch_count == 0 and lead.next_due_at is None
    report = store.status_report(now=clock.now)
    assert [t.id for t, _ in report.failed] == [touch.id]


async def test_permanent_failure_suppresses_the_address(tmp_path: Path, store: Store) -> None:
    clock = Clock(T0)
    channel = MemoryChannel(
        answer=lambda m: Outcome.PERMANENT if m.recipient == "bad@example.com" else Outcome.SENT
    )
    dispatcher, email, _ = make_dispatcher(tmp_path, store, clock, email=channel)
    add_leads(store, "bad@example.com", "good@example.com")
    await run_until(dispatcher, clock, T0 + timedelta(days=3), timedelta(hours=1))
    bad = store.get_lead("bad@example.com")
    assert bad.status == LeadStatus.BOUNCED
    assert store.is_suppressed("bad@example.com")
    assert [t.status for t in store.touches_for(bad.id)] == ["failed"]
    assert all(m.recipient == "good@example.com" for m in email.outbox)
    # re-importing does not bring it back
    add_leads(store, "bad@example.com", now=clock.now)
    assert store.get_lead("bad@example.com").status == LeadStatus.BOUNCED


async def test_suppressed_unsubscribed_and_paused_leads_get_nothing(tmp_path: Path, store: Store) -> None:
    clock = Clock(T0)
    dispatcher, email, mail = make_dispatcher(tmp_path, store, clock)
    add_leads(store, "blocked@example.com", "gone@example.com", "paused@example.com", "ok@example.com")
    store.suppress("blocked@example.com", reason=SuppressionReason.MANUAL, detail="", now=T0)
    store.suppress("gone@example.com", reason=SuppressionReason.UNSUBSCRIBED, detail="", now=T0)
    store.set_status("paused@example.com", LeadStatus.PAUSED, now=T0)
    await run_until(dispatcher, clock, T0 + timedelta(days=8), timedelta(hours=2))
    assert {m.recipient for m in email.outbox + mail.outbox} == {"ok@example.com"}


async def test_send_window_is_respected_in_the_leads_time_zone(tmp_path: Path, store: Store) -> None:
    sequences = """
[sequences.cold]
steps = [{ template = "cold/01-intro", window = { days = ["mon-fri"], hours = "09:00-17:00" } }]
"""
    saturday_noon_chicago = datetime(2026, 3, 7, 18, 0, tzinfo=UTC)
    clock = Clock(saturday_noon_chicago)
    dispatcher, email, _ = make_dispatcher(tmp_path, store, clock, sequences=sequences)
    add_leads(store, "ann@example.com", now=saturday_noon_chicago)
    await dispatcher.run_pass(clock.now)
    assert email.outbox == []
    lead = store.get_lead("ann@example.com")
    monday_nine_chicago = datetime(2026, 3, 9, 14, 0, tzinfo=UTC)  # CDT (UTC-5) since 8 March
    assert lead.next_due_at == monday_nine_chicago
    clock.now = monday_nine_chicago
    await dispatcher.run_pass(clock.now)
    assert len(email.outbox) == 1


async def test_in_flight_touch_becomes_unknown_and_is_resent_only_on_request(
    tmp_path: Path, store: Store
) -> None:
    clock = Clock(T0)
    dispatcher, email, _ = make_dispatcher(tmp_path, store, clock)
    add_leads(store, "ann@example.com")
    # A daemon claimed and started sending, then died before recording the answer.
    claimed = store.claim(policy=dispatcher.policy, now=T0, limit=10, worker="dead:1")
    [claim] = claimed.claims
    assert store.mark_sending([claim.touch_id], worker="dead:1", now=T0, lease=timedelta(minutes=5))
    orphans = store.recover_in_flight(now=T0, exclusive=True)  # what a restart does
    assert [t.id for t in orphans] == [claim.touch_id]
    assert store.get_touch(claim.touch_id).status == TouchStatus.UNKNOWN  # type: ignore[union-attr]
    report = store.status_report(now=T0)
    assert [(t.id, e) for t, e in report.unknown] == [(claim.touch_id, "ann@example.com")]
    # never resent automatically
    await run_until(dispatcher, clock, T0 + timedelta(days=3), timedelta(hours=3))
    assert email.outbox == []
    # the operator checks and re-queues it
    store.retry_touches([claim.touch_id], now=clock.now)
    await dispatcher.run_pass(clock.now)
    assert [parsed(m)["X-Campaignd-Step"] for m in email.outbox] == ["cold/01-intro"]
    assert store.get_touch(claim.touch_id).status == TouchStatus.SENT  # type: ignore[union-attr]


async def test_claimed_work_is_taken_over_after_its_lease(tmp_path: Path, store: Store) -> None:
    """Several daemons share the database (PostgreSQL): another one's claim is respected
    until its lease ends."""
    clock = Clock(T0)
    dispatcher, email, _ = make_dispatcher(tmp_path, store, clock)
    dispatcher.exclusive = False
    add_leads(store, "ann@example.com")
    [claim] = store.claim(policy=dispatcher.policy, now=T0, limit=10, worker="slow:1").claims
    # within the lease nobody else may take it
    await dispatcher.run_pass(T0 + timedelta(minutes=4))
    assert email.outbox == []
    # after the lease it is taken over and sent once
    clock.now = T0 + timedelta(minutes=5, seconds=1)
    await dispatcher.run_pass(clock.now)
    assert len(email.outbox) == 1
    # the slow daemon can no longer mark it as sending
    assert (
        store.mark_sending([claim.touch_id], worker="slow:1", now=clock.now, lease=timedelta(minutes=5))
        == set()
    )


async def test_a_lead_missing_a_custom_field_fails_alone(tmp_path: Path, store: Store) -> None:
    templates = tmp_path / "templates"
    import shutil

    from tests.factories import TEMPLATES

    shutil.copytree(TEMPLATES, templates)
    intro = templates / "cold" / "01-intro.txt.j2"
    intro.write_text(intro.read_text().replace("Dear {{", "Dear {{ lead.custom.salutation }} {{"))
    html = templates / "cold" / "01-intro.html.j2"
    html.write_text(html.read_text().replace("Dear {{", "Dear {{ lead.custom.salutation }} {{"))
    sequences = '[sequences.cold]\nsteps = [{ template = "cold/01-intro" }]\n'
    clock = Clock(T0)
    # the sample lead has the field so the check passes; one real lead lacks it
    settings_extra = f'templates = "{templates}"\n'
    cfg = tmp_path / "campaignd.toml"
    from tests.factories import config_text

    text = config_text(state_dir=tmp_path / "state", sequences=sequences).replace(
        f'templates = "{TEMPLATES}"', settings_extra.strip()
    )
    cfg.write_text(text)
    from campaignd.config import load_settings
    from campaignd.render import SAMPLE_LEAD

    SAMPLE_LEAD["custom"] = {"salutation": "Dr."}
    try:
        settings = load_settings(cfg, environ={}, dotenv=None)
        renderer, signer = prepare(settings)
    finally:
        SAMPLE_LEAD["custom"] = {}
    email = MemoryChannel()
    dispatcher = Dispatcher(
        store=store,
        settings=settings,
        renderer=renderer,
        signer=signer,
        channels={"email": email, "mail": MemoryChannel()},
        worker="t",
        clock=clock,
    )
    store.upsert_leads(
        [
            LeadInput(email="has@example.com", custom={"salutation": "Ms."}),
            LeadInput(email="lacks@example.com"),
        ],
        tier="cold",
        now=T0,
    )
    await dispatcher.run_pass(T0)
    assert [m.recipient for m in email.outbox] == ["has@example.com"]
    lacks = store.get_lead("lacks@example.com")
    [touch] = store.touches_for(lacks.id)
    assert touch.status == TouchStatus.FAILED
    assert "salutation" in (touch.error or "") and "01-intro" in (touch.error or "")


async def test_manual_touch_counts_and_can_flag(tmp_path: Path, store: Store) -> None:
    clock = Clock(T0)
    dispatcher, email, _ = make_dispatcher(tmp_path, store, clock, threshold=2)
    add_leads(store, "ann@example.com")
    await dispatcher.run_pass(T0)
    lead, after = store.log_manual_touch(
        "ann@example.com",
        channel="call",
        note="left a voicemail",
        at=T0 + timedelta(minutes=10),
        policy=dispatcher.policy,
    )
    assert after.touch_count == 2 and after.flagged
    assert lead.status == LeadStatus.FLAGGED
    await run_until(dispatcher, clock, T0 + timedelta(days=3), timedelta(hours=1))
    assert len(email.outbox) == 1


@pytest.mark.parametrize("n", [1200])
async def test_a_backlog_larger_than_a_batch_is_claimed_once_each(
    tmp_path: Path, store: Store, n: int
) -> None:
    clock = Clock(T0)
    sequences = '[sequences.cold]\nsteps = [{ template = "cold/01-intro" }]\n'
    dispatcher, email, _ = make_dispatcher(
        tmp_path, store, clock, sequences=sequences, extra="[dispatch]\nbatch_size = 500\n"
    )
    store.upsert_leads([LeadInput(email=f"lead{i}@example.com") for i in range(n)], tier="cold", now=T0)
    for _ in range(4):
        await dispatcher.run_pass(T0)
    recipients = [m.recipient for m in email.outbox]
    assert len(recipients) == n == len(set(recipients))
    with store.engine.connect() as conn:
        sent = conn.execute(sa.text("select count(*) from touches where status = 'sent'")).scalar_one()
    assert sent == n


async def test_a_message_in_flight_elsewhere_holds_the_lead_then_becomes_unknown(
    tmp_path: Path, store: Store
) -> None:
    """With several daemons (PostgreSQL), a daemon that died mid-send blocks nothing forever
    and never causes the next step to overtake the one in flight."""
    clock = Clock(T0)
    dispatcher, email, mail = make_dispatcher(tmp_path, store, clock)
    dispatcher.exclusive = False
    add_leads(store, "ann@example.com")
    [claim] = store.claim(policy=dispatcher.policy, now=T0, limit=10, worker="dead:1").claims
    assert store.mark_sending([claim.touch_id], worker="dead:1", now=T0, lease=timedelta(minutes=5))
    for minutes in (1, 3, 61, 120):  # the postcard would be due an hour after the intro
        clock.now = T0 + timedelta(minutes=minutes)
        await dispatcher.run_pass(clock.now)
    assert email.outbox == [] and mail.outbox == []
    touch = store.get_touch(claim.touch_id)
    assert touch is not None and touch.status == TouchStatus.UNKNOWN


async def test_a_letter_to_a_lead_without_an_address_goes_by_email_where_configured(
    tmp_path: Path, store: Store
) -> None:
    from campaignd.directmail import DirectMailChannel

    sequences = '[sequences.cold]\nsteps = [{ template = "cold/02-postcard", channel = "mail" }]\n'
    settings = make_settings(tmp_path, sequences=sequences, extra='[print]\nwithout_address = "email"\n')
    renderer, signer = prepare(settings)
    email = MemoryChannel()
    dispatcher = Dispatcher(
        store=store,
        settings=settings,
        renderer=renderer,
        signer=signer,
        channels={"email": email, "mail": DirectMailChannel(settings=settings.print)},
        worker="test:1",
        clock=Clock(T0),
    )
    add_leads(store, "postal@example.com")  # a complete US address
    store.upsert_leads([LeadInput(email="nowhere@example.com", first_name="Nora")], tier="cold", now=T0)
    report = await dispatcher.run_pass(T0)
    assert report.for_print == 1 and report.sent == 1
    [message] = email.outbox
    assert message.recipient == "nowhere@example.com"
    assert parsed(message)["X-Campaignd-Step"] == "cold/02-postcard"
    [touch] = store.touches_for(store.get_lead("nowhere@example.com").id)
    assert (touch.status, touch.channel) == (TouchStatus.SENT, "email")
    assert store.get_lead("nowhere@example.com").touch_count == 1
    [letter] = store.touches_for(store.get_lead("postal@example.com").id)
    assert (letter.status, letter.channel) == (TouchStatus.PENDING, "mail")


async def test_a_step_cancelled_by_a_pause_is_sent_exactly_once_after_resume(
    tmp_path: Path, store: Store
) -> None:
    clock = Clock(T0)
    answers = iter([Outcome.TEMPORARY, Outcome.SENT])
    channel = MemoryChannel(answer=lambda _m: next(answers))
    dispatcher, email, _ = make_dispatcher(tmp_path, store, clock, email=channel)
    add_leads(store, "ann@example.com")
    lead_id = store.get_lead("ann@example.com").id

    await dispatcher.run_pass(T0)
    [touch] = store.touches_for(lead_id)
    assert touch.status == TouchStatus.RETRY and touch.attempts == 1

    # Paused while its first step waits for a retry: the step is cancelled, nothing leaves.
    store.set_status("ann@example.com", LeadStatus.PAUSED, now=T0 + timedelta(seconds=30))
    assert store.touches_for(lead_id)[0].status == TouchStatus.CANCELLED
    clock.now = T0 + timedelta(hours=2)
    await dispatcher.run_pass(clock.now)
    assert email.outbox == []

    # Resumed: the same step is planned again, sent once, and the drip goes on from there.
    store.set_status("ann@example.com", LeadStatus.ACTIVE, now=clock.now)
    await dispatcher.run_pass(clock.now)
    await dispatcher.run_pass(clock.now + timedelta(seconds=1))
    assert [parsed(m)["X-Campaignd-Step"] for m in email.outbox] == ["cold/01-intro"]
    [touch] = store.touches_for(lead_id)
    assert touch.status == TouchStatus.SENT and touch.attempts == 1
    assert store.get_lead("ann@example.com").touch_count == 1


async def test_held_touches_settled_by_hand_release_the_drip_without_a_resend(
    tmp_path: Path, store: Store
) -> None:
    clock = Clock(T0)
    dispatcher, email, mail = make_dispatcher(tmp_path, store, clock, threshold=2)
    add_leads(store, "ann@example.com", "bob@example.com")
    claimed = store.claim(policy=dispatcher.policy, now=T0, limit=10, worker="dead:1")
    ids = [c.touch_id for c in claimed.claims]
    assert store.mark_sending(ids, worker="dead:1", now=T0, lease=timedelta(minutes=5))
    store.recover_in_flight(now=T0, exclusive=True)  # both intros became unknown
    ann, bob = (store.get_lead(e) for e in ("ann@example.com", "bob@example.com"))
    [ann_touch] = store.touches_for(ann.id)
    [bob_touch] = store.touches_for(bob.id)

    # Ann's relay log shows her intro arrived; Bob's shows it did not, and it is not resent.
    later = T0 + timedelta(minutes=10)
    [sent] = store.settle_touches(
        [ann_touch.id], outcome="sent", note="relay log: 250 ok", policy=dispatcher.policy, now=later
    )
    [skipped] = store.settle_touches(
        [bob_touch.id], outcome="skipped", note="", policy=dispatcher.policy, now=later
    )
    assert (sent.status, sent.touch_count, skipped.status) == ("sent", 1, "skipped")
    assert (
        store.settle_touches([ann_touch.id], outcome="sent", note="", policy=dispatcher.policy, now=later)
        == []
    )
    assert store.get_lead("ann@example.com").touch_count == 1
    assert store.get_lead("bob@example.com").touch_count == 0
    assert store.get_touch(ann_touch.id).note == "settled by hand as sent: relay log: 250 ok"  # type: ignore[union-attr]

    # Both drips go on with the postcard; neither intro is sent again.
    clock.now = later + timedelta(hours=1)
    await dispatcher.run_pass(clock.now)
    assert email.outbox == []
    assert sorted(m.recipient for m in mail.outbox) == ["ann@example.com", "bob@example.com"]
    # Ann's second touch reaches the threshold of 2: the settled intro counted.
    assert store.get_lead("ann@example.com").status == LeadStatus.FLAGGED
    assert store.get_lead("bob@example.com").status == LeadStatus.ACTIVE


def test_recording_at_once_gives_up_on_a_locked_database_and_changes_nothing(
    tmp_path: Path, store: Store, db_url: str
) -> None:
    add_leads(store, "ann@example.com")
    settings = make_settings(tmp_path, db_url="")
    policy = Policy.from_settings(settings)
    claimed = store.claim(policy=policy, now=T0, limit=10, worker="w").claims
    touch = claimed[0].touch_id
    args = {
        "worker": "w",
        "policy": policy,
        "now": T0,
        "lease": timedelta(minutes=5),
        "max_attempts": 3,
        "backoff": timedelta(minutes=1),
        "backoff_max": timedelta(hours=1),
    }
    if store.is_postgres:
        # Every statement waits for the server there: always in a thread.
        assert store.advance([], [touch], **args, wait=False) is None
        return
    other = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    started = time.monotonic()
    assert store.advance([], [touch], **args, wait=False) is None
    assert time.monotonic() - started < 1  # not the 10 s busy timeout
    assert store.get_touch(touch).status == "claimed"  # type: ignore[union-attr]
    # The connection waits for the lock again afterwards: a writer that lets go within
    # the busy timeout only delays the transaction.
    threading.Timer(0.5, other.rollback).start()
    started = time.monotonic()
    assert store.advance([], [touch], **args) == ([], {touch})
    assert time.monotonic() - started >= 0.4
    other.close()
    recorded, marked = store.advance([Result(touch, "sent", "250 ok")], [], **args, wait=False)  # type: ignore[misc]
    assert [r.status for r in recorded] == ["sent"] and marked == set()
