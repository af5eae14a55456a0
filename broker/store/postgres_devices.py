"""PostgreSQL implementation of DeviceStore: who owns a device and whom it is shared with."""

from __future__ import annotations

import asyncpg
from asyncpg import Connection

from broker.store.base import DeviceUser, NotFoundError
from broker.store.postgres_db import PgDatabase

# Rows disappear with their principal, so removing a device or a person never
# leaves ghost owners behind.
DDL = """
CREATE TABLE device_users (
    device text COLLATE "C" NOT NULL REFERENCES principals(id) ON DELETE CASCADE,
    principal text COLLATE "C" NOT NULL REFERENCES principals(id) ON DELETE CASCADE,
    role text NOT NULL CHECK (role IN ('owner','sharee')),
    granted_by text,
    created_at double precision NOT NULL,
    PRIMARY KEY (device, principal)
);
CREATE INDEX device_users_principal ON device_users (principal);
"""


class PgDeviceStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def list_device_users(self) -> list[DeviceUser]:
        rows = await self._db.read(lambda conn: conn.fetch(
            "SELECT device, principal, role, granted_by, created_at FROM device_users ORDER BY device, created_at"))
        return [DeviceUser(r[0], r[1], r[2], r[3], float(r[4])) for r in rows]

    async def put_device_user(self, du: DeviceUser) -> None:
        async def job(conn: Connection) -> None:
            try:
                await conn.execute(
                    "INSERT INTO device_users(device, principal, role, granted_by, created_at) VALUES ($1,$2,$3,$4,$5) "
                    "ON CONFLICT (device, principal) DO UPDATE SET role=excluded.role, granted_by=excluded.granted_by",
                    du.device, du.principal, du.role, du.granted_by, du.created_at)
            except asyncpg.ForeignKeyViolationError:
                raise NotFoundError(f"device {du.device!r} or principal {du.principal!r} does not exist") from None

        await self._db.autocommit(job)

    async def remove_device_user(self, device: str, principal: str) -> bool:
        async def job(conn: Connection) -> bool:
            return await conn.fetchval("DELETE FROM device_users WHERE device=$1 AND principal=$2 RETURNING 1",
                                       device, principal) is not None

        return await self._db.autocommit(job)
