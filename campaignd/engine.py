"""The dispatcher: one pass claims due steps, renders, sends and records them.

The imperative shell around the decision core. A pass asks the store for a batch of due
steps (claimed under a lease), renders each, and hands it to its channel through a few
workers per channel. Each message is committed as ``sending`` just before it leaves and
its answer is committed right after, both through group commits, so at any instant the
only touches that a crash can leave ambiguous are the ones really on the wire, at most
one per worker. Claimed work that never started to leave is given back on shutdown (and
would be taken over by anyone after its lease anyway).

Database calls run in worker threads; the event loop only waits on the network.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from campaignd.channels import FALLBACK, Channel, Delivery, Outcome, Outgoing
from campaignd.clock import utcnow
from campaignd.config import Channel as ChannelKind
from campaignd.config import Settings
from campaignd.message import build_email, message_id
from campaignd.render import Renderer, RenderError, lead_context
from campaignd.sequences import Policy
from campaignd.store import Claim, Recorded, Result, Store
from campaignd.unsubscribe import Signer

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Coalesces concurrent requests into one database transaction.

    Workers submit items and wait; whoever arrives while a commit is running is taken
    by the next one. With N workers this costs about one commit per N messages while
    keeping each worker's item durable before it goes on.

    Left to itself, a group of workers splits into halves that take turns (one half
    commits while the other sends), so each commit carries half of them. So a commit
    waits a moment (at most ``gather`` seconds) for the members that are still sending,
    and carries them all: the cost of a commit is mostly its own, not its rows'.

    :param commit: runs in a thread with a list of items and returns one answer per item.
    :param retry_for: how long to keep retrying a failing commit of these items (the
        database may be restarting) before giving the error to the waiters.
    :param gather: how long a commit waits for members still at work.
    :param at_once: tries the commit on the event loop itself, for a database where it
        costs less than handing it to a thread; returns None (having done nothing) when it
        would have to wait, and ``commit`` then runs in a thread.
    """

    def __init__(
        self,
        commit: Callable[[list[T]], list[R]],
        *,
        name: str,
        retry_for: Callable[[list[T]], float],
        gather: float = 0.002,
        at_once: Callable[[list[T]], list[R] | None] | None = None,
    ) -> None:
        self._commit = commit
        self._at_once = at_once
        self._name = name
        self._retry_for = retry_for
        self._gather = gather
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None
        self._full: asyncio.Future[None] | None = None
        """Set when every member has submitted, while a commit waits to gather them."""
        self.members = 0
        """Workers that submit to this group now; a commit waits for at most this many."""

    def leave(self) -> None:
        """A member is done: commits no longer wait for it."""
        self.members -= 1
        self._check_full()

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._check_full()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await future

    def _check_full(self) -> None:
        if self._full is not None and len(self._pending) >= self.members:
            _resolve(self._full)

    async def _gathered(self) -> None:
        """Wait until every member has submitted, or ``gather`` seconds have passed."""
        if len(self._pending) >= self.members:
            return
        loop = asyncio.get_running_loop()
        self._full = full = loop.create_future()
        timer = loop.call_later(self._gather, _resolve, full)
        try:
            await full
        finally:
            timer.cancel()
            self._full = None

    async def _drain(self) -> None:
        while self._pending:
            if self._gather > 0:
                await self._gathered()
            batch, self._pending = self._pending, []
            items = [item for item, _ in batch]
            try:
                answers = await self._with_retry(items)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), answer in zip(batch, answers, strict=True):
                if not fut.done():
                    fut.set_result(answer)

    async def _with_retry(self, items: list[T]) -> list[R]:
        deadline = time.monotonic() + self._retry_for(items)
        delay = 0.5
        while True:
            try:
                if self._at_once is not None:
                    answers = self._at_once(items)
                    if answers is not None:
                        return answers
                return await asyncio.to_thread(self._commit, items)
            except Exception as exc:
                if time.monotonic() >= deadline:
                    raise
                logger.warning("%s failed (%s); retrying in %.1fs", self._name, _short(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)


@dataclass(slots=True)
class PassReport:
    """What one dispatch pass did."""

    claimed: int = 0
    rescheduled: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    bounced: int = 0
    unknown: int = 0
    skipped: int = 0
    deferred: int = 0
    """Work that waits because its channel could not be reached (costs no attempt)."""
    for_print: int = 0
    released: int = 0
    promoted: int = 0
    flagged: int = 0
    seconds: float = 0.0
    events: list[Recorded] = field(default_factory=list)

    def add(self, rec: Recorded) -> None:
        counter = {
            "sent": "sent",
            "retry": "retried",
            "failed": "failed",
            "bounced": "bounced",
            "unknown": "unknown",
            "skipped": "skipped",
            "pending": "for_print",
            "unavailable": "deferred",
        }.get(rec.status)
        if counter:
            setattr(self, counter, getattr(self, counter) + 1)
        self.promoted += rec.promoted
        self.flagged += rec.flagged

    def summary(self) -> str:
        parts = [f"claimed {self.claimed}", f"sent {self.sent}"]
        for name in (
            "retried",
            "failed",
            "bounced",
            "unknown",
            "skipped",
            "deferred",
            "for_print",
            "released",
            "promoted",
            "flagged",
        ):
            if getattr(self, name):
                parts.append(f"{name.replace('for_print', 'queued for print')} {getattr(self, name)}")
        return ", ".join(parts) + f" in {self.seconds:.1f}s"


class Dispatcher:
    """Runs dispatch passes.

    :param store: the database.
    :param settings: the configuration in force (replaced on reload).
    :param renderer: templates for ``settings``.
    :param signer: builds unsubscribe links.
    :param channels: one channel per step kind: ``"email"`` and ``"mail"``.
    :param worker: this daemon's name in claims (host, pid, random suffix).
    :param clock: the wall clock used to time-stamp what actually happened.
    :param exclusive: True when no other daemon can use the database (SQLite).
    """

    def __init__(
        self,
        *,
        store: Store,
        settings: Settings,
        renderer: Renderer,
        signer: Signer,
        channels: Mapping[str, Channel],
        worker: str,
        clock: Callable[[], datetime] = utcnow,
        exclusive: bool = True,
    ) -> None:
        self.store = store
        self.exclusive = exclusive
        self.worker = worker
        self.channels = dict(channels)
        self.clock = clock
        self.stopping = asyncio.Event()
        self._open: dict[str, Channel] = {}
        """The channels opened in the current pass, by kind."""
        self._unavailable: dict[str, int] = {}
        """Consecutive passes in which a channel could not be reached, per channel kind."""
        self.reconfigure(settings=settings, renderer=renderer, signer=signer)

    def reconfigure(self, *, settings: Settings, renderer: Renderer, signer: Signer) -> None:
        self.settings = settings
        self.renderer = renderer
        self.signer = signer
        self.policy = Policy.from_settings(settings)
        self._steps = {
            (tier.value, step.id): (index, step)
            for tier, seq in settings.sequences.items()
            for index, step in enumerate(seq.steps)
        }

    def stop(self) -> None:
        """Stop taking new work; messages already leaving are finished and recorded."""
        self.stopping.set()

    async def run_pass(self, now: datetime) -> PassReport:
        """Claim what is due at ``now``, send it through its channels and record every answer.

        Raises only when the database refuses the claim itself; whatever happens later in
        the pass (a channel down, the database gone mid-pass) is recorded or left for the
        next pass to settle, never lost and never sent twice.
        """
        started = time.monotonic()
        report = PassReport()
        dispatch = self.settings.dispatch
        # Settle what an earlier pass or a dead daemon left: on a database of our own
        # every 'sending' touch is orphaned now (passes never overlap); when several
        # daemons share it, only those whose lease has run out.
        orphans = await asyncio.to_thread(self.store.recover_in_flight, now=now, exclusive=self.exclusive)
        for touch in orphans:
            logger.error(
                "touch %d (%s/%s) was on the wire when its sender stopped: marked unknown; "
                "check it, then 'campaignd touches retry %d'",
                touch.id,
                touch.tier,
                touch.step,
                touch.id,
            )
        claimed = await asyncio.to_thread(
            self.store.claim, policy=self.policy, now=now, limit=dispatch.batch_size, worker=self.worker
        )
        report.claimed, report.rescheduled = len(claimed.claims), claimed.planned
        if not claimed.claims:
            report.seconds = time.monotonic() - started
            return report

        patience = dispatch.stop_timeout.total_seconds() * 15

        def retry_for(items: list[_Step]) -> float:
            # An answer not recorded becomes an unknown: worth waiting for the database.
            # A mark alone is cheap to give up on: nothing has left yet.
            return patience if any(results for results, _ in items) else 5.0

        advancer: GroupCommit[_Step, _Advanced] = GroupCommit(
            self._advance,
            name="recording answers",
            retry_for=retry_for,
            at_once=None if self.store.is_postgres else self._advance_at_once,
        )
        lanes: dict[str, _Lane] = {}
        for claim in claimed.claims:
            found = self._steps.get((claim.tier, claim.step))
            kind = found[1].channel.value if found else ChannelKind.EMAIL.value
            if kind not in lanes:
                lanes[kind] = _Lane(kind, self.channels[kind])
            lanes[kind].queue.put_nowait(claim)

        halt = asyncio.Event()
        self._open = {}
        try:
            workers: list[Awaitable[None]] = []
            for lane in lanes.values():
                await lane.channel.open()
                self._open[lane.kind] = lane.channel
                for _ in range(max(1, lane.channel.concurrency)):
                    workers.append(self._work(lane, advancer, report, halt))
            await asyncio.gather(*workers)
        finally:
            try:
                await asyncio.to_thread(self.store.end_sending)
            except Exception as exc:
                logger.warning("closing the senders' database connection failed: %s", _short(exc))
            for channel in self._open.values():
                try:
                    await channel.close()
                except Exception as exc:
                    logger.warning("closing channel %s failed: %s", channel.name, _short(exc))
            for lane in lanes.values():
                if lane.down is None:
                    self._unavailable.pop(lane.kind, None)
                leftover = [claim.touch_id for claim in [*_drain(lane.queue), *lane.gone]]
                if not leftover:
                    continue
                later = self.clock()
                try:
                    report.released += await asyncio.to_thread(
                        self.store.release,
                        leftover,
                        worker=self.worker,
                        now=later,
                        retry_at=later + lane.down if lane.down else None,
                    )
                except Exception as exc:
                    # Not lost: unreleased claims are taken again when their lease ends.
                    logger.warning("could not give back %d claimed steps: %s", len(leftover), _short(exc))
        report.seconds = time.monotonic() - started
        return report

    def _backoff(self, lane: _Lane, detail: str) -> timedelta:
        """The channel could not be reached: stop using it this pass and back off."""
        if lane.down is None:
            failures = self._unavailable.get(lane.kind, 0) + 1
            self._unavailable[lane.kind] = failures
            lane.down = min(RELAY_BACKOFF * 2 ** (failures - 1), RELAY_BACKOFF_MAX)
            logger.warning(
                "%s channel unavailable (%s); its work waits %ss",
                lane.kind,
                detail,
                int(lane.down.total_seconds()),
            )
        return lane.down

    async def _work(
        self,
        lane: _Lane,
        advancer: GroupCommit[_Step, _Advanced],
        report: PassReport,
        halt: asyncio.Event,
    ) -> None:
        """Send one lane's claims one at a time until the queue is empty or the pass stops.

        Each round trip to the database records the previous answer and marks the next
        message as leaving, in one transaction: a message leaves only once its mark is
        on disk, and the next one only once the answer before it is.
        """
        advancer.members += 1
        try:
            await self._send_all(lane, advancer, report, halt)
        finally:
            advancer.leave()

    async def _send_all(
        self,
        lane: _Lane,
        advancer: GroupCommit[_Step, _Advanced],
        report: PassReport,
        halt: asyncio.Event,
    ) -> None:
        answered: list[Result] = []
        while True:
            claim, outgoing = self._next(lane, halt, answered)
            if claim is None and not answered:
                return
            try:
                recorded, ours = await advancer.submit((answered, claim.touch_id if claim else None))
            except Exception as exc:
                if claim is not None:
                    lane.queue.put_nowait(claim)
                if answered:
                    # The answers are lost with the database; their touches stay 'sending'
                    # and are settled as unknown by the next pass: never resent by itself.
                    logger.error(
                        "could not record %d answers (%s); they will show as unknown",
                        len(answered),
                        _short(exc),
                    )
                else:
                    logger.error(
                        "the database is not answering (%s); sending stops until it does", _short(exc)
                    )
                halt.set()
                return
            answered = []
            for rec in recorded:
                report.add(rec)
                _log_event(rec)
            if claim is None or outgoing is None:
                return
            if not ours:
                logger.warning("touch %s is no longer ours (lease taken over); not sending", claim.touch_id)
                continue
            channel_used = None
            try:
                delivery = await lane.channel.send(outgoing)
                if delivery.outcome == Outcome.SKIPPED and delivery.extra.get(FALLBACK) == ChannelKind.EMAIL:
                    delivery, outgoing = await self._fall_back(claim, delivery, outgoing)
                    channel_used = ChannelKind.EMAIL.value
            except Exception as exc:
                # A channel must answer, not raise; if it does, the message may have left.
                logger.exception("channel %s failed on touch %d", lane.kind, claim.touch_id)
                delivery = Delivery(claim.touch_id, Outcome.UNKNOWN, f"channel error: {_short(exc)}")
            retry_after = None
            if delivery.outcome == Outcome.UNAVAILABLE:
                retry_after = self._backoff(lane, delivery.detail)
            elif delivery.outcome == Outcome.UNKNOWN:
                # The relay took the data and went silent: sending more into it would only
                # make more messages ambiguous. Back off; this one waits for the operator.
                self._backoff(lane, delivery.detail)
            answered.append(
                Result(
                    claim.touch_id,
                    delivery.outcome.value,
                    delivery.detail,
                    outgoing.message_id,
                    retry_after,
                    channel=channel_used if delivery.outcome != Outcome.SKIPPED else None,
                )
            )

    async def _fall_back(
        self, claim: Claim, skipped: Delivery, letter: Outgoing
    ) -> tuple[Delivery, Outgoing]:
        """A channel could not deliver the step its way and asked for it by email instead
        (a letter to a lead without a postal address). The touch is already marked as
        leaving, so this is still the one send of the step."""
        try:
            outgoing = self._build(claim, as_email=True)
        except RenderError as exc:
            detail = f"{skipped.detail}; its email cannot be made: {exc}"
            return Delivery(claim.touch_id, Outcome.SKIPPED, detail), letter
        email = self.channels[ChannelKind.EMAIL.value]
        if ChannelKind.EMAIL.value not in self._open:
            await email.open()
            self._open[ChannelKind.EMAIL.value] = email
        delivery = await email.send(outgoing)
        if delivery.outcome == Outcome.SENT:
            detail = f"by email ({skipped.detail}): {delivery.detail}"
            delivery = Delivery(delivery.touch_id, delivery.outcome, detail, delivery.code)
        return delivery, outgoing

    def _next(
        self, lane: _Lane, halt: asyncio.Event, answered: list[Result]
    ) -> tuple[Claim | None, Outgoing | None]:
        """The lane's next claim and its message, or (None, None) when it should stop.

        A claim that cannot be rendered is answered (``render``) and passed over; one whose
        step left the configuration is kept aside to be given back.
        """
        while not (self.stopping.is_set() or halt.is_set() or lane.down is not None):
            try:
                claim = lane.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            try:
                return claim, self._build(claim)
            except RenderError as exc:
                logger.error("cannot render %s/%s for %s: %s", claim.tier, claim.step, claim.lead.email, exc)
                answered.append(Result(claim.touch_id, "render", str(exc)))
            except _StepGone:
                lane.gone.append(claim)
        return None, None

    def _build(self, claim: Claim, *, as_email: bool = False) -> Outgoing:
        """The message for ``claim``; ``as_email`` builds a ``mail`` step's email instead
        (its ``.subject``/``.html``/``.txt`` beside the print template)."""
        found = self._steps.get((claim.tier, claim.step))
        if found is None:
            raise _StepGone
        index, step = found
        if as_email:
            step = step.model_copy(update={"channel": ChannelKind.EMAIL})
        lead = claim.lead
        links = self.signer.links(lead.id, lead.email)
        context = lead_context(lead)
        rendered = self.renderer.render(lead=context, tier=claim.tier, step=step, index=index, links=links)
        msg_id = message_id(touch_id=claim.touch_id, lead_id=lead.id, sender=self.settings.sender)
        if step.channel == ChannelKind.MAIL:
            return Outgoing(
                claim.touch_id,
                self.settings.sender.from_address,
                lead.email,
                rendered.html.encode(),
                msg_id,
                kind="mail",
                filename_hint=_slug(f"{claim.tier}-{step.id}-{lead.email}"),
                lead=context,
            )
        data = build_email(
            rendered,
            sender=self.settings.sender,
            to_name=f"{lead.first_name} {lead.last_name}",
            to_address=lead.email,
            msg_id=msg_id,
            date=self.clock(),
            links=links,
            step_label=f"{claim.tier}/{step.id}",
        )
        return Outgoing(
            claim.touch_id,
            self.settings.sender.from_address,
            lead.email,
            data,
            msg_id,
            filename_hint=_step_slug(claim.tier, step.id),
            crlf=True,
        )

    def _advance(self, items: list[_Step]) -> list[_Advanced]:
        """Record every answer and mark every next message of a group, in one transaction."""
        done = self.store.advance(**self._advancing(items))
        assert done is not None  # only a transaction told not to wait gives up
        return _advanced(items, done)

    def _advance_at_once(self, items: list[_Step]) -> list[_Advanced] | None:
        """``_advance`` on the event loop, if the database can take it without waiting."""
        done = self.store.advance(**self._advancing(items), wait=False)
        return None if done is None else _advanced(items, done)

    def _advancing(self, items: list[_Step]) -> dict[str, Any]:
        """What the store is asked, for a group's items."""
        d = self.settings.dispatch
        return {
            "results": [result for results, _ in items for result in results],
            "leaving": [touch_id for _, touch_id in items if touch_id is not None],
            "worker": self.worker,
            "policy": self.policy,
            "now": self.clock(),
            "lease": d.lease,
            "max_attempts": d.max_attempts,
            "backoff": d.retry_backoff,
            "backoff_max": d.retry_backoff_max,
        }


def _advanced(items: list[_Step], done: tuple[list[Recorded], set[int]]) -> list[_Advanced]:
    """Each item's share of what the store did: its answers' records, and whether its next
    message may leave."""
    recorded, marked = done
    by_touch = {rec.touch_id: rec for rec in recorded}
    return [
        (
            [by_touch[r.touch_id] for r in results if r.touch_id in by_touch],
            touch_id is not None and touch_id in marked,
        )
        for results, touch_id in items
    ]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _StepGone(Exception):
    pass


_Step = tuple[list[Result], int | None]
"""What a sender hands the database: the answers it got, and the touch it wants to send next."""
_Advanced = tuple[list[Recorded], bool]
"""What it gets back: what recording the answers did, and whether it may send the next one."""

RELAY_BACKOFF = timedelta(seconds=5)
RELAY_BACKOFF_MAX = timedelta(minutes=5)


@dataclass(slots=True)
class _Lane:
    """One channel's share of a pass: its queue of claims and whether it went down."""

    kind: str
    channel: Channel
    queue: asyncio.Queue[Claim] = field(default_factory=asyncio.Queue)
    down: timedelta | None = None
    gone: list[Claim] = field(default_factory=list)
    """Claims whose step left the configuration since they were made: given back."""


def _drain(queue: asyncio.Queue[Claim]) -> list[Claim]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80]


