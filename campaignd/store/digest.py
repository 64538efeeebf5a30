"""Digest queries: flagged leads, their timelines, the day's totals and digest runs."""

from __future__ import annotations

from campaignd.store.base import StoreBase


class DigestQueries(StoreBase):
    """What the flagged-lead digest reads, and the record of digests sent."""
