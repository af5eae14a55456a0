"""The PostgreSQL send in one server-side function (roost_send, schema migration 8):

* the same script of sends on SQLite and on PostgreSQL gives the same outcomes
  (message, dup, each event's principal, n and document, in order), the same
  mailboxes and the same conversation lists: a group with a member skipped, a
  direct conversation created on first use, ts never going back, a dup in the
  same and in another conversation, NotMember, a read in between, and a member
  removed and registered again (it rejoins, its view starting after the history);
* a database at schema version 7 holding messages (made before the function
  existed), opened by two nodes at once: one applies migration 8, the other
  nothing, and sends from both continue its numbers without a gap, an old cmid
  still answered `dup`;
* a member purged while a send waits for its mailbox's lock: the send runs
  again on the members as they are;
* the same cmid committed in another conversation while the send's INSERT
  waits: `dup` of that message, nothing of the send kept.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg

from broker.config import StorageConfig
from broker.store.base import NotMember, Principal, SendOutcome
from broker.store.factory import open_store
from broker.store.postgres import PgStore
from broker.store.postgres_db import PgDatabase
from broker.store.postgres_schema import MIGRATIONS, migrate
from tests.postgres import PostgresDatabases

TS = 1764000000.0
DM = ("alice", "bob")


def body(text: str) -> str:
    return json.dumps({"type": "text", "text": text}, separators=(",", ":"))


def user(pid: str) -> Principal:
    return Principal(pid, "user", pid, "", "hash", TS)


def outcome(out: SendOutcome) -> tuple[Any, ...]:
    return (out.message, out.dup, [(e.principal, e.n, e.doc) for e in out.events])


async def script(s: Any) -> list[Any]:
    """Everything the send path can meet, each step's result recorded."""
    seen: list[Any] = []

    async def send(sender: str, conv: str, cmid: str, now: float, *, dm: tuple[str, str] | None = None,
                   skip: frozenset[str] = frozenset()) -> None:
        try:
            out = await s.messaging.send(sender=sender, conv=conv, dm_members=dm, cmid=cmid, body=body(cmid),
                                         now=now, skip=skip)
        except NotMember as exc:
            seen.append(("NotMember", str(exc)))
        else:
            seen.append(outcome(out))

    for pid in ("alice", "bob", "carol", "dave"):
        await s.identity.add_principal(user(pid))
    await s.messaging.create_group("g:1", "G", "alice", ["bob", "carol", "dave"], TS)
    await send("bob", "g:1", "g1", TS + 1, skip=frozenset({"carol"}))       # carol blocked bob: no event
    await send("carol", "g:1", "g2", TS + 2)
    await send("alice", "dm:alice:bob", "a1", TS + 5, dm=DM)                 # created by this send
    await send("alice", "dm:alice:bob", "a2", TS + 1, dm=DM)                 # a clock behind: ts stays TS + 5
    await send("bob", "dm:alice:bob", "b1", TS + 6, dm=DM)
    await send("alice", "dm:alice:bob", "a1", TS + 7, dm=DM)                 # dup, same conversation
    await send("alice", "g:1", "a2", TS + 7)                                 # dup, another conversation
    await send("alice", "dm:alice:carol", "a1", TS + 7, dm=("alice", "carol"))   # dup, into a new one
    await send("erin", "g:1", "e1", TS + 8)                                  # not a member
    await send("dave", "dm:alice:bob", "d1", TS + 8, dm=DM)                  # not one of the two
    await send("alice", "g:none", "n1", TS + 8)                              # no such group
    seen.append((await s.messaging.read("bob", "dm:alice:bob", 1, TS + 9)).events)
    await send("alice", "dm:alice:bob", "a3", TS + 10, dm=DM)
    await s.identity.remove_principal("bob")
    await s.identity.add_principal(user("bob"))                              # a new owner of the id
    await send("alice", "dm:alice:bob", "a4", TS + 11, dm=DM)                # it rejoins, after the history
    await send("bob", "dm:alice:bob", "a1", TS + 12, dm=DM)                  # its cmids start afresh
    await send("dave", "g:1", "d2", TS + 13, skip=frozenset({"alice", "dave"}))   # the sender is never skipped
    for pid in ("alice", "bob", "carol", "dave"):
        events, head = await s.messaging.sync(pid, 0, 1000)
        seen.append((pid, head, [e.doc for e in events], await s.messaging.convs(pid)))
    seen.append(await s.messaging.history("dm:alice:bob", None, 100, viewer="bob"))
    return seen


