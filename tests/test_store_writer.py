"""The SQLite writer's group commit (broker/store/sqlite_db.py): a job that fails
changes nothing, whether it ran alone in its transaction (no savepoint) or among
others (its own savepoint rolled back, the others committed)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from broker.store.sqlite_db import Database

SCHEMA = [("0001_t", "CREATE TABLE t (k TEXT PRIMARY KEY)")]


def _insert(key: str, *, fail: bool = False, hold: threading.Event | None = None):  # noqa: ANN202
    def job(conn: sqlite3.Connection) -> str:
        if hold is not None:
            assert hold.wait(10)
        conn.execute("INSERT INTO t(k) VALUES (?)", (key,))
        if fail:
            raise ValueError(f"refused {key}")
        return key
    return job


async def _keys(db: Database) -> list[str]:
    return await db.read(lambda conn: [r[0] for r in conn.execute("SELECT k FROM t ORDER BY k")])


def test_a_failing_job_alone_in_its_transaction_changes_nothing(tmp_path):
    async def main() -> None:
        db = Database(tmp_path / "w.db")
        await db.open(SCHEMA)
        assert await db.write(_insert("a")) == "a"
        with pytest.raises(ValueError, match="refused b"):
            await db.write(_insert("b", fail=True))
        assert await db.write(_insert("c")) == "c"
        assert await _keys(db) == ["a", "c"]
        await db.close()

    asyncio.run(main())


def test_a_failing_job_among_others_rolls_back_only_itself(tmp_path):
    async def main() -> None:
        db = Database(tmp_path / "w.db")
        await db.open(SCHEMA)
        hold = threading.Event()
        first = db.submit(_insert("a", hold=hold))     # the writer waits in it while the rest queue up
        rest = [db.submit(_insert("b")), db.submit(_insert("c", fail=True)), db.submit(_insert("d"))]
        commits = db.commits
        hold.set()
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        assert outcomes[:2] == ["a", "b"] and isinstance(outcomes[2], ValueError) and outcomes[3] == "d"
        assert db.commits <= commits + 2     # b, c and d were queued together: one transaction
        assert await _keys(db) == ["a", "b", "d"]
        await db.close()

    asyncio.run(main())
