"""Over real MQTT: every body type travels where messaging is allowed, and
group.remove of someone who is not a member (docs/PROTOCOL.md, Message bodies
and Groups)."""

from __future__ import annotations

import pytest

from tests.clients import ImClient, RequestFailed


def text(t: str) -> dict:
    return {"type": "text", "text": t}


COMMAND = {"type": "command", "name": "set", "args": {"on": True}}
EVENT = {"type": "event", "name": "opened", "data": {"open": True}}


def result_for(seq: int) -> dict:
    return {"type": "result", "for": seq, "status": "ok", "data": {"on": True}}


def befriend(a: ImClient, b: ImClient) -> None:
    a.call("contact.request", to=b.principal)
    b.call("contact.accept", **{"from": a.principal})


def assert_no_event(client: ImClient, kind: str, **match) -> None:
    with pytest.raises(TimeoutError):
        client.wait_event(kind, timeout=0.3, **match)


@pytest.fixture
def home(roost):
    """alice and bob are contacts; alice owns the porch light; all connected."""
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    secret, code = roost.add_device("porch", "light", name="Porch light")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    befriend(alice, bob)
    alice.call("device.claim", device="porch", code=code)
    porch = ImClient("porch", None).open(roost, secret)
    return alice, bob, porch


def test_every_body_type_travels_between_people_devices_and_groups(home):
    """Body types say what a message is for; the broker does not judge who sends
    which (the contract lists text, command, result, event for `send`)."""
    alice, bob, porch = home
    sent = alice.call("send", to="porch", cmid="c1", body=COMMAND)
    assert porch.wait_event("msg", cmid="c1")["body"] == COMMAND
    porch.call("send", to="alice", cmid="r1", body=result_for(sent["seq"]))
    porch.call("send", to="alice", cmid="e1", body=EVENT)
    assert alice.wait_event("msg", cmid="r1")["body"] == result_for(sent["seq"])
    assert alice.wait_event("msg", cmid="e1")["body"] == EVENT
    for i, body in enumerate((text("hi"), COMMAND, result_for(1), EVENT)):
        alice.call("send", to="bob", cmid=f"p{i}", body=body)
        assert bob.wait_event("msg", cmid=f"p{i}")["body"] == body
    conv = alice.call("group.create", name="home", members=["bob", "porch"])["conv"]
    porch.call("send", conv=conv, cmid="g1", body=EVENT)         # a device telling the family
    assert bob.wait_event("msg", conv=conv)["body"] == EVENT


# ---- group.remove of a non-member -------------------------------------------------

@pytest.fixture
def trio(roost):
    """alice created a group with bob; carol is alice's contact but not in it."""
    pw = {p: roost.add_user(p) for p in ("alice", "bob", "carol")}
    clients = {p: ImClient(p, "phone").open(roost, pw[p]) for p in pw}
    alice = clients["alice"]
    befriend(alice, clients["bob"])
    befriend(alice, clients["carol"])
    conv = alice.call("group.create", name="pair", members=["bob"])["conv"]
    for p in ("alice", "bob"):
        clients[p].wait_event("group", conv=conv, event="created")
    return clients, conv


def test_removing_a_non_member_is_not_found_and_changes_nothing(trio):
    clients, conv = trio
    alice, bob, carol = clients["alice"], clients["bob"], clients["carol"]
    with pytest.raises(RequestFailed) as info:
        alice.call("group.remove", conv=conv, members=["carol"])
    assert info.value.code == "not_found" and "carol" in info.value.message
    # All or nothing: bob is a member, carol is not, so bob stays too.
    with pytest.raises(RequestFailed) as info:
        alice.call("group.remove", conv=conv, members=["bob", "carol"])
    assert info.value.code == "not_found" and "carol" in info.value.message and "bob" not in info.value.message
    assert alice.call("group.info", conv=conv)["members"] == ["alice", "bob"]
    for c in (alice, bob, carol):
        assert_no_event(c, "group", event="removed")
    bob.call("send", conv=conv, cmid="still-in", body=text("still here"))
    assert alice.wait_event("msg", conv=conv)["from"] == "bob"


