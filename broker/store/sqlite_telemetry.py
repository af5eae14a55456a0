"""SQLite implementation of TelemetryStore: the latest readings of each device,
and a short recent history of each for charts.

Latest: one row per device, replaced in place. History: one row per device and
ts, bounded by the caller's `keep` per device and `expire_before` (the long
time series goes to InfluxDB, never here). Rows of a removed device go with it (foreign key, ON DELETE CASCADE),
and a write for a device that no longer exists is skipped rather than failing the
whole batch, because the telemetry service writes behind, after the fact.
"""

from __future__ import annotations

import json
import sqlite3

from broker.store.base import HistoryPoint, LatestReading
from broker.store.historyutil import select_history
from broker.store.sqlite_db import Database, Migration

MIGRATIONS: list[Migration] = [
    ("0100_telemetry_latest", """
        CREATE TABLE telemetry_latest (
            device TEXT PRIMARY KEY REFERENCES principals(id) ON DELETE CASCADE,
            ts REAL NOT NULL,
            fields TEXT NOT NULL
        );
    """),
    ("0101_telemetry_history", """
        CREATE TABLE telemetry_history (
            device TEXT NOT NULL REFERENCES principals(id) ON DELETE CASCADE,
            ts REAL NOT NULL,
            fields TEXT NOT NULL,
            PRIMARY KEY (device, ts)
        ) WITHOUT ROWID;
        CREATE INDEX telemetry_history_ts ON telemetry_history(ts);
    """),
]


class SqliteTelemetryStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def load_latest(self) -> list[LatestReading]:
        def job(conn: sqlite3.Connection) -> list[LatestReading]:
            rows = conn.execute("SELECT device, ts, fields FROM telemetry_latest ORDER BY device").fetchall()
            out = []
            for device, ts, fields in rows:
                try:
                    doc = json.loads(fields)
                except ValueError:
                    continue  # a damaged row is a missing reading, not a failed start
                if isinstance(doc, dict):
                    out.append(LatestReading(device=device, ts=float(ts), fields=doc))
            return out

        return await self._db.read(job)

    async def get_latest(self, device: str) -> LatestReading | None:
        def job(conn: sqlite3.Connection) -> LatestReading | None:
            r = conn.execute("SELECT ts, fields FROM telemetry_latest WHERE device=?", (device,)).fetchone()
            return LatestReading(device=device, ts=float(r[0]), fields=json.loads(r[1])) if r else None

        return await self._db.read(job)

    async def put_latest(self, readings: list[LatestReading]) -> int:
        rows = [(r.device, r.ts, json.dumps(r.fields, separators=(",", ":"), ensure_ascii=False), r.device)
                for r in readings]

        def job(conn: sqlite3.Connection) -> int:
            n = 0
            for row in rows:
                n += conn.execute(
                    "INSERT INTO telemetry_latest(device, ts, fields) "
                    "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM principals WHERE id=?) "
                    "ON CONFLICT(device) DO UPDATE SET ts=excluded.ts, fields=excluded.fields",
                    row,
                ).rowcount
            return n

        return await self._db.write(job)

    async def delete_latest(self, device: str) -> None:
        await self._db.write(lambda conn: conn.execute("DELETE FROM telemetry_latest WHERE device=?", (device,)))

    async def put_history(self, points: list[HistoryPoint], *, keep: int, expire_before: float) -> int:
        rows = [(p.device, p.ts, json.dumps(p.fields, separators=(",", ":")), p.device) for p in points]
        devices = sorted({p.device for p in points})

        def job(conn: sqlite3.Connection) -> int:
            n = 0
            for row in rows:
                n += conn.execute(
                    "INSERT OR REPLACE INTO telemetry_history(device, ts, fields) "
                    "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM principals WHERE id=?)", row).rowcount
            for device in devices:
                conn.execute(
                    "DELETE FROM telemetry_history WHERE device=? AND ts < COALESCE(("
                    "SELECT ts FROM telemetry_history WHERE device=? ORDER BY ts DESC LIMIT 1 OFFSET ?), -1)",
                    (device, device, max(0, keep - 1)))
            conn.execute("DELETE FROM telemetry_history WHERE ts < ?", (expire_before,))
            return n

        return await self._db.write(job)

    async def history(self, device: str, *, metric: str | None, since: float, limit: int) -> list[HistoryPoint]:
        def job(conn: sqlite3.Connection) -> list[tuple[float, str]]:
            # A device's history is bounded (put_history's `keep`): filtering by metric here is bounded too.
            return conn.execute(
                "SELECT ts, fields FROM telemetry_history WHERE device=? AND ts>? ORDER BY ts DESC"
                + ("" if metric is not None else " LIMIT ?"),
                (device, since) if metric is not None else (device, since, limit)).fetchall()

        return select_history(device, await self._db.read(job), metric, limit)

