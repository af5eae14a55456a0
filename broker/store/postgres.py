"""The PostgreSQL store: one asyncpg pool, every domain repository, versioned migrations.

Several Roost nodes may use one database at once: every counter (a
conversation's seq, a mailbox's n, the admin log's seq) is allocated inside the
committing transaction, never in a node's memory.
"""

from __future__ import annotations

from broker.store.postgres_db import PgDatabase
from broker.store.postgres_devices import PgDeviceStore
from broker.store.postgres_files import PgBlobStore, PgFileStore
from broker.store.postgres_identity import PgIdentityStore
from broker.store.postgres_messaging import PgMessagingStore
from broker.store.postgres_messaging import purge_principal as purge_messaging
from broker.store.postgres_presence import PgPresenceStore
from broker.store.postgres_retained import PgRetainedStore
from broker.store.postgres_schema import migrate
from broker.store.postgres_sessions import PgSessionStore
from broker.store.postgres_social import PgSocialStore
from broker.store.postgres_social import purge_principal as purge_social
from broker.store.postgres_telemetry import PgTelemetryStore
from broker.store.postgres_websessions import PgWebSessionStore


class PgStore:
    """Implements broker.store.base's `Store` on a PostgreSQL database. `db` (the
    pool) is for this engine's own modules and its tests only."""

    def __init__(self, dsn: str, *, pool_size: int = 10) -> None:
        self.db = PgDatabase(dsn, pool_size=pool_size)
        # the purges run inside add_principal's transaction, as SQLite's do
        self.identity = PgIdentityStore(self.db, purges=(purge_messaging, purge_social))
        self.retained = PgRetainedStore(self.db)
        self.sessions = PgSessionStore(self.db)
        self.devices = PgDeviceStore(self.db)
        self.presence = PgPresenceStore(self.db)
        self.telemetry = PgTelemetryStore(self.db)
        self.files = PgFileStore(self.db)
        self.web_sessions = PgWebSessionStore(self.db)
        self.blobs = PgBlobStore(self.db)   # not part of Store: factory.create_blob_store hands it out
        self.messaging = PgMessagingStore(self.db)
        self.social = PgSocialStore(self.db)

    @property
    def health(self) -> PgDatabase:
        return self.db

    async def open(self) -> None:
        """Connect and bring the schema up to date (once, even with several nodes starting together)."""
        await self.db.open()
        await migrate(self.db)

    async def close(self) -> None:
        await self.db.close()