def test_removing_members_still_works_and_is_announced(trio):
    clients, conv = trio
    alice, bob = clients["alice"], clients["bob"]
    alice.call("group.remove", conv=conv, members=["bob"])
    ev = bob.wait_event("group", conv=conv, event="removed")
    assert ev["by"] == "alice" and ev["members"] == ["bob"]
    assert alice.call("group.info", conv=conv)["members"] == ["alice"]
    with pytest.raises(RequestFailed) as info:   # removing bob again: he is no longer there
        alice.call("group.remove", conv=conv, members=["bob"])
    assert info.value.code == "not_found"


# ---- a device one may not know of is "not found", whatever the op (issue 15) ---------

def refusal(client: ImClient, op: str, **params) -> tuple[str, str]:
    """(code, message) of a refused request."""
    with pytest.raises(RequestFailed) as info:
        client.call(op, **params)
    return info.value.code, info.value.message


def as_unknown(client: ImClient, op: str, params: dict, hidden: str = "porch", unknown: str = "ghost") -> None:
    """`op` naming `hidden` is answered exactly as naming `unknown`, an id nobody has:
    same code (`not_found`), same text. In `params`, "@" stands for the id."""
    def ask(target: str) -> tuple[str, str]:
        def fill(v):
            return [fill(x) for x in v] if isinstance(v, list) else v.replace("@", target) if isinstance(v, str) else v
        code, message = refusal(client, op, **{k: fill(v) for k, v in params.items()})
        return code, message.replace(target, "@")

    got, expected = ask(hidden), ask(unknown)
    assert got == expected and got[0] == "not_found", (op, got, expected)


def test_a_device_you_may_not_see_is_not_found_like_an_unknown_id(home, roost):
    """carol is a stranger to the porch light (alice owns it): every op naming it
    answers `not_found` with the text an unknown id gets, as `profile.get` does;
    `forbidden` would tell her the device exists."""
    alice, bob, porch = home
    carol = ImClient("carol", "phone").open(roost, roost.add_user("carol"))
    befriend(carol, bob)
    as_unknown(carol, "profile.get", {"user": "@"})
    as_unknown(carol, "send", {"to": "@", "cmid": "s1", "body": COMMAND})
    as_unknown(carol, "send", {"conv": "dm:carol:@", "cmid": "s2", "body": COMMAND})
    as_unknown(carol, "group.create", {"name": "g", "members": ["@"]})
    conv = carol.call("group.create", name="friends", members=["bob"])["conv"]
    as_unknown(carol, "group.add", {"conv": conv, "members": ["@"]})
    as_unknown(carol, "device.share", {"device": "@", "with": "bob"})
    as_unknown(carol, "device.unshare", {"device": "@", "with": "bob"})
    # the history of such a conversation is as empty as one with nobody
    assert carol.call("history", conv="dm:carol:porch") == carol.call("history", conv="dm:carol:ghost")
    # nothing reached the device; a person who exists is still `forbidden`
    assert porch.no_message("roost/inbox/porch", wait=0.3)
    assert refusal(carol, "send", to="alice", cmid="s3", body=text("hi"))[0] == "forbidden"
    assert refusal(carol, "profile.get", user="alice")[0] == "forbidden"


def test_once_shared_the_device_is_known_and_refusals_are_forbidden(home):
    """bob is alice's contact but not a sharee: he may not know of the porch light
    either; once it is shared with him he sees it, and only an owner may share it."""
    alice, bob, porch = home
    as_unknown(bob, "send", {"to": "@", "cmid": "b1", "body": COMMAND})
    as_unknown(bob, "device.share", {"device": "@", "with": "alice"})
    alice.call("device.share", device="porch", **{"with": "bob"})
    assert bob.call("send", to="porch", cmid="b2", body=COMMAND)["conv"] == "dm:bob:porch"
    assert porch.wait_event("msg", cmid="b2")["from"] == "bob"
    code, message = refusal(bob, "device.share", device="porch", **{"with": "alice"})
    assert code == "forbidden" and "owner" in message
