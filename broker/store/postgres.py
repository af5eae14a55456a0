"""The PostgreSQL store: one asyncpg pool, every domain repository, versioned migrations.

Several Roost nodes may use one database at once: every counter (a
conversation's seq, a mailbox's n, the admin log's seq) is allocated inside the
committing transaction, never in a node's memory.
"""

from __future__ import annotations

import importlib
from typing import Any

from broker.store.base import MessagingStore, SocialStore
from broker.store.postgres_db import PgDatabase
from broker.store.postgres_devices import PgDeviceStore
from broker.store.postgres_files import PgFileStore
from broker.store.postgres_identity import PgIdentityStore, Purge
from broker.store.postgres_presence import PgPresenceStore
from broker.store.postgres_retained import PgRetainedStore
from broker.store.postgres_schema import migrate
from broker.store.postgres_sessions import PgSessionStore
from broker.store.postgres_telemetry import PgTelemetryStore


def _messaging_and_social(db: PgDatabase) -> tuple[Any, Any, list[Purge]]:
    """The messaging and social repositories and their purges, once written
    (broker/store/postgres_messaging.py, postgres_social.py)."""
    try:   # until they exist, messaging and social raise NotImplementedError
        postgres_messaging = importlib.import_module("broker.store.postgres_messaging")
        postgres_social = importlib.import_module("broker.store.postgres_social")
    except ModuleNotFoundError:
        return None, None, []
    return (postgres_messaging.PgMessagingStore(db), postgres_social.PgSocialStore(db),
            [postgres_messaging.purge_principal, postgres_social.purge_principal])


class PgStore:
    """Implements broker.store.base's `Store` on a PostgreSQL database. `db` (the
    pool) is for this engine's own modules and its tests only."""

    def __init__(self, dsn: str, *, pool_size: int = 10) -> None:
        self.db = PgDatabase(dsn, pool_size=pool_size)
        self._messaging, self._social, purges = _messaging_and_social(self.db)
        self.identity = PgIdentityStore(self.db, purges=purges)
        self.retained = PgRetainedStore(self.db)
        self.sessions = PgSessionStore(self.db)
        self.devices = PgDeviceStore(self.db)
        self.presence = PgPresenceStore(self.db)
        self.telemetry = PgTelemetryStore(self.db)
        self.files = PgFileStore(self.db)

    @property
    def messaging(self) -> MessagingStore:
        if self._messaging is None:
            raise NotImplementedError("the PostgreSQL messaging store is not written yet")
        store: MessagingStore = self._messaging
        return store

    @property
    def social(self) -> SocialStore:
        if self._social is None:
            raise NotImplementedError("the PostgreSQL social store is not written yet")
        store: SocialStore = self._social
        return store

    @property
    def health(self) -> PgDatabase:
        return self.db

    async def open(self) -> None:
        """Connect and bring the schema up to date (once, even with several nodes starting together)."""
        await self.db.open()
        await migrate(self.db)

    async def close(self) -> None:
        await self.db.close()
