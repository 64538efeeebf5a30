"""The command line. ``campaignd --help`` lists the commands; ``docs/commands.md`` explains them.

Importing this package registers every command group on the root app:
``daemon`` (run, demo, status, plan, doctor), ``setup`` (config, db), ``leads``
(leads, touches, suppression), ``templates``, ``digest`` and ``mail``.
"""

from __future__ import annotations

from campaignd.cli import daemon, digest, leads, mail, setup, templates
from campaignd.cli.app import app, main

__all__ = ["app", "daemon", "digest", "leads", "mail", "main", "setup", "templates"]
