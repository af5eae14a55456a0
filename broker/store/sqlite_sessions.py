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

from broker.store.base import (
    JournalOp,
    MessageDone,
    MessageKept,
    SavedMessage,
    SavedSession,
    SessionDrop,
    SessionUpsert,
)
from broker.store.sqlite_db import Database, Migration, payload_digest

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
    # A message routed to many persistent sessions (one user's 40 client ids) is
    # stored once: rows refer to a payload by id, payloads count their rows.
    # Empty payloads (and PUBREL-only rows) refer to none.
    ("0112_mqtt_shared_payloads", """
        CREATE TABLE mqtt_payloads (
            id INTEGER PRIMARY KEY,
            digest BLOB NOT NULL UNIQUE,
            payload BLOB NOT NULL,
            refs INTEGER NOT NULL DEFAULT 0
        );
        INSERT OR IGNORE INTO mqtt_payloads(digest, payload)
            SELECT roost_digest(payload), payload FROM mqtt_session_messages WHERE length(payload) > 0;
        CREATE TABLE mqtt_session_messages_v2 (
            client_id TEXT NOT NULL REFERENCES mqtt_sessions(client_id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            topic TEXT NOT NULL,
            payload_id INTEGER REFERENCES mqtt_payloads(id),
            qos INTEGER NOT NULL,
            retain INTEGER NOT NULL,
            pid INTEGER,
            stage INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (client_id, seq)
        ) WITHOUT ROWID;
        INSERT INTO mqtt_session_messages_v2(client_id, seq, topic, payload_id, qos, retain, pid, stage)
            SELECT client_id, seq, topic,
                   CASE WHEN length(payload) > 0
                        THEN (SELECT id FROM mqtt_payloads WHERE digest = roost_digest(m.payload)) END,
                   qos, retain, pid, stage
            FROM mqtt_session_messages m;
        UPDATE mqtt_payloads SET refs = (SELECT count(*) FROM mqtt_session_messages_v2 v
                                         WHERE v.payload_id = mqtt_payloads.id);
        DROP TABLE mqtt_session_messages;
        ALTER TABLE mqtt_session_messages_v2 RENAME TO mqtt_session_messages;
        CREATE INDEX mqtt_session_messages_payload ON mqtt_session_messages(payload_id)
    """),
    # MQTT 5 across a restart: a session's Session Expiry Interval (NULL:
    # limits.session_expiry) and subscription options/identifiers (JSON filter ->
    # [options byte, identifier]); a kept or retained message's forwarded
    # properties (encoded) and the end of its Message Expiry Interval (epoch s).
    ("0113_mqtt5_session_fields", """
        ALTER TABLE mqtt_sessions ADD COLUMN session_expiry REAL;
        ALTER TABLE mqtt_sessions ADD COLUMN subscription_options TEXT NOT NULL DEFAULT '{}';
        ALTER TABLE mqtt_session_messages ADD COLUMN properties BLOB;
        ALTER TABLE mqtt_session_messages ADD COLUMN expires_at REAL;
        ALTER TABLE retained ADD COLUMN properties BLOB;
        ALTER TABLE retained ADD COLUMN expires_at REAL
    """),
]

_UPSERT = ("INSERT INTO mqtt_sessions(client_id, principal, kind, subscriptions, incoming_qos2, last_pid, "
           "disconnected_at, session_expiry, subscription_options) VALUES (?,?,?,?,'[]',0,?,?,?) "
           "ON CONFLICT(client_id) DO UPDATE SET principal=excluded.principal, "
           "kind=excluded.kind, subscriptions=excluded.subscriptions, disconnected_at=excluded.disconnected_at, "
           "session_expiry=excluded.session_expiry, subscription_options=excluded.subscription_options")
_KEEP = ("INSERT OR REPLACE INTO mqtt_session_messages(client_id, seq, topic, payload_id, qos, retain, pid, stage, "
         "properties, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?)")


def options_json(options: dict[str, tuple[int, int]]) -> str:
    return json.dumps({f: [o, sid] for f, (o, sid) in options.items()})


def options_of(text: str) -> dict[str, tuple[int, int]]:
    return {str(f): (int(v[0]), int(v[1])) for f, v in json.loads(text).items()}


def _payload_ref(conn: sqlite3.Connection, payload: bytes) -> int | None:
    """The id of `payload` in mqtt_payloads, stored if new, with one more reference."""
    if not payload:
        return None
    digest = payload_digest(payload)
    row = conn.execute("SELECT id FROM mqtt_payloads WHERE digest=?", (digest,)).fetchone()
    if row is not None:
        conn.execute("UPDATE mqtt_payloads SET refs = refs + 1 WHERE id=?", (row[0],))
        return int(row[0])
    cur = conn.execute("INSERT INTO mqtt_payloads(digest, payload, refs) VALUES (?,?,1)", (digest, payload))
    return cur.lastrowid


