"""The one wall clock of campaignd, in a module light enough for every command to import."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, aware, in UTC. Only the shell calls it, once per decision; the
    decision code is given ``now``."""
    return datetime.now(UTC)
