"""SocialService on a real SQLite store: contacts, blocking, search, profiles."""

from __future__ import annotations

import asyncio

from contract.errors import ErrorCode
from tests.messaging_env import close_env, open_env


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def text(t: str) -> dict:
    return {"type": "text", "text": t}


async def contact_events(env, who: str) -> list[tuple]:  # noqa: ANN001
    return [(e["event"], e["with"], e["by"]) for e in await env.mailbox(who) if e["kind"] == "contact"]


def test_request_accept_reject_remove_reach_both_sides(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, users=("alice", "bob", "carol", "dave"))
        r = await env.call("alice", "contact.request", to="bob", note="it's me, Alice")
        assert r["state"] == "requested"
        assert (await env.call("alice", "contact.request", to="bob"))["state"] == "pending"  # no second event
        ev = [e for e in await env.mailbox("bob") if e["kind"] == "contact"]
        assert len(ev) == 1 and ev[0]["event"] == "request" and ev[0]["with"] == "alice"
        assert ev[0]["note"] == "it's me, Alice"
        listing = await env.call("bob", "contacts")
        assert listing["contacts"] == [] and [i["from"] for i in listing["incoming"]] == ["alice"]
        assert (await env.error("alice", "send", to="bob", cmid="1", body=text("x"))).code == ErrorCode.FORBIDDEN
        await env.call("bob", "contact.accept", **{"from": "alice"})
        assert env.services.relations.are_contacts("alice", "bob")
        assert env.pub.acl_refreshes >= 1
        listing = await env.call("alice", "contacts")
        assert [(c["id"], c["kind"], c["name"]) for c in listing["contacts"]] == [("bob", "user", "Bob")]
        assert listing["contacts"][0]["presence"]["state"] == "offline"  # no presence service here
        assert (await env.call("alice", "send", to="bob", cmid="1", body=text("x")))["seq"] == 1
        assert (await env.error("alice", "contact.request", to="bob")).code == ErrorCode.CONFLICT
        assert (await env.error("bob", "contact.accept", **{"from": "alice"})).code == ErrorCode.NOT_FOUND
        # Reject
        await env.call("carol", "contact.request", to="bob")
        await env.call("bob", "contact.reject", **{"from": "carol"})
        assert ("rejected", "bob", "bob") in await contact_events(env, "carol")
        assert not env.services.relations.are_contacts("bob", "carol")
        # Mutual requests become a contact.
        await env.call("carol", "contact.request", to="dave")
        assert (await env.call("dave", "contact.request", to="carol"))["state"] == "accepted"
        assert env.services.relations.are_contacts("carol", "dave")
        # Remove
        await env.call("bob", "contact.remove", user="alice")
        assert not env.services.relations.are_contacts("alice", "bob")
        assert ("removed", "bob", "bob") in await contact_events(env, "alice")
        assert ("removed", "alice", "bob") in await contact_events(env, "bob")
        assert (await env.error("alice", "send", to="bob", cmid="2", body=text("x"))).code == ErrorCode.FORBIDDEN
        assert (await env.error("bob", "contact.remove", user="alice")).code == ErrorCode.NOT_FOUND
        await close_env(env)

    run(main())


def test_bad_contact_requests(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, devices=("lamp",))
        assert (await env.error("alice", "contact.request", to="alice")).code == ErrorCode.BAD_REQUEST
        assert (await env.error("alice", "contact.request", to="ghost")).code == ErrorCode.NOT_FOUND
        assert (await env.error("alice", "contact.request", to="lamp")).code == ErrorCode.NOT_FOUND
        assert (await env.error("alice", "contact.request", to="BOB")).code == ErrorCode.BAD_REQUEST
        assert (await env.error("alice", "contact.request")).code == ErrorCode.BAD_REQUEST
        assert (await env.error("alice", "contact.request", to="bob", note=5)).code == ErrorCode.BAD_REQUEST
        assert (await env.error("lamp", "contact.request", to="bob")).code == ErrorCode.FORBIDDEN
        assert await env.mailbox("bob") == []
        await close_env(env)

    run(main())


