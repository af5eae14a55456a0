"""Copy a SQLite store into an empty PostgreSQL store, every row as it is
(`roost migrate --to postgresql://...`).

Both engines keep the same tables and columns (the PostgreSQL DDL mirrors
SQLite's), so the copy is table by table, column by column: ids, seqs, mailbox
numbers, cursors, secret hashes and payload digests arrive unchanged, and the
migrated store answers exactly as the SQLite one did. Rows go in with COPY, in
one transaction (all or nothing), parents before children (the foreign keys of
the PostgreSQL schema give the order). Afterwards every serial column's sequence
is moved past the largest id copied and the statements of
postgres_schema.AFTER_IMPORT bring PostgreSQL-only counters up to date.

The SQLite side is read in one read transaction (a consistent snapshot) on a
worker thread, in chunks, so a large store is never held in memory whole.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from asyncpg import Connection

from broker.store.postgres_db import PgDatabase, redacted_dsn
from broker.store.postgres_files import import_blobs
from broker.store.postgres_schema import AFTER_IMPORT, SEEDED_TABLES, migrate

CHUNK_ROWS = 5000

# Tables of SQLite's own, or of its engine's bookkeeping, that are not copied.
_SQLITE_ONLY = {"schema_migrations", "sqlite_sequence"}


class ImportRefused(Exception):
    """The copy cannot be made (target not empty, a table the target lacks...);
    str() is one line saying why. Nothing was written."""


def _convert(pg_type: str) -> Callable[[Any], Any]:
    """SQLite value -> what asyncpg's binary COPY wants for a column of `pg_type`."""
    if pg_type == "boolean":
        return lambda v: None if v is None else bool(v)
    if pg_type in ("integer", "bigint", "smallint"):
        return lambda v: None if v is None else int(v)
    if pg_type in ("double precision", "real", "numeric"):
        return lambda v: None if v is None else float(v)
    if pg_type == "bytea":
        return lambda v: None if v is None else bytes(v) if not isinstance(v, str) else v.encode()
    return lambda v: None if v is None else v if isinstance(v, str) else str(v)


