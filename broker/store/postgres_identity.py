"""PostgreSQL implementation of IdentityStore: principals and the admin log."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
from asyncpg import Connection

from broker.store.base import AlreadyExists, Principal
from broker.store.postgres_db import PgDatabase

# Text keys are COLLATE "C": ORDER BY gives SQLite's byte order whatever the database's locale.
DDL = """
CREATE TABLE principals (
    id text COLLATE "C" PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('user','device','service')),
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT '',
    secret_hash text NOT NULL,
    created_at double precision NOT NULL,
    device_kind text,
    room text,
    pairing_code text,
    secret_set_at double precision NOT NULL DEFAULT 0
);
CREATE INDEX principals_name ON principals (kind, lower(name) text_pattern_ops);
-- Admin commands may run in another process (or on another node) than the broker:
-- they append here and every broker applies the changes. `seq` is allocated from
-- admin_log_head's one row, whose lock is held until commit: seqs commit in order,
-- without gaps, so a reader that has seen seq N never misses a smaller one later.
CREATE TABLE admin_log (
    seq bigint PRIMARY KEY,
    principal text NOT NULL,
    action text NOT NULL,
    at double precision NOT NULL
);
CREATE TABLE admin_log_head (
    id integer PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL
);
INSERT INTO admin_log_head (id, seq) VALUES (1, 0);
"""

# `roost migrate`: admin_log_head is the DDL's own row, set from the admin log copied.
SEEDED_TABLES = ("admin_log_head",)
AFTER_IMPORT = ("UPDATE admin_log_head SET seq = (SELECT coalesce(max(seq), 0) FROM admin_log) WHERE id = 1",)

_COLUMNS = "id, kind, name, status, secret_hash, created_at, device_kind, room, pairing_code, secret_set_at"

# A purge runs with every registration, in its transaction: another domain forgets
# what an earlier principal with this id left behind (removed while no broker ran).
Purge = Callable[[Connection, str], Awaitable[object]]


def _row(r: asyncpg.Record) -> Principal:
    return Principal(r[0], r[1], r[2], r[3], r[4], float(r[5]), r[6], r[7], r[8], float(r[9]))


class PgIdentityStore:
    def __init__(self, db: PgDatabase, purges: Sequence[Purge] = ()) -> None:
        self._db = db
        self._purges = tuple(purges)

    async def add_principal(self, p: Principal) -> None:
        async def job(conn: Connection) -> None:
            try:
                async with conn.transaction():   # a savepoint: the duplicate alone is rolled back
                    await conn.execute(
                        f"INSERT INTO principals ({_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
                        p.id, p.kind, p.name, p.status, p.secret_hash, p.created_at, p.device_kind, p.room,
                        p.pairing_code, p.secret_set_at or p.created_at)
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(p.id) from None
            for purge in self._purges:
                await purge(conn, p.id)

        await self._db.write(job)

    async def get_principal(self, principal_id: str) -> Principal | None:
        r = await self._db.read(lambda conn: conn.fetchrow(
            f"SELECT {_COLUMNS} FROM principals WHERE id=$1", principal_id))
        return _row(r) if r is not None else None

    async def list_principals(self, kind: str | None = None) -> list[Principal]:
        if kind is None:
            rows = await self._db.read(lambda conn: conn.fetch(f"SELECT {_COLUMNS} FROM principals ORDER BY id"))
        else:
            rows = await self._db.read(lambda conn: conn.fetch(
                f"SELECT {_COLUMNS} FROM principals WHERE kind=$1 ORDER BY id", kind))
        return [_row(r) for r in rows]

    async def remove_principal(self, principal_id: str) -> bool:
        async def job(conn: Connection) -> bool:
            return await conn.fetchval("DELETE FROM principals WHERE id=$1 RETURNING 1", principal_id) is not None

        return await self._db.autocommit(job)

    async def set_secret(self, principal_id: str, secret_hash: str) -> bool:
        now = time.time()

        async def job(conn: Connection) -> bool:
            return await conn.fetchval("UPDATE principals SET secret_hash=$1, secret_set_at=$2 WHERE id=$3 RETURNING 1",
                                       secret_hash, now, principal_id) is not None

        return await self._db.autocommit(job)

    async def set_pairing_code(self, principal_id: str, code: str) -> bool:
        """`code` is the hash of the pairing code (IdentityService hashes it)."""
        async def job(conn: Connection) -> bool:
            return await conn.fetchval("UPDATE principals SET pairing_code=$1 WHERE id=$2 AND kind='device' RETURNING 1",
                                       code, principal_id) is not None

        return await self._db.autocommit(job)

    async def set_profile(self, principal_id: str, *, name: str | None, status: str | None) -> Principal | None:
        async def job(conn: Connection) -> Principal | None:
            r = await conn.fetchrow(
                f"UPDATE principals SET name=coalesce($1, name), status=coalesce($2, status) WHERE id=$3 "
                f"RETURNING {_COLUMNS}", name, status, principal_id)
            return _row(r) if r is not None else None

        return await self._db.autocommit(job)

    async def log_admin(self, principal_id: str, action: str) -> None:
        async def job(conn: Connection) -> None:
            await conn.execute(
                "WITH head AS (UPDATE admin_log_head SET seq = seq + 1 WHERE id = 1 RETURNING seq) "
                "INSERT INTO admin_log(seq, principal, action, at) "
                "SELECT head.seq, $1, $2, extract(epoch FROM now()) FROM head", principal_id, action)

        await self._db.autocommit(job)   # one statement: the counter's row lock is held until it commits

    async def admin_log_after(self, seq: int) -> list[tuple[int, str, str]]:
        rows = await self._db.read(lambda conn: conn.fetch(
            "SELECT seq, principal, action FROM admin_log WHERE seq>$1 ORDER BY seq LIMIT 1000", seq))
        return [(int(r[0]), r[1], r[2]) for r in rows]

    async def admin_log_head(self) -> int:
        value = await self._db.read(lambda conn: conn.fetchval("SELECT max(seq) FROM admin_log"))
        return int(value or 0)

    async def search_users(self, query: str, limit: int) -> list[Principal]:
        like = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = await self._db.read(lambda conn: conn.fetch(
            f"SELECT {_COLUMNS} FROM principals WHERE kind='user' AND (id=$1 OR "
            "(length($1) >= 2 AND lower(name) LIKE lower($2) ESCAPE '\\')) ORDER BY id LIMIT $3",
            query, like, limit))
        return [_row(r) for r in rows]