def test_sends_give_what_the_sqlite_store_gives(postgres_dsn: str, tmp_path: Path) -> None:
    async def run(storage: StorageConfig) -> list[Any]:
        s = await open_store(storage)
        try:
            return await script(s)
        finally:
            await s.close()

    async def main() -> None:
        sqlite = await run(StorageConfig(path=str(tmp_path / "roost.db")))
        postgres = await run(StorageConfig(backend="postgres", dsn=postgres_dsn))
        for step, (want, got) in enumerate(zip(sqlite, postgres, strict=True)):
            assert got == want, f"step {step}"
    asyncio.run(main())


async def _at_version_7_with_messages(dsn: str) -> None:
    """A database as Roost left it before migration 8: the tables (the same up to
    version 7 and at 8, which only adds the function) holding messages and events."""
    store = PgStore(dsn, pool_size=2)
    await store.open()
    try:
        for pid in ("alice", "bob", "carol"):
            await store.identity.add_principal(user(pid))
        await store.messaging.create_group("g:1", "G", "alice", ["bob", "carol"], TS)
        for k in range(5):
            await store.messaging.send(sender="alice", conv="g:1", dm_members=None, cmid=f"old{k}",
                                       body=body("old"), now=TS + k)
        async with store.db.transaction() as conn:
            await conn.execute("DROP FUNCTION roost_send")
            await conn.execute("DELETE FROM schema_migrations WHERE version = 8")
    finally:
        await store.close()


