"""Cron schedules of the daemon's jobs (the digest, print batches): when one last fired."""

from __future__ import annotations

from datetime import datetime, timedelta

from apscheduler.triggers.cron import CronTrigger


def previous_fire_time(
    trigger: CronTrigger, now: datetime, *, within: timedelta = timedelta(days=800)
) -> datetime | None:
    """The latest time at or before ``now`` at which ``trigger`` fires (None if it did not
    within ``within`` before ``now``).

    Looks back over windows that grow fourfold, so a schedule every few seconds and one a
    week both take a handful of steps.
    """
    span = timedelta(minutes=2)
    while span <= within:
        fire: datetime | None = trigger.get_next_fire_time(None, now - span)
        if fire is not None and fire <= now:
            while True:
                following: datetime | None = trigger.get_next_fire_time(fire, now)
                if following is None or following <= fire or following > now:
                    return fire
                fire = following
        span *= 4
    return None
