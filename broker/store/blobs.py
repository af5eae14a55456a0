"""Files' bytes in a folder, by content hash: `<root>/ab/cdef...` (SHA-256 hex).

A blob is written once and never changed: staged under `<root>/staging/<upload>`,
fsynced, then linked into place (only if no blob of that name exists) and its
folder fsynced, so a crash leaves either no blob or the whole one, never a part.
The same content uploaded twice is one blob, and none is ever deleted
(broker/store/base.py BlobStore says why). Every call runs on a worker thread:
file I/O never blocks the event loop. The SQLite store's blobs; with
`storage.backend: postgres` they are in the database (broker/store/postgres_files.py).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from broker.store.base import NotFoundError

_HEX = frozenset("0123456789abcdef")


def _checked(name: str, what: str) -> str:
    # Ids come from the service, never from a client, but a path is built from them: no surprises.
    if not name or not set(name) <= _HEX:
        raise ValueError(f"bad {what} {name!r}")
    return name


class FsBlobStore:
    def __init__(self, root: Path) -> None:
        self._root = root
        self._staging = root / "staging"

    def _blob(self, digest: str) -> Path:
        _checked(digest, "digest")
        return self._root / digest[:2] / digest[2:]

    def _staged(self, upload: str) -> Path:
        return self._staging / _checked(upload, "upload id")

    async def begin(self, upload: str) -> None:
        def job() -> None:
            self._staging.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._staged(upload).write_bytes(b"")

        await asyncio.to_thread(job)

    async def append(self, upload: str, data: bytes) -> None:
        def job() -> None:
            with self._staged(upload).open("ab") as f:
                f.write(data)

        await asyncio.to_thread(job)

    async def commit(self, upload: str, digest: str) -> bool:
        def job() -> bool:
            staged, blob = self._staged(upload), self._blob(digest)
            if blob.exists():
                staged.unlink(missing_ok=True)
                return False
            with staged.open("rb+") as f:
                os.fsync(f.fileno())
            blob.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:   # a hard link is created only if the name is free: two commits of one content make one blob
                os.link(staged, blob)
            except FileExistsError:
                staged.unlink(missing_ok=True)
                return False
            staged.unlink()
            _fsync_dir(blob.parent)
            return True

        return await asyncio.to_thread(job)

    async def discard(self, upload: str) -> None:
        await asyncio.to_thread(lambda: self._staged(upload).unlink(missing_ok=True))

    async def read(self, digest: str, offset: int, length: int) -> bytes:
        def job() -> bytes:
            try:
                with self._blob(digest).open("rb") as f:
                    f.seek(offset)
                    return f.read(length)
            except FileNotFoundError:
                raise NotFoundError(digest) from None

        return await asyncio.to_thread(job)

    async def clear_staging(self) -> int:
        def job() -> int:
            self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self._staging.is_dir():
                return 0
            n = 0
            for part in self._staging.iterdir():
                part.unlink(missing_ok=True)
                n += 1
            return n

        return await asyncio.to_thread(job)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
