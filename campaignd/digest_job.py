"""The digest job: when the flagged-lead digest goes out, and sending each one exactly once.

Owns the schedule (an APScheduler 3 ``CronTrigger`` in the digest's time zone under the
fixed job id ``digest``, coalesced, one at a time), catching up the latest missed digest
once at start-up, trying a digest again when the relay was unavailable, settling digests
that were on the wire when campaignd stopped, and the one send path that the daemon and
``campaignd digest --send`` share.

Periods: consecutive scheduled digests cover ``(previous end, fire time]``, so each flag
lands in exactly one. The first scheduled digest starts at the beginning and lists every
lead still flagged; a digest that reached nobody leaves its period to the next one.
Everything that makes this hold across restarts is in the ``digest_runs`` table; the
scheduler only says when.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.triggers.cron import CronTrigger

from campaignd import database
from campaignd.channels import Channel, Outcome, Outgoing
from campaignd.config import Settings
from campaignd.digest import (
    Digest,
    DigestTemplates,
    attachment_for,
    build_message,
    describe_period,
    digest_message_id,
    human_time,
)
from campaignd.exceptions import TemplateError
from campaignd.schedules import previous_fire_time
from campaignd.services import ServiceContext
from campaignd.store import Store
from campaignd.store.digest import AttemptResult, Delivery, DigestRunRecord, RunStatus, address_of

logger = logging.getLogger(__name__)

JOB_ID = "digest"
CATCH_UP_JOB_ID = "digest-catch-up"
WAKEUP_JOB_ID = "digest-wakeup"

SETTLE = timedelta(seconds=3)
"""How long after its fire time a scheduled digest reads the flags: a flag stamped just
before the boundary may still be committing."""
LEASE = timedelta(minutes=10)
"""How long a digest being built or sent belongs to its sender before another daemon (or
the next start) may settle it: far more than a send to a few recipients takes."""

_DELIVERY = {
    Outcome.SENT: Delivery.SENT,
    Outcome.TEMPORARY: Delivery.RETRY,
    Outcome.UNAVAILABLE: Delivery.RETRY,
    Outcome.UNKNOWN: Delivery.UNKNOWN,
}


def zone_of(settings: Settings) -> str:
    """The digest's time zone: its own, else the business's."""
    return settings.digest.timezone or settings.timezone


def trigger_for(settings: Settings) -> CronTrigger:
    return CronTrigger(**settings.digest.cron_fields(settings.digest.schedule), timezone=zone_of(settings))


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt at a digest run did: the run as recorded after it, and the digest."""

    run: DigestRunRecord
    digest: Digest