def _payload_unref(conn: sqlite3.Connection, payload_id: int | None) -> None:
    if payload_id is None:
        return
    conn.execute("UPDATE mqtt_payloads SET refs = refs - 1 WHERE id=?", (payload_id,))
    conn.execute("DELETE FROM mqtt_payloads WHERE id=? AND refs <= 0", (payload_id,))


def _keep(conn: sqlite3.Connection, client_id: str, m: SavedMessage) -> None:
    old = conn.execute("SELECT payload_id FROM mqtt_session_messages WHERE client_id=? AND seq=?",
                       (client_id, m.seq)).fetchone()
    payload_id = _payload_ref(conn, m.payload)
    conn.execute(_KEEP, (client_id, m.seq, m.topic, payload_id, m.qos, int(m.retain), m.pid, m.stage,
                         m.properties, m.expires_at))
    if old is not None:
        _payload_unref(conn, old[0])


class SqliteSessionStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def apply(self, ops: list[JournalOp]) -> None:
        def job(conn: sqlite3.Connection) -> None:
            for op in ops:
                if isinstance(op, MessageKept):
                    _keep(conn, op.client_id, op.message)
                elif isinstance(op, MessageDone):
                    rows = conn.execute("DELETE FROM mqtt_session_messages WHERE client_id=? AND seq=? "
                                       "RETURNING payload_id", (op.client_id, op.seq)).fetchall()
                    for (payload_id,) in rows:
                        _payload_unref(conn, payload_id)
                elif isinstance(op, SessionUpsert):
                    conn.execute(_UPSERT, (op.client_id, op.principal, op.kind, json.dumps(op.subscriptions),
                                           op.disconnected_at, op.expiry, options_json(op.subscription_options)))
                elif isinstance(op, SessionDrop):
                    for (payload_id,) in conn.execute("DELETE FROM mqtt_session_messages WHERE client_id=? "
                                                      "RETURNING payload_id", (op.client_id,)).fetchall():
                        _payload_unref(conn, payload_id)
                    conn.execute("DELETE FROM mqtt_sessions WHERE client_id=?", (op.client_id,))

        await self._db.write(job)

    async def save_sessions(self, sessions: list[SavedSession]) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM mqtt_session_messages")
            conn.execute("DELETE FROM mqtt_payloads")
            conn.execute("DELETE FROM mqtt_sessions")
            conn.executemany(
                "INSERT INTO mqtt_sessions(client_id, principal, kind, subscriptions, incoming_qos2, last_pid, "
                "disconnected_at, session_expiry, subscription_options) VALUES (?,?,?,?,?,?,?,?,?)",
                [(s.client_id, s.principal, s.kind, json.dumps(s.subscriptions), json.dumps(s.incoming_qos2),
                  s.last_pid, s.disconnected_at, s.expiry, options_json(s.subscription_options)) for s in sessions])
            for s in sessions:
                for m in s.messages:
                    _keep(conn, s.client_id, m)

        await self._db.write(job)

    async def load_sessions(self) -> list[SavedSession]:
        def job(conn: sqlite3.Connection) -> list[SavedSession]:
            # each payload read once: the sessions that share it share one bytes object
            payloads = {pid_: bytes(p) for pid_, p in conn.execute("SELECT id, payload FROM mqtt_payloads")}
            messages: dict[str, list[SavedMessage]] = {}
            for cid, seq, topic, payload_id, qos, retain, pid, stage, props, expires_at in conn.execute(
                    "SELECT client_id, seq, topic, payload_id, qos, retain, pid, stage, properties, expires_at "
                    "FROM mqtt_session_messages ORDER BY client_id, seq"):
                payload = payloads.get(payload_id, b"") if payload_id is not None else b""
                messages.setdefault(cid, []).append(SavedMessage(seq, topic, payload, qos, bool(retain), pid, stage,
                                                                 None if props is None else bytes(props), expires_at))
            out = []
            for cid, principal, kind, subs, qos2, last_pid, at, expiry, options in conn.execute(
                    "SELECT client_id, principal, kind, subscriptions, incoming_qos2, last_pid, disconnected_at, "
                    "session_expiry, subscription_options FROM mqtt_sessions ORDER BY client_id"):
                out.append(SavedSession(cid, principal, kind, dict(json.loads(subs)), messages.get(cid, []),
                                        list(json.loads(qos2)), last_pid, at, expiry, options_of(options)))
            return out

        return await self._db.read(job)
