"""SQLite implementation of FileStore: who uploaded which content, and where it was sent.

The bytes are not here (broker/store/blobs.py keeps them by content hash); these
rows are the metadata: one per (content, uploader), counted against that
uploader's quota once per distinct content, and one per (content, conversation)
it was sent in, which is what downloads are authorized by.
"""

from __future__ import annotations

import sqlite3

from broker.store.base import FileRecord, NotFoundError
from broker.store.sqlite_db import Database, Migration

MIGRATIONS: list[Migration] = [
    ("0140_files", """
        CREATE TABLE file_uploads (
            id TEXT NOT NULL,
            owner TEXT NOT NULL REFERENCES principals(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            size INTEGER NOT NULL,
            type TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (id, owner)
        ) WITHOUT ROWID;
        CREATE INDEX file_uploads_owner ON file_uploads(owner);
        CREATE TABLE file_convs (
            id TEXT NOT NULL,
            conv TEXT NOT NULL,
            PRIMARY KEY (id, conv)
        ) WITHOUT ROWID;
    """),
    # The content itself, kept when its uploaders are removed (the messages that carry it stay).
    ("0141_file_contents", """
        CREATE TABLE file_contents (
            id TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            type TEXT NOT NULL,
            created_at REAL NOT NULL
        ) WITHOUT ROWID;
        INSERT INTO file_contents(id, size, type, created_at)
            SELECT id, size, type, MIN(created_at) FROM file_uploads GROUP BY id;
    """),
]

_COLUMNS = "id, owner, name, size, type, created_at"


def _record(row: tuple[str, str, str, int, str, float] | None) -> FileRecord | None:
    return FileRecord(row[0], row[1], row[2], int(row[3]), row[4], float(row[5])) if row else None


class SqliteFileStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add_upload(self, rec: FileRecord, *, quota: int) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM file_uploads WHERE id=? AND owner=?", (rec.id, rec.owner)).fetchone():
                return True
            if not conn.execute("SELECT 1 FROM principals WHERE id=?", (rec.owner,)).fetchone():
                raise NotFoundError(rec.owner)
            used = conn.execute("SELECT COALESCE(SUM(size), 0) FROM file_uploads WHERE owner=?",
                                (rec.owner,)).fetchone()[0]
            if used + rec.size > quota:
                return False
            conn.execute(f"INSERT INTO file_uploads({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                         (rec.id, rec.owner, rec.name, rec.size, rec.type, rec.created_at))
            conn.execute("INSERT OR IGNORE INTO file_contents(id, size, type, created_at) VALUES (?, ?, ?, ?)",
                         (rec.id, rec.size, rec.type, rec.created_at))
            return True

        return await self._db.write(job)

    async def get_upload(self, file_id: str, owner: str) -> FileRecord | None:
        return await self._db.read(lambda conn: _record(conn.execute(
            f"SELECT {_COLUMNS} FROM file_uploads WHERE id=? AND owner=?", (file_id, owner)).fetchone()))

    async def find(self, file_id: str) -> FileRecord | None:
        def job(conn: sqlite3.Connection) -> FileRecord | None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM file_uploads WHERE id=? ORDER BY created_at, owner LIMIT 1",
                               (file_id,)).fetchone()
            if row is None:   # every uploader is gone: the content's own record
                row = conn.execute("SELECT id, '', '', size, type, created_at FROM file_contents WHERE id=?",
                                   (file_id,)).fetchone()
            return _record(row)

        return await self._db.read(job)

    async def usage(self, owner: str) -> int:
        return await self._db.read(lambda conn: int(conn.execute(
            "SELECT COALESCE(SUM(size), 0) FROM file_uploads WHERE owner=?", (owner,)).fetchone()[0]))

    async def add_conv(self, file_id: str, conv: str) -> None:
        await self._db.write(lambda conn: conn.execute(
            "INSERT OR IGNORE INTO file_convs(id, conv) VALUES (?, ?)", (file_id, conv)))

    async def convs_of(self, file_id: str) -> list[str]:
        rows = await self._db.read(lambda conn: conn.execute(
            "SELECT conv FROM file_convs WHERE id=? ORDER BY conv", (file_id,)).fetchall())
        return [r[0] for r in rows]
