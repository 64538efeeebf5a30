"""Calendar invitations: the ``.ics`` file that adds an announced event to the recipient's
calendar with one click, and the event as templates see it.

Owns turning a configured :class:`~campaignd.config.Event` into an iCalendar object
(RFC 5545, ``METHOD:PUBLISH``: an announcement, not a meeting request that would ask
for a reply) with the time zone definition it needs, a UID that stays the same for as
long as the event keeps its name (so a corrected invitation updates the entry a
recipient already added instead of adding a second one), and a ``DTSTAMP`` of the moment
the message is made.

Pure: no I/O, and no clock (the time stamp is passed in). Imports no database, SMTP or
scheduler module.
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import icalendar

from campaignd.config import Event, Sender

PRODID = "-//campaignd//campaignd invitations//EN"
# The invitation is built once per event; this stamp marks where each message's own
# creation time goes. It is replaced, never sent.
_STAMP_PLACEHOLDER = datetime(1970, 1, 1, tzinfo=UTC)
_STAMP_LINE = b"DTSTAMP:19700101T000000Z"


def _domain(address: str) -> str:
    domain = address.rpartition("@")[2] or "localhost"
    if not domain.isascii():
        domain = domain.encode("idna").decode("ascii")
    return domain.lower()


class Invitation:
    """One event's calendar invitation and template values.

    :param name: the event's name under ``[events]``; it names the attached file and,
        unless the event sets ``uid``, makes its UID.
    :param event: the configured event.
    :param zone: the IANA time zone its wall-clock times are in.
    :param organizer: the sender, shown as the organiser.
    """

    def __init__(self, *, name: str, event: Event, zone: str, organizer: Sender) -> None:
        self.name = name
        self.event = event
        self.zone = zone
        tz = ZoneInfo(zone)
        self.start = event.start.replace(tzinfo=tz)
        end = event.end if event.end is not None else event.start + timedelta(hours=1)
        self.end = end.replace(tzinfo=tz)
        self.uid = event.uid or f"campaignd-event-{name}@{_domain(organizer.from_address)}"
        self.filename = f"{name}.ics"
        self._ics = self._build(organizer)
        head, found, tail = self._ics.partition(_STAMP_LINE)
        if not found or _STAMP_LINE in tail:
            raise RuntimeError("the invitation's DTSTAMP could not be located")
        self._head, self._tail = head, tail

    def _build(self, organizer: Sender) -> bytes:
        event = self.event
        cal = icalendar.Calendar()
        cal.add("prodid", PRODID)
        cal.add("version", "2.0")
        cal.add("calscale", "GREGORIAN")
        cal.add("method", "PUBLISH")
        vevent = icalendar.Event()
        vevent.add("uid", self.uid)
        vevent.add("dtstamp", _STAMP_PLACEHOLDER)
        vevent.add("sequence", event.sequence)
        vevent.add("dtstart", self.start)
        vevent.add("dtend", self.end)
        vevent.add("summary", event.title)
        if event.location:
            vevent.add("location", event.location)
        description = event.description.strip()
        if event.url:
            vevent.add("url", event.url)
            # Most calendars do not show URL; the description is where people look.
            description = f"{description}\n\n{event.url}".strip()
        if description:
            vevent.add("description", description)
        if organizer.from_address:
            who = icalendar.vCalAddress(f"mailto:{organizer.from_address}")
            if organizer.from_name:
                who.params["cn"] = organizer.from_name
            vevent.add("organizer", who)
        vevent.add("status", "CONFIRMED")
        vevent.add("transp", "OPAQUE")
        cal.add_component(vevent)
        # The zone's rules for the span around the event only: a definition from 1970
        # onwards would be a few kilobytes of transitions in every message.
        cal.add_missing_timezones(
            first_date=date(self.start.year - 1, 1, 1), last_date=date(self.end.year + 1, 12, 31)
        )
        return bytes(cal.to_ical())

    def ics(self, stamp: datetime) -> bytes:
        """The ``.ics`` file as made at ``stamp`` (its ``DTSTAMP``), CRLF line endings."""
        return self._head + _dtstamp(int(stamp.timestamp())) + self._tail

    def context(self) -> dict[str, Any]:
        """The event as templates see it (``{{ event.title }}``, ``{{ event.when }}``, ...)."""
        start, end, e = self.start, self.end, self.event
        same_day = start.date() == end.date()
        zone_abbr = start.tzname() or self.zone
        date_text = _long_date(start)
        time_text = f"{start:%H:%M}–{end:%H:%M}"
        time_12h = _span_12h(start, end)
        if same_day:
            when = f"{date_text}, {time_text} {zone_abbr}"
        else:
            when = f"{date_text} {start:%H:%M} – {_long_date(end)} {end:%H:%M} {zone_abbr}"
        return {
            "name": self.name,
            "title": e.title,
            "start": start,
            "end": end,
            "timezone": self.zone,
            "timezone_abbr": zone_abbr,
            "date": date_text,
            "end_date": _long_date(end),
            "start_time": f"{start:%H:%M}",
            "end_time": f"{end:%H:%M}",
            "time": time_text,
            "time_12h": time_12h,
            "when": when,
            "location": e.location,
            "url": e.url,
            "description": e.description,
            "uid": self.uid,
            "filename": self.filename,
        }


@functools.lru_cache(maxsize=16)
def _dtstamp(seconds: int) -> bytes:
    """The DTSTAMP line for a moment in Unix seconds (a batch shares a few seconds)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("DTSTAMP:%Y%m%dT%H%M%SZ").encode("ascii")


def _long_date(moment: datetime) -> str:
    return f"{moment:%A} {moment.day} {moment:%B %Y}"


def _clock_12h(moment: datetime, *, suffix: bool = True) -> str:
    text = f"{moment.hour % 12 or 12}:{moment:%M}"
    return f"{text} {'am' if moment.hour < 12 else 'pm'}" if suffix else text


def _span_12h(start: datetime, end: datetime) -> str:
    """``6:30–8:00 pm``, or ``11:30 am–1:00 pm`` across noon."""
    same_half = (start.hour < 12) == (end.hour < 12) and start.date() == end.date()
    return f"{_clock_12h(start, suffix=not same_half)}–{_clock_12h(end)}"