def test_blocked_principal_is_treated_as_a_stranger(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, users=("alice", "bob", "mallory", "stranger"))
        await env.befriend("alice", "mallory")
        await env.call("alice", "contact.block", user="mallory")
        assert not env.services.relations.are_contacts("alice", "mallory")
        # What mallory sees: an ordinary removal, then refusals worded like a stranger's.
        assert ("removed", "alice", "alice") in await contact_events(env, "mallory")
        assert not any(e[0] == "blocked" for e in await contact_events(env, "mallory"))
        as_blocked = await env.error("mallory", "send", to="alice", cmid="1", body=text("hi"))
        as_stranger = await env.error("stranger", "send", to="alice", cmid="1", body=text("hi"))
        assert as_blocked.code == as_stranger.code == ErrorCode.FORBIDDEN
        assert as_blocked.message == as_stranger.message
        req = await env.error("mallory", "contact.request", to="alice", note="let me in")
        assert req.code == ErrorCode.FORBIDDEN
        # Nothing reached alice after the block.
        box = await env.mailbox("alice")
        assert box[-1]["kind"] == "contact" and box[-1]["event"] == "blocked"
        assert (await env.call("alice", "contacts"))["blocked"] == ["mallory"]
        # Blocking twice is fine; the blocker cannot message the blocked one either.
        await env.call("alice", "contact.block", user="mallory")
        assert (await env.error("alice", "send", to="mallory", cmid="x", body=text("x"))).code == ErrorCode.FORBIDDEN
        assert (await env.error("alice", "contact.request", to="mallory")).code == ErrorCode.CONFLICT
        # Blocks survive a restart.
        await close_env(env)
        env = await open_env(tmp_path, users=())
        assert (await env.error("mallory", "contact.request", to="alice")).code == ErrorCode.FORBIDDEN
        await env.call("alice", "contact.unblock", user="mallory")
        assert (await env.error("alice", "contact.unblock", user="mallory")).code == ErrorCode.NOT_FOUND
        assert (await env.call("mallory", "contact.request", to="alice"))["state"] == "requested"
        await close_env(env)

    run(main())


def test_search_never_lists_others_devices(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, users=("alice", "bob", "alfred"), devices=("lamp", "alarm"))
        env.services.relations.set_device_users("alarm", {"alice"})
        found = await env.call("bob", "user.search", q="al")
        assert [(u["id"], u["kind"]) for u in found["users"]] == [("alfred", "user"), ("alice", "user")]
        assert (await env.call("bob", "user.search", q="lamp"))["users"] == []
        assert (await env.call("bob", "user.search", q="alarm"))["users"] == []
        mine = await env.call("alice", "user.search", q="alarm")
        assert [u["id"] for u in mine["users"]] == ["alarm"]
        assert [u["id"] for u in (await env.call("alice", "user.search", q="al"))["users"]] == \
            ["alarm", "alfred", "alice"]
        assert (await env.call("bob", "user.search", q="a"))["users"] == []  # one letter: exact id only
        assert [u["id"] for u in (await env.call("bob", "user.search", q="bob"))["users"]] == ["bob"]
        assert (await env.error("bob", "user.search", q="")).code == ErrorCode.BAD_REQUEST
        assert (await env.error("bob", "user.search")).code == ErrorCode.BAD_REQUEST
        assert (await env.call("bob", "user.search", q="%"))["users"] == []
        await close_env(env)

    run(main())


