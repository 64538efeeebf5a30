"""Commands that set an install up: config check/show, db upgrade/current."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from campaignd import database
from campaignd.cli.app import STATE, app, emit_json, logger, out
from campaignd.config import find_config

config_app = typer.Typer(help="Check and show the configuration.", no_args_is_help=True)
db_app = typer.Typer(help="The lead database: migrations.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")


@config_app.command("check")
def config_check() -> None:
    """Validate the configuration and the templates it references."""
    from campaignd.daemon import prepare

    path = find_config(STATE.config)
    settings = STATE.settings()
    prepare(settings, create_key=False)
    steps = sum(len(s.steps) for s in settings.sequences.values())
    out(
        f"{path or 'defaults'}: configuration valid ({len(settings.sequences)} sequences, {steps} steps, "
        f"templates in {settings.templates})"
    )


@config_app.command("show")
def config_show(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print the effective configuration, secrets redacted."""
    data = STATE.settings().redacted()
    if as_json:
        emit_json(data)
        return
    _print_toml(data)


def _print_toml(data: dict[str, Any]) -> None:
    """``data`` as a TOML file that ``--config`` would read back; unset keys (TOML has no
    null) are left out."""
    import tomli_w

    typer.echo(tomli_w.dumps(_without_none(data)), nl=False)


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the database or bring it to the latest schema revision."""
    settings = STATE.settings()
    engine = database.create_engine(settings.database_url)
    before, after = database.upgrade(engine)
    if before == after:
        out(f"database already at revision {after}")
    else:
        out(f"database upgraded from {before or 'empty'} to revision {after}")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database and the one this version needs."""
    settings = STATE.settings()
    engine = database.create_engine(settings.database_url)
    current, head = database.current_revision(engine), database.head_revision()
    out(f"database revision: {current or 'empty'}; this version needs: {head}")
    if current != head:
        raise typer.Exit(1)


@db_app.command("copy")
def db_copy(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="URL",
            help="The new, empty database, e.g. postgresql+psycopg://campaignd@db.internal/campaignd "
            "(give the password in PGPASSWORD, not on the command line).",
        ),
    ],
) -> None:
    """Copy the whole database into a new one, to move from SQLite to PostgreSQL.

    Stop the daemon first. Every lead, touch, event, suppression, digest run and print
    batch is copied with its id; then point database.url at the new database.
    """
    settings = STATE.settings()
    source = database.create_engine(settings.database_url)
    target = database.create_engine(to)
    try:
        with database.daemon_lock(settings.database_url):
            copied = database.copy_database(
                source, target, progress=lambda table, n: logger.debug("copied %d rows of %s", n, table)
            )
    finally:
        source.dispose()
        target.dispose()
    for table, n in copied.items():
        out(f"{table:<16} {n:>9} rows")
    out(
        f"copied {sum(copied.values())} rows; now point database.url (CAMPAIGND_DATABASE__URL) "
        "at the new database"
    )