class DigestSender:
    """Builds one recorded digest run, commits it as sending, sends it and records the answers.

    :param store: the database.
    :param settings: the configuration (sender, recipients' formatting, templates, retries).
    :param channel: the email channel (the SMTP relay, or the local outbox).
    :param clock: the wall clock; read at each step that records a time.
    """

    def __init__(
        self,
        *,
        store: Store,
        settings: Settings,
        channel: Channel,
        clock: Callable[[], datetime],
        templates: DigestTemplates | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.channel = channel
        self.clock = clock
        self.templates = templates or DigestTemplates(root=settings.templates)

    async def attempt(self, run: DigestRunRecord, *, send_empty: bool, max_attempts: int) -> Attempt:
        """Try to deliver ``run`` to the recipients that do not have it yet."""
        s = self.settings
        digest = await asyncio.to_thread(self.store.read_digest, start=run.period_start, end=run.period_end)
        if not digest.leads and not send_empty:
            await asyncio.to_thread(
                self.store.settle_unsent, run.id, status=RunStatus.EMPTY, now=self.clock()
            )
            done = await asyncio.to_thread(self.store.get_digest_run, run.id)
            return Attempt(done or run, digest)
        msg_id = digest_message_id(run.id, s.sender)
        try:
            # Thousands of leads take a second or two to render, write as CSV and zip:
            # done in a thread, so the dispatcher's loop never waits for it.
            data = await asyncio.to_thread(self._build, digest, run, msg_id, self.clock())
        except TemplateError as exc:
            await asyncio.to_thread(
                self.store.settle_unsent, run.id, status=RunStatus.FAILED, now=self.clock(), error=str(exc)
            )
            raise
        targets = run.to_try()
        marked = await asyncio.to_thread(
            self.store.mark_digest_sending,
            run.id,
            now=self.clock(),
            lease=LEASE,
            leads=len(digest.leads),
            message_id=msg_id,
        )
        if not marked:
            logger.warning("digest run %d is no longer waiting to be sent; not sending it", run.id)
            current = await asyncio.to_thread(self.store.get_digest_run, run.id)
            return Attempt(current or run, digest)
        results = await self._send(run, targets, data, msg_id)
        d = s.dispatch
        done = await asyncio.to_thread(
            self.store.finish_digest_attempt,
            run.id,
            results,
            now=self.clock(),
            max_attempts=max_attempts,
            backoff=d.retry_backoff,
            backoff_max=d.retry_backoff_max,
        )
        return Attempt(done, digest)

    def _build(self, digest: Digest, run: DigestRunRecord, msg_id: str, date: datetime) -> bytes:
        s = self.settings
        zone = zone_of(s)
        attachment = attachment_for(digest, zone)
        rendered = self.templates.render(
            digest,
            zone=zone,
            sender=s.sender,
            email_leads=s.digest.email_leads,
            attachment=attachment.filename if attachment else "",
        )
        return build_message(
            rendered,
            sender=s.sender,
            recipients=run.recipients,
            msg_id=msg_id,
            date=date,
            attachment=attachment,
        )

    async def _send(
        self, run: DigestRunRecord, targets: list[str], data: bytes, msg_id: str
    ) -> list[AttemptResult]:
        results: list[AttemptResult] = []
        try:
            await self.channel.open()
        except Exception as exc:
            # Nothing left: every recipient can be tried again.
            return [
                AttemptResult(address_of(r), Delivery.RETRY, f"the channel did not open: {exc}")
                for r in targets
            ]
        try:
            for recipient in targets:
                address = address_of(recipient)
                outgoing = Outgoing(
                    touch_id=0,
                    sender=self.settings.sender.from_address,
                    recipient=address,
                    data=data,
                    message_id=msg_id,
                    filename_hint=f"digest-{run.id}",
                )
                try:
                    answer = await self.channel.send(outgoing)
                except Exception as exc:
                    # The channel broke its promise not to raise: whether the message left
                    # cannot be known, so it is never resent by itself.
                    results.append(AttemptResult(address, Delivery.UNKNOWN, f"the channel failed: {exc}"))
                    continue
                results.append(
                    AttemptResult(address, _DELIVERY.get(answer.outcome, Delivery.REFUSED), answer.detail)
                )
        finally:
            try:
                await self.channel.close()
            except Exception as exc:
                logger.warning("closing the %s channel failed: %s", self.channel.name, exc)
        return results


def describe_run(run: DigestRunRecord, zone: str) -> str:
    """``the digest of Mon 5 Jan 2026, 08:00`` or ``the digest sent by hand (run 12)``."""
    if run.scheduled_for is not None:
        return f"the digest of {human_time(run.scheduled_for, zone)}"
    return f"the digest sent by hand (run {run.id})"


def log_outcome(outcome: Attempt, zone: str) -> None:
    run, digest = outcome.run, outcome.digest
    what = describe_run(run, zone)
    count = f"{len(digest.leads)} {'lead' if len(digest.leads) == 1 else 'leads'}"
    sent = [a for a, d in run.deliveries.items() if d == Delivery.SENT]
    if run.status == RunStatus.EMPTY:
        logger.info(
            "%s: no lead flagged %s; not sent (digest.send_empty is off)", what, describe_period(digest, zone)
        )
    elif run.status == RunStatus.SENT:
        logger.info("sent %s to %s: %s (run %d)", what, ", ".join(sent), count, run.id)
    elif run.status == RunStatus.RETRY:
        when = run.next_attempt_at.isoformat(timespec="seconds") if run.next_attempt_at else "later"
        logger.warning(
            "%s (%s) not delivered yet, trying again at %s: %s", what, count, when, _last(run.error)
        )
    elif run.status == RunStatus.PARTIAL:
        logger.error("%s (%s) reached only %s: %s", what, count, ", ".join(sent), run.error)
    elif run.status == RunStatus.UNKNOWN:
        logger.error("%s (%s): unknown whether it arrived: %s", what, count, run.error)
    elif run.status == RunStatus.FAILED:
        logger.error(
            "%s (%s) could not be delivered: %s%s",
            what,
            count,
            run.error,
            "; its leads will be in the next scheduled digest" if run.kind == "scheduled" else "",
        )


def _last(text: str | None) -> str:
    return (text or "").splitlines()[-1] if text else ""


class DigestService:
    """The daemon's digest: scheduled runs, the catch-up at start-up, retries and recovery.

    :param settle: how long after its fire time a scheduled digest waits before reading.
    """

    name = "digest"

    def __init__(self, *, settle: timedelta = SETTLE) -> None:
        self.settle = settle
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ctx: ServiceContext | None = None
        self._templates: DigestTemplates | None = None
        self._trigger: CronTrigger | None = None

    @property
    def ctx(self) -> ServiceContext:
        assert self._ctx is not None, "the digest service is not started"
        return self._ctx

    # -- the Service protocol ------------------------------------------------------------------------

    async def start(self, ctx: ServiceContext) -> None:
        # Checked before anything awaits, so a broken template stops the start-up before
        # the first dispatch pass can run.
        self._configure(ctx)
        ctx.run_now(self._catch_up, CATCH_UP_JOB_ID)

    async def reload(self, ctx: ServiceContext) -> None:
        try:
            self._configure(ctx)
        except TemplateError as exc:
            logger.error(
                "the digest templates are broken; the digest keeps its previous configuration:\n%s", exc
            )

    async def stop(self) -> None:
        if self._ctx is None:
            return
        self._ctx.remove_jobs(JOB_ID, CATCH_UP_JOB_ID, WAKEUP_JOB_ID)
        if not self._tasks:
            return
        bound = self._ctx.settings.dispatch.stop_timeout.total_seconds()
        _, pending = await asyncio.wait(set(self._tasks), timeout=bound)
        for task in pending:
            # Still on the wire: the run stays 'sending' and becomes unknown at the next start.
            logger.error("the digest was still being sent after %ss; stopping anyway", bound)
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)

    def _configure(self, ctx: ServiceContext) -> None:
        settings: Settings = ctx.settings
        active = bool(settings.digest.recipients)
        templates = DigestTemplates(root=settings.templates)
        if active:
            # Checking compiles the templates once and for all (they are not read again), so
            # files broken later on disk never reach a digest: a reload reports them first.
            problems = templates.check(sender=settings.sender, end=ctx.clock(), zone=zone_of(settings))
            if problems:
                raise TemplateError(problems)
        self._ctx, self._templates = ctx, templates
        self._trigger = trigger_for(settings) if active else None
        if self._trigger is None:
            with contextlib.suppress(JobLookupError):
                ctx.scheduler.remove_job(JOB_ID)
            return
        ctx.scheduler.add_job(
            self._fire,
            self._trigger,
            id=JOB_ID,
            coalesce=True,
            max_instances=1,
            # Run late rather than not at all (a suspended machine, a busy loop): the
            # digest's period reaches its fire time however late it goes out.
            misfire_grace_time=None,
            replace_existing=True,
        )
        logger.info(
            "flagged-lead digest to %s on the schedule '%s' (%s)",
            ", ".join(settings.digest.recipients),
            settings.digest.schedule,
            zone_of(settings),
        )

    # -- jobs ------------------------------------------------------------------------------------------

    async def _fire(self) -> None:
        trigger = self._trigger
        if trigger is None:
            return
        fire = previous_fire_time(trigger, self.ctx.clock())
        if fire is not None:
            await self._spawn(self.run_scheduled(fire))

    async def _catch_up(self) -> None:
        await self._spawn(self.start_up())

    async def _wake(self) -> None:
        await self._spawn(self.retry_due())

    async def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # The work runs as a task of its own and the job waits for it shielded: stopping
        # the scheduler cancels its jobs, but a digest on the wire is left to finish.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The scheduler is shutting down; stop() waits for the task itself.
            return

    async def start_up(self) -> None:
        """Settle what a stopped daemon left, send the latest digest that was due while
        campaignd was down (once, covering everything since the last one), and retry what
        waits to be retried."""
        ctx = self.ctx
        async with self._lock:
            exclusive = database.is_sqlite(ctx.settings.database_url)
            await self._recover(exclusive=exclusive)
        trigger = self._trigger
        if trigger is not None:
            fire = previous_fire_time(trigger, ctx.clock())
            if fire is not None:
                await self.run_scheduled(fire)
        await self.retry_due()

    async def _recover(self, *, exclusive: bool) -> None:
        ctx = self.ctx
        orphans = await asyncio.to_thread(ctx.store.recover_digest_runs, now=ctx.clock(), exclusive=exclusive)
        for run in orphans:
            logger.error(
                "%s was being sent when campaignd stopped: marked %s, not sent again "
                "(check with its recipients; 'campaignd digest --runs' lists digests)",
                describe_run(run, zone_of(ctx.settings)),
                run.status,
            )

    async def run_scheduled(self, fire: datetime) -> None:
        """Record, build and send the scheduled digest of ``fire``, unless it already is."""
        ctx = self.ctx
        settings: Settings = ctx.settings
        async with self._lock:
            if not settings.digest.recipients:
                return
            run = await asyncio.to_thread(
                ctx.store.begin_scheduled_run,
                fire=fire,
                now=ctx.clock(),
                recipients=settings.digest.recipients,
                lease=LEASE,
            )
            if run is None:
                logger.debug("the digest of %s is already recorded", fire.isoformat())
                return
            wait = (fire + self.settle - ctx.clock()).total_seconds()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._attempt(run)
        await self._arm_wakeup()

    async def retry_due(self) -> None:
        """Settle runs whose sender stopped long ago, and try again the ones that are due."""
        ctx = self.ctx
        async with self._lock:
            await self._recover(exclusive=False)
            for run in await asyncio.to_thread(ctx.store.due_digest_retries, now=ctx.clock()):
                claimed = await asyncio.to_thread(
                    ctx.store.claim_digest_retry, run.id, now=ctx.clock(), lease=LEASE
                )
                if claimed is not None:
                    await self._attempt(claimed)
        await self._arm_wakeup()

    async def _attempt(self, run: DigestRunRecord) -> None:
        ctx = self.ctx
        settings: Settings = ctx.settings
        sender = DigestSender(
            store=ctx.store,
            settings=settings,
            channel=ctx.channels["email"],
            clock=ctx.clock,
            templates=self._templates,
        )
        try:
            outcome = await sender.attempt(
                run, send_empty=settings.digest.send_empty, max_attempts=settings.dispatch.max_attempts
            )
        except TemplateError as exc:
            logger.error(
                "%s could not be built; its leads will be in the next one:\n%s",
                describe_run(run, zone_of(settings)),
                exc,
            )
            return
        except Exception as exc:
            # The database may be restarting: the run stays as it was recorded and is
            # settled by the next wake-up once its lease runs out.
            logger.error("%s failed: %s", describe_run(run, zone_of(settings)), exc)
            return
        log_outcome(outcome, zone_of(settings))

    async def _arm_wakeup(self) -> None:
        ctx = self.ctx
        try:
            when = await asyncio.to_thread(ctx.store.next_digest_wakeup)
        except Exception as exc:
            logger.warning("cannot look for digests to retry: %s", exc)
            return
        if when is None:
            with contextlib.suppress(JobLookupError):
                ctx.scheduler.remove_job(WAKEUP_JOB_ID)
            return
        ctx.scheduler.add_job(
            self._wake,
            "date",
            run_date=when,
            id=WAKEUP_JOB_ID,
            misfire_grace_time=None,
            replace_existing=True,
        )
