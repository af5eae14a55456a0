"""The messaging store's numbers and counters with several nodes writing at once:
three PgStore instances (three pools: three "nodes") on one PostgreSQL database.

* 8 senders spread over the 3 nodes into one group: the conversation's seqs are
  1..N without a gap or a duplicate, every member's mailbox n is gap-free, and
  each mailbox has the messages in seq order with unread counts that only grow;
* the same cmid sent at the same time from two nodes is stored once: one answer
  is the message, the other `dup` of it (also for a direct conversation created
  by that very send, and for the same cmid aimed at two conversations);
* reads and acks on other nodes while the sends go on: stored unread counters
  equal a recount, the last `unread` event of each mailbox says what is stored,
  and two clients acking at once on two nodes send one `delivered` per message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from broker.store.base import MailboxEvent, Principal, SendOutcome
from broker.store.postgres import PgStore

TS = 1764000000.0
GROUP = "g:busy"


def body(text: str) -> str:
    return json.dumps({"type": "text", "text": text}, separators=(",", ":"))


async def nodes(dsn: str, job: Callable[[list[PgStore]], Awaitable[None]]) -> None:
    stores = [PgStore(dsn, pool_size=4) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await job(stores)
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def add_users(s: PgStore, *ids: str) -> None:
    for pid in ids:
        await s.identity.add_principal(Principal(pid, "user", pid, "", "hash", TS))


async def mailbox(s: PgStore, principal: str) -> list[dict[str, Any]]:
    events, head = await s.messaging.sync(principal, 0, 100000)
    docs = [e.doc for e in events]
    assert [d["n"] for d in docs] == list(range(1, head + 1)), f"{principal}'s mailbox has a gap or a duplicate"
    return docs


async def stored_unread_matches_a_recount(s: PgStore) -> None:
    rows = await s.db.pool.fetch(
        "SELECT cm.conv, cm.principal, cm.unread, (SELECT count(*) FROM messages m WHERE m.conv = cm.conv "
        "AND m.seq > cm.read_seq AND m.sender <> cm.principal) AS counted FROM conv_members cm")
    assert rows and all(r["unread"] == r["counted"] for r in rows), [dict(r) for r in rows]


def test_eight_senders_on_three_nodes_get_gap_free_seqs_and_mailbox_numbers(postgres_dsn: str) -> None:
    senders = [f"s{i}" for i in range(8)]
    per_sender = 12

    async def job(stores: list[PgStore]) -> None:
        await add_users(stores[0], *senders, "watcher")
        await stores[0].messaging.create_group(GROUP, "Busy", "s0", [*senders, "watcher"], TS)

        async def sender(i: int) -> list[SendOutcome]:
            s = stores[i % 3]
            return [await s.messaging.send(sender=senders[i], conv=GROUP, dm_members=None, cmid=f"c{k}",
                                           body=body(f"{i}/{k}"), now=TS + k) for k in range(per_sender)]

        outs = [o for sent in await asyncio.gather(*(sender(i) for i in range(8))) for o in sent]
        total = 8 * per_sender
        assert not any(o.dup for o in outs)
        assert sorted(o.message.seq for o in outs) == list(range(1, total + 1))
        for i in range(8):   # each sender's messages in the order it sent them
            mine = [o.message.seq for o in outs if o.message.sender == senders[i]]
            assert mine == sorted(mine)
        reader = stores[1]
        for who in (*senders, "watcher"):
            docs = await mailbox(reader, who)
            seqs = [d["seq"] for d in docs if d["kind"] == "msg"]
            assert seqs == list(range(1, total + 1)), f"{who} misses a message or has it out of order"
            counts = [d["count"] for d in docs if d["kind"] == "unread"]
            assert counts == list(range(1, len(counts) + 1))   # nothing read: one more each time
            answered = sorted((e for o in outs for e in o.events if e.principal == who), key=lambda e: e.n)
            assert [e.doc for e in answered] == docs[1:]        # what was answered is what was stored
        assert counts[-1] == total and (await reader.messaging.convs("watcher"))[1] == total
        await stored_unread_matches_a_recount(reader)

    asyncio.run(nodes(postgres_dsn, job))


def test_the_same_cmid_from_two_nodes_at_once_is_stored_once(postgres_dsn: str) -> None:
    async def job(stores: list[PgStore]) -> None:
        a, b = stores[0], stores[1]
        await add_users(a, "alice", "bob", "carol")
        await a.messaging.create_group(GROUP, "G", "alice", ["bob", "carol"], TS)
        for k in range(15):
            cmid = f"m{k}"
            targets: list[tuple[str, tuple[str, str] | None]]
            if k % 3 == 0:     # a direct conversation (created by this very send on the first round)
                targets = [("dm:alice:bob", ("alice", "bob"))] * 2
            elif k % 3 == 1:   # the group
                targets = [(GROUP, None)] * 2
            else:              # one cmid aimed at two conversations: still one message
                targets = [("dm:alice:bob", ("alice", "bob")), ("dm:alice:carol", ("alice", "carol"))]
            outs = await asyncio.gather(*(
                s.messaging.send(sender="alice", conv=conv, dm_members=members, cmid=cmid, body=body(cmid),
                                 now=TS + k)
                for s, (conv, members) in zip((a, b), targets)))
            assert sorted(o.dup for o in outs) == [False, True], cmid
            assert outs[0].message == outs[1].message
            assert [o.events for o in outs if o.dup] == [[]]
        stored = await a.db.pool.fetch("SELECT cmid, count(*) AS n FROM messages GROUP BY cmid")
        assert {r["cmid"]: r["n"] for r in stored} == {f"m{k}": 1 for k in range(15)}
        for who in ("alice", "bob", "carol"):
            cmids = [d["cmid"] for d in await mailbox(stores[2], who) if d["kind"] == "msg"]
            assert len(cmids) == len(set(cmids))
        await stored_unread_matches_a_recount(a)

    asyncio.run(nodes(postgres_dsn, job))


def test_reads_and_acks_on_other_nodes_during_sends_keep_counts_consistent(postgres_dsn: str) -> None:
    async def job(stores: list[PgStore]) -> None:
        await add_users(stores[0], "alice", "bob", "carol")
        await stores[0].messaging.create_group(GROUP, "G", "alice", ["bob", "carol"], TS)
        sending = True

        async def send(i: int, sender: str) -> None:
            s = stores[i % 3]
            for k in range(30):
                await s.messaging.send(sender=sender, conv=GROUP, dm_members=None, cmid=f"{i}-{k}",
                                       body=body("x"), now=TS + k)

        async def reader(s: PgStore, who: str) -> list[MailboxEvent]:
            events: list[MailboxEvent] = []
            while sending:   # read up to the newest message it has seen, again and again
                docs = (await s.messaging.sync(who, 0, 100000))[0]
                seqs = [e.doc["seq"] for e in docs if e.doc["kind"] == "msg"]
                if seqs:
                    out = await s.messaging.read(who, GROUP, seqs[-1], TS)
                    events += out.events
                    assert out.unread >= 0 and out.total_unread >= out.unread
                await asyncio.sleep(0)
            return events

        async def acker(s: PgStore, client: str, who: str) -> list[MailboxEvent]:
            events: list[MailboxEvent] = []
            while sending:
                head = await s.messaging.head(who)
                if head:
                    events += (await s.messaging.ack(client, who, head, TS))[1]
                await asyncio.sleep(0)
            return events

        tasks = [asyncio.ensure_future(t) for t in (
            reader(stores[1], "bob"), reader(stores[2], "bob"),
            acker(stores[0], "carol.phone", "carol"), acker(stores[1], "carol.laptop", "carol"))]
        await asyncio.gather(send(0, "alice"), send(1, "alice"), send(2, "bob"))
        sending = False
        await asyncio.gather(*tasks)

        s = stores[0]
        await stored_unread_matches_a_recount(s)
        for who in ("alice", "bob", "carol"):
            docs = await mailbox(s, who)
            unread_events = [d for d in docs if d["kind"] == "unread"]
            summaries, total = await s.messaging.convs(who)
            assert unread_events[-1]["count"] == summaries[0].unread and unread_events[-1]["total"] == total
        # carol's two clients acked at once on two nodes: one receipt per message, to its sender
        head = await s.messaging.head("carol")
        await asyncio.gather(stores[0].messaging.ack("carol.phone", "carol", head, TS),
                             stores[1].messaging.ack("carol.laptop", "carol", head, TS))
        carol_msgs = [(d["seq"], d["from"]) for d in await mailbox(s, "carol") if d["kind"] == "msg"]
        for sender in ("alice", "bob"):
            receipts = [d["seq"] for d in await mailbox(s, sender) if d["kind"] == "delivered" and d["to"] == "carol"]
            assert sorted(receipts) == sorted(seq for seq, frm in carol_msgs if frm == sender)
        # bob read everything in the end: nothing unread, and the read receipts carried his positions
        last = max(seq for seq, _frm in carol_msgs)
        final = await stores[2].messaging.read("bob", GROUP, last, TS)
        assert final.unread == 0
        read_seqs = [d["seq"] for d in await mailbox(s, "alice") if d["kind"] == "read" and d["by"] == "bob"]
        assert read_seqs == sorted(read_seqs) and read_seqs[-1] == last

    asyncio.run(nodes(postgres_dsn, job))
