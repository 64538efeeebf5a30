"""The unsubscribe endpoint in-process: a real aiohttp server and client, the real databases.

What the daemon-level tests cannot reach cheaply lives here: every kind of forged token,
size limits, the rate limit and trusted proxies, database failures, key rotation on
reload, moving the endpoint, and the store queries behind it on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from campaignd.config import Settings, load_settings
from campaignd.database import create_engine, upgrade
from campaignd.exceptions import CampaigndError
from campaignd.models import LeadStatus, SuppressionReason, TouchStatus
from campaignd.services import ServiceContext, build_services
from campaignd.store import LeadInput, LeadRecord, Store
from campaignd.store.base import touches_t
from campaignd.store.optout import OptOut, OptOutQueries
from campaignd.unsubscribe import Signer, make_token
from campaignd.web import (
    Batcher,
    RateLimiter,
    UnsubscribeEndpoint,
    client_address,
    mask_address,
    probe_listen,
    rate_key,
    request_source,
)
from tests.factories import write_config

KEY = "test-signing-key-0123456789-abcdefghijklmnopq"
OLD_KEY = "old-signing-key-0123456789-abcdefghijklmnopqr"
OTHER_KEY = "someone-elses-key-0123456789-abcdefghijklmno"
NOW = datetime(2025, 3, 3, 15, 0, tzinfo=UTC)
MARIA = LeadInput(
    email="maria.gonzalez@lakeview-dental.example",
    first_name="Maria",
    last_name="Gonzalez",
    company="Lakeview Dental",
)
TOM = LeadInput(email="tom.becker@becker-bakery.example", first_name="Tom", last_name="Becker")
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


def settings_for(tmp_path: Path, **unsubscribe: str) -> Settings:
    env = {"CAMPAIGND_UNSUBSCRIBE__SECRET_KEY": KEY, "CAMPAIGND_UNSUBSCRIBE__LISTEN": "127.0.0.1:0"}
    env |= {f"CAMPAIGND_UNSUBSCRIBE__{k.upper()}": v for k, v in unsubscribe.items()}
    return load_settings(write_config(tmp_path), environ=env, dotenv=None)


@dataclass
class Served:
    endpoint: UnsubscribeEndpoint
    http: aiohttp.ClientSession
    store: Store
    tmp_path: Path
    health: dict[str, Any] = field(default_factory=lambda: {"status": "ok"})

    @property
    def maria(self) -> LeadRecord:
        return self.store.get_lead(MARIA.email)

    @property
    def tom(self) -> LeadRecord:
        return self.store.get_lead(TOM.email)

    def token(self, lead: LeadRecord, key: str = KEY) -> str:
        return make_token(key.encode(), lead.id, lead.email)

    def context(self, settings: Settings) -> ServiceContext:
        return ServiceContext(
            settings=settings,
            store=self.store,
            scheduler=None,
            channels={},
            clock=lambda: NOW,
            health=lambda: dict(self.health),
        )

    async def reload(self, **unsubscribe: str) -> None:
        await self.endpoint.reload(self.context(settings_for(self.tmp_path, **unsubscribe)))


async def serve(tmp_path: Path, store: Store, **unsubscribe: str) -> tuple[Served, aiohttp.ClientSession]:
    store.upsert_leads([MARIA, TOM], tier="cold", now=NOW)
    endpoint = UnsubscribeEndpoint(write_retry=0.2)
    served = Served(endpoint, None, store, tmp_path)  # type: ignore[arg-type]
    await endpoint.start(served.context(settings_for(tmp_path, **unsubscribe)))
    assert endpoint.address is not None
    http = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{endpoint.address[1]}")
    served.http = http
    return served, http


@pytest.fixture
async def served(tmp_path: Path, store: Store) -> AsyncIterator[Served]:
    srv, http = await serve(tmp_path, store)
    try:
        yield srv
    finally:
        await http.close()
        await srv.endpoint.stop()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    """For tests that hold SQLite's single write lock to make a request wait."""
    engine = create_engine(f"sqlite:///{tmp_path / 'locked.db'}")
    upgrade(engine)
    yield Store(engine=engine)
    engine.dispose()


def nothing_changed(store: Store) -> None:
    assert store.suppressions() == []
    for email in (MARIA.email, TOM.email):
        lead = store.get_lead(email)
        assert lead.status == "active"
        assert store.events_for(lead.id) == []


