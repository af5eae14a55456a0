"""Builds the store that the `storage:` config describes.

The one place that knows which engines exist: everything else receives a
`broker.store.base.Store`. `storage.backend: sqlite` (the default) is one file
at `storage.path`; `storage.backend: postgres` is the database at `storage.dsn`
with a pool of `storage.pool_size` connections (docs/STORAGE.md). Each engine
passes tests/test_store_contract.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from broker.store.base import BlobStore, Store


class StorageSettings(Protocol):
    """What the factory reads of the `storage:` config (broker.config.StorageConfig)."""

    @property
    def path(self) -> str:
        """SQLite: the database file."""

    @property
    def backend(self) -> str:
        """sqlite | postgres"""

    @property
    def dsn(self) -> str:
        """PostgreSQL: postgresql://user:password@host:port/dbname"""

    @property
    def pool_size(self) -> int:
        """PostgreSQL: connections this node keeps at most."""


def create_store(storage: StorageSettings, resolve: Callable[[str], Path] = Path) -> Store:
    """The store, not yet opened. `resolve` turns a relative path of the config into
    a real one (`RoostConfig.resolve`: relative to the config's base_dir).
    Engines are imported here: only the chosen one is loaded."""
    if storage.backend == "postgres":
        from broker.store.postgres import PgStore

        return PgStore(storage.dsn, pool_size=storage.pool_size)
    if storage.backend != "sqlite":
        raise ValueError(f"unknown storage backend {storage.backend!r} (sqlite or postgres)")
    from broker.store.sqlite import SqliteStore

    return SqliteStore(resolve(storage.path))   # returned as a Store: mypy checks it implements every member


def create_blob_store(storage: StorageSettings, store: Store, files_dir: Path) -> BlobStore:
    """Where files' bytes go: with postgres, in the database (every node serves every
    file, whatever disk it has); with sqlite, the folder `files_dir`."""
    if storage.backend == "postgres":
        from broker.store.postgres import PgStore

        assert isinstance(store, PgStore), "create_store made it"
        return store.blobs
    from broker.store.blobs import FsBlobStore

    return FsBlobStore(files_dir)


async def open_store(storage: StorageSettings, resolve: Callable[[str], Path] = Path) -> Store:
    """The opened (migrated) store. Raises StoreCannotOpen or OSError, after
    closing what was opened."""
    store = create_store(storage, resolve)
    try:
        await store.open()
    except BaseException:
        await store.close()
        raise
    return store
