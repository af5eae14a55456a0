"""PostgreSQL implementation of TelemetryStore: the latest readings of each device.

One row per device, replaced in place (the time series itself goes to InfluxDB,
never here). Rows of a removed device go with it (ON DELETE CASCADE), and a
write for a device that no longer exists is skipped rather than failing the
whole batch, because the telemetry service writes behind, after the fact.
"""

from __future__ import annotations

import json

from asyncpg import Connection

from broker.store.base import LatestReading
from broker.store.postgres_db import PgDatabase

DDL = """
CREATE TABLE telemetry_latest (
    device text COLLATE "C" PRIMARY KEY REFERENCES principals(id) ON DELETE CASCADE,
    ts double precision NOT NULL,
    fields text NOT NULL
);
"""

_UPSERT = ("INSERT INTO telemetry_latest(device, ts, fields) "
           "SELECT r.* FROM unnest($1::text[], $2::float8[], $3::text[]) AS r(device, ts, fields) "
           "WHERE EXISTS (SELECT 1 FROM principals p WHERE p.id = r.device) "
           "ON CONFLICT (device) DO UPDATE SET ts=excluded.ts, fields=excluded.fields "
           "RETURNING device")


def _reading(device: str, ts: float, fields: str) -> LatestReading | None:
    try:
        doc = json.loads(fields)
    except ValueError:
        return None   # a damaged row is a missing reading, not a failed start
    return LatestReading(device=device, ts=float(ts), fields=doc) if isinstance(doc, dict) else None


class PgTelemetryStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def load_latest(self) -> list[LatestReading]:
        rows = await self._db.read(lambda conn: conn.fetch(
            "SELECT device, ts, fields FROM telemetry_latest ORDER BY device"))
        return [r for r in (_reading(row[0], row[1], row[2]) for row in rows) if r is not None]

    async def get_latest(self, device: str) -> LatestReading | None:
        row = await self._db.read(lambda conn: conn.fetchrow(
            "SELECT ts, fields FROM telemetry_latest WHERE device=$1", device))
        return LatestReading(device=device, ts=float(row[0]), fields=json.loads(row[1])) if row is not None else None

    async def put_latest(self, readings: list[LatestReading]) -> int:
        # one statement for the batch; the last reading of a device wins, as one by one
        last = {r.device: r for r in readings}
        rows = list(last.values())
        if not rows:
            return 0
        texts = [json.dumps(r.fields, separators=(",", ":"), ensure_ascii=False) for r in rows]

        async def job(conn: Connection) -> int:
            written = {r[0] for r in await conn.fetch(
                _UPSERT, [r.device for r in rows], [r.ts for r in rows], texts)}
            return sum(1 for r in readings if r.device in written)

        return await self._db.write(job)

    async def delete_latest(self, device: str) -> None:
        async def job(conn: Connection) -> None:
            await conn.execute("DELETE FROM telemetry_latest WHERE device=$1", device)

        await self._db.write(job)
