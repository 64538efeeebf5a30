"""The daemon: start-up checks, the ticker, signals, reload and a clean stop.

APScheduler (3.x, in-memory job store) is only the ticker: one ``dispatch`` job with a
fixed id, coalesced, one instance at a time. Everything a restart needs is in the
database. Start-up refuses to run with broken config or templates, or a database not at
the latest revision, before anything is sent.

Signals: SIGTERM/SIGINT stop claiming, finish or give back what is in flight within the
configured bound, and exit 0; SIGHUP reloads config and templates, keeping the old ones
when the new ones do not validate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from campaignd import database
from campaignd.channels import Channel
from campaignd.clock import utcnow
from campaignd.config import Channel as ChannelKind
from campaignd.config import Settings
from campaignd.engine import Dispatcher, PassReport, describe_error
from campaignd.exceptions import CampaigndError
from campaignd.render import LetterCheck, Renderer
from campaignd.sequences import Policy
from campaignd.services import Service, ServiceContext, build_services
from campaignd.store import Store
from campaignd.systemd import Notifier, watchdog_interval
from campaignd.unsubscribe import Signer, load_keys

logger = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def build_channels(settings: Settings) -> dict[str, Channel]:
    # Imported here so that commands which only check config need no network modules.
    from campaignd.directmail import DirectMailChannel
    from campaignd.mailer import SmtpChannel
    from campaignd.outbox import MaildirChannel

    email: Channel
    if settings.smtp.host:
        email = SmtpChannel(settings=settings.smtp)
    else:
        email = MaildirChannel(path=settings.outbox_dir)
    # Direct mail answers at once: the piece waits for the next print batch (see
    # campaignd.directmail), or the step is skipped for want of a postal address.
    return {"email": email, "mail": DirectMailChannel(settings=settings.print)}


def letter_checks(settings: Settings) -> list[LetterCheck]:
    """The print checks of direct-mail steps (page format, fonts, the address window)."""
    if not any(s.channel == ChannelKind.MAIL for seq in settings.sequences.values() for s in seq.steps):
        return []
    from campaignd.printing import PrintCheck

    today = utcnow().astimezone(ZoneInfo(settings.timezone)).date()
    return [PrintCheck(settings=settings, day=today)]


def prepare(settings: Settings, *, create_key: bool = True) -> tuple[Renderer, Signer]:
    """Validate templates against config; raises TemplateError with file and line."""
    signer = Signer(
        keys=load_keys(settings, create=create_key),
        base_url=settings.unsubscribe.base_url,
        mailto=settings.unsubscribe.mailto,
    )
    renderer = Renderer(settings=settings, letter_checks=letter_checks(settings))
    renderer.check_or_raise(sample_links=signer.links(0, "jane.sample@example.com"))
    if settings.digest.recipients:
        from campaignd.digest import check_templates
        from campaignd.digest_job import zone_of

        check_templates(settings.templates, sender=settings.sender, end=utcnow(), zone=zone_of(settings))
    return renderer, signer


class Daemon:
    """One campaignd daemon process.

    :param settings: the validated configuration.
    :param reload: builds fresh settings on SIGHUP (raises ConfigError when invalid).
    :param once: run dispatch passes until nothing is due now, then exit.
    :param duration: stop by itself after this long (demos, scripts).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        reload: Callable[[], Settings],
        once: bool = False,
        duration: timedelta | None = None,
        channels: dict[str, Channel] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.reload_settings = reload
        self.once = once
        self.duration = duration
        self.clock = clock
        self._channels = channels
        self.notifier = Notifier()
        self.stop_event = asyncio.Event()
        self.ticking = asyncio.Lock()
        self.last: PassReport | None = None
        self.totals = PassReport()
        self.services: list[Service] = []
        self._last_progress = time.monotonic()
        self._failures = 0
        self._retry_at = 0.0
        self._started: list[Service] = []

    def run(self) -> int:
        return asyncio.run(self.main())

    async def main(self) -> int:
        settings = self.settings
        renderer, signer = prepare(settings)
        engine = database.create_engine(
            settings.database_url, busy_timeout_s=settings.database.busy_timeout.total_seconds()
        )
        with ExitStack() as stack:
            stack.callback(engine.dispose)
            await asyncio.to_thread(database.require_head, engine)
            stack.enter_context(database.daemon_lock(settings.database_url))
            store = Store(engine=engine)
            exclusive = database.is_sqlite(settings.database_url)
            now = self.clock()
            orphans = await asyncio.to_thread(store.recover_in_flight, now=now, exclusive=exclusive)
            for touch in orphans:
                logger.error(
                    "touch %d (%s/%s) was being sent when campaignd stopped: marked unknown; "
                    "see 'campaignd status'",
                    touch.id,
                    touch.tier,
                    touch.step,
                )
            replanned = await asyncio.to_thread(
                store.replan_if_changed, Policy.from_settings(settings).fingerprint(), now=now
            )
            if replanned:
                logger.info("sequences changed: re-planning %d active leads", replanned)
            self.dispatcher = Dispatcher(
                store=store,
                settings=settings,
                renderer=renderer,
                signer=signer,
                channels=self._channels or build_channels(settings),
                worker=worker_name(),
                clock=self.clock,
                exclusive=exclusive,
            )
            self.store = store
            if self.once:
                await self.tick()
                logger.info("done: %s", self.totals.summary())
                return 0
            return await self._serve()
        return 0

    async def _serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        scheduler = AsyncIOScheduler(timezone=UTC)
        interval = self.settings.dispatch.interval.total_seconds()
        scheduler.add_job(
            self.tick,
            "interval",
            seconds=max(interval, 1),
            id="dispatch",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=max(int(interval), 1),
            next_run_time=datetime.now(UTC),
            replace_existing=True,
        )
        watchdog = watchdog_interval()
        if watchdog:
            scheduler.add_job(
                self._watchdog, "interval", seconds=watchdog, id="watchdog", coalesce=True, max_instances=1
            )
        self.scheduler = scheduler
        self._last_progress = time.monotonic()
        # Services start before the ticker: one that cannot start (a port taken) stops
        # the start-up before any dispatch pass has begun.
        self.services = build_services(self.settings)
        try:
            for service in self.services:
                await service.start(self._context())
                self._started.append(service)
        except BaseException:
            await self._stop_services()
            raise
        scheduler.start()
        logger.info(
            "campaignd started: %s, dispatch every %ss, email via %s",
            self._describe_db(),
            int(interval),
            self.dispatcher.channels["email"].name,
        )
        self.notifier.ready("started")
        try:
            if self.duration is not None:
                try:
                    await asyncio.wait_for(self.stop_event.wait(), self.duration.total_seconds())
                except TimeoutError:
                    logger.info("ran for %s: stopping", self.duration)
                    self.request_stop(None)
            await self.stop_event.wait()
        finally:
            self.notifier.stopping()
            scheduler.pause()
            self.dispatcher.stop()
            bound = self.settings.dispatch.stop_timeout.total_seconds()
            try:
                await asyncio.wait_for(self.ticking.acquire(), bound)
            except TimeoutError:
                logger.error(
                    "the dispatch pass did not finish within %ss; stopping anyway "
                    "(messages on the wire will show as unknown)",
                    bound,
                )
            scheduler.shutdown(wait=False)
            await self._stop_services()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        logger.info("campaignd stopped: %s", self.totals.summary())
        return 0

    def _context(self) -> ServiceContext:
        return ServiceContext(
            settings=self.settings,
            store=self.store,
            scheduler=self.scheduler,
            channels=self.dispatcher.channels,
            clock=self.clock,
            health=self.health,
        )

    def health(self) -> dict[str, Any]:
        """Whether the dispatch loop is alive, and what it did last."""
        interval = self.settings.dispatch.interval.total_seconds()
        idle = time.monotonic() - self._last_progress
        stalled = self.ticking.locked() and idle > max(interval * 3, 120)
        return {
            "status": "stalled" if stalled else "ok",
            "seconds_since_last_pass": round(idle, 1),
            "last_pass": self.last.summary() if self.last else None,
            "sent_since_start": self.totals.sent,
        }

    async def _stop_services(self) -> None:
        while self._started:
            service = self._started.pop()
            try:
                await service.stop()
            except Exception as exc:
                logger.error("stopping %s failed: %s", service.name, exc)

    def _describe_db(self) -> str:
        url = self.settings.database_url
        path = database.sqlite_path(url)
        return f"SQLite {path}" if path else "PostgreSQL"

    def request_stop(self, sig: signal.Signals | None) -> None:
        if sig is not None:
            logger.info("received %s: stopping", sig.name)
        self.stop_event.set()
        if hasattr(self, "dispatcher"):
            self.dispatcher.stop()

    def request_reload(self) -> None:
        logger.info("received SIGHUP: reloading configuration and templates")
        asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> bool:
        self.notifier.reloading()
        try:
            settings = self.reload_settings()
            renderer, signer = prepare(settings)
        except CampaigndError as exc:
            logger.error("reload failed, keeping the running configuration:\n%s", exc)
            self.notifier.ready("reload failed; running configuration kept")
            return False
        async with self.ticking:
            self.settings = settings
            self.dispatcher.reconfigure(settings=settings, renderer=renderer, signer=signer)
            n = await asyncio.to_thread(
                self.store.replan_if_changed, Policy.from_settings(settings).fingerprint(), now=self.clock()
            )
            for service in self._started:
                await service.reload(self._context())
        logger.info("reloaded%s", f"; re-planning {n} active leads" if n else "")
        self.notifier.ready("reloaded")
        return True

    async def tick(self) -> None:
        """One or more dispatch passes: keep going while full batches are due."""
        if self.ticking.locked() or time.monotonic() < self._retry_at:
            return
        async with self.ticking:
            batch = self.settings.dispatch.batch_size
            while not self.dispatcher.stopping.is_set():
                now = self.clock()
                try:
                    report = await self.dispatcher.run_pass(now)
                except asyncio.CancelledError:
                    # Shutdown gave up waiting for this pass; what it left is settled at
                    # the next start.
                    logger.warning("dispatch pass cut short by the shutdown")
                    return
                except Exception as exc:
                    self._failed(exc)
                    return
                if self._failures:
                    logger.info("dispatch works again after %d failed passes", self._failures)
                    self._failures = 0
                self._account(report)
                # A full batch (claimed or just re-planned) means more may be due now.
                if report.claimed + report.rescheduled < batch:
                    break

    def _failed(self, exc: Exception) -> None:
        """A pass could not run (the database refused): say so and back off, up to a minute."""
        self._failures += 1
        interval = self.settings.dispatch.interval.total_seconds()
        delay = min(interval * 2 ** (self._failures - 1), max(interval, 60.0))
        self._retry_at = time.monotonic() + delay
        message = describe_error(exc)
        logger.error(
            "dispatch pass failed (%d in a row), next try in %ds: %s",
            self._failures,
            delay,
            message,
            exc_info=logger.isEnabledFor(logging.DEBUG),
        )
        self.notifier.status(f"dispatch failing ({self._failures} in a row): {message[:120]}")

    def _account(self, report: PassReport) -> None:
        self.last = report
        self._last_progress = time.monotonic()
        t = self.totals
        for name in (
            "claimed",
            "sent",
            "retried",
            "failed",
            "bounced",
            "unknown",
            "skipped",
            "for_print",
            "released",
            "promoted",
            "flagged",
        ):
            setattr(t, name, getattr(t, name) + getattr(report, name))
        if report.claimed:
            logger.info("pass: %s", report.summary())
        self.notifier.status(
            f"last pass {report.summary()}; since start sent {t.sent}, failed {t.failed + t.bounced}, "
            f"flagged {t.flagged}"
        )
        self.notifier.watchdog()

    async def _watchdog(self) -> None:
        # Pings only while the dispatch loop makes progress: a hung loop gets restarted.
        interval = self.settings.dispatch.interval.total_seconds()
        stall = max(interval * 3, (watchdog_interval() or 0) * 2)
        if not self.ticking.locked() or time.monotonic() - self._last_progress < stall:
            self.notifier.watchdog()
