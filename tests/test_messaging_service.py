"""MessagingService on a real SQLite store: sequences, idempotency, sync, acks,
receipts, unread counts, groups, mailbox bounds, restart and inbox pushing."""

from __future__ import annotations

import asyncio
import time

from contract.errors import ErrorCode
from tests.messaging_env import FakeClock, close_env, open_env


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def test_concurrent_senders_get_gap_free_seq_and_mailboxes(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        await env.befriend("alice", "carol")
        conv = (await env.call("alice", "group.create", name="home", members=["bob", "carol"]))["conv"]

        async def burst(who: str) -> list[dict]:
            return await asyncio.gather(*(env.call(who, "send", conv=conv, cmid=f"{who}-{i}", body=text(str(i)))
                                          for i in range(60)))

        results = await asyncio.gather(burst("alice"), burst("bob"), burst("carol"))
        seqs = sorted(r["seq"] for rs in results for r in rs)
        assert seqs == list(range(1, 181))
        assert not any(r["dup"] for rs in results for r in rs)
        for who in ("alice", "bob", "carol"):
            box = await env.mailbox(who)
            assert [e["n"] for e in box] == list(range(1, len(box) + 1))
            msgs = [e for e in box if e["kind"] == "msg"]
            assert [m["seq"] for m in msgs] == list(range(1, 181))
        history = (await env.call("bob", "history", conv=conv, limit=200))["messages"]
        assert [m["seq"] for m in history] == list(range(1, 181))
        await close_env(env)

    run(main())


def test_send_is_idempotent_by_cmid_even_when_retried_concurrently(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        first = await env.call("alice", "send", to="bob", cmid="c1", body=text("hi"))
        assert first["conv"] == "dm:alice:bob" and first["seq"] == 1 and first["dup"] is False
        again = await env.call("alice", "send", to="bob", cmid="c1", body=text("hi"))
        assert again == {**first, "dup": True}
        both = await asyncio.gather(*(env.call("alice", "send", to="bob", cmid="c2", body=text("x"))
                                      for _ in range(5)))
        assert len({r["seq"] for r in both}) == 1 and sum(not r["dup"] for r in both) == 1
        # The retry is still a dup after the contact went away.
        await env.call("alice", "contact.remove", user="bob")
        late = await env.call("alice", "send", to="bob", cmid="c1", body=text("hi"))
        assert late["dup"] is True and late["seq"] == 1
        assert len((await env.call("bob", "history", conv="dm:alice:bob"))["messages"]) == 2
        await close_env(env)

    run(main())


def test_bad_sends_store_nothing(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, config={"limits": {"max_body": 100}})
        await env.befriend("alice", "bob")
        cases = [
            (dict(to="bob", cmid="a", body=text("x" * 200)), ErrorCode.TOO_LARGE),
            (dict(to="bob", cmid="a", body={"type": "file", "url": "x"}), ErrorCode.BAD_REQUEST),
            (dict(to="bob", cmid="a", body={"type": "nope"}), ErrorCode.BAD_REQUEST),
            (dict(to="bob", cmid="a", body="hello"), ErrorCode.BAD_REQUEST),
            (dict(to="bob", body=text("x")), ErrorCode.BAD_REQUEST),
            (dict(to="bob", cmid="", body=text("x")), ErrorCode.BAD_REQUEST),
            (dict(to="bob", cmid="x" * 65, body=text("x")), ErrorCode.BAD_REQUEST),
            (dict(to="Bob!", cmid="a", body=text("x")), ErrorCode.BAD_REQUEST),
            (dict(to="alice", cmid="a", body=text("x")), ErrorCode.BAD_REQUEST),
            (dict(to="bob", conv="dm:alice:bob", cmid="a", body=text("x")), ErrorCode.BAD_REQUEST),
            (dict(conv="dm:bob:alice", cmid="a", body=text("x")), ErrorCode.BAD_REQUEST),
            (dict(conv="dm:bob:carol", cmid="a", body=text("x")), ErrorCode.FORBIDDEN),
            (dict(conv="grp:doesnotexist", cmid="a", body=text("x")), ErrorCode.NOT_FOUND),
            (dict(to="nobody", cmid="a", body=text("x")), ErrorCode.NOT_FOUND),
            (dict(to="carol", cmid="a", body=text("x")), ErrorCode.FORBIDDEN),
            (dict(to="bob", cmid="a", body={"type": "command"}), ErrorCode.BAD_REQUEST),
            (dict(to="bob", cmid="a", body={"type": "result", "for": 0, "status": "ok"}), ErrorCode.BAD_REQUEST),
        ]
        for params, code in cases:
            err = await env.error("alice", "send", **params)
            assert err.code == code, (params, err)
        assert await env.mailbox("bob") == [e for e in await env.mailbox("bob") if e["kind"] == "contact"]
        ok = await env.call("alice", "send", to="bob", cmid="a", body=text("fits"))
        assert ok["seq"] == 1
        await close_env(env)

    run(main())


def test_dm_without_contact_switch(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, config={"messaging": {"allow_dm_without_contact": True}})
        r = await env.call("alice", "send", to="carol", cmid="1", body=text("hello stranger"))
        assert r["conv"] == "dm:alice:carol"
        await close_env(env)

    run(main())


def test_sync_pages_and_ack_cursor(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        for i in range(25):
            await env.call("alice", "send", to="bob", cmid=str(i), body=text(str(i)))
        seen, after = [], 0
        while True:
            page = await env.call("bob", "sync", after=after, limit=10)
            seen += page["events"]
            after = page["last"]
            if not page["more"]:
                break
        assert [e["n"] for e in seen] == list(range(1, 53))  # 2 contact events + 25 x (message, unread)
        assert [e["body"]["text"] for e in seen if e["kind"] == "msg"] == [str(i) for i in range(25)]
        assert [(e["count"], e["total"]) for e in seen if e["kind"] == "unread"] == [(i, i) for i in range(1, 26)]
        empty = await env.call("bob", "sync", after=52)
        assert empty == {"events": [], "last": 52, "more": False}
        for bad_limit in (0, 1001, "5"):
            assert (await env.error("bob", "sync", after=0, limit=bad_limit)).code == ErrorCode.BAD_REQUEST
        assert (await env.call("bob", "ack", n=10)) == {"n": 10}
        assert (await env.call("bob", "ack", n=5)) == {"n": 10}  # cumulative, never backwards
        assert (await env.error("bob", "ack", n=53)).code == ErrorCode.BAD_REQUEST
        assert (await env.call("bob", "ack", label="laptop", n=3)) == {"n": 3}  # per client
        await close_env(env)

    run(main())


def test_delivered_receipt_once_per_recipient(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        await env.befriend("alice", "carol")
        conv = (await env.call("alice", "group.create", name="g", members=["bob", "carol"]))["conv"]
        await env.call("alice", "send", conv=conv, cmid="m1", body=text("hi all"))
        bob_head = (await env.call("bob", "sync"))["last"]
        await env.call("bob", "ack", n=bob_head)
        await env.call("bob", "ack", label="laptop", n=bob_head)  # a second client: no second receipt
        carol_head = (await env.call("carol", "sync"))["last"]
        await env.call("carol", "ack", n=carol_head)
        own_head = (await env.call("alice", "sync"))["last"]
        await env.call("alice", "ack", n=own_head)  # own messages: no receipt to oneself
        delivered = [e for e in await env.mailbox("alice") if e["kind"] == "delivered"]
        assert sorted((d["conv"], d["seq"], d["to"]) for d in delivered) == [(conv, 1, "bob"), (conv, 1, "carol")]
        await close_env(env)

    run(main())


def test_unread_counts_and_read_events(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        await env.befriend("alice", "carol")
        for i in range(3):
            await env.call("bob", "send", to="alice", cmid=f"b{i}", body=text("b"))
        await env.call("alice", "send", to="bob", cmid="a0", body=text("mine"))   # seq 4, not unread for alice
        await env.call("carol", "send", to="alice", cmid="c0", body=text("c"))
        convs = await env.call("alice", "convs")
        by_conv = {c["conv"]: c for c in convs["convs"]}
        assert by_conv["dm:alice:bob"]["unread"] == 3 and by_conv["dm:alice:bob"]["peer"] == "bob"
        assert by_conv["dm:alice:bob"]["last"]["seq"] == 4 and by_conv["dm:alice:bob"]["last"]["from"] == "alice"
        assert by_conv["dm:alice:carol"]["unread"] == 1
        assert convs["total_unread"] == 4
        assert convs["convs"][0]["conv"] == "dm:alice:carol"  # most recent first
        r = await env.call("alice", "read", label="laptop", conv="dm:alice:bob", seq=2)
        assert r == {"conv": "dm:alice:bob", "seq": 2, "unread": 1, "total_unread": 2}
        again = await env.call("alice", "read", conv="dm:alice:bob", seq=1)  # never backwards
        assert again == {"conv": "dm:alice:bob", "seq": 2, "unread": 1, "total_unread": 2}
        r = await env.call("alice", "read", conv="dm:alice:bob", seq=4)
        assert r["unread"] == 0 and r["total_unread"] == 1
        assert (await env.error("alice", "read", conv="dm:alice:bob", seq=5)).code == ErrorCode.BAD_REQUEST
        assert (await env.error("carol", "read", conv="dm:alice:bob", seq=1)).code == ErrorCode.FORBIDDEN
        reads = [e for e in await env.mailbox("bob") if e["kind"] == "read"]
        assert [(e["conv"], e["seq"], e["by"]) for e in reads] == [("dm:alice:bob", 2, "alice"),
                                                                  ("dm:alice:bob", 4, "alice")]
        # Counts move on every arrival (not on alice's own message) and on every read.
        unread = [e for e in await env.mailbox("alice") if e["kind"] == "unread"]
        assert [(e["conv"], e["count"], e["total"]) for e in unread] == [
            ("dm:alice:bob", 1, 1), ("dm:alice:bob", 2, 2), ("dm:alice:bob", 3, 3), ("dm:alice:carol", 1, 4),
            ("dm:alice:bob", 1, 2), ("dm:alice:bob", 0, 1)]
        # bob's own three messages never count for him: only alice's one does
        bob_unread = [(e["conv"], e["count"], e["total"]) for e in await env.mailbox("bob") if e["kind"] == "unread"]
        assert bob_unread == [("dm:alice:bob", 1, 1)]
        await close_env(env)

    run(main())


def test_history_pages_backwards_oldest_first(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        for i in range(12):
            await env.call("alice", "send", to="bob", cmid=str(i), body=text(str(i)))
        page = await env.call("bob", "history", conv="dm:alice:bob", limit=5)
        assert [m["seq"] for m in page["messages"]] == [8, 9, 10, 11, 12] and page["more"] is True
        page = await env.call("bob", "history", conv="dm:alice:bob", before=8, limit=5)
        assert [m["seq"] for m in page["messages"]] == [3, 4, 5, 6, 7]
        page = await env.call("bob", "history", conv="dm:alice:bob", before=3, limit=5)
        assert [m["seq"] for m in page["messages"]] == [1, 2] and page["more"] is False
        m = page["messages"][0]
        assert m["from"] == "alice" and m["cmid"] == "0" and m["body"] == text("0") and m["ts"] > 0
        assert (await env.error("carol", "history", conv="dm:alice:bob")).code == ErrorCode.FORBIDDEN
        assert (await env.error("bob", "history", conv="dm:alice:bob", limit=201)).code == ErrorCode.BAD_REQUEST
        await close_env(env)

    run(main())


def test_groups_membership_and_events(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, users=("alice", "bob", "carol", "dave"))
        await env.befriend("alice", "bob")
        await env.befriend("alice", "carol")
        # Only contacts (and own devices) can be added.
        assert (await env.error("alice", "group.create", name="g", members=["dave"])).code == ErrorCode.FORBIDDEN
        assert (await env.error("alice", "group.create", name="", members=[])).code == ErrorCode.BAD_REQUEST
        conv = (await env.call("alice", "group.create", name="Family", members=["bob"]))["conv"]
        assert conv.startswith("grp:")
        assert env.services.relations.share_group("alice", "bob")
        info = await env.call("bob", "group.info", conv=conv)
        assert info["name"] == "Family" and info["members"] == ["alice", "bob"]
        assert (await env.error("carol", "group.info", conv=conv)).code == ErrorCode.FORBIDDEN
        assert (await env.error("carol", "send", conv=conv, cmid="x", body=text("x"))).code == ErrorCode.FORBIDDEN
        await env.call("alice", "group.add", conv=conv, members=["carol"])
        await env.call("carol", "send", conv=conv, cmid="x", body=text("hi"))
        # Group co-members may message each other directly.
        await env.call("bob", "send", to="carol", cmid="y", body=text("dm via group"))
        assert (await env.error("bob", "group.remove", conv=conv, members=["carol"])).code == ErrorCode.FORBIDDEN
        await env.call("alice", "group.remove", conv=conv, members=["carol"])
        assert (await env.error("carol", "send", conv=conv, cmid="z", body=text("x"))).code == ErrorCode.FORBIDDEN
        await env.call("bob", "group.leave", conv=conv)
        info = await env.call("alice", "group.info", conv=conv)
        assert info["members"] == ["alice"]
        events = [(e["event"], e["by"], e.get("members")) for e in await env.mailbox("carol") if e["kind"] == "group"]
        assert events == [("added", "alice", ["carol"]), ("removed", "alice", ["carol"])]
        events = [e["event"] for e in await env.mailbox("bob") if e["kind"] == "group"]
        assert events == ["created", "added", "removed", "left"]
        assert not env.services.relations.share_group("alice", "bob")
        await close_env(env)

    run(main())


def test_device_messages_need_ownership(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, devices=("lamp",))
        cmd = {"type": "command", "name": "set", "args": {"on": True}}
        # a device one may not know of is not found, not forbidden (issue 15)
        assert (await env.error("alice", "send", to="lamp", cmid="1", body=cmd)).code == ErrorCode.NOT_FOUND
        env.services.relations.set_device_users("lamp", {"alice"})
        r = await env.call("alice", "send", to="lamp", cmid="1", body=cmd)
        assert r["conv"] == "dm:alice:lamp"
        res = await env.call("lamp", "send", to="alice", cmid="r1",
                             body={"type": "result", "for": r["seq"], "status": "ok", "data": {"on": True}})
        assert res["seq"] == 2
        assert (await env.error("bob", "send", to="lamp", cmid="1", body=cmd)).code == ErrorCode.NOT_FOUND
        assert (await env.error("lamp", "send", to="bob", cmid="2", body=text("x"))).code == ErrorCode.FORBIDDEN
        await close_env(env)

    run(main())


def test_mailbox_bound_announces_dropped(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, config={"mailbox": {"max_events": 10}})
        await env.befriend("alice", "bob")
        for i in range(25):
            await env.call("alice", "send", to="bob", cmid=str(i), body=text(str(i)))
        await env.messaging.prune_once()
        box = await env.mailbox("bob")
        assert len(box) == 10                          # of 2 contact events + 25 x (message, unread)
        dropped = box[-1]
        assert dropped["kind"] == "dropped" and dropped["reason"] == "queue_full" and dropped["count"] == 43
        assert dropped["n"] == 53  # numbering continues: nothing reused
        assert [e["n"] for e in box] == list(range(44, 54))
        page = await env.call("bob", "sync", after=0)
        assert page["events"][0]["n"] == 44
        assert await env.messaging.prune_once() == 0  # within bounds now
        await close_env(env)

    run(main())


def test_mailbox_ttl_expires_with_announcement(tmp_path):
    async def main() -> None:
        clock = FakeClock()
        env = await open_env(tmp_path, config={"mailbox": {"ttl": 1}}, clock=clock)
        await env.befriend("alice", "bob")
        await env.call("alice", "send", to="bob", cmid="1", body=text("old"))
        clock.advance(1.2)
        await env.call("alice", "send", to="bob", cmid="2", body=text("new"))
        await env.messaging.prune_once()
        box = await env.mailbox("bob")
        assert [e["kind"] for e in box] == ["msg", "unread", "dropped"]
        assert box[0]["body"]["text"] == "new"
        # two contact events and the old message with its unread count
        assert box[2]["reason"] == "expired" and box[2]["count"] == 4
        # History keeps the message: the mailbox bound is about delivery only.
        assert len((await env.call("bob", "history", conv="dm:alice:bob"))["messages"]) == 2
        await close_env(env)

    run(main())


def test_restart_continues_seq_and_n(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        for i in range(5):
            await env.call("alice", "send", to="bob", cmid=str(i), body=text(str(i)))
        await env.call("bob", "ack", n=3)
        await close_env(env)
        env = await open_env(tmp_path)
        assert env.services.relations.are_contacts("alice", "bob")
        r = await env.call("alice", "send", to="bob", cmid="after", body=text("after restart"))
        assert r["seq"] == 6
        assert (await env.call("alice", "send", to="bob", cmid="0", body=text("0")))["dup"] is True
        box = await env.mailbox("bob")
        assert [e["n"] for e in box] == list(range(1, 15))     # 2 contact + 6 x (message, unread)
        assert (await env.call("bob", "ack", n=2)) == {"n": 3}
        await close_env(env)

    run(main())


def test_persistent_client_is_pushed_from_its_cursor_then_live(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        inboxes = env.messaging.inboxes
        for i in range(5):
            await env.call("alice", "send", to="bob", cmid=str(i), body=text(str(i)))
        await env.call("bob", "ack", label="fw", n=3)
        env.pub.subscribed.add("bob.fw")
        await inboxes.client_connected("bob.fw", "bob", False)
        await inboxes.client_subscribed("bob.fw", "bob", False, "roost/inbox/bob")
        # Live sends race with the replay.
        sends = [env.call("alice", "send", to="bob", cmid=f"live{i}", body=text(str(i))) for i in range(30)]
        await asyncio.gather(*sends)
        await env.settle()
        got = [e["n"] for e in env.pub.events("bob.fw")]
        assert got == list(range(4, 73))                    # 2 contact events + 35 x (message, unread)
        # Disconnect, more traffic, reconnect relying on the persistent session (no SUBSCRIBE).
        await inboxes.client_disconnected("bob.fw", "bob", "lost")
        await env.call("bob", "ack", label="fw", n=20)
        for i in range(3):
            await env.call("alice", "send", to="bob", cmid=f"away{i}", body=text(str(i)))
        env.pub.delivered.clear()
        await inboxes.client_connected("bob.fw", "bob", False)
        await env.settle()
        assert [e["n"] for e in env.pub.events("bob.fw")] == list(range(21, 79))
        await close_env(env)

    run(main())


def test_clean_client_gets_live_events_only_and_all_clients_see_own_sends(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        inboxes = env.messaging.inboxes
        await env.call("alice", "send", to="bob", cmid="before", body=text("before"))
        for c in ("bob.phone", "bob.laptop", "alice.laptop"):
            env.pub.subscribed.add(c)
            await inboxes.client_connected(c, c.split(".")[0], True)
            await inboxes.client_subscribed(c, c.split(".")[0], True, "roost/inbox/+")
        await env.call("alice", "send", to="bob", cmid="after", body=text("after"), label="phone")
        await env.settle()
        for c in ("bob.phone", "bob.laptop"):
            assert [e["body"]["text"] for e in env.pub.events(c, "msg")] == ["after"]
        assert [e["cmid"] for e in env.pub.events("alice.laptop", "msg")] == ["after"]
        # Unsubscribing stops the pushes.
        await inboxes.client_unsubscribed("bob.laptop", "bob", True, "roost/inbox/+")
        await env.call("alice", "send", to="bob", cmid="later", body=text("later"))
        await env.settle()
        assert len(env.pub.events("bob.laptop", "msg")) == 1 and len(env.pub.events("bob.phone", "msg")) == 2
        await close_env(env)

    run(main())


def test_send_throughput_group_commits(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        db = env.services.store.db
        commits = db.commits
        t0 = time.monotonic()
        await asyncio.gather(*(env.call("alice", "send", to="bob", cmid=str(i), body=text("x")) for i in range(300)))
        elapsed = time.monotonic() - t0
        assert db.commits - commits < 150  # many sends share a transaction
        assert elapsed < 8
        await close_env(env)

    run(main())


def test_pruning_rounds_are_bounded_and_every_discard_is_announced(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, config={"mailbox": {"max_events": 5}})
        env.messaging.prune_max_rows = 4
        await env.befriend("alice", "bob")
        for i in range(20):
            await env.call("alice", "send", to="bob", cmid=str(i), body=text(str(i)))
        total = 42                                   # 2 contact events + 20 x (message, unread)
        rounds = 0
        while await env.messaging.prune_once():
            rounds += 1
            assert rounds < 20
        box = await env.mailbox("bob")
        assert len(box) == 5 and rounds > 1         # several small rounds, not one big one
        dropped = [e for e in await env.mailbox("bob") if e["kind"] == "dropped"]
        head = box[-1]["n"]
        # Everything ever numbered is either still there or counted in a dropped event
        # that is still there or was itself discarded (and counted) later.
        assert head == total + rounds
        assert all(d["reason"] == "queue_full" for d in dropped)
        await close_env(env)

    run(main())


def test_expired_dropped_announcements_are_not_announced_again(tmp_path):
    async def main() -> None:
        clock = FakeClock()
        env = await open_env(tmp_path, config={"mailbox": {"ttl": 1}}, clock=clock)
        await env.befriend("alice", "bob")
        clock.advance(1.1)
        await env.messaging.prune_once()
        box = await env.mailbox("bob")
        assert [(e["kind"], e.get("count")) for e in box] == [("dropped", 2)]
        clock.advance(1.1)
        await env.messaging.prune_once()
        assert await env.mailbox("bob") == []        # the announcement expired, silently
        await env.messaging.prune_once()
        assert await env.mailbox("bob") == []
        await env.call("alice", "send", to="bob", cmid="x", body=text("x"))
        assert [e["n"] for e in await env.mailbox("bob")] == [4, 5]   # numbering never restarts
        await close_env(env)

    run(main())


def test_a_persistent_client_with_two_inbox_filters_keeps_its_pushes_when_one_goes(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        inboxes = env.messaging.inboxes
        env.pub.subscribed.add("bob.fw")
        await inboxes.client_connected("bob.fw", "bob", False)
        await inboxes.client_subscribed("bob.fw", "bob", False, "roost/inbox/bob")
        await inboxes.client_subscribed("bob.fw", "bob", False, "roost/inbox/+")
        await inboxes.client_subscribed("bob.fw", "bob", False, "roost/req/bob.fw")   # not its inbox
        await inboxes.client_unsubscribed("bob.fw", "bob", False, "roost/inbox/bob")
        await inboxes.client_unsubscribed("bob.fw", "bob", False, "roost/req/bob.fw")
        await env.call("alice", "send", to="bob", cmid="m1", body=text("1"))
        await env.settle()
        assert [e["cmid"] for e in env.pub.events("bob.fw", "msg")] == ["m1"]
        # still recorded: a reconnect relying on the session (no SUBSCRIBE) is pushed too
        await inboxes.client_disconnected("bob.fw", "bob", "lost")
        await env.call("alice", "send", to="bob", cmid="m2", body=text("2"))
        await inboxes.client_connected("bob.fw", "bob", False)
        await env.settle()
        assert [e["cmid"] for e in env.pub.events("bob.fw", "msg")] == ["m1", "m1", "m2"]  # never acked: replayed
        # the session kept its filters across the reconnect: dropping the last one stops pushes
        await inboxes.client_unsubscribed("bob.fw", "bob", False, "roost/inbox/+")
        assert inboxes.pusher("bob.fw", "bob") is None
        assert (await env.services.store.messaging.client_cursor("bob.fw", "bob"))[1] is False
        await close_env(env)

    run(main())


def test_a_pusher_survives_a_failing_deliver_and_a_failing_first_read(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        inboxes = env.messaging.inboxes
        store = env.services.store.messaging
        real_cursor, real_deliver = store.client_cursor, env.pub.deliver
        failures = {"cursor": 1, "deliver": 2}

        async def flaky_cursor(*args):  # noqa: ANN002 - the store is briefly unreadable
            if failures["cursor"]:
                failures["cursor"] -= 1
                raise RuntimeError("disk I/O error")
            return await real_cursor(*args)

        async def flaky_deliver(*args):  # noqa: ANN002 - the engine fails a push
            if failures["deliver"]:
                failures["deliver"] -= 1
                raise RuntimeError("engine error")
            return await real_deliver(*args)

        env.pub.deliver = flaky_deliver
        env.pub.subscribed.add("bob.phone")
        await inboxes.client_connected("bob.phone", "bob", True)
        store.client_cursor = flaky_cursor                  # the pusher's own first read fails
        await inboxes.client_subscribed("bob.phone", "bob", True, "roost/inbox/bob")
        for i in range(3):
            await env.call("alice", "send", to="bob", cmid=f"m{i}", body=text(str(i)))
        for _ in range(60):
            if len(env.pub.events("bob.phone", "msg")) == 3:
                break
            await asyncio.sleep(0.1)
        pushed = env.pub.events("bob.phone")
        assert [e["cmid"] for e in pushed if e["kind"] == "msg"] == ["m0", "m1", "m2"]
        assert [e["n"] for e in pushed] == list(range(pushed[0]["n"], pushed[0]["n"] + 6))
        assert failures == {"cursor": 0, "deliver": 0}
        p = inboxes.pusher("bob.phone", "bob")
        assert p is not None and p.read_errors == 1 and p.retries >= 2
        await close_env(env)

    run(main())


def test_inbox_filters_are_forgotten_with_their_clean_session_and_stay_bounded(tmp_path, monkeypatch):
    from broker.services import inbox as inbox_module

    async def main() -> None:
        env = await open_env(tmp_path)
        inboxes = env.messaging.inboxes
        monkeypatch.setattr(inbox_module, "MAX_TRACKED_CLIENTS", 3)
        for label in ("a", "b"):
            await inboxes.client_connected(f"bob.{label}", "bob", True)
            await inboxes.client_subscribed(f"bob.{label}", "bob", True, "roost/inbox/+")
        await inboxes.client_connected("bob.fw", "bob", False)
        await inboxes.client_subscribed("bob.fw", "bob", False, "roost/inbox/bob")
        # pushers that already ended (the client vanished) do not keep a clean session's filters
        await inboxes.client_disconnected("bob.a", "bob", "lost")
        await inboxes.client_disconnected("bob.fw", "bob", "lost")
        assert set(inboxes._filters) == {"bob.b", "bob.fw"}      # the persistent session keeps its own
        for label in ("c", "d", "e"):
            await inboxes.client_subscribed(f"bob.{label}", "bob", True, "roost/inbox/bob")
        assert len(inboxes._filters) == 3 and inboxes.filters_evicted == 2
        inboxes.forget_principal("bob")
        assert not inboxes._filters and not inboxes._clean
        await close_env(env)

    run(main())