# -- the two verbs ----------------------------------------------------------------------------------


async def test_get_shows_a_confirmation_page_and_unsubscribes_nothing(served: Served) -> None:
    for method in ("GET", "HEAD"):
        async with served.http.request(method, f"/u/{served.token(served.maria)}") as r:
            assert r.status == 200
            assert r.content_type == "text/html"
            body = await r.text()
    async with served.http.get(f"/u/{served.token(served.maria)}") as r:
        body = await r.text()
    assert '<form method="post">' in body and "<button" in body
    assert "m***@l***.example" in body
    # no lead data beyond the masked address
    for secret in (MARIA.email, "Maria", "Gonzalez", "Lakeview", "maria"):
        assert secret not in body
    assert "Harbor Home Services" in body
    nothing_changed(served.store)
    assert r.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Server"] == "campaignd"


async def test_one_click_post_unsubscribes_at_once(served: Served) -> None:
    maria = served.maria
    async with served.http.post(f"/u/{served.token(maria)}", data=ONE_CLICK) as r:
        assert r.status == 200
        assert "You are unsubscribed" in await r.text()
    lead = served.maria
    assert lead.status == "unsubscribed" and lead.next_due_at is None
    [suppression] = served.store.suppressions()
    assert suppression.email == MARIA.email
    assert suppression.reason == SuppressionReason.UNSUBSCRIBED
    assert suppression.detail == "one-click (List-Unsubscribe-Post)"
    assert suppression.created_at == NOW
    assert [(e.kind, e.at) for e in served.store.events_for(maria.id)] == [("unsubscribed", NOW)]
    assert served.tom.status == "active"
    assert served.endpoint.stats.unsubscribed == 1

    # a provider retrying, or a second click: the same answer, nothing recorded twice
    async with served.http.post(f"/u/{served.token(maria)}", data=ONE_CLICK) as r:
        assert r.status == 200
    assert len(served.store.events_for(maria.id)) == 1
    assert served.endpoint.stats.already == 1
    # counted once in the totals of the digest that covers it
    digest = served.store.read_digest(start=NOW - timedelta(days=1), end=NOW + timedelta(minutes=1))
    assert digest.totals.unsubscribed == 1
    async with served.http.get(f"/u/{served.token(maria)}") as r:
        body = await r.text()
    assert "is unsubscribed" in body and "<form" not in body


async def test_one_click_as_multipart_and_the_page_button_are_told_apart(served: Served) -> None:
    with aiohttp.MultipartWriter("form-data") as mp:
        part = mp.append("One-Click")
        part.set_content_disposition("form-data", name="List-Unsubscribe")
        async with served.http.post(f"/u/{served.token(served.maria)}", data=mp) as r:
            assert r.status == 200
    page_form = {"List-Unsubscribe": "One-Click", "source": "page"}
    async with served.http.post(f"/u/{served.token(served.tom)}", data=page_form) as r:
        assert r.status == 200
    details = {s.email: s.detail for s in served.store.suppressions()}
    assert details == {MARIA.email: "one-click (List-Unsubscribe-Post)", TOM.email: "unsubscribe page"}


async def test_the_base_url_path_is_served_too_and_a_trailing_slash_or_full_stop_is_fine(
    served: Served,
) -> None:
    # tests.factories sets base_url = https://harborhome.example/campaignd
    async with served.http.post(f"/campaignd/u/{served.token(served.maria)}/", data=ONE_CLICK) as r:
        assert r.status == 200
    assert served.maria.status == "unsubscribed"
    # as a plain-text mail client may link "…/u/<token>." at the end of a sentence
    async with served.http.get(f"/u/{served.token(served.tom)}.") as r:
        assert r.status == 200 and "<form" in await r.text()


