"""PostgreSQL implementation of SessionStore: persistent MQTT sessions (their
subscriptions, queued and in-flight messages), as broker/store/sqlite_sessions.py.

`apply` runs a journal batch in one transaction, a few statements per run of
operations of one kind (arrays through unnest), not one round trip per
operation. A payload routed to many sessions is stored once (mqtt_payloads,
keyed by its digest, counting its rows); references are taken and dropped with
single atomic statements, so nodes writing at once keep the counts right.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from asyncpg import Connection

from broker.store.base import (
    JournalOp,
    MessageDone,
    MessageKept,
    SavedMessage,
    SavedSession,
    SessionDrop,
    SessionUpsert,
)
from broker.store.postgres_db import PgDatabase
from broker.store.sqlite_sessions import options_json, options_of

DDL = """
CREATE TABLE mqtt_sessions (
    client_id text COLLATE "C" PRIMARY KEY,
    principal text,
    kind text,
    subscriptions text NOT NULL,
    incoming_qos2 text NOT NULL,
    last_pid integer NOT NULL,
    disconnected_at double precision NOT NULL
);
CREATE TABLE mqtt_payloads (
    id bigserial PRIMARY KEY,
    digest bytea NOT NULL UNIQUE,
    payload bytea NOT NULL,
    refs integer NOT NULL DEFAULT 0
);
CREATE TABLE mqtt_session_messages (
    client_id text COLLATE "C" NOT NULL REFERENCES mqtt_sessions(client_id) ON DELETE CASCADE,
    seq bigint NOT NULL,
    topic text NOT NULL,
    payload_id bigint REFERENCES mqtt_payloads(id),
    qos integer NOT NULL,
    retain boolean NOT NULL,
    pid integer,
    stage integer NOT NULL DEFAULT 0,
    PRIMARY KEY (client_id, seq)
);
CREATE INDEX mqtt_session_messages_payload ON mqtt_session_messages (payload_id);
"""

# MQTT 5 across a restart (migration 5; the SQLite engine's 0113, same columns):
# a session's Session Expiry Interval (NULL: limits.session_expiry) and
# subscription options/identifiers (JSON filter -> [options byte, identifier]);
# a kept or retained message's forwarded properties (encoded) and the end of its
# Message Expiry Interval (epoch s).
MQTT5_DDL = """
ALTER TABLE mqtt_sessions ADD COLUMN session_expiry double precision;
ALTER TABLE mqtt_sessions ADD COLUMN subscription_options text NOT NULL DEFAULT '{}';
ALTER TABLE mqtt_session_messages ADD COLUMN properties bytea;
ALTER TABLE mqtt_session_messages ADD COLUMN expires_at double precision;
ALTER TABLE retained ADD COLUMN properties bytea;
ALTER TABLE retained ADD COLUMN expires_at double precision;
"""



def payload_digest(payload: bytes) -> bytes:
    """The key under which a payload is stored once (the SQLite engine's too, so a
    migrated store keeps deduplicating against the payloads it brought along)."""
    return hashlib.blake2b(payload, digest_size=16).digest()


_UPSERT = ("INSERT INTO mqtt_sessions(client_id, principal, kind, subscriptions, incoming_qos2, last_pid, "
           "disconnected_at, session_expiry, subscription_options) VALUES ($1,$2,$3,$4,'[]',0,$5,$6,$7) "
           "ON CONFLICT (client_id) DO UPDATE SET "
           "principal=excluded.principal, kind=excluded.kind, subscriptions=excluded.subscriptions, "
           "disconnected_at=excluded.disconnected_at, session_expiry=excluded.session_expiry, "
           "subscription_options=excluded.subscription_options")
_REF = ("INSERT INTO mqtt_payloads(digest, payload, refs) SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::int[]) "
        "ON CONFLICT (digest) DO UPDATE SET refs = mqtt_payloads.refs + excluded.refs RETURNING id, digest")
_UNREF = ("UPDATE mqtt_payloads p SET refs = p.refs - d.c "
          "FROM (SELECT id, count(*) AS c FROM unnest($1::bigint[]) AS id GROUP BY id) d WHERE p.id = d.id")
_UNREF_GONE = "DELETE FROM mqtt_payloads WHERE id = ANY($1::bigint[]) AND refs <= 0"
_DELETE_MESSAGES = ("DELETE FROM mqtt_session_messages m USING unnest($1::text[], $2::bigint[]) AS k(client_id, seq) "
                    "WHERE m.client_id = k.client_id AND m.seq = k.seq RETURNING m.payload_id")
_INSERT_MESSAGES = ("INSERT INTO mqtt_session_messages(client_id, seq, topic, payload_id, qos, retain, pid, stage, "
                    "properties, expires_at) "
                    "SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::int[], "
                    "$6::boolean[], $7::int[], $8::int[], $9::bytea[], $10::float8[])")


async def _unref(conn: Connection, payload_ids: Iterable[int | None]) -> None:
    ids = sorted(i for i in payload_ids if i is not None)   # one lock order for every writer
    if ids:
        await conn.execute(_UNREF, ids)
        await conn.execute(_UNREF_GONE, ids)


async def _keep(conn: Connection, kept: list[tuple[str, SavedMessage]]) -> None:
    """Store these messages (replacing any with the same client id and seq): the
    last of several for one key wins, as when they are applied one by one."""
    by_key: dict[tuple[str, int], SavedMessage] = {}
    for client_id, m in kept:
        by_key.pop((client_id, m.seq), None)
        by_key[(client_id, m.seq)] = m
    client_ids = [k[0] for k in by_key]
    seqs = [k[1] for k in by_key]
    old = await conn.fetch(_DELETE_MESSAGES, client_ids, seqs)
    digests: dict[bytes, tuple[bytes, int]] = {}
    keyed: list[bytes | None] = []
    for m in by_key.values():
        if not m.payload:
            keyed.append(None)
            continue
        d = payload_digest(m.payload)
        payload, refs = digests.get(d, (m.payload, 0))
        digests[d] = (payload, refs + 1)
        keyed.append(d)
    ids: dict[bytes, int] = {}
    if digests:
        order = sorted(digests)   # one lock order for every writer
        rows = await conn.fetch(_REF, order, [digests[d][0] for d in order], [digests[d][1] for d in order])
        ids = {bytes(r[1]): int(r[0]) for r in rows}
    ms = list(by_key.values())
    await conn.execute(_INSERT_MESSAGES, client_ids, seqs, [m.topic for m in ms],
                       [ids[d] if d is not None else None for d in keyed], [m.qos for m in ms],
                       [m.retain for m in ms], [m.pid for m in ms], [m.stage for m in ms],
                       [m.properties for m in ms], [m.expires_at for m in ms])
    await _unref(conn, (r[0] for r in old))


async def _done(conn: Connection, done: list[MessageDone]) -> None:
    rows = await conn.fetch(_DELETE_MESSAGES, [op.client_id for op in done], [op.seq for op in done])
    await _unref(conn, (r[0] for r in rows))


async def _drop(conn: Connection, client_ids: list[str]) -> None:
    rows = await conn.fetch("DELETE FROM mqtt_session_messages WHERE client_id = ANY($1::text[]) RETURNING payload_id",
                            client_ids)
    await _unref(conn, (r[0] for r in rows))
    await conn.execute("DELETE FROM mqtt_sessions WHERE client_id = ANY($1::text[])", client_ids)


def _runs(ops: list[JournalOp]) -> list[list[JournalOp]]:
    """Consecutive operations of one kind: each run is one or two statements, and
    runs are applied in order, so every operation sees the ones before it."""
    out: list[list[JournalOp]] = []
    for op in ops:
        if out and type(out[-1][0]) is type(op):
            out[-1].append(op)
        else:
            out.append([op])
    return out


class PgSessionStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def apply(self, ops: list[JournalOp]) -> None:
        if not ops:
            return

        async def job(conn: Connection) -> None:
            for run in _runs(ops):
                first = run[0]
                if isinstance(first, MessageKept):
                    await _keep(conn, [(op.client_id, op.message) for op in run if isinstance(op, MessageKept)])
                elif isinstance(first, MessageDone):
                    await _done(conn, [op for op in run if isinstance(op, MessageDone)])
                elif isinstance(first, SessionUpsert):
                    await conn.executemany(_UPSERT, [
                        (op.client_id, op.principal, op.kind, json.dumps(op.subscriptions), op.disconnected_at,
                         op.expiry, options_json(op.subscription_options))
                        for op in run if isinstance(op, SessionUpsert)])
                elif isinstance(first, SessionDrop):
                    await _drop(conn, [op.client_id for op in run])

        await self._db.write(job)

    async def save_sessions(self, sessions: list[SavedSession]) -> None:
        async def job(conn: Connection) -> None:
            await conn.execute("DELETE FROM mqtt_session_messages")
            await conn.execute("DELETE FROM mqtt_payloads")
            await conn.execute("DELETE FROM mqtt_sessions")
            if sessions:
                await conn.executemany(
                    "INSERT INTO mqtt_sessions(client_id, principal, kind, subscriptions, incoming_qos2, last_pid, "
                    "disconnected_at, session_expiry, subscription_options) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                    [(s.client_id, s.principal, s.kind, json.dumps(s.subscriptions), json.dumps(s.incoming_qos2),
                      s.last_pid, s.disconnected_at, s.expiry, options_json(s.subscription_options))
                     for s in sessions])
            kept = [(s.client_id, m) for s in sessions for m in s.messages]
            if kept:
                await _keep(conn, kept)

        await self._db.write(job)

    async def load_sessions(self) -> list[SavedSession]:
        async def job(conn: Connection) -> list[SavedSession]:
            # each payload read once: the sessions that share it share one bytes object
            payloads = {int(r[0]): bytes(r[1]) for r in await conn.fetch("SELECT id, payload FROM mqtt_payloads")}
            messages: dict[str, list[SavedMessage]] = {}
            for r in await conn.fetch("SELECT client_id, seq, topic, payload_id, qos, retain, pid, stage, "
                                      "properties, expires_at FROM mqtt_session_messages ORDER BY client_id, seq"):
                payload = payloads.get(int(r[3]), b"") if r[3] is not None else b""
                messages.setdefault(r[0], []).append(
                    SavedMessage(int(r[1]), r[2], payload, int(r[4]), bool(r[5]), r[6], int(r[7]),
                                 None if r[8] is None else bytes(r[8]), None if r[9] is None else float(r[9])))
            out = []
            for r in await conn.fetch("SELECT client_id, principal, kind, subscriptions, incoming_qos2, last_pid, "
                                      "disconnected_at, session_expiry, subscription_options "
                                      "FROM mqtt_sessions ORDER BY client_id"):
                out.append(SavedSession(r[0], r[1], r[2], dict(json.loads(r[3])), messages.get(r[0], []),
                                        list(json.loads(r[4])), int(r[5]), float(r[6]),
                                        None if r[7] is None else float(r[7]), options_of(r[8])))
            return out

        return await self._db.read(job, snapshot=True)
