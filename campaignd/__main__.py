"""``python -m campaignd``: the same as the ``campaignd`` command."""

from __future__ import annotations

from campaignd.cli import main

# Guarded: processes started with the spawn method import this module again.
if __name__ == "__main__":
    main()