async def test_the_unsubscribe_cancels_every_step_not_yet_leaving(served: Served) -> None:
    maria = served.maria
    statuses = ["claimed", "retry", "pending", "sending", "queued", "sent"]
    with served.store.engine.begin() as conn:
        for i, status in enumerate(statuses):
            conn.execute(
                sa.insert(touches_t).values(
                    lead_id=maria.id,
                    tier="cold",
                    step=f"s{i}",
                    channel="mail" if status in ("pending", "queued") else "email",
                    status=status,
                    created_at=NOW,
                    updated_at=NOW,
                )
            )
    async with served.http.post(f"/u/{served.token(maria)}", data=ONE_CLICK) as r:
        assert r.status == 200
    after = {t.step: t.status for t in served.store.touches_for(maria.id)}
    assert after == {
        "s0": "cancelled",
        "s1": "cancelled",
        "s2": "cancelled",  # direct mail not yet exported
        "s3": "sending",  # on the wire: cannot be recalled
        "s4": "queued",  # already at the print shop
        "s5": "sent",
    }


# -- forged tokens ------------------------------------------------------------------------------------


def forgeries(served: Served) -> dict[str, str]:
    maria, tom = served.maria, served.tom
    good = served.token(maria)
    lead_id, sig = good.split(".")
    flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    return {
        "truncated": good[:-1],
        "no signature": f"{lead_id}.",
        "only the id": lead_id,
        "extended": good + "A",
        "altered": f"{lead_id}.{flipped}",
        "other lead": f"{tom.id}.{sig}",
        "leading zero": f"0{good}",
        "another key": served.token(maria, OTHER_KEY),
        "another address": make_token(KEY.encode(), maria.id, "someone@else.example"),
        "unknown lead": make_token(KEY.encode(), 999_999, maria.email),
        "non-ascii": f"{lead_id}.{sig[:-1]}é",
        "percent-encoded": f"{lead_id}.{sig[:-1]}%C3%A9",
        "garbage": "hello",
        "sql": "1;DROP TABLE leads",
        "huge id": f"{'9' * 40}.{sig}",
    }


async def test_forged_tokens_are_refused_and_change_nothing(served: Served) -> None:
    for name, token in forgeries(served).items():
        for method in ("GET", "POST"):
            async with served.http.request(method, f"/u/{token}", data=ONE_CLICK) as r:
                body = await r.text()
                assert 400 <= r.status < 500, (name, method, r.status)
                assert "Traceback" not in body and "sqlalchemy" not in body.lower(), name
    nothing_changed(served.store)
    assert served.endpoint.stats.unsubscribed == 0


async def test_a_refused_link_says_how_else_to_opt_out(served: Served) -> None:
    async with served.http.get(f"/u/{served.token(served.maria, OTHER_KEY)}") as r:
        assert r.status == 404
        body = await r.text()
    assert "This link is not valid" in body
    assert "mailto:unsubscribe@harborhome.example" in body


async def test_signed_for_an_address_the_lead_no_longer_has_is_refused(served: Served) -> None:
    # As after a restore from backup: the id now belongs to someone else.
    maria = served.maria
    stale = make_token(KEY.encode(), maria.id, "previous.owner@example.com")
    async with served.http.post(f"/u/{stale}", data=ONE_CLICK) as r:
        assert r.status == 404
    nothing_changed(served.store)


# -- keys -----------------------------------------------------------------------------------------


async def test_rotation_accepts_the_previous_key_until_it_is_dropped(served: Served) -> None:
    maria, tom = served.maria, served.tom
    old_maria, old_tom = served.token(maria), served.token(tom)  # signed with KEY
    await served.reload(secret_key=OLD_KEY, previous_secret_key=KEY)
    async with served.http.post(f"/u/{old_maria}", data=ONE_CLICK) as r:
        assert r.status == 200
    async with served.http.get(f"/u/{served.token(tom, OLD_KEY)}") as r:
        assert r.status == 200
    await served.reload(secret_key=OLD_KEY)
    async with served.http.post(f"/u/{old_tom}", data=ONE_CLICK) as r:
        assert r.status == 404
    assert served.tom.status == "active"
    assert served.maria.status == "unsubscribed"


# -- hardening --------------------------------------------------------------------------------------


async def test_request_size_limits(served: Served) -> None:
    token = served.token(served.maria)
    async with served.http.post(f"/u/{token}", data="x" * (17 * 1024)) as r:
        assert r.status == 413
        assert "Traceback" not in await r.text()
    async with served.http.get("/u/" + "9" * 5000) as r:
        assert 400 <= r.status < 500
    async with served.http.get(f"/u/{token}", headers={"X-Filler": "y" * 9000}) as r:
        assert 400 <= r.status < 500
    nothing_changed(served.store)


