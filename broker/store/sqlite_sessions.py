"""SQLite implementation of SessionStore: persistent MQTT sessions across a
broker restart (their subscriptions, queued and in-flight messages).

Saved whole when the broker stops and taken back (and deleted) when it starts,
so a row never describes a session that a running broker has changed since.
"""

from __future__ import annotations

import json
import sqlite3

from broker.store.base import SavedMessage, SavedSession
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
]


class SqliteSessionStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def save_sessions(self, sessions: list[SavedSession]) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM mqtt_session_messages")
            conn.execute("DELETE FROM mqtt_sessions")
            conn.executemany(
                "INSERT INTO mqtt_sessions(client_id, principal, kind, subscriptions, incoming_qos2, last_pid, "
                "disconnected_at) VALUES (?,?,?,?,?,?,?)",
                [(s.client_id, s.principal, s.kind, json.dumps(s.subscriptions), json.dumps(s.incoming_qos2),
                  s.last_pid, s.disconnected_at) for s in sessions])
            conn.executemany(
                "INSERT INTO mqtt_session_messages(client_id, pos, topic, payload, qos, retain, pid, stage) "
                "VALUES (?,?,?,?,?,?,?,?)",
                [(s.client_id, i, m.topic, m.payload, m.qos, int(m.retain), m.pid, m.stage)
                 for s in sessions for i, m in enumerate(s.messages)])

        await self._db.write(job)

    async def take_sessions(self) -> list[SavedSession]:
        def job(conn: sqlite3.Connection) -> list[SavedSession]:
            messages: dict[str, list[SavedMessage]] = {}
            for cid, topic, payload, qos, retain, pid, stage in conn.execute(
                    "SELECT client_id, topic, payload, qos, retain, pid, stage FROM mqtt_session_messages "
                    "ORDER BY client_id, pos"):
                messages.setdefault(cid, []).append(SavedMessage(topic, bytes(payload), qos, bool(retain), pid, stage))
            out = []
            for cid, principal, kind, subs, qos2, last_pid, at in conn.execute(
                    "SELECT client_id, principal, kind, subscriptions, incoming_qos2, last_pid, disconnected_at "
                    "FROM mqtt_sessions ORDER BY client_id"):
                out.append(SavedSession(cid, principal, kind, dict(json.loads(subs)), messages.get(cid, []),
                                        list(json.loads(qos2)), last_pid, at))
            conn.execute("DELETE FROM mqtt_session_messages")
            conn.execute("DELETE FROM mqtt_sessions")
            return out

        return await self._db.write(job)
