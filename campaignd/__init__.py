"""campaignd: email and direct-mail drip campaigns that hand warm leads to sales."""

from __future__ import annotations

__version__ = "0.1.0"