async def test_other_paths_and_methods(served: Served) -> None:
    token = served.token(served.maria)
    async with served.http.put(f"/u/{token}") as r:
        assert r.status == 405
        assert r.headers["Allow"] == "GET, HEAD, POST"
    async with served.http.delete(f"/u/{token}") as r:
        assert r.status == 405
    async with served.http.get("/admin") as r:
        assert r.status == 404
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    async with served.http.get("/u/a/b") as r:
        assert r.status == 404
    async with served.http.get("/robots.txt") as r:
        assert r.status == 200 and "Disallow: /" in await r.text()
    nothing_changed(served.store)


async def test_rate_limit_per_client_with_forwarded_for_only_from_trusted_proxies(
    tmp_path: Path, store: Store
) -> None:
    srv, http = await serve(tmp_path, store, rate_limit="5")
    try:
        token = srv.token(srv.maria)
        for _ in range(5):
            async with http.get(f"/u/{token}") as r:
                assert r.status == 200
        async with http.post(f"/u/{token}", data=ONE_CLICK) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) >= 1
        assert srv.maria.status == "active"  # a refused request changes nothing
        # Behind the (trusted, loopback) proxy each client has its own allowance.
        async with http.post(f"/u/{token}", data=ONE_CLICK, headers={"X-Forwarded-For": "203.0.113.7"}) as r:
            assert r.status == 200
        assert srv.maria.status == "unsubscribed"

        # Not trusted: X-Forwarded-For is the client's own word and is ignored.
        # (a new limit starts every client afresh)
        await srv.reload(rate_limit="4", trusted_proxies="[]")
        for i in range(4):
            async with http.get("/robots.txt", headers={"X-Forwarded-For": f"198.51.100.{i}"}) as r:
                assert r.status == 200
        async with http.get("/robots.txt", headers={"X-Forwarded-For": "198.51.100.99"}) as r:
            assert r.status == 429
        assert srv.endpoint.stats.limited == 2
    finally:
        await http.close()
        await srv.endpoint.stop()


async def test_forged_tokens_use_up_the_allowance_faster(tmp_path: Path, store: Store) -> None:
    srv, http = await serve(tmp_path, store, rate_limit="20")
    try:
        forged = srv.token(srv.maria, OTHER_KEY)
        for _ in range(2):
            async with http.get(f"/u/{forged}") as r:
                assert r.status == 404
        async with http.get(f"/u/{srv.token(srv.maria)}") as r:
            assert r.status == 429
    finally:
        await http.close()
        await srv.endpoint.stop()


async def test_a_database_failure_answers_503_without_details_and_records_nothing(served: Served) -> None:
    token = served.token(served.maria)
    with served.store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE suppressions")
    for method in ("GET", "POST"):
        async with served.http.request(method, f"/u/{token}", data=ONE_CLICK) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "60"
            body = await r.text()
        assert "Please try again" in body
        for leak in ("Traceback", "sqlalchemy", "suppressions", "psycopg", "sqlite", "Error"):
            assert leak not in body
    assert served.maria.status == "active"
    assert served.endpoint.stats.failed == 2


async def test_health(served: Served) -> None:
    async with served.http.get("/health") as r:
        assert r.status == 200
        data = await r.json()
    assert data["status"] == "ok" and data["database"] == "ok"
    assert data["unsubscribe"]["unsubscribed"] == 0
    served.health["status"] = "stalled"
    async with served.http.get("/health") as r:
        assert r.status == 503
        assert (await r.json())["status"] == "stalled"


async def test_a_held_write_lock_delays_an_unsubscribe_but_loses_nothing_and_pages_keep_answering(
    tmp_path: Path, sqlite_store: Store
) -> None:
    store = sqlite_store
    srv, http = await serve(tmp_path, store)
    token = srv.token(srv.maria)  # read before the lock is taken
    held = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with store.engine.begin() as conn:  # BEGIN IMMEDIATE: the write lock
            held.set()
            release.wait(10)
            conn.exec_driver_sql("SELECT 1")

    locker = threading.Thread(target=hold_lock)
    locker.start()
    try:
        assert held.wait(5)
        post = asyncio.create_task(http.post(f"/u/{token}", data=ONE_CLICK))
        await asyncio.sleep(0.3)
        assert not post.done()
        started = asyncio.get_running_loop().time()
        async with http.get("/robots.txt") as r:
            assert r.status == 200
        assert asyncio.get_running_loop().time() - started < 0.5
        release.set()
        async with await post as r:
            assert r.status == 200
        assert srv.maria.status == "unsubscribed"
    finally:
        release.set()
        locker.join(10)
        await http.close()
        await srv.endpoint.stop()


