"""Logging set-up: plain lines on stderr, fit for the journal and for a terminal.

Under systemd (``$JOURNAL_STREAM`` set) each line starts with its ``<N>`` syslog
priority and carries no timestamp, because the journal records both. In a terminal
lines get a readable local timestamp.
"""

from __future__ import annotations

import logging
import logging.config
import sys
from typing import Any

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """Prefixes every line with its syslog priority, as sd-daemon(3) describes."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def log_config(level: str, *, journal: bool) -> dict[str, Any]:
    """The ``dictConfig`` for campaignd's loggers."""
    if journal:
        formatter = {"()": JournalFormatter, "format": "%(name)s: %(message)s"}
    else:
        formatter = {
            "format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s",
            "datefmt": "%Y-%m-%d %H:%M:%S",
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": sys.stderr, "formatter": "main"}},
        "root": {"level": "WARNING", "handlers": ["stderr"]},
        "loggers": {
            "campaignd": {"level": level, "propagate": True},
            # Its warnings are about overlapping ticks, which campaignd expects and handles.
            "apscheduler": {"level": "ERROR"},
        },
    }


def setup_logging(level: str, *, journal: bool) -> None:
    logging.config.dictConfig(log_config(level.upper(), journal=journal))