@functools.lru_cache(maxsize=1024)
def _step_slug(tier: str, step: str) -> str:
    return _slug(f"{tier}-{step}")


def describe_error(exc: BaseException) -> str:
    """One line for the log: the first line of the message (SQLAlchemy adds several)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


_short = describe_error


def _log_event(rec: Recorded) -> None:
    step = f"{rec.tier}/{rec.step}"
    if rec.status == "sent":
        logger.info("sent %s to %s (touch %d)", step, rec.email, rec.touch_count)
        if rec.promoted:
            logger.info("promoted %s from cold to warm", rec.email)
        if rec.flagged:
            logger.info("flagged %s for sales follow-up after %d touches", rec.email, rec.touch_count)
    elif rec.status == "retry":
        when = rec.retry_at.strftime("%Y-%m-%d %H:%M:%S") if rec.retry_at else "later"
        logger.warning("deferred %s to %s until %s: %s", step, rec.email, when, rec.detail)
    elif rec.status == "bounced":
        logger.warning("bounced %s to %s, address suppressed: %s", step, rec.email, rec.detail)
    elif rec.status == "unknown":
        logger.error("unknown outcome of %s to %s (touch %d): %s", step, rec.email, rec.touch_id, rec.detail)
    elif rec.status == "skipped":
        logger.warning("skipped %s for %s: %s", step, rec.email, rec.detail)
    elif rec.status == "unavailable":
        logger.debug("deferred %s to %s: channel unavailable", step, rec.email)
    elif rec.status == "pending":
        logger.info("queued %s for %s for the next print batch", step, rec.email)
    else:
        logger.error("failed %s to %s (touch %d): %s", step, rec.email, rec.touch_id, rec.detail)