async def test_stop_waits_for_an_unsubscribe_in_progress(tmp_path: Path, sqlite_store: Store) -> None:
    store = sqlite_store
    srv, http = await serve(tmp_path, store)
    token = srv.token(srv.maria)  # read before the lock is taken
    held, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with store.engine.begin():
            held.set()
            release.wait(10)

    locker = threading.Thread(target=hold_lock)
    locker.start()
    try:
        assert held.wait(5)
        post = asyncio.create_task(http.post(f"/u/{token}", data=ONE_CLICK))
        await asyncio.sleep(0.3)
        stopping = asyncio.create_task(srv.endpoint.stop())
        await asyncio.sleep(0.3)
        release.set()
        async with await post as r:
            assert r.status == 200
        await stopping
        assert srv.maria.status == "unsubscribed"
    finally:
        release.set()
        locker.join(10)
        await http.close()


# -- the service's life -----------------------------------------------------------------------------


async def test_a_taken_port_stops_the_start_with_a_clear_message(tmp_path: Path, store: Store) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        endpoint = UnsubscribeEndpoint()
        ctx = Served(endpoint, None, store, tmp_path).context(  # type: ignore[arg-type]
            settings_for(tmp_path, listen=f"127.0.0.1:{port}")
        )
        with pytest.raises(CampaigndError) as caught:
            await endpoint.start(ctx)
        await endpoint.stop()
    message = str(caught.value)
    assert f"cannot listen on 127.0.0.1:{port}" in message
    assert "in use" in message and "[unsubscribe] listen" in message


async def test_empty_listen_serves_nothing_until_a_reload_sets_it_and_a_reload_can_move_it(
    tmp_path: Path, store: Store
) -> None:
    store.upsert_leads([MARIA], tier="cold", now=NOW)
    endpoint = UnsubscribeEndpoint()
    srv = Served(endpoint, None, store, tmp_path)  # type: ignore[arg-type]
    await endpoint.start(srv.context(settings_for(tmp_path, listen="")))
    assert endpoint.address is None
    try:
        await srv.reload(listen="127.0.0.1:0")
        assert endpoint.address is not None
        first = endpoint.address[1]
        # A new connection for every request: keep-alive ones outlive a move.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            async with http.get(f"http://127.0.0.1:{first}/robots.txt") as r:
                assert r.status == 200
            with socket.create_server(("127.0.0.1", 0)) as probe:
                free = probe.getsockname()[1]
            await srv.reload(listen=f"127.0.0.1:{free}")
            second = endpoint.address[1]
            assert second == free != first
            async with http.get(f"http://127.0.0.1:{second}/robots.txt") as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.get(f"http://127.0.0.1:{first}/robots.txt")
            # a new address that cannot be bound: the old one keeps serving
            with socket.create_server(("127.0.0.1", 0)) as taken:
                await srv.reload(listen=f"127.0.0.1:{taken.getsockname()[1]}")
            assert endpoint.address[1] == second
            await srv.reload(listen="")
            assert endpoint.address is None
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.get(f"http://127.0.0.1:{second}/robots.txt")
    finally:
        await endpoint.stop()


def test_the_daemon_registers_the_endpoint(tmp_path: Path) -> None:
    services = build_services(settings_for(tmp_path))
    assert [s.name for s in services][:1] == ["unsubscribe endpoint"]


async def test_probe_listen_for_doctor(served: Served) -> None:
    assert served.endpoint.address is not None
    ok, detail = await asyncio.to_thread(probe_listen, f"127.0.0.1:{served.endpoint.address[1]}")
    assert ok and "served by the running campaignd" in detail
    with socket.create_server(("127.0.0.1", 0)) as taken:
        ok, detail = probe_listen(f"127.0.0.1:{taken.getsockname()[1]}", timeout=0.5)
    assert not ok and "cannot listen" in detail
    with socket.create_server(("127.0.0.1", 0)) as free:
        port = free.getsockname()[1]
    ok, detail = probe_listen(f"127.0.0.1:{port}")
    assert ok and "is free" in detail


