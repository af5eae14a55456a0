"""A principal removed while no broker runs leaves no trace for a new owner of its
id: its mailbox, cursors, memberships, contacts, blocks and direct conversations'
history are gone for the newcomer, registered again before or after a restart.
Services over a real SqliteStore, and a real broker subprocess with the CLI."""

from __future__ import annotations

import asyncio

from contract.errors import ErrorCode
from tests.clients import ImClient
from tests.messaging_env import close_env, open_env


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def run(coro) -> None:  # noqa: ANN001
    asyncio.run(coro)


async def chat_history(env) -> str:  # noqa: ANN001
    """alice and bob are contacts, in a group with carol, and have talked."""
    await env.befriend("alice", "bob")
    await env.befriend("alice", "carol")
    await env.call("bob", "contact.block", user="carol")
    conv = (await env.call("alice", "group.create", name="g", members=["bob", "carol"]))["conv"]
    for i in range(3):
        await env.call("alice", "send", to="bob", cmid=f"a{i}", body=text(f"secret {i}"))
        await env.call("bob", "send", to="alice", cmid=f"b{i}", body=text(f"old bob {i}"))
    await env.call("alice", "send", conv=conv, cmid="g", body=text("group"))
    await env.call("bob", "ack", n=(await env.call("bob", "sync"))["last"])
    return conv


async def remove_bob_while_down(tmp_path, *, add_again: bool) -> str:  # noqa: ANN001
    """A chat history, then what `roost user remove bob` (and `roost user add bob`)
    do with no broker running. Returns the group conversation."""
    env = await open_env(tmp_path)
    conv = await chat_history(env)
    await close_env(env)
    env = await open_env(tmp_path, users=())
    await env.services.identity.remove("bob")
    if add_again:
        await env.services.identity.add("bob", "user", secret="new", name="New Bob")
    await close_env(env)
    return conv


def test_an_id_registered_again_after_an_offline_removal_starts_empty(tmp_path):
    async def main() -> None:
        conv = await remove_bob_while_down(tmp_path, add_again=True)
        env = await open_env(tmp_path)
        assert (await env.call("bob", "sync", after=0)) == {"events": [], "last": 0, "more": False}
        assert (await env.call("bob", "convs")) == {"convs": [], "total_unread": 0}
        assert (await env.call("bob", "history", conv="dm:alice:bob")) == {"messages": [], "more": False}
        assert (await env.error("bob", "history", conv=conv)).code == ErrorCode.FORBIDDEN
        assert (await env.call("bob", "contacts"))["contacts"] == []
        assert (await env.call("bob", "contacts"))["blocked"] == []
        assert (await env.call("bob", "ack", n=0)) == {"n": 0}        # no old cursor either
        assert (await env.error("bob", "send", to="alice", cmid="x", body=text("hi"))).code == ErrorCode.FORBIDDEN
        assert not env.services.relations.are_contacts("alice", "bob")
        assert "bob" not in (await env.call("alice", "group.info", conv=conv))["members"]
        # alice keeps her side of the old conversation
        assert len((await env.call("alice", "history", conv="dm:alice:bob"))["messages"]) == 6
        # Once they are contacts again, the new bob sees only the new conversation.
        await env.befriend("alice", "bob")
        r = await env.call("bob", "send", to="alice", cmid="a0", body=text("new bob"))   # an old cmid: not a dup
        assert r["dup"] is False and r["seq"] == 7
        hist = (await env.call("bob", "history", conv="dm:alice:bob"))["messages"]
        assert [m["body"]["text"] for m in hist] == ["new bob"]
        convs = await env.call("bob", "convs")
        assert [(c["conv"], c["unread"]) for c in convs["convs"]] == [("dm:alice:bob", 0)]
        await env.call("alice", "send", to="bob", cmid="hello", body=text("hello new bob"))
        assert (await env.call("bob", "convs"))["total_unread"] == 1
        assert [m["cmid"] for m in (await env.call("bob", "history", conv="dm:alice:bob"))["messages"]] == [
            "a0", "hello"]
        await close_env(env)

    run(main())


