"""PostgreSQL implementation of WebSessionStore: the web app's signed-in browsers,
shared by every node (a cookie made on one node works on all of them).

The table mirrors SQLite's (broker/store/sqlite_websessions.py), so `roost
migrate` copies it as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
from asyncpg import Connection

from broker.store.base import NotFoundError, WebSessionRecord
from broker.store.postgres_db import PgDatabase

DDL = """
CREATE TABLE web_sessions (
    key text COLLATE "C" PRIMARY KEY,
    principal text COLLATE "C" NOT NULL REFERENCES principals(id) ON DELETE CASCADE,
    kind text NOT NULL,
    csrf text NOT NULL,
    created double precision NOT NULL,
    used double precision NOT NULL,
    expires_at double precision
);
CREATE INDEX web_sessions_principal ON web_sessions(principal);
CREATE INDEX web_sessions_used ON web_sessions(used);
CREATE INDEX web_sessions_created ON web_sessions(created);
"""

_COLUMNS = "key, principal, kind, csrf, created, used, expires_at"


def _record(row: Any) -> WebSessionRecord | None:
    if row is None:
        return None
    return WebSessionRecord(row[0], row[1], row[2], row[3], float(row[4]), float(row[5]),
                            None if row[6] is None else float(row[6]))


def _count(status: str) -> int:
    """The row count of a command tag ("DELETE 3", "UPDATE 1")."""
    return int(status.rsplit(" ", 1)[-1])


class PgWebSessionStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def create(self, rec: WebSessionRecord, *, max_sessions: int) -> tuple[int, int]:
        async def job(conn: Connection) -> tuple[int, int]:
            try:
                await conn.execute(f"INSERT INTO web_sessions({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                                   rec.key, rec.principal, rec.kind, rec.csrf, rec.created, rec.used, rec.expires_at)
            except asyncpg.ForeignKeyViolationError:
                raise NotFoundError(rec.principal) from None
            count = int(await conn.fetchval("SELECT COUNT(*) FROM web_sessions"))
            over = count - max(1, max_sessions)
            if over <= 0:
                return count, 0
            # Two nodes signing people in at once may both evict: the table stays bounded either way.
            evicted = _count(await conn.execute(
                "DELETE FROM web_sessions WHERE key IN (SELECT key FROM web_sessions WHERE key <> $1 "
                "ORDER BY used, created LIMIT $2 FOR UPDATE SKIP LOCKED)", rec.key, over))
            return count - evicted, evicted

        return await self._db.write(job)

    async def get(self, key: str) -> WebSessionRecord | None:
        return _record(await self._db.read(lambda conn: conn.fetchrow(
            f"SELECT {_COLUMNS} FROM web_sessions WHERE key=$1", key)))

    async def existing(self, keys: Sequence[str]) -> set[str]:
        rows = await self._db.read(lambda conn: conn.fetch(
            "SELECT key FROM web_sessions WHERE key = ANY($1::text[])", list(keys)))
        return {r[0] for r in rows}

    async def touch(self, key: str, used: float) -> None:
        async def job(conn: Connection) -> None:
            await conn.execute("UPDATE web_sessions SET used=$2 WHERE key=$1 AND used < $2", key, used)

        await self._db.autocommit(job)

    async def delete(self, key: str) -> bool:
        async def job(conn: Connection) -> bool:
            return _count(await conn.execute("DELETE FROM web_sessions WHERE key=$1", key)) > 0

        return await self._db.autocommit(job)

    async def delete_principal(self, principal: str) -> int:
        async def job(conn: Connection) -> int:
            return _count(await conn.execute("DELETE FROM web_sessions WHERE principal=$1", principal))

        return await self._db.autocommit(job)

    async def expire(self, *, used_before: float, created_before: float, now: float) -> int:
        async def job(conn: Connection) -> int:
            return _count(await conn.execute(
                "DELETE FROM web_sessions WHERE used < $1 OR created < $2 OR expires_at <= $3",
                used_before, created_before, now))

        return await self._db.autocommit(job)

    async def count(self) -> int:
        return int(await self._db.read(lambda conn: conn.fetchval("SELECT COUNT(*) FROM web_sessions")))
