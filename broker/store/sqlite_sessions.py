"""SQLite implementation of SessionStore: persistent MQTT sessions across a
broker restart, clean or not (their subscriptions, queued and in-flight messages).

The engine journals every change of a persistent session as it happens
(`apply`, group-committed with everything else) and, at a clean stop, replaces
the lot with the exact state, packet ids of in-flight messages included
(`save_sessions`). Rows are the truth between runs: `load_sessions` reads
them and leaves them in place.
"""

from __future__ import annotations

import json
import sqlite3

from broker.store.base import (JournalOp, MessageDone, MessageKept, SavedMessage, SavedSession, SessionDrop,
                               SessionUpsert)
from broker.store.sqlite_db import Database, Migration

MIGRATIONS: list[Migration] = [
    ("0110_mqtt_sessions", """
        CREATE TABLE mqtt_sessions (
            client_id TEXT PRIMARY KEY,
            principal TEXT,
            kind TEXT,
            subscriptions TEXT NOT NULL,
            incoming_qos2 TEXT NOT NULL,
            last_pid INTEGER NOT NULL,
            disconnected_at REAL NOT NULL
        );
        CREATE TABLE mqtt_session_messages (
            client_id TEXT NOT NULL REFERENCES mqtt_sessions(client_id) ON DELETE CASCADE,
            pos INTEGER NOT NULL,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL,
            retain INTEGER NOT NULL,
            pid INTEGER,
            stage INTEGER NOT NULL,
            PRIMARY KEY (client_id, pos)
        );
    """),
    # Sessions are journaled as they change (not only saved at a clean stop):
    # messages are keyed by the session's own sequence number.
    ("0111_mqtt_session_journal", """
        DROP TABLE mqtt_session_messages;
        CREATE TABLE mqtt_session_messages (
            client_id TEXT NOT NULL REFERENCES mqtt_sessions(client_id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL,
            retain INTEGER NOT NULL,
            pid INTEGER,
            stage INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (client_id, seq)
        ) WITHOUT ROWID;
    """),
]

_UPSERT = ("INSERT INTO mqtt_sessions(client_id, principal, kind, subscriptions, incoming_qos2, last_pid, "
           "disconnected_at) VALUES (?,?,?,?,'[]',0,?) ON CONFLICT(client_id) DO UPDATE SET principal=excluded.principal, "
           "kind=excluded.kind, subscriptions=excluded.subscriptions, disconnected_at=excluded.disconnected_at")
_KEEP = ("INSERT OR REPLACE INTO mqtt_session_messages(client_id, seq, topic, payload, qos, retain, pid, stage) "
         "VALUES (?,?,?,?,?,?,?,?)")


def _message_row(client_id: str, m: SavedMessage) -> tuple:
    return (client_id, m.seq, m.topic, m.payload, m.qos, int(m.retain), m.pid, m.stage)


class SqliteSessionStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def apply(self, ops: list[JournalOp]) -> None:
        def job(conn: sqlite3.Connection) -> None:
            for op in ops:
                if isinstance(op, MessageKept):
                    conn.execute(_KEEP, _message_row(op.client_id, op.message))
                elif isinstance(op, MessageDone):
                    conn.execute("DELETE FROM mqtt_session_messages WHERE client_id=? AND seq=?",
                                 (op.client_id, op.seq))
                elif isinstance(op, SessionUpsert):
                    conn.execute(_UPSERT, (op.client_id, op.principal, op.kind, json.dumps(op.subscriptions),
                                           op.disconnected_at))
                elif isinstance(op, SessionDrop):
                    conn.execute("DELETE FROM mqtt_session_messages WHERE client_id=?", (op.client_id,))
                    conn.execute("DELETE FROM mqtt_sessions WHERE client_id=?", (op.client_id,))

        await self._db.write(job)

    async def save_sessions(self, sessions: list[SavedSession]) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM mqtt_session_messages")
            conn.execute("DELETE FROM mqtt_sessions")
            conn.executemany(
                "INSERT INTO mqtt_sessions(client_id, principal, kind, subscriptions, incoming_qos2, last_pid, "
                "disconnected_at) VALUES (?,?,?,?,?,?,?)",
                [(s.client_id, s.principal, s.kind, json.dumps(s.subscriptions), json.dumps(s.incoming_qos2),
                  s.last_pid, s.disconnected_at) for s in sessions])
            conn.executemany(_KEEP, [_message_row(s.client_id, m) for s in sessions for m in s.messages])

        await self._db.write(job)

    async def load_sessions(self) -> list[SavedSession]:
        def job(conn: sqlite3.Connection) -> list[SavedSession]:
            messages: dict[str, list[SavedMessage]] = {}
            for cid, seq, topic, payload, qos, retain, pid, stage in conn.execute(
                    "SELECT client_id, seq, topic, payload, qos, retain, pid, stage FROM mqtt_session_messages "
                    "ORDER BY client_id, seq"):
                messages.setdefault(cid, []).append(
                    SavedMessage(seq, topic, bytes(payload), qos, bool(retain), pid, stage))
            out = []
            for cid, principal, kind, subs, qos2, last_pid, at in conn.execute(
                    "SELECT client_id, principal, kind, subscriptions, incoming_qos2, last_pid, disconnected_at "
                    "FROM mqtt_sessions ORDER BY client_id"):
                out.append(SavedSession(cid, principal, kind, dict(json.loads(subs)), messages.get(cid, []),
                                        list(json.loads(qos2)), last_pid, at))
            return out

        return await self._db.read(job)
