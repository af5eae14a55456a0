"""PostgreSQL implementation of RetainedStore: one row per topic with a retained message."""

from __future__ import annotations

from asyncpg import Connection

from broker.store.base import RetainedMessage
from broker.store.postgres_db import PgDatabase

DDL = """
CREATE TABLE retained (
    topic text COLLATE "C" PRIMARY KEY,
    payload bytea NOT NULL,
    qos integer NOT NULL
);
"""


class PgRetainedStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def load_all(self) -> list[RetainedMessage]:
        # properties and expires_at: MQTT 5 (added by migration 5, postgres_sessions.MQTT5_DDL)
        rows = await self._db.read(lambda conn: conn.fetch(
            "SELECT topic, payload, qos, properties, expires_at FROM retained"))
        return [RetainedMessage(r[0], bytes(r[1]), int(r[2]), None if r[3] is None else bytes(r[3]),
                                None if r[4] is None else float(r[4])) for r in rows]

    async def put(self, msg: RetainedMessage) -> None:
        async def job(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO retained(topic, payload, qos, properties, expires_at) VALUES ($1,$2,$3,$4,$5) "
                "ON CONFLICT (topic) DO UPDATE SET payload=excluded.payload, qos=excluded.qos, "
                "properties=excluded.properties, expires_at=excluded.expires_at",
                msg.topic, msg.payload, msg.qos, msg.properties, msg.expires_at)

        await self._db.autocommit(job)

    async def delete(self, topic: str) -> None:
        async def job(conn: Connection) -> None:
            await conn.execute("DELETE FROM retained WHERE topic=$1", topic)

        await self._db.autocommit(job)
