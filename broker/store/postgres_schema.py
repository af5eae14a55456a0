"""Versioned schema migrations of the PostgreSQL store.

`MIGRATIONS` is the ordered list (version, name, SQL); each domain module keeps
its DDL next to its code and contributes it here. Applied versions are recorded
in `schema_migrations`. `migrate` runs in one transaction under a
transaction-scoped advisory lock: when several nodes start together, the first
applies what is pending and the others wait for it, then find nothing to do.
A database migrated by a newer Roost (a version unknown here) is refused.

Adding a change: append (next version, name, SQL) to MIGRATIONS; never edit
one that was released (databases have it recorded as applied). A migration
whose SQL is still empty (a domain not written yet) is skipped, not recorded.
"""

from __future__ import annotations

import logging
import time

import asyncpg

from broker.store import (
    postgres_devices,
    postgres_files,
    postgres_identity,
    postgres_messaging_schema,
    postgres_presence,
    postgres_retained,
    postgres_sessions,
    postgres_telemetry,
    postgres_websessions,
)
from broker.store.base import StoreCannotOpen
from broker.store.postgres_db import PgDatabase
from broker.store.postgres_messaging_schema import MESSAGING_DDL

log = logging.getLogger("roost.store")

PgMigration = tuple[int, str, str]

CORE_DDL = "\n".join((
    postgres_identity.DDL,
    postgres_retained.DDL,
    postgres_sessions.DDL,
    postgres_devices.DDL,
    postgres_presence.DDL,
    postgres_telemetry.DDL,
))

MIGRATIONS: list[PgMigration] = [
    (1, "core: principals, retained, admin log, mqtt sessions, devices, presence, telemetry", CORE_DDL),
    (2, "messaging and social", MESSAGING_DDL),
    (3, "telemetry history and files", postgres_telemetry.HISTORY_DDL + postgres_files.DDL),
    (4, "file contents kept when their uploaders are removed", postgres_files.CONTENTS_DDL),
    (5, "mqtt 5 session expiry, subscription options, message properties and expiry", postgres_sessions.MQTT5_DDL),
    (6, "web sign-in sessions, shared by every node", postgres_websessions.DDL),
    (7, "files' bytes, so every node serves every file", postgres_files.BLOBS_DDL),
    (8, "messaging: a send in one server-side function (one round trip)", postgres_messaging_schema.SEND_FUNCTION_DDL),
]

# For `roost migrate` (broker/store/postgres_import.py): tables the DDL fills
# itself (one-row counters: neither checked for emptiness nor copied) and the
# statements that bring them up to date after a copy.
SEEDED_TABLES: frozenset[str] = frozenset((*postgres_identity.SEEDED_TABLES, *postgres_messaging_schema.SEEDED_TABLES))
AFTER_IMPORT: tuple[str, ...] = (*postgres_identity.AFTER_IMPORT, *postgres_messaging_schema.AFTER_IMPORT)

# pg_advisory_xact_lock key of schema migrations: any fixed 64-bit number, the same on every node.
MIGRATION_LOCK = 0x526F6F7374_01   # "Roost", 1


async def migrate(db: PgDatabase, migrations: list[PgMigration] | None = None) -> list[int]:
    """Apply the pending migrations (all or none); returns the versions applied now.
    Raises StoreCannotOpen with one line when the schema cannot be brought up to date."""
    steps = MIGRATIONS if migrations is None else migrations
    known = max((v for v, _n, _s in steps), default=0)
    try:
        async with db.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                               "name text NOT NULL, applied_at double precision NOT NULL)")
            done = {int(r[0]) for r in await conn.fetch("SELECT version FROM schema_migrations")}
            newer = sorted(v for v in done if v > known)
            if newer:
                raise StoreCannotOpen(f"the database has schema version {newer[-1]}, newer than this Roost knows "
                                      f"({known}): upgrade Roost")
            applied = []
            for version, name, sql in steps:
                if version in done or not sql.strip():
                    continue
                try:
                    await conn.execute(sql)
                except asyncpg.PostgresError as exc:
                    raise StoreCannotOpen(f"schema migration {version} ({name}) failed: "
                                          f"{' '.join(str(exc).split())}") from None
                await conn.execute("INSERT INTO schema_migrations(version, name, applied_at) VALUES ($1, $2, $3)",
                                   version, name, time.time())
                applied.append(version)
    except asyncpg.PostgresError as exc:   # e.g. no right to create tables
        raise StoreCannotOpen(f"cannot migrate the schema: {' '.join(str(exc).split())}") from None
    for version in applied:
        log.info("applied schema migration %d", version)
    return applied


async def applied_versions(db: PgDatabase) -> list[int]:
    """The versions recorded in the database (empty when it was never migrated)."""
    async def job(conn: asyncpg.Connection) -> list[int]:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not exists:
            return []
        return [int(r[0]) for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")]

    return await db.read(job)
