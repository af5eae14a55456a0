"""`roost migrate --to postgresql://...`: move a SQLite home into PostgreSQL.

Copies the SQLite store named by the config (`storage.path`) into an empty
PostgreSQL database, every row with its ids, seqs, mailbox numbers, cursors and
secrets intact (broker/store/postgres_import.py), then says how to switch the
config over. The broker must be stopped meanwhile (the store's lock is taken,
as `roost serve` does); a target with rows in it is refused and left as it was.
"""

from __future__ import annotations

import asyncio

import click

from client.cli_admin import _load, config_option
from client.output import EXIT_USAGE, CliError


@click.command()
@config_option
@click.option("--to", "dsn", required=True, metavar="postgresql://USER[:PASSWORD]@HOST[:PORT]/DB",
              help="The empty PostgreSQL database to copy the store into.")
def migrate(config_path: str | None, dsn: str) -> None:
    """Copy this config's SQLite store into an empty PostgreSQL database.

    \b
    Stop the broker first, then:
      roost migrate --to postgresql://roost:secret@db:5432/roost
    and set storage.backend: postgres and storage.dsn in the config.
    """
    from broker.startup import StartupError, StoreLock, os_reason
    from broker.store.base import StoreCannotOpen, StoreUnavailable
    from broker.store.postgres_import import ImportRefused, describe_target, import_sqlite

    if not dsn.startswith(("postgresql://", "postgres://")):
        raise CliError("--to: expected a postgresql://user@host:5432/db URL", EXIT_USAGE)
    cfg = _load(config_path)
    if cfg.storage.backend != "sqlite":
        raise CliError("roost migrate copies a SQLite store: this config's storage.backend is "
                       f"{cfg.storage.backend}")
    path = cfg.resolve(cfg.storage.path)
    if not path.is_file():
        raise CliError(f"no SQLite store at {path}")
    target = describe_target(dsn)

    async def run() -> dict[str, int]:
        from broker.startup import open_store

        # Open (and close) it once as the broker would: an older store is migrated
        # to the schema this Roost copies from.
        store = await open_store(path)
        await store.close()
        return await import_sqlite(path, dsn, files_dir=cfg.files_dir())   # files' bytes go into PostgreSQL too

    try:
        with StoreLock(path):   # no broker writes while we copy
            copied = asyncio.run(run())
    except (StartupError, ImportRefused, StoreCannotOpen) as exc:
        raise CliError(str(exc)) from None
    except (StoreUnavailable, OSError) as exc:
        raise CliError(f"{target}: {os_reason(exc)}") from None
    rows = sum(copied.values())
    click.echo(f"copied {rows} rows of {len(copied)} tables from {path} to {target}")
    click.echo("now set in the config:  storage: {backend: postgres, dsn: <that URL>}")


def register(group: click.Group) -> None:
    group.add_command(migrate)