# -- the queries, on both databases -------------------------------------------------------------------


def test_record_optouts_once_per_address_and_a_re_import_does_not_resubscribe(store: Store) -> None:
    store.upsert_leads([MARIA, TOM], tier="cold", now=NOW)
    maria = store.get_lead(MARIA.email)
    q = OptOutQueries(engine=store.engine)
    first = OptOut(maria.id, maria.email, NOW, "one-click (List-Unsubscribe-Post)")
    assert q.record_optouts([first, first]) == [True, False]
    assert [e.kind for e in store.events_for(maria.id)] == ["unsubscribed"]
    targets = q.optout_targets([maria.id, 999_999])
    assert list(targets) == [maria.id]
    assert targets[maria.id].suppressed and targets[maria.id].opted_out

    again = LeadInput(
        email="Maria.Gonzalez@Lakeview-Dental.example".lower(), first_name="María", phone="+1 2"
    )
    counts = store.upsert_leads([again], tier="warm", now=NOW)
    assert counts.updated == 1
    lead = store.get_lead(MARIA.email)
    assert lead.status == "unsubscribed" and lead.next_due_at is None and lead.tier == "cold"
    assert store.is_suppressed(MARIA.email)


def test_an_unsubscribe_does_not_turn_a_bounced_lead_into_an_unsubscribed_one(store: Store) -> None:
    store.upsert_leads([MARIA], tier="cold", now=NOW)
    maria = store.get_lead(MARIA.email)
    store.suppress(maria.email, reason=SuppressionReason.BOUNCED, detail="550 no such user", now=NOW)
    q = OptOutQueries(engine=store.engine)
    assert q.record_optouts([OptOut(maria.id, maria.email, NOW, "unsubscribe page")]) == [False]
    assert store.get_lead(MARIA.email).status == "bounced"
    assert [e.kind for e in store.events_for(maria.id)] == ["bounced"]


def test_a_lead_resumed_by_hand_after_its_suppression_was_removed_can_unsubscribe_again(store: Store) -> None:
    store.upsert_leads([MARIA], tier="cold", now=NOW)
    maria = store.get_lead(MARIA.email)
    q = OptOutQueries(engine=store.engine)
    assert q.record_optouts([OptOut(maria.id, maria.email, NOW, "unsubscribe page")]) == [True]
    store.unsuppress(maria.email, now=NOW, reason="asked to be contacted again, by phone")
    store.set_status(maria.email, LeadStatus.ACTIVE, now=NOW)
    assert q.record_optouts([OptOut(maria.id, maria.email, NOW, "one-click (List-Unsubscribe-Post)")]) == [
        True
    ]
    assert store.get_lead(MARIA.email).status == "unsubscribed"
    kinds = [e.kind for e in store.events_for(maria.id)]
    assert kinds.count("unsubscribed") == 2


def test_cancelled_work_is_reported_with_its_reason(store: Store) -> None:
    store.upsert_leads([MARIA], tier="cold", now=NOW)
    maria = store.get_lead(MARIA.email)
    with store.engine.begin() as conn:
        conn.execute(
            sa.insert(touches_t).values(
                lead_id=maria.id,
                tier="cold",
                step="s1",
                channel="email",
                status=TouchStatus.CLAIMED.value,
                created_at=NOW,
                updated_at=NOW,
            )
        )
    OptOutQueries(engine=store.engine).record_optouts(
        [OptOut(maria.id, maria.email, NOW, "unsubscribe page")]
    )
    [touch] = store.touches_for(maria.id)
    assert touch.status == "cancelled" and touch.error == "address unsubscribed"


# -- pure parts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("email", "masked"),
    [
        ("maria.gonzalez@lakeview-dental.example", "m***@l***.example"),
        ("a@b.co", "a***@b***.co"),
        ("x@localhost", "x***@l***"),
        ("tom@mail.becker.de", "t***@m***.de"),
    ],
)
def test_mask_address(email: str, masked: str) -> None:
    assert mask_address(email) == masked


TRUSTED = [ipaddress.ip_network(n) for n in ("127.0.0.1/32", "::1/128", "10.0.0.0/8")]