def test_profiles_visible_to_contacts_groups_and_owners_only(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, users=("alice", "bob", "carol", "dave"), devices=("lamp",))
        env.services.relations.set_device_users("lamp", {"alice"})
        await env.befriend("alice", "bob")
        await env.befriend("bob", "carol")
        p = await env.call("alice", "profile.set", name="Alice A.", status="at home")
        assert p == {"user": "alice", "kind": "user", "name": "Alice A.", "status": "at home"}
        assert (await env.call("bob", "profile.get", user="alice"))["status"] == "at home"
        assert (await env.call("alice", "profile.get"))["name"] == "Alice A."
        assert (await env.call("alice", "profile.get", user="lamp"))["kind"] == "device"
        assert (await env.call("lamp", "profile.get", user="alice"))["name"] == "Alice A."
        assert (await env.error("carol", "profile.get", user="alice")).code == ErrorCode.FORBIDDEN
        assert (await env.error("bob", "profile.get", user="lamp")).code == ErrorCode.NOT_FOUND
        assert (await env.error("bob", "profile.get", user="ghost")).code == ErrorCode.NOT_FOUND
        await env.call("bob", "group.create", name="g", members=["carol"])
        await env.call("bob", "group.add", conv=(await env.call("bob", "convs"))["convs"][0]["conv"],
                       members=["alice"])
        assert (await env.call("carol", "profile.get", user="alice"))["user"] == "alice"  # co-members now
        assert (await env.error("alice", "profile.set")).code == ErrorCode.BAD_REQUEST
        assert (await env.error("alice", "profile.set", name="")).code == ErrorCode.BAD_REQUEST
        assert (await env.error("alice", "profile.set", name="x" * 65)).code == ErrorCode.BAD_REQUEST
        assert (await env.error("alice", "profile.set", status=3)).code == ErrorCode.BAD_REQUEST
        await close_env(env)

    run(main())


def test_nothing_from_a_blocked_member_reaches_the_blocker_in_groups(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, users=("alice", "bob", "mallory"))
        await env.befriend("bob", "alice")
        await env.befriend("bob", "mallory")
        conv = (await env.call("bob", "group.create", name="street", members=["alice", "mallory"]))["conv"]
        await env.call("alice", "contact.block", user="mallory")
        r = await env.call("mallory", "send", conv=conv, cmid="m1", body=text("psst"))
        assert r["seq"] == 1                                    # mallory cannot tell
        await env.call("bob", "send", conv=conv, cmid="b1", body=text("hello street"))
        alice_msgs = [e["cmid"] for e in await env.mailbox("alice") if e["kind"] == "msg"]
        assert alice_msgs == ["b1"]
        assert [e["cmid"] for e in await env.mailbox("bob") if e["kind"] == "msg"] == ["m1", "b1"]
        convs = await env.call("alice", "convs")
        assert convs["total_unread"] == 1 and convs["convs"][0]["unread"] == 1
        assert (await env.call("bob", "convs"))["total_unread"] == 1  # mallory's; his own never count
        await env.call("alice", "contact.unblock", user="mallory")
        await env.call("mallory", "send", conv=conv, cmid="m2", body=text("again"))
        assert [e["cmid"] for e in await env.mailbox("alice") if e["kind"] == "msg"] == ["b1", "m2"]
        await close_env(env)

    run(main())


def test_a_removed_principal_leaves_nothing_behind_for_its_id(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, users=("alice", "bob", "carol"))
        await env.befriend("alice", "bob")
        await env.befriend("alice", "carol")
        conv = (await env.call("alice", "group.create", name="g", members=["bob", "carol"]))["conv"]
        await env.call("bob", "send", to="alice", cmid="1", body=text("old bob"))
        await env.call("bob", "contact.block", user="carol")
        await env.services.identity.remove("bob")
        await env.messaging.principal_removed("bob")
        await env.social.principal_removed("bob")
        assert not env.services.relations.are_contacts("alice", "bob")
        assert (await env.call("alice", "group.info", conv=conv))["members"] == ["alice", "carol"]
        assert not env.social.is_blocked("bob", "carol")
        # The id registered again starts from nothing.
        await env.services.identity.add("bob", "user", secret="pw2")
        assert await env.mailbox("bob") == []
        assert (await env.call("bob", "contacts"))["contacts"] == []
        assert (await env.error("bob", "send", to="alice", cmid="2", body=text("x"))).code == ErrorCode.FORBIDDEN
        assert (await env.error("bob", "group.info", conv=conv)).code == ErrorCode.FORBIDDEN
        await env.befriend("alice", "bob")
        r = await env.call("bob", "send", to="alice", cmid="1", body=text("new bob"))  # old bob's cmid
        assert r["seq"] == 2 and r["dup"] is False
        await close_env(env)

    run(main())
