"""Restart recovery: fill a stopped Roost's store with mailbox events, then time its start.

The fill writes in bulk through the store's own writer (`Database.write`), into the
tables of `broker/store/sqlite_messaging.py`: direct conversations between pairs of
principals `rs0..rs<k>`, every message a `msg` event in both members' mailboxes, each
mailbox at most `mailbox.max_events` (10,000 by default) so nothing is pruned. Then it
reads a few events back through the store's public API (`messaging.sync`), so a schema
change makes this fail loudly instead of measuring an empty store.

Time to serve = from spawning `roost serve` to the first successful request
(`sync` of a filled mailbox) from a client that connects as soon as it can.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bench.brokers import Roost
from bench.mqtt import MqttError, connect, publish_packet

EVENTS_PER_MAILBOX = 10_000
PROBE = "rs0"


def plan(total_events: int) -> tuple[int, int]:
    """(pairs, messages per pair) so that 2 * pairs * per_pair == total_events."""
    per_pair = min(EVENTS_PER_MAILBOX, max(1, total_events // 2))
    pairs = max(1, total_events // (2 * per_pair))
    return pairs, per_pair


async def fill_mailbox(broker: Roost, total_events: int) -> int:
    """Fill the (stopped) broker's store; returns the number of mailbox events stored."""
    from broker.store.sqlite import SqliteStore

    await broker.store_add_users({PROBE: f"pw-{PROBE}"})
    pairs, per_pair = plan(total_events)
    await broker.store_add_mailbox_owners([f"rs{i}" for i in range(2 * pairs)])
    now = time.time() - 3600.0
    store = SqliteStore(broker.db_path)
    await store.open()
    try:
        for p in range(pairs):
            a, b = f"rs{2 * p}", f"rs{2 * p + 1}"
            await store.db.write(lambda conn, a=a, b=b, i=p: _fill_pair(conn, a, b, per_pair, now, i))
        events, last = await store.messaging.sync(PROBE, 0, 5)
        if last != per_pair or len(events) != 5 or events[0].doc.get("kind") != "msg":
            raise RuntimeError(f"filled store does not read back: last={last}, events={events[:2]}")
        return await store.db.read(lambda conn: conn.execute("SELECT COUNT(*) FROM mailbox").fetchone()[0])
    finally:
        await store.close()


def _fill_pair(conn: Any, a: str, b: str, n: int, now: float, activity: int) -> None:
    conv = f"dm:{min(a, b)}:{max(a, b)}"
    conn.execute("DELETE FROM mailbox WHERE principal IN (?,?)", (a, b))
    conn.execute("DELETE FROM mailbox_state WHERE principal IN (?,?)", (a, b))
    conn.execute("DELETE FROM messages WHERE conv=?", (conv,))
    conn.execute("DELETE FROM conv_members WHERE conv=?", (conv,))
    conn.execute("DELETE FROM conversations WHERE conv=?", (conv,))
    conn.execute("INSERT INTO conversations(conv, kind, name, created_by, created_at, last_seq, last_ts, activity)"
                 " VALUES (?, 'dm', '', ?, ?, ?, ?, ?)", (conv, a, now, n, now + n * 1e-3, activity + 1))
    conn.executemany("INSERT INTO conv_members(conv, principal, joined_at) VALUES (?,?,?)",
                     [(conv, a, now), (conv, b, now)])
    body = json.dumps({"type": "text", "text": "x" * 40})
    conn.executemany(
        "INSERT INTO messages(conv, seq, sender, cmid, ts, body) VALUES (?,?,?,?,?,?)",
        ((conv, s, a if s % 2 else b, f"fill-{s}", now + s * 1e-3, body) for s in range(1, n + 1)))
    for p in (a, b):
        conn.executemany(
            "INSERT INTO mailbox(principal, n, ts, kind, conv, seq, data) VALUES (?,?,?,'msg',?,?,NULL)",
            ((p, s, now + s * 1e-3, conv, s) for s in range(1, n + 1)))
        conn.execute("INSERT INTO mailbox_state(principal, last_n, first_n, delivered_n) VALUES (?,?,1,?)",
                     (p, n, n))


async def count_events(broker: Roost) -> int:
    """Mailbox events in the (stopped) broker's store."""
    from broker.store.sqlite import SqliteStore

    store = SqliteStore(broker.db_path)
    await store.open()
    try:
        return await store.db.read(lambda conn: conn.execute("SELECT COUNT(*) FROM mailbox").fetchone()[0])
    finally:
        await store.close()


async def time_to_serve(broker: Roost, timeout: float = 30.0) -> float:
    """Spawn the broker and return seconds until a `sync` request is answered ok."""
    creds = broker.im_client(PROBE, "probe")
    broker.spawn()
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if broker.proc is None or broker.proc.poll() is not None:
            raise RuntimeError(f"roost exited during restart:\n{broker.log_tail()}")
        try:
            if await _probe(broker, creds.client_id, creds.username, creds.password):
                return time.monotonic() - t0
        except (TimeoutError, OSError, MqttError):
            pass
        await asyncio.sleep(0.01)
    raise RuntimeError(f"roost did not answer within {timeout}s after restart:\n{broker.log_tail()}")


async def _probe(broker: Roost, cid: str, user: str | None, pw: str | None) -> bool:
    answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def on_message(topic: bytes, payload: bytes, t: int) -> None:
        if not answer.done():
            answer.set_result(json.loads(payload))

    conn = await connect(broker.host, broker.port, cid, user, pw, on_message=on_message, timeout=5.0)
    try:
        await conn.subscribe([(f"roost/resp/{cid}", 1)], timeout=5.0)
        req = json.dumps({"id": "probe", "op": "sync", "after": 0, "limit": 100}).encode()
        conn.write(publish_packet(f"roost/req/{cid}", req, qos=1, pid=7))
        doc = await asyncio.wait_for(answer, 5.0)
        return bool(doc.get("ok")) and len(doc["result"].get("events", [])) > 0
    finally:
        conn.close()