class _SqliteReader:
    """The SQLite store, read-only, in one snapshot, on one worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                     isolation_level=None)
        self._conn.execute("BEGIN")
        self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()   # the snapshot starts here

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    def tables(self) -> dict[str, list[str]]:
        names = [r[0] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {n: [r[1] for r in self.conn.execute(f'PRAGMA table_info("{n}")')]
                for n in names if n not in _SQLITE_ONLY}

    def count(self, table: str) -> int:
        return int(self.conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])

    def cursor(self, table: str, columns: list[str]) -> sqlite3.Cursor:
        cols = ", ".join(f'"{c}"' for c in columns)
        return self.conn.execute(f'SELECT {cols} FROM "{table}"')


async def _pg_columns(conn: Connection) -> dict[str, dict[str, str]]:
    rows = await conn.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position")
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        out.setdefault(str(r[0]), {})[str(r[1])] = str(r[2])
    return out


async def _parents_first(conn: Connection, tables: list[str]) -> list[str]:
    """`tables` ordered so that every table comes after those its foreign keys name."""
    deps: dict[str, set[str]] = {t: set() for t in tables}
    for r in await conn.fetch(
            "SELECT c.conrelid::regclass::text, c.confrelid::regclass::text FROM pg_constraint c "
            "JOIN pg_namespace n ON n.oid = c.connamespace WHERE c.contype = 'f' AND n.nspname = current_schema()"):
        child, parent = str(r[0]).strip('"'), str(r[1]).strip('"')
        if child in deps and parent in deps and child != parent:
            deps[child].add(parent)
    ordered: list[str] = []
    while deps:
        ready = sorted(t for t, ps in deps.items() if not ps - set(ordered))
        if not ready:   # a cycle: cannot happen with this schema; keep a stable order
            ready = sorted(deps)
        for t in ready:
            ordered.append(t)
            del deps[t]
    return ordered


async def _check_empty(conn: Connection, tables: list[str]) -> None:
    for table in tables:
        if table in SEEDED_TABLES or table == "schema_migrations":
            continue
        if await conn.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{table}")'):
            raise ImportRefused(f"the target database is not empty (table {table} has rows): "
                                "migrate into a new, empty database")


async def import_sqlite(sqlite_path: Path, dsn: str, *,
                        on_table: Callable[[str, int], None] | None = None,
                        files_dir: Path | None = None) -> dict[str, int]:
    """Copy the (already opened once, so migrated) SQLite store at `sqlite_path` into
    the PostgreSQL database at `dsn`, which gets Roost's schema if it has none and
    must hold no rows; with `files_dir` (the home's blob folder), the files' bytes
    too (PostgreSQL keeps them: postgres_files.import_blobs). Returns {table: rows
    copied}. Raises ImportRefused, or StoreCannotOpen / StoreUnavailable for the server."""
    loop = asyncio.get_running_loop()
    reader = _SqliteReader(sqlite_path)
    await loop.run_in_executor(None, reader.open)
    db = PgDatabase(dsn, pool_size=1, command_timeout=3600.0)   # one COPY may take long for a large store
    try:
        source = await loop.run_in_executor(None, reader.tables)
        await db.open()
        await migrate(db)
        copied: dict[str, int] = {}
        async with db.transaction() as conn:
            # nobody else writes these tables while we copy (another migrate, a broker started too early)
            pg = await _pg_columns(conn)
            await _check_empty(conn, sorted(pg))
            for table, columns in source.items():
                if table not in pg:
                    raise ImportRefused(f"the PostgreSQL schema has no table {table}: this Roost cannot migrate "
                                        "that store (is the target migrated by an older Roost?)")
                missing = [c for c in columns if c not in pg[table]]
                if missing:
                    raise ImportRefused(f"the PostgreSQL table {table} has no column {missing[0]}")
            for table in await _parents_first(conn, [t for t in source]):
                columns = source[table]
                await conn.execute(f'LOCK TABLE "{table}" IN EXCLUSIVE MODE')
                converters = [_convert(pg[table][c]) for c in columns]
                cur = await loop.run_in_executor(None, reader.cursor, table, columns)
                count = 0

                async def records(cur: sqlite3.Cursor = cur,
                                  converters: list[Callable[[Any], Any]] = converters) -> AsyncIterator[tuple[Any, ...]]:
                    nonlocal count
                    while True:
                        chunk = await loop.run_in_executor(None, cur.fetchmany, CHUNK_ROWS)
                        if not chunk:
                            return
                        for row in chunk:
                            count += 1
                            yield tuple(f(v) for f, v in zip(converters, row))

                await conn.copy_records_to_table(table, records=records(), columns=columns)
                copied[table] = count
                if on_table is not None:
                    on_table(table, count)
            # serial columns continue after the largest id copied
            for r in await conn.fetch(
                    "SELECT table_name, column_name, pg_get_serial_sequence(quote_ident(table_name), column_name) "
                    "FROM information_schema.columns WHERE table_schema = current_schema() "
                    "AND pg_get_serial_sequence(quote_ident(table_name), column_name) IS NOT NULL"):
                table, column, sequence = str(r[0]), str(r[1]), str(r[2])
                await conn.execute(f"SELECT setval($1, coalesce((SELECT max(\"{column}\") FROM \"{table}\"), 0) + 1, "
                                   "false)", sequence)
            for statement in AFTER_IMPORT:
                await conn.execute(statement)
            if files_dir is not None:
                copied["file_blobs"], _missing = await import_blobs(conn, files_dir)
        return copied
    finally:
        await db.close()
        await loop.run_in_executor(None, reader.close)


def describe_target(dsn: str) -> str:
    """The dsn as it may be printed (no password)."""
    return redacted_dsn(dsn)
