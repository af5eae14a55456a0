"""PostgreSQL implementations of FileStore (who uploaded which content, and where
it was sent) and of BlobStore (the bytes themselves).

FileStore's rows are one per (content, uploader), counted against that
uploader's quota once per distinct content, and one per (content, conversation)
it was sent in.

BlobStore keeps the bytes in the database too, so a file uploaded through one
node is served by every node (they need not share a disk): `file_blobs` has a
row per content (by SHA-256) or per upload in progress (by upload id, `staged`),
and `file_blob_chunks` its bytes, one row per appended chunk (at most
contract.ops.FILE_CHUNK bytes each) at its offset. A read fetches only the
chunks it covers, so a big file is streamed, never loaded whole. Committing an
upload renames its row to the digest (the chunks follow by ON UPDATE CASCADE;
PostgreSQL keeps their out-of-line bytes as they are), in one transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from asyncpg import Connection

from broker.store.base import FileRecord, NotFoundError
from broker.store.blobs import FsBlobStore
from broker.store.postgres_db import PgDatabase

DDL = """
CREATE TABLE file_uploads (
    id text COLLATE "C" NOT NULL,
    owner text COLLATE "C" NOT NULL REFERENCES principals(id) ON DELETE CASCADE,
    name text NOT NULL,
    size bigint NOT NULL,
    type text NOT NULL,
    created_at double precision NOT NULL,
    PRIMARY KEY (id, owner)
);
CREATE INDEX file_uploads_owner ON file_uploads(owner);
CREATE TABLE file_convs (
    id text COLLATE "C" NOT NULL,
    conv text COLLATE "C" NOT NULL,
    PRIMARY KEY (id, conv)
);
"""

# A later migration (postgres_schema.MIGRATIONS): the content itself, kept when its
# uploaders are removed (the messages that carry it stay).
CONTENTS_DDL = """
CREATE TABLE file_contents (
    id text COLLATE "C" PRIMARY KEY,
    size bigint NOT NULL,
    type text NOT NULL,
    created_at double precision NOT NULL
);
INSERT INTO file_contents(id, size, type, created_at)
    SELECT DISTINCT ON (id) id, size, type, created_at FROM file_uploads ORDER BY id, created_at;
