"""The flagged-lead digest by hand: review, export and send it."""

from __future__ import annotations
