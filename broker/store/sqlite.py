"""The SQLite store: one database file, one writer, every domain repository."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from broker.store import (
    sqlite_devices,
    sqlite_files,
    sqlite_identity,
    sqlite_messaging,
    sqlite_sessions,
    sqlite_social,
    sqlite_telemetry,
    sqlite_websessions,
)
from broker.store.base import StoreCannotOpen
from broker.store.sqlite_db import Database, Migration
from broker.store.sqlite_identity import SqliteIdentityStore, SqliteRetainedStore

# Domain modules contribute their migrations in this fixed order.
MIGRATIONS: list[Migration] = [
    *sqlite_identity.MIGRATIONS,
    *sqlite_messaging.MIGRATIONS,
    *sqlite_social.MIGRATIONS,
    *sqlite_devices.MIGRATIONS,
    *sqlite_telemetry.MIGRATIONS,
    *sqlite_sessions.MIGRATIONS,
    *sqlite_files.MIGRATIONS,
    *sqlite_websessions.MIGRATIONS,
]


class SqliteStore:
    """Implements broker.store.base's `Store` on one SQLite file. `db` (the writer
    and reader threads) is for this engine's own modules and its tests only."""

    def __init__(self, path: str | Path) -> None:
        self.db = Database(path)
        self.identity = SqliteIdentityStore(
            self.db, purges=(sqlite_messaging.purge_principal, sqlite_social.purge_principal))
        self.retained = SqliteRetainedStore(self.db)
        self.messaging = sqlite_messaging.SqliteMessagingStore(self.db)
        self.social = sqlite_social.SqliteSocialStore(self.db)
        self.devices = sqlite_devices.SqliteDeviceStore(self.db)
        self.presence = sqlite_devices.SqlitePresenceStore(self.db)
        self.telemetry = sqlite_telemetry.SqliteTelemetryStore(self.db)
        self.sessions = sqlite_sessions.SqliteSessionStore(self.db)
        self.files = sqlite_files.SqliteFileStore(self.db)
        self.web_sessions = sqlite_websessions.SqliteWebSessionStore(self.db)

    @property
    def health(self) -> Database:
        return self.db

    async def open(self) -> None:
        try:
            await self.db.open(MIGRATIONS)
        except sqlite3.Error as exc:
            raise StoreCannotOpen(str(exc)) from exc

    async def close(self) -> None:
        await self.db.close()
