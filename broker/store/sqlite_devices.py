"""SQLite implementation of DeviceStore (ownership and shares) and PresenceStore
(last known presence, so a restart can announce `offline` with the right `last_seen`)."""

from __future__ import annotations

import sqlite3

from broker.store.base import DeviceUser, NotFoundError, PresenceRecord
from broker.store.sqlite_db import Database, Migration

# Rows disappear with their principal (foreign keys are on), so removing a device
# or a person never leaves ghost owners or stale presence behind.
MIGRATIONS: list[Migration] = [
    ("devices_0001_users", """
        CREATE TABLE device_users (
            device TEXT NOT NULL REFERENCES principals(id) ON DELETE CASCADE,
            principal TEXT NOT NULL REFERENCES principals(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('owner','sharee')),
            granted_by TEXT,
            created_at REAL NOT NULL,
            PRIMARY KEY (device, principal)
        );
        CREATE INDEX device_users_principal ON device_users(principal);
    """),
    ("presence_0001", """
        CREATE TABLE presence (
            principal TEXT PRIMARY KEY REFERENCES principals(id) ON DELETE CASCADE,
            state TEXT NOT NULL CHECK (state IN ('online','offline')),
            since REAL NOT NULL,
            last_seen REAL NOT NULL
        );
    """),
    ("presence_0002_alive", """
        CREATE TABLE broker_alive (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            at REAL NOT NULL
        );
    """),
]


class SqliteDeviceStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def list_device_users(self) -> list[DeviceUser]:
        rows = await self._db.read(lambda conn: conn.execute(
            "SELECT device, principal, role, granted_by, created_at FROM device_users ORDER BY device, created_at"
        ).fetchall())
        return [DeviceUser(*r) for r in rows]

    async def put_device_user(self, du: DeviceUser) -> None:
        def job(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO device_users(device, principal, role, granted_by, created_at) VALUES (?,?,?,?,?) "
                    "ON CONFLICT(device, principal) DO UPDATE SET role=excluded.role, granted_by=excluded.granted_by",
                    (du.device, du.principal, du.role, du.granted_by, du.created_at),
                )
            except sqlite3.IntegrityError:
                raise NotFoundError(f"device {du.device!r} or principal {du.principal!r} does not exist") from None

        await self._db.write(job)

    async def remove_device_user(self, device: str, principal: str) -> bool:
        return await self._db.write(lambda conn: conn.execute(
            "DELETE FROM device_users WHERE device=? AND principal=?", (device, principal)).rowcount > 0)


class SqlitePresenceStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def load_presence(self) -> list[PresenceRecord]:
        rows = await self._db.read(lambda conn: conn.execute(
            "SELECT principal, state, since, last_seen FROM presence").fetchall())
        return [PresenceRecord(*r) for r in rows]

    async def last_alive(self) -> float | None:
        row = await self._db.read(lambda conn: conn.execute("SELECT at FROM broker_alive WHERE id=1").fetchone())
        return row[0] if row else None

    async def save_presence(self, records: list[PresenceRecord], alive_at: float | None = None) -> int:
        def job(conn: sqlite3.Connection) -> int:
            if alive_at is not None:
                conn.execute("INSERT INTO broker_alive(id, at) VALUES (1, ?) "
                             "ON CONFLICT(id) DO UPDATE SET at=excluded.at", (alive_at,))
            written = 0
            for r in records:
                # INSERT ... SELECT skips principals removed meanwhile instead of
                # failing the whole batch on the foreign key.
                cur = conn.execute(
                    "INSERT INTO presence(principal, state, since, last_seen) "
                    "SELECT ?,?,?,? WHERE EXISTS (SELECT 1 FROM principals WHERE id=?) "
                    "ON CONFLICT(principal) DO UPDATE SET state=excluded.state, since=excluded.since, "
                    "last_seen=excluded.last_seen",
                    (r.principal, r.state, r.since, r.last_seen, r.principal),
                )
                written += cur.rowcount
            return written

        return await self._db.write(job)