"""

# A later migration still: the bytes (see the module's docstring). Chunks are
# images and archives, mostly compressed already: stored out of line, uncompressed.
BLOBS_DDL = """
CREATE TABLE file_blobs (
    id text COLLATE "C" PRIMARY KEY,
    staged boolean NOT NULL,
    size bigint NOT NULL,
    touched double precision NOT NULL
);
CREATE TABLE file_blob_chunks (
    blob text COLLATE "C" NOT NULL REFERENCES file_blobs(id) ON DELETE CASCADE ON UPDATE CASCADE,
    off bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (blob, off)
);
ALTER TABLE file_blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
"""

# An upload in progress untouched this long belongs to no live node (each node
# drops its own idle ones after files.upload_ttl): clear_staging deletes it.
STALE_STAGING = 24 * 3600.0
_NOW = "extract(epoch from clock_timestamp())"   # the database's clock: the same for every node
IMPORT_CHUNK = 48 * 1024   # bytes per chunk row of a blob copied in (the protocol's file.chunk size)

_COLUMNS = "id, owner, name, size, type, created_at"


def _record(row: Any) -> FileRecord | None:
    return FileRecord(row[0], row[1], row[2], int(row[3]), row[4], float(row[5])) if row is not None else None


class PgFileStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def add_upload(self, rec: FileRecord, *, quota: int) -> bool:
        async def job(conn: Connection) -> bool:
            # The owner's row, locked: two uploads of one owner (on any node) check the quota one after the other.
            if await conn.fetchval("SELECT 1 FROM principals WHERE id=$1 FOR UPDATE", rec.owner) is None:
                raise NotFoundError(rec.owner)
            if await conn.fetchval("SELECT 1 FROM file_uploads WHERE id=$1 AND owner=$2", rec.id, rec.owner):
                return True
            used = await conn.fetchval("SELECT COALESCE(SUM(size), 0) FROM file_uploads WHERE owner=$1", rec.owner)
            if int(used) + rec.size > quota:
                return False
            await conn.execute(f"INSERT INTO file_uploads({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)",
                               rec.id, rec.owner, rec.name, rec.size, rec.type, rec.created_at)
            await conn.execute("INSERT INTO file_contents(id, size, type, created_at) VALUES ($1, $2, $3, $4) "
                               "ON CONFLICT DO NOTHING", rec.id, rec.size, rec.type, rec.created_at)
            return True

        return await self._db.write(job)

    async def get_upload(self, file_id: str, owner: str) -> FileRecord | None:
        return _record(await self._db.read(lambda conn: conn.fetchrow(
            f"SELECT {_COLUMNS} FROM file_uploads WHERE id=$1 AND owner=$2", file_id, owner)))

    async def find(self, file_id: str) -> FileRecord | None:
        # the first upload, or (every uploader gone) the content's own record
        return _record(await self._db.read(lambda conn: conn.fetchrow(
            f"(SELECT {_COLUMNS}, 0 AS k FROM file_uploads WHERE id=$1 ORDER BY created_at, owner LIMIT 1) "
            "UNION ALL (SELECT id, '', '', size, type, created_at, 1 FROM file_contents WHERE id=$1) "
            "ORDER BY k LIMIT 1", file_id)))

    async def usage(self, owner: str) -> int:
        return int(await self._db.read(lambda conn: conn.fetchval(
            "SELECT COALESCE(SUM(size), 0) FROM file_uploads WHERE owner=$1", owner)))

    async def add_conv(self, file_id: str, conv: str) -> None:
        async def job(conn: Connection) -> None:
            await conn.execute("INSERT INTO file_convs(id, conv) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                               file_id, conv)

        await self._db.write(job)

    async def convs_of(self, file_id: str) -> list[str]:
        rows = await self._db.read(lambda conn: conn.fetch(
            "SELECT conv FROM file_convs WHERE id=$1 ORDER BY conv", file_id))
        return [r[0] for r in rows]


class PgBlobStore:
    """Implements broker.store.base's `BlobStore` in the database (see the module docstring)."""

    def __init__(self, db: PgDatabase, *, stale_staging: float = STALE_STAGING) -> None:
        self._db = db
        self._stale = stale_staging

    async def begin(self, upload: str) -> None:
        async def job(conn: Connection) -> None:
            await conn.execute("DELETE FROM file_blobs WHERE id=$1 AND staged", upload)
            await conn.execute(f"INSERT INTO file_blobs(id, staged, size, touched) VALUES ($1, true, 0, {_NOW})",
                               upload)

        await self._db.write(job)

    async def append(self, upload: str, data: bytes) -> None:
        async def job(conn: Connection) -> str:
            return str(await conn.execute(
                "WITH b AS (UPDATE file_blobs SET size = size + length($2::bytea), "
                f"touched = {_NOW} WHERE id=$1 AND staged RETURNING size - length($2::bytea) AS off) "
                "INSERT INTO file_blob_chunks(blob, off, data) SELECT $1, off, $2 FROM b", upload, data))

        if (await self._db.autocommit(job)).endswith(" 0"):
            raise NotFoundError(upload)

    async def commit(self, upload: str, digest: str) -> bool:
        async def job(conn: Connection) -> bool:
            if await conn.fetchval("SELECT 1 FROM file_blobs WHERE id=$1 AND NOT staged", digest):
                await conn.execute("DELETE FROM file_blobs WHERE id=$1 AND staged", upload)
                return False
            try:
                async with conn.transaction():   # a savepoint: another node may commit the same content now
                    renamed = await conn.execute(
                        "UPDATE file_blobs SET id=$2, staged=false, touched=" + _NOW + " WHERE id=$1 AND staged",
                        upload, digest)
            except asyncpg.UniqueViolationError:
                await conn.execute("DELETE FROM file_blobs WHERE id=$1 AND staged", upload)
                return False
            if renamed.endswith(" 0"):
                raise NotFoundError(upload)
            return True

        return await self._db.write(job)

    async def discard(self, upload: str) -> None:
        async def job(conn: Connection) -> None:
            await conn.execute("DELETE FROM file_blobs WHERE id=$1 AND staged", upload)

        await self._db.autocommit(job)

    async def read(self, digest: str, offset: int, length: int) -> bytes:
        end = offset + max(0, length)

        async def job(conn: Connection) -> bytes:
            # the chunk holding `offset` (the last one starting at or before it) and those after it up to `end`
            rows = await conn.fetch(
                "SELECT off, data FROM file_blob_chunks WHERE blob=$1 AND off < $3 AND off >= COALESCE("
                "(SELECT max(off) FROM file_blob_chunks WHERE blob=$1 AND off <= $2), 0) ORDER BY off",
                digest, offset, end)
            if not rows and not await conn.fetchval("SELECT 1 FROM file_blobs WHERE id=$1 AND NOT staged", digest):
                raise NotFoundError(digest)
            parts = [bytes(r[1])[max(0, offset - r[0]):end - r[0]] for r in rows]
            return b"".join(parts)

        return await self._db.read(job)

    async def clear_staging(self) -> int:
        # Not "every staged upload", as on a node's own disk: other nodes may be receiving theirs now.
        async def job(conn: Connection) -> int:
            status = await conn.execute(f"DELETE FROM file_blobs WHERE staged AND touched < {_NOW} - $1", self._stale)
            return int(str(status).rsplit(" ", 1)[-1])

        return await self._db.autocommit(job)


async def import_blobs(conn: Connection, files_dir: Path) -> tuple[int, int]:
    """`roost migrate`: copy the bytes of every content the (just copied) file
    records name from a SQLite home's blob folder into the database, inside the
    caller's transaction, a chunk at a time. Returns (blobs copied, recorded
    contents whose bytes were missing from the folder: they stay unreadable, as
    they were)."""
    folder = FsBlobStore(files_dir)
    copied = missing = 0
    for row in await conn.fetch("SELECT id, size FROM file_contents ORDER BY id"):
        digest, size = str(row[0]), int(row[1])
        try:
            first = await folder.read(digest, 0, IMPORT_CHUNK)
        except NotFoundError:
            missing += 1
            continue

        async def chunks(digest: str = digest, first: bytes = first) -> AsyncIterator[tuple[str, int, bytes]]:
            data, offset = first, 0
            while data:
                yield digest, offset, data
                offset += len(data)
                data = await folder.read(digest, offset, IMPORT_CHUNK) if len(data) == IMPORT_CHUNK else b""

        await conn.execute(f"INSERT INTO file_blobs(id, staged, size, touched) VALUES ($1, false, $2, {_NOW})",
                           digest, size)
        await conn.copy_records_to_table("file_blob_chunks", records=chunks(), columns=["blob", "off", "data"])
        copied += 1
    return copied, missing
