"""Direct-mail queries: print batches and the pieces in them."""

from __future__ import annotations

from campaignd.store.base import StoreBase


class MailQueries(StoreBase):
    """Collecting pending letters into print batches, confirming and cancelling them."""
