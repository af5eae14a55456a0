"""The blob stores behind `broker.store.base.BlobStore`: the folder one (SQLite
homes) and the PostgreSQL one (a cluster: every node serves every file). Each
test runs against both, on a real folder and a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from broker.config import StorageConfig
from broker.store.base import BlobStore, NotFoundError
from broker.store.factory import create_blob_store, open_store

OpenBlobs = Callable[[], AbstractAsyncContextManager[BlobStore]]


@pytest.fixture(params=["sqlite", "postgres"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> OpenBlobs:
    """`async with blobs() as b:` the engine's blob store (the same one each time)."""
    if request.param == "postgres":
        storage = StorageConfig(backend="postgres", dsn=request.getfixturevalue("postgres_dsn"))
    else:
        storage = StorageConfig(path=str(tmp_path / "roost.db"))

    @asynccontextmanager
    async def opened() -> AsyncIterator[BlobStore]:
        store = await open_store(storage)
        try:
            yield create_blob_store(storage, store, tmp_path / "files")
        finally:
            await store.close()

    return opened


def test_staged_upload_becomes_a_blob_read_at_any_offset(blobs: OpenBlobs) -> None:
    content = bytes(range(256)) * 700            # 179,200 bytes: several uneven chunks
    digest = hashlib.sha256(content).hexdigest()
    cuts = [0, 1000, 50_000, 99_999, 150_000, len(content)]

    async def main() -> None:
        async with blobs() as b:
            assert await b.clear_staging() == 0
            await b.begin("0a1b")
            for lo, hi in zip(cuts, cuts[1:], strict=False):
                await b.append("0a1b", content[lo:hi])
            with pytest.raises(NotFoundError):
                await b.read(digest, 0, 10)        # staged only: no blob yet
            assert await b.commit("0a1b", digest)
        async with blobs() as b:                   # durable, and readable by another node/process
            for offset, length in ((0, 10), (999, 2), (1000, 49_000), (49_990, 100_000), (179_000, 5000),
                                   (len(content), 10), (0, len(content))):
                assert await b.read(digest, offset, length) == content[offset:offset + length], (offset, length)
            await b.begin("0c")                    # the same content again: one blob, the copy dropped
            await b.append("0c", content)
            assert not await b.commit("0c", digest)
            assert await b.read(digest, 5, 5) == content[5:10]
            await b.begin("0d")
            await b.append("0d", b"abandoned")
            await b.discard("0d")
            await b.discard("0d")                  # twice: nothing
            assert await b.read(digest, 0, 3) == content[:3]
            with pytest.raises(NotFoundError):
                await b.read("ee" * 32, 0, 1)

    asyncio.run(main())


def test_two_uploads_of_one_content_at_once_make_one_blob(blobs: OpenBlobs) -> None:
    content = b"same bytes " * 1000
    digest = hashlib.sha256(content).hexdigest()

    async def main() -> None:
        async with blobs() as b:
            for upload in ("01", "02"):
                await b.begin(upload)
                await b.append(upload, content)
            made = await asyncio.gather(b.commit("01", digest), b.commit("02", digest))
            assert sorted(made) == [False, True]
            assert await b.read(digest, 0, len(content) + 1) == content

    asyncio.run(main())


def test_roost_migrate_copies_the_files_bytes_into_postgresql(tmp_path: Path, postgres_dsn: str) -> None:
    from broker.store.base import FileRecord, Principal
    from broker.store.blobs import FsBlobStore
    from broker.store.postgres_import import import_sqlite

    content = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 600     # more than one chunk row
    digest = hashlib.sha256(content).hexdigest()
    home = StorageConfig(path=str(tmp_path / "home" / "roost.db"))
    folder = tmp_path / "home" / "files"

    async def main() -> None:
        store = await open_store(home)
        try:
            await store.identity.add_principal(Principal("alice", "user", "Alice", "", "hash", 1.0))
            assert await store.files.add_upload(FileRecord(digest, "alice", "a.png", len(content), "image/png", 1.0),
                                                quota=10 ** 9)
            await store.files.add_upload(FileRecord("ab" * 32, "alice", "lost.png", 5, "image/png", 1.0), quota=10 ** 9)
        finally:
            await store.close()
        disk = FsBlobStore(folder)
        await disk.begin("01")
        await disk.append("01", content)
        assert await disk.commit("01", digest)
        copied = await import_sqlite(Path(home.path), postgres_dsn, files_dir=folder)
        assert copied["file_blobs"] == 1            # the record whose bytes were missing stays without them
        cluster = StorageConfig(backend="postgres", dsn=postgres_dsn)
        pg = await open_store(cluster)
        try:
            blobs = create_blob_store(cluster, pg, tmp_path / "elsewhere")
            assert await blobs.read(digest, 0, len(content) + 1) == content
            assert await blobs.read(digest, 50_000, 10) == content[50_000:50_010]
        finally:
            await pg.close()

    asyncio.run(main())
