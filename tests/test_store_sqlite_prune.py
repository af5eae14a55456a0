"""The mailbox bound's expiry probe stays a lookup per mailbox, whatever the history.

It runs every second (needs_prune on the reader, prune in the writer's transaction):
a scan of the whole `mailbox` table there held back every send's commit by a time
that grew with the events kept (9-10 ms at 160k events).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from broker.store.sqlite import SqliteStore
from broker.store.sqlite_messaging import _EXPIRED_HEADS


def _fill(path: Path) -> None:
    async def go() -> None:
        store = SqliteStore(path)
        await store.open()
        await store.close()

    asyncio.run(go())
    conn = sqlite3.connect(str(path), isolation_level=None)
    now = time.time()
    conn.execute("BEGIN")
    for p in range(20):
        conn.execute("INSERT INTO mailbox_state(principal, last_n, first_n, delivered_n) VALUES (?, 500, 1, 0)",
                     (f"u{p}",))
        conn.executemany("INSERT INTO mailbox(principal, n, ts, kind, data) VALUES (?, ?, ?, 'unread', '{}')",
                         [(f"u{p}", n, now - (100 if p == 7 and n < 3 else 0)) for n in range(1, 501)])
    conn.execute("COMMIT")
    conn.close()


def test_expired_heads_are_looked_up_per_mailbox_not_scanned(tmp_path: Path) -> None:
    path = tmp_path / "roost.db"
    _fill(path)
    conn = sqlite3.connect(str(path))
    try:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + _EXPIRED_HEADS + " LIMIT 1", (0.0,))]
        assert any(step.startswith("SCAN s") for step in plan), plan
        assert not any(step.startswith("SCAN mb") for step in plan), plan
        # ... and it still finds the mailbox whose oldest event is older than the cutoff
        found = conn.execute(_EXPIRED_HEADS + " LIMIT 10", (time.time() - 50,)).fetchall()
        assert found == [("u7", 1, 500)]
    finally:
        conn.close()