def test_a_version_7_database_with_messages_migrated_by_two_nodes_at_once(
        postgres_databases: PostgresDatabases) -> None:
    dsn = postgres_databases.fresh()
    assert [v for v, _n, _s in MIGRATIONS][-1] == 8

    async def main() -> None:
        await _at_version_7_with_messages(dsn)
        dbs = [PgDatabase(dsn, pool_size=2) for _ in range(2)]
        await asyncio.gather(*(db.open() for db in dbs))
        try:
            assert sorted(await asyncio.gather(*(migrate(db) for db in dbs)), key=len) == [[], [8]]
        finally:
            await asyncio.gather(*(db.close() for db in dbs))
        stores = [PgStore(dsn, pool_size=3) for _ in range(2)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            outs = await asyncio.gather(*(
                s.messaging.send(sender=sender, conv="g:1", dm_members=None, cmid=f"new{k}", body=body("new"),
                                 now=TS + 10 + k)
                for k in range(10) for s, sender in zip(stores, ("bob", "carol"), strict=True)))
            assert sorted(o.message.seq for o in outs) == list(range(6, 26))
            again = await stores[1].messaging.send(sender="alice", conv="g:1", dm_members=None, cmid="old3",
                                                   body=body("again"), now=TS + 50)
            assert again.dup and again.message.seq == 4 and again.events == []
            for pid in ("alice", "bob", "carol"):
                events, head = await stores[0].messaging.sync(pid, 0, 1000)
                assert [e.n for e in events] == list(range(1, head + 1))
                assert [e.doc["seq"] for e in events if e.doc["kind"] == "msg"] == list(range(1, 26))
                _convs, total = await stores[1].messaging.convs(pid)
                unread = [e.doc for e in events if e.doc["kind"] == "unread"]
                assert total == (unread[-1]["total"] if unread else 0)
        finally:
            await asyncio.gather(*(s.close() for s in stores))
    asyncio.run(main())


async def group_and_a_second_connection(dsn: str) -> tuple[PgStore, asyncpg.Connection]:
    """A store with alice, bob, carol and group g:1 of the three, and a connection
    of its own for the concurrent transaction."""
    store = PgStore(dsn, pool_size=3)
    await store.open()
    for pid in ("alice", "bob", "carol"):
        await store.identity.add_principal(user(pid))
    await store.messaging.create_group("g:1", "G", "alice", ["bob", "carol"], TS)
    return store, await asyncpg.connect(dsn)


async def wait_until_blocked(other: asyncpg.Connection, sending: asyncio.Task[object]) -> None:
    """Until the send waits for a lock the other connection's transaction holds."""
    while not await other.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name='roost' AND wait_event_type='Lock'"):
        assert not sending.done()
        await asyncio.sleep(0.01)


def test_a_member_purged_while_the_send_waits_for_its_mailbox_is_left_out(postgres_dsn: str) -> None:
    """The send read the members, then waits for bob's mailbox row, locked by a purge
    of bob that deletes his membership and commits: the send runs again on the
    members as they are (no event, no count for bob), its numbers still gap-free."""
    async def main() -> None:
        store, purge = await group_and_a_second_connection(postgres_dsn)
        try:
            tx = purge.transaction()
            await tx.start()
            await purge.execute("SELECT 1 FROM mailbox_state WHERE principal='bob' FOR UPDATE")
            await purge.execute("DELETE FROM conv_members WHERE conv='g:1' AND principal='bob'")
            retries = store.db.retries
            sending = asyncio.create_task(store.messaging.send(
                sender="alice", conv="g:1", dm_members=None, cmid="m1", body=body("m1"), now=TS + 1))
            await wait_until_blocked(purge, sending)   # by the purge's row lock
            await tx.commit()
            out = await sending
            assert store.db.retries == retries + 1
            assert (out.message.seq, out.dup) == (1, False)
            assert [(e.principal, e.n, e.doc["kind"]) for e in out.events] == [
                ("alice", 2, "msg"), ("carol", 2, "msg"), ("carol", 3, "unread")]
            assert (await store.messaging.sync("bob", 0, 100))[1] == 1   # only the group's creation
        finally:
            await purge.close()
            await store.close()
    asyncio.run(main())


def test_the_same_cmid_committed_in_another_conversation_during_the_send_answers_dup(postgres_dsn: str) -> None:
    """The (sender, cmid) index refuses the function's INSERT (another transaction
    stored the cmid in another conversation while this send waited for it): the
    unique violation leaves roost_send with its constraint's name, the send
    changes nothing and answers the first message as `dup`."""
    async def main() -> None:
        store, other = await group_and_a_second_connection(postgres_dsn)
        try:
            tx = other.transaction()
            await tx.start()
            await other.execute("UPDATE conversations SET last_seq = 1 WHERE conv = 'g:1'")
            await other.execute("INSERT INTO messages(conv, seq, sender, cmid, ts, body) "
                                "VALUES ('g:1', 1, 'alice', 'x', $1, $2)", TS, body("first"))
            sending = asyncio.create_task(store.messaging.send(
                sender="alice", conv="dm:alice:bob", dm_members=DM, cmid="x", body=body("again"), now=TS + 1))
            await wait_until_blocked(other, sending)   # its INSERT, by the uncommitted one
            await tx.commit()
            out = await sending
            assert out.dup and out.events == []
            assert (out.message.conv, out.message.seq, out.message.body) == ("g:1", 1, body("first"))
            # the whole statement rolled back: no direct conversation, no event
            assert await other.fetchval("SELECT count(*) FROM conversations WHERE conv = 'dm:alice:bob'") == 0
            assert await other.fetchval("SELECT count(*) FROM mailbox WHERE conv = 'dm:alice:bob'") == 0
        finally:
            await other.close()
            await store.close()
    asyncio.run(main())
