"""What `roost serve` checks and takes before it serves, each failure one line.

`roost serve` goes: TLS files and listener sockets (broker.server.bind_listeners:
nothing on disk is touched yet), then the store's lock (`StoreLock`: one
`roost serve` per store), then the store itself (`open_store`). Whatever fails
raises StartupError, whose text is the whole message a person sees: what
(address, file, store) and why, never a traceback.

The admin commands (`roost user add` ...) open the store without the lock: they
are meant to run next to the broker.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Self

from broker.config import StorageConfig
from broker.store import factory
from broker.store.base import Store, StoreCannotOpen


class StartupError(Exception):
    """`roost serve` cannot start; str() is the one line to print."""


def os_reason(exc: BaseException) -> str:
    """`exc` without errno noise: "permission denied", "file is not a database"."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)


class StoreLock:
    """An exclusive flock on `<store>.lock`, held for as long as one `roost serve`
    uses the store: two brokers on one store would each keep their own sessions
    and retained messages and overwrite the other's. flock dies with the process
    (even on SIGKILL), so a crash never leaves a stale lock; the file itself stays
    (removing it would let a third process lock a file nobody else sees) and holds
    the pid of its last holder for the message."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = Path(f"{store}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        _make_store_folder(self.store.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StartupError(f"cannot lock store {self.store}: {self.path}: {os_reason(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in(fd)
            os.close(fd)
            raise StartupError(f"store {self.store} is in use by another roost serve "
                               f"(pid {holder or 'unknown'})") from None
        except OSError as exc:   # e.g. a file system without locks
            os.close(fd)
            raise StartupError(f"cannot lock store {self.store}: {os_reason(exc)}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _pid_in(fd: int) -> int | None:
    """The pid the holder wrote; None if it has not written it yet."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _make_store_folder(folder: Path) -> None:
    """The store's folder, created 0700 as broker.store.sqlite_db.prepare_private_file
    does (the lock file is the first thing written in it)."""
    if folder.is_dir():
        return
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)      # mkdir's mode is filtered by the umask
    except FileExistsError:
        raise StartupError(f"cannot create store folder {folder}: a file of that name exists") from None
    except OSError as exc:
        raise StartupError(f"cannot create store folder {folder}: {os_reason(exc)}") from None


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system once started (glibc's
    malloc_trim): what the imports and opening the store freed stays in RSS
    otherwise, ~0.7 MB of a started broker's ~42 (issue 16: RSS before the first
    client). Elsewhere (musl, macOS) there is nothing to call."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim   # the C library the interpreter runs on
    except (OSError, AttributeError):
        return
    trim(0)


async def open_store(path: Path, storage: StorageConfig | None = None) -> Store:
    """The opened, migrated store at `path` (resolved `storage.path`), built by
    broker.store.factory, or StartupError("cannot open store <path>: ..."). With
    the config's `storage` whose backend is postgres: the database at its dsn."""
    settings = StorageConfig(path=str(path))
    where = str(path)
    if storage is not None and storage.backend != "sqlite":
        from broker.store.postgres_db import redacted_dsn

        settings, where = storage, redacted_dsn(storage.dsn)
    try:
        return await factory.open_store(settings)
    except (StoreCannotOpen, OSError) as exc:
        raise StartupError(f"cannot open store {where}: {os_reason(exc)}") from None
