"""The grouped hot path of the messaging store (broker/store/sqlite_msgbatch.py):
sends and acks queued together run as one store job. Each behaves as if it ran
alone: gap-free seq and n, duplicates answered with the first message, refusals
change nothing, and what was answered is exactly what is stored."""

from __future__ import annotations

import asyncio
import json
import sqlite3

from broker.store.base import MailboxEvent, NotMember, Principal
from broker.store.jsonutil import compact_json
from broker.store.sqlite import SqliteStore

TS = 1764000000.123


def body(t: str) -> str:
    return json.dumps({"type": "text", "text": t}, separators=(",", ":"))


async def open_store(tmp_path, users=("alice", "bob", "carol")) -> SqliteStore:  # noqa: ANN001
    store = SqliteStore(tmp_path / "roost.db")
    await store.open()
    for u in users:
        await store.identity.add_principal(Principal(u, "user", u, "", "x", 0.0))
    return store


def dm(a: str, b: str) -> tuple[str, tuple[str, str]]:
    x, y = sorted((a, b))
    return f"dm:{x}:{y}", (x, y)


def send(store: SqliteStore, sender: str, to: str, cmid: str, *, now: float = TS, text: str = "hi"):  # noqa: ANN201
    conv, members = dm(sender, to)
    return store.messaging.send(sender=sender, conv=conv, dm_members=members, cmid=cmid, body=body(text), now=now)


def assert_wire_is_doc(events: list[MailboxEvent]) -> None:
    """The bytes pushed for an event (built by the batch, once per message) are its document's encoding."""
    for e in events:
        assert e.wire == compact_json(e.doc).encode()


async def mailbox(store: SqliteStore, principal: str) -> list[dict]:
    events, _head = await store.messaging.sync(principal, 0, 1000)
    return [e.doc for e in events]


def test_a_group_numbers_like_one_job_per_request_and_answers_what_it_stores(tmp_path):
    async def main() -> None:
        store = await open_store(tmp_path)
        ms = store.messaging
        # Queued together (no await in between): one group.
        groups_before = ms._batcher.groups
        outs = await asyncio.gather(*(send(store, s, r, f"{s}-{i}", now=TS + i * 0.0001)
                                      for i in range(30) for s, r in (("alice", "bob"), ("bob", "alice"),
                                                                      ("carol", "alice"))))
        assert ms._batcher.groups == groups_before + 1
        ab = sorted(o.message.seq for o in outs if o.message.conv == "dm:alice:bob")
        assert ab == list(range(1, 61))
        for who in ("alice", "bob", "carol"):
            stored = await mailbox(store, who)
            assert [e["n"] for e in stored] == list(range(1, len(stored) + 1))
            answered = sorted((e for o in outs for e in o.events if e.principal == who), key=lambda e: e.n)
            assert [e.doc for e in answered] == stored   # same docs, same floats
        # alice's unread counts: 30 from bob and 30 from carol, running total.
        unread = [e for e in await mailbox(store, "alice") if e["kind"] == "unread"]
        assert unread[-1]["total"] == 60 and max(e["count"] for e in unread) == 30
        await store.close()

    asyncio.run(main())


def test_duplicates_in_one_group_and_across_groups(tmp_path):
    async def main() -> None:
        store = await open_store(tmp_path)
        a, b, c = await asyncio.gather(send(store, "alice", "bob", "c1"), send(store, "alice", "bob", "c1"),
                                       send(store, "alice", "bob", "c2"))
        assert not a.dup and b.dup and b.message == a.message and c.message.seq == 2
        assert b.events == []
        again = await send(store, "alice", "bob", "c1")
        assert again.dup and again.message == a.message
        assert [e["kind"] for e in await mailbox(store, "bob")] == ["msg", "unread", "msg", "unread"]
        await store.close()

    asyncio.run(main())


def test_a_refused_operation_changes_nothing_and_the_rest_of_its_group_commits(tmp_path):
    async def main() -> None:
        store = await open_store(tmp_path)
        ms = store.messaging
        await ms.create_group("grp:g1", "home", "alice", ["bob"], TS)
        results = await asyncio.gather(
            send(store, "alice", "bob", "ok1"),
            ms.send(sender="carol", conv="grp:g1", dm_members=None, cmid="no", body=body("x"), now=TS),
            ms.ack("bob.phone", "bob", 999, TS),
            ms.send(sender="carol", conv="grp:missing", dm_members=None, cmid="no2", body=body("x"), now=TS),
            send(store, "bob", "alice", "ok2"),
            return_exceptions=True)
        assert isinstance(results[1], NotMember) and isinstance(results[3], NotMember)
        assert isinstance(results[2], ValueError) and "beyond the last event" in str(results[2])
        assert results[0].message.seq == 1 and results[4].message.seq == 2
        assert await ms.find_sent("carol", "no") is None
        bob = await mailbox(store, "bob")
        assert [e["n"] for e in bob] == list(range(1, len(bob) + 1))
        cursor, _sub, _head = await ms.client_cursor("bob.phone", "bob")
        assert cursor == 0
        await store.close()

    asyncio.run(main())


