"""The dispatcher against a real SMTP server that misbehaves, on SQLite and PostgreSQL.

Each fault must end with the right statuses — retried with backoff, failed and
suppressed, unknown, or sent — with nothing lost and nothing sent twice. The dispatcher's
clock is a variable the test moves; the relay is real.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from campaignd.config import Smtp
from campaignd.daemon import prepare
from campaignd.engine import Dispatcher
from campaignd.mailer import SmtpChannel
from campaignd.models import LeadStatus, TouchStatus
from campaignd.store import LeadInput, Store
from campaignd.testing import MemoryChannel
from tests.factories import make_settings
from tests.smtp import SmtpServer

T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
ONE_STEP = '[sequences.cold]\nsteps = [{ template = "cold/01-intro" }]\n'
LEADS = [f"lead{n}@example.com" for n in range(12)]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=[True, False], ids=["pipelining", "one-command-at-a-time"])
def smtpd(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """The relay, once offering PIPELINING (MAIL, RCPT and DATA go together) and once not."""
    with SmtpServer(pipelining=request.param) as server:
        yield server


def setup(tmp_path: Path, store: Store, smtpd: SmtpServer, clock: Clock, **smtp: object) -> Dispatcher:
    settings = make_settings(tmp_path, sequences=ONE_STEP)
    renderer, signer = prepare(settings)
    values: dict[str, object] = {"host": "127.0.0.1", "port": smtpd.port, "tls": "none", "timeout": "1s"}
    values.update(smtp)
    store.upsert_leads([LeadInput(email=e) for e in LEADS], tier="cold", now=T0)
    return Dispatcher(
        store=store,
        settings=settings,
        renderer=renderer,
        signer=signer,
        channels={"email": SmtpChannel(settings=Smtp.model_validate(values)), "mail": MemoryChannel()},
        worker="test:1",
        clock=clock,
    )


async def run_for(dispatcher: Dispatcher, clock: Clock, span: timedelta, step: timedelta) -> None:
    end = clock.now + span
    while clock.now <= end:
        await dispatcher.run_pass(clock.now)
        clock.now += step


def statuses(store: Store) -> dict[str, str]:
    out = {}
    for email in LEADS:
        touches = store.touches_for(store.get_lead(email).id)
        assert len(touches) <= 1
        out[email] = touches[0].status if touches else "none"
    return out


def assert_nothing_twice(smtpd: SmtpServer) -> None:
    counts = Counter(r.recipients[0] for r in smtpd.received)
    assert [e for e, n in counts.items() if n > 1] == []


async def test_a_relay_down_at_start_costs_no_attempt_and_all_goes_out_when_it_is_back(
    tmp_path: Path, store: Store, smtpd: SmtpServer
) -> None:
    clock = Clock(T0)
    dispatcher = setup(tmp_path, store, smtpd, clock)
    smtpd.stop()
    report = await dispatcher.run_pass(clock.now)
    # Each connection tried once; the rest of the batch was given back untried.
    assert report.sent == 0 and 1 <= report.deferred <= 4
    assert report.deferred + report.released == len(LEADS)
    assert set(statuses(store).values()) == {"retry", "claimed"}
    # Still down a while later: backed off again, still no attempt spent.
    clock.now += timedelta(seconds=6)
    await dispatcher.run_pass(clock.now)
    smtpd.start()
    await run_for(dispatcher, clock, timedelta(minutes=2), timedelta(seconds=5))
    assert set(statuses(store).values()) == {"sent"}
    assert sorted(r.recipients[0] for r in smtpd.received) == sorted(LEADS)
    for email in LEADS:
        [touch] = store.touches_for(store.get_lead(email).id)
        assert touch.attempts == 1  # the outage cost nothing


async def test_a_link_dropped_mid_batch_is_retried_and_nothing_is_doubled(
    tmp_path: Path, store: Store, smtpd: SmtpServer
) -> None:
    clock = Clock(T0)
    dispatcher = setup(tmp_path, store, smtpd, clock, connections=1)
    smtpd.faults.next_rcpt.extend(["250 OK"] * 4 + ["drop"] + ["250 OK"] * 2 + ["drop"])
    report = await dispatcher.run_pass(clock.now)
    # The message had not left when the link dropped: it goes again on a new connection.
    assert report.sent == len(LEADS) and report.retried == 0
    assert smtpd.connections == 3
    assert set(statuses(store).values()) == {"sent"}
    assert_nothing_twice(smtpd)
    assert len(smtpd.received) == len(LEADS)


async def test_421_and_451_for_a_while_then_recovery(tmp_path: Path, store: Store, smtpd: SmtpServer) -> None:
    clock = Clock(T0)
    dispatcher = setup(tmp_path, store, smtpd, clock)
    smtpd.faults.next_mail.append("421 4.3.2 system going down")
    smtpd.faults.next_rcpt.extend(["451 4.3.0 try again later"] * 5)
    await dispatcher.run_pass(clock.now)
    retried = [e for e, s in statuses(store).items() if s == "retry"]
    assert len(retried) == 6
    for email in retried:
        [touch] = store.touches_for(store.get_lead(email).id)
        assert touch.next_attempt_at == T0 + timedelta(minutes=1)  # the configured backoff
    # not before the backoff
    clock.now += timedelta(seconds=30)
    await dispatcher.run_pass(clock.now)
    assert len([s for s in statuses(store).values() if s == "retry"]) == 6
    await run_for(dispatcher, clock, timedelta(minutes=3), timedelta(seconds=30))
    assert set(statuses(store).values()) == {"sent"}
    assert_nothing_twice(smtpd)
    for email in retried:
        [touch] = store.touches_for(store.get_lead(email).id)
        assert touch.attempts == 2


async def test_550_for_one_recipient_fails_and_suppresses_it(
    tmp_path: Path, store: Store, smtpd: SmtpServer
) -> None:
    clock = Clock(T0)
    dispatcher = setup(tmp_path, store, smtpd, clock)
    smtpd.faults.rcpt["lead3@example.com"] = "550 5.1.1 user unknown"
    await run_for(dispatcher, clock, timedelta(minutes=5), timedelta(minutes=1))
    result = statuses(store)
    assert result.pop("lead3@example.com") == "failed"
    assert set(result.values()) == {"sent"}
    assert store.is_suppressed("lead3@example.com")
    assert store.get_lead("lead3@example.com").status == LeadStatus.BOUNCED
    assert smtpd.rcpt_attempts.count("lead3@example.com") == 1  # a hard bounce is never retried


async def test_452_is_retried_then_sent(tmp_path: Path, store: Store, smtpd: SmtpServer) -> None:
    clock = Clock(T0)
    dispatcher = setup(tmp_path, store, smtpd, clock)
    smtpd.faults.next_rcpt.extend(["452 4.5.3 too many recipients"] * 3)
    await run_for(dispatcher, clock, timedelta(minutes=3), timedelta(seconds=20))
    assert set(statuses(store).values()) == {"sent"}
    assert_nothing_twice(smtpd)


async def test_a_stall_past_the_timeout_is_unknown_and_never_resent(
    tmp_path: Path, store: Store, smtpd: SmtpServer
) -> None:
    clock = Clock(T0)
    dispatcher = setup(tmp_path, store, smtpd, clock, connections=1)
    smtpd.faults.stall_data = 2.5
    smtpd.faults.drop_after_data = 0
    first = await dispatcher.run_pass(clock.now)
    smtpd.faults.stall_data = 0
    # Only the message on the wire is ambiguous; the channel backs off for the rest.
    assert first.unknown == 1 and first.released == len(LEADS) - 1
    await run_for(dispatcher, clock, timedelta(days=2), timedelta(hours=6))
    result = statuses(store)
    unknown = [e for e, s in result.items() if s == TouchStatus.UNKNOWN]
    assert len(unknown) == first.unknown
    assert {s for e, s in result.items() if e not in unknown} == {"sent"}
    assert_nothing_twice(smtpd)
    # the relay got the stalled message too; the operator decides after checking
    assert sorted(r.recipients[0] for r in smtpd.received) == sorted(LEADS)
    assert store.status_report(now=clock.now).unknown[0][1] == unknown[0]
