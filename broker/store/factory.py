"""Builds the store that the `storage:` config describes.

The one place that knows which engines exist: everything else receives a
`broker.store.base.Store`. A new engine (PostgreSQL) is a module of its own
implementing `Store`, one more branch here, and one more param of the `store`
fixture in tests/test_store_contract.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from broker.store.base import Store


class StorageSettings(Protocol):
    """What the factory reads of the `storage:` config (broker.config.StorageConfig)."""

    @property
    def path(self) -> str:
        """SQLite: the database file."""


def create_store(storage: StorageSettings, resolve: Callable[[str], Path] = Path) -> Store:
    """The store, not yet opened. `resolve` turns a relative path of the config into
    a real one (`RoostConfig.resolve`: relative to the config's base_dir)."""
    from broker.store.sqlite import SqliteStore  # imported here: only the chosen engine is loaded

    return SqliteStore(resolve(storage.path))   # returned as a Store: mypy checks it implements every member


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
