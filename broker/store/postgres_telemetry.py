"""PostgreSQL implementation of TelemetryStore: the latest readings of each device,
and a short recent history of each for charts.

Latest: one row per device, replaced in place. History: one row per device and
ts, bounded by the caller's `keep` per device and `expire_before` (the long
time series goes to InfluxDB, never here). Rows of a removed device go with it (ON DELETE CASCADE), and a
write for a device that no longer exists is skipped rather than failing the
whole batch, because the telemetry service writes behind, after the fact.
"""

from __future__ import annotations

import json

from asyncpg import Connection

from broker.store.base import HistoryPoint, LatestReading
from broker.store.historyutil import select_history
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

# A later migration (postgres_schema.MIGRATIONS): databases made before it have the table above only.
HISTORY_DDL = """
CREATE TABLE telemetry_history (
    device text COLLATE "C" NOT NULL REFERENCES principals(id) ON DELETE CASCADE,
    ts double precision NOT NULL,
    fields text NOT NULL,
    PRIMARY KEY (device, ts)
);
CREATE INDEX telemetry_history_ts ON telemetry_history(ts);
"""

_APPEND = ("INSERT INTO telemetry_history(device, ts, fields) "
           "SELECT r.* FROM unnest($1::text[], $2::float8[], $3::text[]) AS r(device, ts, fields) "
           "WHERE EXISTS (SELECT 1 FROM principals p WHERE p.id = r.device) "
           "ON CONFLICT (device, ts) DO UPDATE SET fields=excluded.fields "
           "RETURNING device")
_TRIM = ("DELETE FROM telemetry_history h USING unnest($1::text[]) AS d(device) "
         "WHERE h.device = d.device AND h.ts < COALESCE((SELECT k.ts FROM telemetry_history k "
         "WHERE k.device = d.device ORDER BY k.ts DESC LIMIT 1 OFFSET $2), -1)")


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
        rows = sorted(last.values(), key=lambda r: r.device)   # one lock order for every node
        if not rows:
            return 0
        texts = [json.dumps(r.fields, separators=(",", ":"), ensure_ascii=False) for r in rows]

        async def job(conn: Connection) -> int:
            written = {r[0] for r in await conn.fetch(
                _UPSERT, [r.device for r in rows], [r.ts for r in rows], texts)}
            return sum(1 for r in readings if r.device in written)

        return await self._db.autocommit(job)

    async def delete_latest(self, device: str) -> None:
        async def job(conn: Connection) -> None:
            await conn.execute("DELETE FROM telemetry_latest WHERE device=$1", device)

        await self._db.autocommit(job)

    async def put_history(self, points: list[HistoryPoint], *, keep: int, expire_before: float) -> int:
        last = {(p.device, p.ts): p for p in points}   # one statement may not touch a row twice
        rows = list(last.values())
        texts = [json.dumps(p.fields, separators=(",", ":")) for p in rows]

        async def job(conn: Connection) -> int:
            written = 0
            if rows:
                written = len(await conn.fetch(_APPEND, [p.device for p in rows], [p.ts for p in rows], texts))
                await conn.execute(_TRIM, sorted({p.device for p in rows}), max(0, keep - 1))
            await conn.execute("DELETE FROM telemetry_history WHERE ts < $1", expire_before)
            return written

        return await self._db.write(job)

    async def history(self, device: str, *, metric: str | None, since: float, limit: int) -> list[HistoryPoint]:
        # A device's history is bounded (put_history's `keep`): filtering by metric here is bounded too.
        if metric is None:
            rows = await self._db.read(lambda conn: conn.fetch(
                "SELECT ts, fields FROM telemetry_history WHERE device=$1 AND ts>$2 ORDER BY ts DESC LIMIT $3",
                device, since, limit))
        else:
            rows = await self._db.read(lambda conn: conn.fetch(
                "SELECT ts, fields FROM telemetry_history WHERE device=$1 AND ts>$2 ORDER BY ts DESC",
                device, since))
        return select_history(device, [(float(r[0]), r[1]) for r in rows], metric, limit)
