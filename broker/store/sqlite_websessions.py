"""SQLite implementation of WebSessionStore: the web app's signed-in browsers.

One row per session, keyed by the SHA-256 of its cookie token (never the token).
The principal's removal deletes its rows (foreign key). `used` is indexed: the
least recently used go first when the table is full, and idle ones expire.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from broker.store.base import NotFoundError, WebSessionRecord
from broker.store.sqlite_db import Database, Migration

MIGRATIONS: list[Migration] = [
    ("0150_web_sessions", """
        CREATE TABLE web_sessions (
            key TEXT PRIMARY KEY,
            principal TEXT NOT NULL REFERENCES principals(id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            csrf TEXT NOT NULL,
            created REAL NOT NULL,
            used REAL NOT NULL,
            expires_at REAL
        ) WITHOUT ROWID;
        CREATE INDEX web_sessions_principal ON web_sessions(principal);
        CREATE INDEX web_sessions_used ON web_sessions(used);
        CREATE INDEX web_sessions_created ON web_sessions(created);
    """),
]

_COLUMNS = "key, principal, kind, csrf, created, used, expires_at"
_BATCH = 500   # keys per IN (...) of `existing`, well under SQLite's limit of bound parameters

Row = tuple[str, str, str, str, float, float, float | None]


def _record(row: Row | None) -> WebSessionRecord | None:
    if row is None:
        return None
    return WebSessionRecord(row[0], row[1], row[2], row[3], float(row[4]), float(row[5]),
                            None if row[6] is None else float(row[6]))


class SqliteWebSessionStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, rec: WebSessionRecord, *, max_sessions: int) -> tuple[int, int]:
        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            try:
                conn.execute(f"INSERT INTO web_sessions({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (rec.key, rec.principal, rec.kind, rec.csrf, rec.created, rec.used, rec.expires_at))
            except sqlite3.IntegrityError as exc:
                if "FOREIGN KEY" in str(exc):
                    raise NotFoundError(rec.principal) from None
                raise
            count = int(conn.execute("SELECT COUNT(*) FROM web_sessions").fetchone()[0])
            over = count - max(1, max_sessions)
            if over <= 0:
                return count, 0
            evicted = conn.execute(
                "DELETE FROM web_sessions WHERE key IN (SELECT key FROM web_sessions WHERE key != ? "
                "ORDER BY used, created LIMIT ?)", (rec.key, over)).rowcount
            return count - evicted, evicted

        return await self._db.write(job)

    async def get(self, key: str) -> WebSessionRecord | None:
        return await self._db.read(lambda conn: _record(conn.execute(
            f"SELECT {_COLUMNS} FROM web_sessions WHERE key=?", (key,)).fetchone()))

    async def existing(self, keys: Sequence[str]) -> set[str]:
        def job(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for i in range(0, len(keys), _BATCH):
                part = list(keys[i:i + _BATCH])
                marks = ",".join("?" * len(part))
                found.update(r[0] for r in conn.execute(f"SELECT key FROM web_sessions WHERE key IN ({marks})", part))
            return found

        return await self._db.read(job)

    async def touch(self, key: str, used: float) -> None:
        await self._db.write(lambda conn: conn.execute(
            "UPDATE web_sessions SET used=? WHERE key=? AND used < ?", (used, key, used)))

    async def delete(self, key: str) -> bool:
        return await self._db.write(lambda conn: conn.execute(
            "DELETE FROM web_sessions WHERE key=?", (key,)).rowcount > 0)

    async def delete_principal(self, principal: str) -> int:
        return await self._db.write(lambda conn: int(conn.execute(
            "DELETE FROM web_sessions WHERE principal=?", (principal,)).rowcount))

    async def expire(self, *, used_before: float, created_before: float, now: float) -> int:
        return await self._db.write(lambda conn: int(conn.execute(
            "DELETE FROM web_sessions WHERE used < ? OR created < ? OR expires_at <= ?",
            (used_before, created_before, now)).rowcount))

    async def count(self) -> int:
        return await self._db.read(lambda conn: int(conn.execute("SELECT COUNT(*) FROM web_sessions").fetchone()[0]))