def test_acks_in_the_same_group_as_the_sends_they_acknowledge(tmp_path):
    async def main() -> None:
        store = await open_store(tmp_path)
        ms = store.messaging
        first = await send(store, "alice", "bob", "m1")
        head = max(e.n for e in first.events if e.principal == "bob")
        # bob acks what he has and, in the same group, guesses the events of a
        # send queued before the ack (n 3, 4 exist once that send is numbered).
        out = await asyncio.gather(send(store, "alice", "bob", "m2"), ms.ack("bob.phone", "bob", head, TS),
                                   ms.ack("bob.phone", "bob", head + 2, TS), ms.ack("bob.phone", "bob", 1, TS))
        assert out[1][0] == head and out[2][0] == head + 2 and out[3][0] == head + 2   # never back
        delivered = [e.doc for o in out[1:] for e in o[1]]
        assert [(d["seq"], d["to"]) for d in delivered] == [(1, "bob"), (2, "bob")]
        assert_wire_is_doc([e for o in out[1:] for e in o[1]] + out[0].events + first.events)
        alice = await mailbox(store, "alice")
        assert [e["kind"] for e in alice] == ["msg", "msg", "delivered", "delivered"]
        assert [e["n"] for e in alice] == [1, 2, 3, 4]
        assert (await ms.client_cursor("bob.phone", "bob"))[0] == head + 2
        # Acking again sends no second receipt.
        _n, events = await ms.ack("bob.laptop", "bob", head + 2, TS)
        assert events == []
        await store.close()

    asyncio.run(main())


def test_odd_text_and_floats_are_stored_and_answered_exactly(tmp_path):
    async def main() -> None:
        store = await open_store(tmp_path)
        ms = store.messaging
        odd = 1764000000.1234567   # not a 3-decimal time: stored exactly all the same
        outs = await asyncio.gather(send(store, "alice", "bob", "nul\0cmid", now=odd),
                                    send(store, "alice", "bob", "plain", now=odd + 1),
                                    send(store, "alice", "bob", 'quote"\\\u2028é😀'))
        assert [o.message.seq for o in outs] == [1, 2, 3]
        found = await ms.find_sent("alice", "nul\0cmid")
        assert found is not None and found.cmid == "nul\0cmid" and found.ts == odd
        assert (await send(store, "alice", "bob", "nul\0cmid")).dup
        assert (await send(store, "alice", "bob", 'quote"\\\u2028é😀')).dup
        stored = await mailbox(store, "bob")
        answered = sorted((e for o in outs for e in o.events if e.principal == "bob"), key=lambda e: e.n)
        assert [e.doc for e in answered] == stored
        assert_wire_is_doc([e for o in outs for e in o.events])
        await store.close()

    asyncio.run(main())


def test_new_conversations_and_a_group_job_in_between(tmp_path):
    async def main() -> None:
        store = await open_store(tmp_path)
        ms = store.messaging
        # A job queued after a group closes it: later sends start a new group and
        # run after that job, in arrival order.
        s1 = send(store, "alice", "bob", "a1")
        s1_task = asyncio.ensure_future(s1)
        await asyncio.sleep(0)
        grp = asyncio.ensure_future(ms.create_group("grp:g2", "g", "alice", ["carol"], TS))
        await asyncio.sleep(0)
        s2 = asyncio.ensure_future(ms.send(sender="carol", conv="grp:g2", dm_members=None, cmid="c1",
                                           body=body("x"), now=TS))
        a1, _events, c1 = await asyncio.gather(s1_task, grp, s2)
        assert a1.message.seq == 1 and c1.message.seq == 1
        convs, total = await ms.convs("alice")
        assert {c.conv for c in convs} == {"dm:alice:bob", "grp:g2"} and total == 1
        await store.close()

    asyncio.run(main())


def test_everything_answered_is_committed(tmp_path):
    async def main() -> None:
        store = await open_store(tmp_path)
        outs = await asyncio.gather(*(send(store, "alice", "bob", f"m{i}") for i in range(50)),
                                    store.messaging.ack("bob.x", "bob", 0, TS))
        await store.close()
        # Another connection sees every answered row (committed before the answers).
        conn = sqlite3.connect(str(tmp_path / "roost.db"))
        count = conn.execute("SELECT COUNT(*) FROM messages WHERE conv='dm:alice:bob'").fetchone()[0]
        last_n = conn.execute("SELECT last_n FROM mailbox_state WHERE principal='bob'").fetchone()[0]
        conn.close()
        assert count == 50 == max(o.message.seq for o in outs[:50])
        assert last_n == 100

    asyncio.run(main())


def test_a_large_group_fits_an_old_sqlite_parameter_limit(tmp_path):
    async def main() -> None:
        store = await open_store(tmp_path)
        # SQLite before 3.32: at most 999 parameters per statement (the multi-row INSERTs)
        await store.db.write(lambda conn: conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999))
        outs = await asyncio.gather(*(send(store, "alice", "bob", f"m{i}") for i in range(200)))
        assert sorted(o.message.seq for o in outs) == list(range(1, 201))
        assert len(await mailbox(store, "bob")) == 400
        await store.close()

    asyncio.run(main())
