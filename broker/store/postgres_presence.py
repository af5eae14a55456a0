"""PostgreSQL implementation of PresenceStore: the last known presence of each
principal (so a restart can announce `offline` with the right `last_seen`), and
when a broker was last known running."""

from __future__ import annotations

from asyncpg import Connection

from broker.store.base import PresenceRecord
from broker.store.postgres_db import PgDatabase

DDL = """
CREATE TABLE presence (
    principal text COLLATE "C" PRIMARY KEY REFERENCES principals(id) ON DELETE CASCADE,
    state text NOT NULL CHECK (state IN ('online','offline')),
    since double precision NOT NULL,
    last_seen double precision NOT NULL
);
CREATE TABLE broker_alive (
    id integer PRIMARY KEY CHECK (id = 1),
    at double precision NOT NULL
);
"""

# INSERT ... SELECT skips principals removed meanwhile instead of failing the
# whole batch on the foreign key.
_UPSERT = ("INSERT INTO presence(principal, state, since, last_seen) "
           "SELECT r.* FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[]) AS r(principal, state, since, last_seen) "
           "WHERE EXISTS (SELECT 1 FROM principals p WHERE p.id = r.principal) "
           "ON CONFLICT (principal) DO UPDATE SET state=excluded.state, since=excluded.since, last_seen=excluded.last_seen "
           "RETURNING principal")


class PgPresenceStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def load_presence(self) -> list[PresenceRecord]:
        rows = await self._db.read(lambda conn: conn.fetch("SELECT principal, state, since, last_seen FROM presence"))
        return [PresenceRecord(r[0], r[1], float(r[2]), float(r[3])) for r in rows]

    async def last_alive(self) -> float | None:
        value = await self._db.read(lambda conn: conn.fetchval("SELECT at FROM broker_alive WHERE id=1"))
        return float(value) if value is not None else None

    async def save_presence(self, records: list[PresenceRecord], alive_at: float | None = None) -> int:
        # one statement for the batch; the last record of a principal wins, as one by one
        last = {r.principal: r for r in records}
        rows = sorted(last.values(), key=lambda r: r.principal)   # one lock order for every node

        async def job(conn: Connection) -> int:
            if alive_at is not None:
                await conn.execute("INSERT INTO broker_alive(id, at) VALUES (1, $1) "
                                   "ON CONFLICT (id) DO UPDATE SET at=excluded.at", alive_at)
            if not rows:
                return 0
            written = {r[0] for r in await conn.fetch(
                _UPSERT, [r.principal for r in rows], [r.state for r in rows], [r.since for r in rows],
                [r.last_seen for r in rows])}
            return sum(1 for r in records if r.principal in written)

        # without alive_at it is one statement, atomic by itself
        return await (self._db.write(job) if alive_at is not None else self._db.autocommit(job))