def test_a_removal_while_down_is_forgotten_at_load(tmp_path):
    async def main() -> None:
        conv = await remove_bob_while_down(tmp_path, add_again=False)
        env = await open_env(tmp_path, users=("alice", "carol"))
        assert (await env.call("alice", "group.info", conv=conv))["members"] == ["alice", "carol"]
        store = env.services.store.db

        def leftovers(conn) -> list:  # noqa: ANN001
            return [conn.execute(q, ("bob",) * q.count("?")).fetchone()[0] for q in (
                "SELECT COUNT(*) FROM mailbox WHERE principal=?",
                "SELECT COUNT(*) FROM mailbox_state WHERE principal=?",
                "SELECT COUNT(*) FROM cursors WHERE principal=?",
                "SELECT COUNT(*) FROM conv_members WHERE principal=?",
                "SELECT COUNT(*) FROM contacts WHERE a=? OR b=?",
                "SELECT COUNT(*) FROM blocks WHERE blocker=? OR blocked=?")]

        assert await store.read(leftovers) == [0, 0, 0, 0, 0, 0]
        await close_env(env)

    run(main())


def test_load_forgets_many_removed_principals_in_bounded_rounds(tmp_path):
    async def main() -> None:
        users = tuple(f"u{i}" for i in range(12))
        env = await open_env(tmp_path, users=("alice", *users))
        conv = (await env.call("alice", "group.create", name="big", members=[],))["conv"]
        for u in users:
            await env.befriend("alice", u)
        await env.call("alice", "group.add", conv=conv, members=list(users))
        await close_env(env)
        env = await open_env(tmp_path, users=())
        for u in users:
            await env.services.identity.remove(u)     # as the CLI does: rows stay behind
        rounds = []
        while purged := await env.services.store.messaging.purge_orphans(5):
            rounds.append(len(purged))
            assert all(groups == [conv] for groups in purged.values())
        assert rounds == [5, 5, 2]                     # one bounded transaction each
        social_rounds = []
        while purged_social := await env.services.store.social.purge_orphans(5):
            social_rounds.append(len(purged_social))
        assert social_rounds == [5, 5, 2]
        await close_env(env)
        env = await open_env(tmp_path, users=())
        assert (await env.call("alice", "group.info", conv=conv))["members"] == ["alice"]
        assert (await env.call("alice", "contacts"))["contacts"] == []
        await close_env(env)

    run(main())


# ---- end to end: a real broker, the real CLI -------------------------------------

def test_cli_remove_and_add_while_the_broker_is_stopped(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    alice.call("contact.request", to="bob")
    bob.call("contact.accept", **{"from": "alice"})
    conv = alice.call("group.create", name="family", members=["bob"])["conv"]
    alice.call("send", to="bob", cmid="s1", body=text("the safe code is 1234"))
    bob.call("send", to="alice", cmid="s2", body=text("thanks"))
    alice.call("send", conv=conv, cmid="g1", body=text("dinner at 8"))
    bob.call("ack", n=bob.call("sync", after=0)["last"])
    alice.disconnect()
    bob.disconnect()
    roost.stop()
    roost.cli("user", "remove", "bob")
    roost.cli("user", "add", "bob", "--password-stdin", input="a-new-secret\n")
    roost.start()
    newbob = ImClient("bob", "laptop").open(roost, "a-new-secret")
    assert newbob.call("sync", after=0) == {"events": [], "last": 0, "more": False}
    assert newbob.call("convs") == {"convs": [], "total_unread": 0}
    assert newbob.call("history", conv="dm:alice:bob") == {"messages": [], "more": False}
    assert newbob.request("history", conv=conv)["error"]["code"] == "forbidden"
    assert newbob.call("contacts")["contacts"] == []
    assert newbob.request("send", to="alice", cmid="s2", body=text("hi"))["error"]["code"] == "forbidden"
    alice = ImClient("alice", "phone").open(roost, apw)
    assert alice.call("group.info", conv=conv)["members"] == ["alice"]
    assert alice.call("contacts")["contacts"] == []
    assert [m["cmid"] for m in alice.call("history", conv="dm:alice:bob")["messages"]] == ["s1", "s2"]
    assert newbob.no_message("roost/inbox/#", 0.3)          # nothing old pushed either
