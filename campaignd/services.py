"""Services: the parts of the daemon that run beside the dispatcher.

The unsubscribe endpoint, the flagged-lead digest and the print batches each implement
:class:`Service`. The daemon starts them after its start-up checks (before telling
systemd it is ready), hands them the new configuration on reload, and stops them on
shutdown. A service that needs a schedule adds jobs with fixed ids to the daemon's one
APScheduler; all of its state lives in the database, like the dispatcher's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from campaignd.channels import Channel
from campaignd.config import Settings
from campaignd.store import Store


@dataclass(frozen=True, slots=True)
class ServiceContext:
    """What a service may use.

    :param settings: the configuration in force (a new context comes with each reload).
    :param store: the database.
    :param scheduler: the daemon's APScheduler (3.x ``AsyncIOScheduler``).
    :param channels: the daemon's channels by kind (``email``, ``mail``).
    :param clock: the wall clock; read it once per job run and pass the time down.
    :param health: the daemon's own view of its health, for monitoring: whether the
        dispatch loop is making progress, the last pass and its summary.
    """

    settings: Settings
    store: Store
    scheduler: Any
    channels: dict[str, Channel]
    clock: Callable[[], datetime]
    health: Callable[[], dict[str, Any]]

    def run_now(self, job: Callable[[], Any], job_id: str) -> None:
        """Run ``job`` once, as soon as the scheduler can (catching up at start-up)."""
        self.scheduler.add_job(
            job, "date", run_date=self.clock(), id=job_id, misfire_grace_time=None, replace_existing=True
        )

    def remove_jobs(self, *job_ids: str) -> None:
        """Remove the service's jobs; those not scheduled (or a scheduler already shut down) are skipped."""
        from apscheduler.jobstores.base import JobLookupError

        for job_id in job_ids:
            with contextlib.suppress(JobLookupError, AttributeError):
                self.scheduler.remove_job(job_id)


class Service(Protocol):
    name: str

    async def start(self, ctx: ServiceContext) -> None:
        """Start; raise :class:`campaignd.exceptions.CampaigndError` to stop the daemon's start-up."""

    async def reload(self, ctx: ServiceContext) -> None:
        """Take the new configuration in ``ctx``."""

    async def stop(self) -> None:
        """Stop within a few seconds; nothing may be lost."""


def build_services(settings: Settings) -> list[Service]:
    """The services this configuration asks for, in start order."""
    from campaignd.digest_job import DigestService
    from campaignd.web import UnsubscribeEndpoint

    # First, so that a port already taken stops the start-up before any other service runs.
    # Always registered: with unsubscribe.listen empty it serves nothing until a reload sets it.
    services: list[Service] = [UnsubscribeEndpoint()]
    # Always registered: with no digest.recipients it schedules nothing until a reload adds some.
    services.append(DigestService())
    # Always registered: with no print schedule and no when_waiting it exports only by hand
    # ('campaignd mail export'), but still finishes what a stopped export left at start-up.
    from campaignd.directmail import PrintBatchService

    services.append(PrintBatchService())
    return services
