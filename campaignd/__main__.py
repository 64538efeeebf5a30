from __future__ import annotations

from campaignd.cli import main

main()