@pytest.mark.parametrize(
    ("peer", "xff", "client"),
    [
        ("203.0.113.5", [], "203.0.113.5"),
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # untrusted peer: header ignored
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("127.0.0.1", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # the client's own words are ignored
        ("127.0.0.1", ["198.51.100.1, 10.1.2.3"], "198.51.100.1"),  # through two proxies
        ("127.0.0.1", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),  # two headers
        ("127.0.0.1", ["garbage, 10.1.2.3"], "10.1.2.3"),  # junk stops the walk at the last proxy
        ("127.0.0.1", ["10.9.9.9"], "10.9.9.9"),  # nothing but proxies: the farthest
        ("::1", ["2001:db8::7"], "2001:db8::7"),
        ("::ffff:127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        (None, ["198.51.100.1"], "unknown"),
    ],
)
def test_client_address(peer: str | None, xff: list[str], client: str) -> None:
    assert client_address(peer, xff, TRUSTED) == client


def test_rate_key_groups_ipv6_by_64() -> None:
    assert rate_key("2001:db8:1:2:3:4:5:6") == rate_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert rate_key("203.0.113.5") == "203.0.113.5"


def test_rate_limiter_refills_and_forgets_the_oldest_clients() -> None:
    limiter = RateLimiter(per_minute=60, max_clients=3)
    assert all(limiter.take("a", 0.0) == 0 for _ in range(60))
    wait = limiter.take("a", 0.0)
    assert wait == pytest.approx(1.0)
    assert limiter.take("a", 1.0) == 0  # one more a second later
    assert limiter.take("b", 1.0) == 0  # others are not affected
    limiter.charge("b", 1.0, 100)  # 59 left, 100 spent: 41 owed, 42 seconds to the next request
    assert limiter.take("b", 1.0) == pytest.approx(42.0)
    limiter.charge("b", 1.0, 10_000)  # never owes more than one full allowance
    assert limiter.take("b", 1.0) == pytest.approx(61.0)
    for client in ("c", "d", "e"):
        limiter.take(client, 2.0)
    assert len(limiter) == 3
    assert RateLimiter(per_minute=0).take("x", 0.0) == 0


@pytest.mark.parametrize(
    ("content_type", "body", "source"),
    [
        (
            "application/x-www-form-urlencoded",
            b"List-Unsubscribe=One-Click",
            "one-click (List-Unsubscribe-Post)",
        ),
        ("application/x-www-form-urlencoded", b"List-Unsubscribe=One-Click&source=page", "unsubscribe page"),
        (
            "multipart/form-data",
            b'name="List-Unsubscribe"\r\n\r\nOne-Click',
            "one-click (List-Unsubscribe-Post)",
        ),
        ("application/x-www-form-urlencoded", b"&" * 100, "unsubscribe link (POST)"),
        ("", b"", "unsubscribe link (POST)"),
    ],
)
def test_request_source(content_type: str, body: bytes, source: str) -> None:
    assert request_source(content_type, body) == source


def test_signer_links_and_endpoint_agree(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    signer = Signer(keys=[KEY.encode()], base_url=settings.unsubscribe.base_url, mailto="u@example.com")
    url = signer.links(7, "a@example.com").url
    assert url.startswith("https://harborhome.example/campaignd/u/7.")
    assert settings.unsubscribe.base_path == "/campaignd"


async def test_batcher_takes_a_burst_in_few_calls_and_gives_every_request_its_answer() -> None:
    calls: list[list[int]] = []

    def work(items: list[int]) -> list[int]:
        calls.append(items)
        return [i * 2 for i in items]

    batcher: Batcher[int, int] = Batcher(work, name="doubling", retry_for=0)
    answers = await asyncio.gather(*(batcher.submit(i) for i in range(1200)))
    assert answers == [i * 2 for i in range(1200)]
    assert 3 <= len(calls) < 10  # at most MAX_BATCH (500) a call
    assert max(len(c) for c in calls) == Batcher.MAX_BATCH


async def test_batcher_retries_then_gives_the_error_to_every_waiter() -> None:
    attempts = 0

    def failing(items: list[int]) -> list[int]:
        nonlocal attempts
        attempts += 1
        raise sa.exc.OperationalError("UPDATE", {}, Exception("database is locked"))

    batcher: Batcher[int, int] = Batcher(failing, name="failing", retry_for=0.5)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, sa.exc.OperationalError) for r in results)
    assert attempts >= 2
