"""Direct mail: print batches for the print shop or mailing house."""

from __future__ import annotations
