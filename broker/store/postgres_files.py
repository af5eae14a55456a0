"""PostgreSQL implementation of FileStore: who uploaded which content, and where it was sent.

The bytes are not here (broker/store/blobs.py keeps them by content hash); the
rows are one per (content, uploader), counted against that uploader's quota
once per distinct content, and one per (content, conversation) it was sent in.
"""

from __future__ import annotations

from typing import Any

from asyncpg import Connection

from broker.store.base import FileRecord, NotFoundError
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
