"""Unread counts move on every change, not only on `read` (PROTOCOL.md, event
`unread`; issue 4: "every change pushed as an `unread` event to all of the
reader's clients"): a message arriving, joining a group with history, leaving
one with unread messages. Services over a real SqliteStore."""

from __future__ import annotations

import asyncio
import sqlite3

from tests.messaging_env import close_env, open_env


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def run(coro) -> None:  # noqa: ANN001
    asyncio.run(coro)


async def subscribe(env, *client_ids: str) -> None:  # noqa: ANN001
    for c in client_ids:
        env.pub.subscribed.add(c)
        await env.messaging.inboxes.client_connected(c, c.split(".")[0], True)
        await env.messaging.inboxes.client_subscribed(c, c.split(".")[0], True, f"roost/inbox/{c.split('.')[0]}")


def test_an_arriving_message_moves_the_count_on_every_client_of_the_recipient(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        await subscribe(env, "bob.phone", "bob.laptop", "alice.phone", "alice.laptop")
        for i in range(3):
            await env.call("alice", "send", to="bob", cmid=f"a{i}", body=text(str(i)))
        await env.settle()
        for c in ("bob.phone", "bob.laptop"):
            pushed = env.pub.events(c)
            # each message is followed at once by the count it brought
            assert [e["kind"] for e in pushed] == ["msg", "unread"] * 3
            assert [(e["conv"], e["count"], e["total"]) for e in pushed if e["kind"] == "unread"] == [
                ("dm:alice:bob", 1, 1), ("dm:alice:bob", 2, 2), ("dm:alice:bob", 3, 3)]
            assert [e["n"] for e in pushed] == list(range(pushed[0]["n"], pushed[0]["n"] + 6))
        for c in ("alice.phone", "alice.laptop"):   # the sender's own counts do not move
            assert [e["kind"] for e in env.pub.events(c)] == ["msg"] * 3
        # the pushed numbers are those of convs, and a read brings them back down everywhere
        convs = await env.call("bob", "convs")
        assert convs["total_unread"] == 3 and convs["convs"][0]["unread"] == 3
        await env.call("bob", "read", conv="dm:alice:bob", seq=3)
        await env.settle()
        for c in ("bob.phone", "bob.laptop"):
            last = env.pub.events(c, "unread")[-1]
            assert (last["count"], last["total"]) == (0, 0)
        await close_env(env)

    run(main())


def test_group_counts_per_member_and_a_blocker_gets_nothing(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, users=("alice", "bob", "carol", "mallory"))
        for other in ("bob", "carol", "mallory"):
            await env.befriend("alice", other)
        conv = (await env.call("alice", "group.create", name="g", members=["bob", "carol", "mallory"]))["conv"]
        await env.call("carol", "contact.block", user="mallory")
        await env.call("bob", "send", to="alice", cmid="dm", body=text("a dm first"))
        await env.call("mallory", "send", conv=conv, cmid="m1", body=text("psst"))
        for who, expected in (("alice", [(conv, 1, 2)]), ("bob", [(conv, 1, 1)]), ("carol", []), ("mallory", [])):
            box = await env.mailbox(who)
            got = [(e["conv"], e["count"], e["total"]) for e in box if e["kind"] == "unread" and e["conv"] == conv]
            assert got == expected, who
        # in every recipient's mailbox the count comes right after the message
        box = await env.mailbox("alice")
        i = next(i for i, e in enumerate(box) if e["kind"] == "msg" and e["cmid"] == "m1")
        assert box[i + 1]["kind"] == "unread" and box[i + 1]["n"] == box[i]["n"] + 1
        assert (await env.call("carol", "convs"))["total_unread"] == 0
        await close_env(env)

    run(main())


def test_leaving_or_being_removed_takes_the_unread_with_it(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        await env.befriend("alice", "carol")
        conv = (await env.call("alice", "group.create", name="g", members=["bob", "carol"]))["conv"]
        await env.call("alice", "send", to="bob", cmid="dm", body=text("dm"))   # bob: 1 unread elsewhere
        for i in range(2):
            await env.call("alice", "send", conv=conv, cmid=f"g{i}", body=text(str(i)))
        await env.call("bob", "group.leave", conv=conv)
        box = await env.mailbox("bob")
        assert [e["kind"] for e in box[-2:]] == ["group", "unread"]
        assert (box[-1]["conv"], box[-1]["count"], box[-1]["total"]) == (conv, 0, 1)
        assert (await env.call("bob", "convs"))["total_unread"] == 1
        # carol read everything: removing her changes no count, so no unread event
        await env.call("carol", "read", conv=conv, seq=2)
        await env.call("alice", "group.remove", conv=conv, members=["carol"])
        assert (await env.mailbox("carol"))[-1]["kind"] == "group"
        await close_env(env)

    run(main())


def test_joining_a_group_with_history_announces_its_count(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        await env.befriend("alice", "carol")
        conv = (await env.call("alice", "group.create", name="g", members=["bob"]))["conv"]
        for i in range(3):
            await env.call("bob", "send", conv=conv, cmid=f"b{i}", body=text(str(i)))
        await env.call("alice", "group.add", conv=conv, members=["carol"])
        box = await env.mailbox("carol")
        assert [e["kind"] for e in box[-2:]] == ["group", "unread"]
        assert (box[-1]["count"], box[-1]["total"]) == (3, 3)
        convs = await env.call("carol", "convs")
        assert convs["total_unread"] == 3 and convs["convs"][0]["unread"] == 3
        r = await env.call("carol", "read", conv=conv, seq=2)
        assert (r["unread"], r["total_unread"]) == (1, 1)
        await close_env(env)

    run(main())


def test_counts_survive_a_restart_and_an_upgraded_store_is_backfilled(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        await env.befriend("alice", "bob")
        for i in range(4):
            await env.call("bob", "send", to="alice", cmid=f"b{i}", body=text(str(i)))
        await env.call("alice", "read", conv="dm:alice:bob", seq=1)
        await close_env(env)
        # A store from before the counter: drop the column and the migration record.
        conn = sqlite3.connect(tmp_path / "roost.db")
        conn.execute("ALTER TABLE conv_members DROP COLUMN unread")
        conn.execute("DELETE FROM schema_migrations WHERE name='0111_unread_counter'")
        conn.commit()
        conn.close()
        env = await open_env(tmp_path)
        convs = await env.call("alice", "convs")
        assert convs["total_unread"] == 3 and convs["convs"][0]["unread"] == 3
        await env.call("bob", "send", to="alice", cmid="b4", body=text("4"))
        last = [e for e in await env.mailbox("alice") if e["kind"] == "unread"][-1]
        assert (last["count"], last["total"]) == (4, 4)
        await close_env(env)

    run(main())


def test_blocking_and_unblocking_recount_and_announce(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, users=("alice", "bob", "mallory"))
        await env.befriend("alice", "bob")
        await env.befriend("alice", "mallory")
        conv = (await env.call("alice", "group.create", name="g", members=["bob", "mallory"]))["conv"]
        await env.call("mallory", "send", conv=conv, cmid="m1", body=text("1"))
        await env.call("bob", "send", conv=conv, cmid="b1", body=text("2"))
        await env.call("mallory", "send", to="alice", cmid="m2", body=text("3"))
        assert (await env.call("alice", "convs"))["total_unread"] == 3
        await env.call("alice", "contact.block", user="mallory")
        box = await env.mailbox("alice")
        assert (box[-3]["kind"], box[-3]["event"]) == ("contact", "blocked")
        assert [e["kind"] for e in box[-2:]] == ["unread", "unread"]
        assert {(e["conv"], e["count"]) for e in box[-2:]} == {(conv, 1), ("dm:alice:mallory", 0)}
        assert box[-1]["total"] == 1
        convs = await env.call("alice", "convs")
        assert convs["total_unread"] == 1
        assert {c["conv"]: c["unread"] for c in convs["convs"]} == {conv: 1, "dm:alice:mallory": 0}
        await env.call("alice", "contact.unblock", user="mallory")
        assert (await env.call("alice", "convs"))["total_unread"] == 3
        assert (await env.mailbox("alice"))[-1]["total"] == 3
        await close_env(env)

    run(main())
