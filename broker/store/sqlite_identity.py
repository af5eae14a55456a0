"""SQLite implementation of IdentityStore and RetainedStore."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from broker.store.base import AlreadyExists, Principal, RetainedMessage
from broker.store.sqlite_db import Database, Migration


def _hash_plaintext_pairing_codes(conn: sqlite3.Connection) -> None:
    """Pairing codes used to be stored as typed; hash them like secrets (argon2).
    The parameters are those of broker.services.identity (the store may not import
    the services); any argon2 parameters verify, as they are part of the hash."""
    hasher = PasswordHash((Argon2Hasher(time_cost=2, memory_cost=19456, parallelism=1),))
    rows = conn.execute("SELECT id, pairing_code FROM principals WHERE pairing_code IS NOT NULL "
                        "AND pairing_code NOT LIKE '$argon2%'").fetchall()
    for principal_id, code in rows:
        conn.execute("UPDATE principals SET pairing_code=? WHERE id=?", (hasher.hash(code), principal_id))

MIGRATIONS: list[Migration] = [
    ("0001_identity", """
        CREATE TABLE principals (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('user','device','service')),
            name TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT '',
            secret_hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            device_kind TEXT,
            room TEXT,
            pairing_code TEXT
        );
        CREATE INDEX principals_name ON principals(kind, name COLLATE NOCASE);
    """),
    ("0002_retained", """
        CREATE TABLE retained (
            topic TEXT PRIMARY KEY,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL
        );
    """),
    # Admin commands may run in another process than the broker: they append
    # here and the broker applies the changes (kick removed principals, reload).
    ("0003_admin_log", """
        CREATE TABLE admin_log (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            principal TEXT NOT NULL,
            action TEXT NOT NULL,
            at REAL NOT NULL
        );
    """),
    # JWTs issued (`iat`) before the secret was last set are refused: a passwd, or
    # removing and adding the id again, revokes every token issued until then.
    ("0004_secret_set_at", """
        ALTER TABLE principals ADD COLUMN secret_set_at REAL NOT NULL DEFAULT 0;
        UPDATE principals SET secret_set_at = created_at;
    """),
    ("0005_pairing_code_hashes", _hash_plaintext_pairing_codes),
]

_COLUMNS = "id, kind, name, status, secret_hash, created_at, device_kind, room, pairing_code, secret_set_at"


def _row(r: tuple[Any, ...]) -> Principal:
    return Principal(*r)


class SqliteIdentityStore:
    def __init__(self, db: Database, purges: Sequence[Callable[[sqlite3.Connection, str], object]] = ()) -> None:
        self._db = db
        # Run with every registration, in its transaction: other domains forget what
        # an earlier principal with this id left behind (removed while no broker ran).
        self._purges = tuple(purges)

    async def add_principal(self, p: Principal) -> None:
        def job(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO principals ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (p.id, p.kind, p.name, p.status, p.secret_hash, p.created_at, p.device_kind, p.room, p.pairing_code,
                     p.secret_set_at or p.created_at),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(p.id) from None
            for purge in self._purges:
                purge(conn, p.id)

        await self._db.write(job)

    async def get_principal(self, principal_id: str) -> Principal | None:
        def job(conn: sqlite3.Connection) -> Principal | None:
            r = conn.execute(f"SELECT {_COLUMNS} FROM principals WHERE id=?", (principal_id,)).fetchone()
            return _row(r) if r else None

        return await self._db.read(job)

    async def list_principals(self, kind: str | None = None) -> list[Principal]:
        def job(conn: sqlite3.Connection) -> list[Principal]:
            if kind is None:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM principals ORDER BY id").fetchall()
            else:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM principals WHERE kind=? ORDER BY id", (kind,)).fetchall()
            return [_row(r) for r in rows]

        return await self._db.read(job)

    async def remove_principal(self, principal_id: str) -> bool:
        return await self._db.write(
            lambda conn: conn.execute("DELETE FROM principals WHERE id=?", (principal_id,)).rowcount > 0
        )

    async def set_secret(self, principal_id: str, secret_hash: str) -> bool:
        now = time.time()
        return await self._db.write(
            lambda conn: conn.execute(
                "UPDATE principals SET secret_hash=?, secret_set_at=? WHERE id=?", (secret_hash, now, principal_id)
            ).rowcount > 0
        )

    async def set_pairing_code(self, principal_id: str, code: str) -> bool:
        """`code` is the hash of the pairing code (IdentityService hashes it)."""
        return await self._db.write(
            lambda conn: conn.execute(
                "UPDATE principals SET pairing_code=? WHERE id=? AND kind='device'", (code, principal_id)
            ).rowcount > 0
        )

    async def set_profile(self, principal_id: str, *, name: str | None, status: str | None) -> Principal | None:
        def job(conn: sqlite3.Connection) -> Principal | None:
            if name is not None:
                conn.execute("UPDATE principals SET name=? WHERE id=?", (name, principal_id))
            if status is not None:
                conn.execute("UPDATE principals SET status=? WHERE id=?", (status, principal_id))
            r = conn.execute(f"SELECT {_COLUMNS} FROM principals WHERE id=?", (principal_id,)).fetchone()
            return _row(r) if r else None

        return await self._db.write(job)

    async def log_admin(self, principal_id: str, action: str) -> None:
        await self._db.write(lambda conn: conn.execute(
            "INSERT INTO admin_log(principal, action, at) VALUES (?,?,strftime('%s','now'))", (principal_id, action)))

    async def admin_log_after(self, seq: int) -> list[tuple[int, str, str]]:
        return await self._db.read(lambda conn: conn.execute(
            "SELECT seq, principal, action FROM admin_log WHERE seq>? ORDER BY seq LIMIT 1000", (seq,)).fetchall())

    async def admin_log_head(self) -> int:
        row = await self._db.read(lambda conn: conn.execute("SELECT max(seq) FROM admin_log").fetchone())
        return row[0] or 0

    async def search_users(self, query: str, limit: int) -> list[Principal]:
        def job(conn: sqlite3.Connection) -> list[Principal]:
            like = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM principals WHERE kind='user' AND (id=? OR "
                "(length(?) >= 2 AND name LIKE ? ESCAPE '\\')) ORDER BY id LIMIT ?",
                (query, query, like, limit),
            ).fetchall()
            return [_row(r) for r in rows]

        return await self._db.read(job)


class SqliteRetainedStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def load_all(self) -> list[RetainedMessage]:
        # properties and expires_at: MQTT 5 (columns added by sqlite_sessions' 0113)
        rows = await self._db.read(lambda conn: conn.execute(
            "SELECT topic, payload, qos, properties, expires_at FROM retained").fetchall())
        return [RetainedMessage(t, bytes(p), q, None if props is None else bytes(props), exp)
                for t, p, q, props, exp in rows]

    async def put(self, msg: RetainedMessage) -> None:
        await self._db.write(
            lambda conn: conn.execute(
                "INSERT INTO retained(topic, payload, qos, properties, expires_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(topic) DO UPDATE SET payload=excluded.payload, qos=excluded.qos, "
                "properties=excluded.properties, expires_at=excluded.expires_at",
                (msg.topic, msg.payload, msg.qos, msg.properties, msg.expires_at),
            )
        )

    async def delete(self, topic: str) -> None:
        await self._db.write(lambda conn: conn.execute("DELETE FROM retained WHERE topic=?", (topic,)))
