"""Over real MQTT: who may send which body type (command, result, event), and
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


def refused(client: ImClient, **params) -> RequestFailed:
    with pytest.raises(RequestFailed) as info:
        client.call("send", **params)
    return info.value


def assert_no_event(client: ImClient, kind: str, **match) -> None:
    with pytest.raises(TimeoutError):
        client.wait_event(kind, timeout=0.3, **match)


def assert_nothing_stored(sender: ImClient, receiver: ImClient, conv: str, cmid: str) -> None:
    """The receiver was told nothing, the conversation has no message, and the
    refused cmid is still free (a text with it is a new message, not a dup)."""
    assert_no_event(receiver, "msg")
    assert sender.call("history", conv=conv)["messages"] == []
    sent = sender.call("send", conv=conv, cmid=cmid, body=text("hello"))
    assert sent["dup"] is False and sent["seq"] == 1


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


def test_a_person_cannot_send_device_bodies_to_another_person(home):
    alice, bob, _ = home
    for cmid, body in (("c1", COMMAND), ("r1", result_for(1)), ("e1", EVENT)):
        err = refused(alice, to="bob", cmid=cmid, body=body)
        assert err.code == "bad_request", (body, err)
    assert "device" in refused(alice, to="bob", cmid="c2", body=COMMAND).message
    assert_nothing_stored(alice, bob, "dm:alice:bob", "c1")


def test_a_person_cannot_answer_or_announce_like_a_device(home):
    alice, _, porch = home
    for cmid, body in (("r1", result_for(1)), ("e1", EVENT)):
        err = refused(alice, to="porch", cmid=cmid, body=body)
        assert err.code == "bad_request" and "device" in err.message
    assert_nothing_stored(alice, porch, "dm:alice:porch", "r1")


def test_a_device_cannot_command(home):
    alice, _, porch = home
    err = refused(porch, to="alice", cmid="c1", body=COMMAND)
    assert err.code == "bad_request" and "command" in err.message
    assert_nothing_stored(porch, alice, "dm:alice:porch", "c1")


def test_command_result_and_event_between_a_person_and_her_device_still_work(home):
    alice, _, porch = home
    sent = alice.call("send", to="porch", cmid="c1", body=COMMAND)
    assert porch.wait_event("msg", cmid="c1")["body"] == COMMAND
    porch.call("send", to="alice", cmid="r1", body=result_for(sent["seq"]))
    porch.call("send", to="alice", cmid="e1", body=EVENT)
    assert alice.wait_event("msg", cmid="r1")["body"] == result_for(sent["seq"])
    assert alice.wait_event("msg", cmid="e1")["body"] == EVENT


def test_commands_and_results_stay_out_of_groups_events_do_not(home):
    alice, bob, porch = home
    conv = alice.call("group.create", name="home", members=["bob", "porch"])["conv"]
    for c in (alice, bob, porch):
        c.wait_event("group", conv=conv)
    err = refused(alice, conv=conv, cmid="c1", body=COMMAND)
    assert err.code == "bad_request" and "group" in err.message
    err = refused(porch, conv=conv, cmid="r1", body=result_for(1))
    assert err.code == "bad_request" and "group" in err.message
    assert_no_event(bob, "msg")
    assert alice.call("history", conv=conv)["messages"] == []
    porch.call("send", conv=conv, cmid="e1", body=EVENT)   # a device telling the family
    assert bob.wait_event("msg", conv=conv)["body"] == EVENT
    assert [m["seq"] for m in alice.call("history", conv=conv)["messages"]] == [1]


def test_an_integration_account_commands_devices_only(roost_factory):
    roost = roost_factory({"messaging": {"allow_dm_without_contact": True}})
    apw = roost.add_user("alice")
    secret, _ = roost.add_device("porch", "light")
    ipw = roost.add_service("hub")
    alice = ImClient("alice", "phone").open(roost, apw)
    porch = ImClient("porch", None).open(roost, secret)
    hub = ImClient("hub", "main").open(roost, ipw)
    sent = hub.call("send", to="porch", cmid="c1", body=COMMAND)
    assert porch.wait_event("msg", cmid="c1")["from"] == "hub"
    porch.call("send", to="hub", cmid="r1", body=result_for(sent["seq"]))
    assert hub.wait_event("msg", cmid="r1")["body"]["for"] == sent["seq"]
    err = refused(hub, to="alice", cmid="c2", body=COMMAND)
    assert err.code == "bad_request" and "'alice' is not a device" in err.message
    err = refused(hub, to="porch", cmid="e1", body=EVENT)
    assert err.code == "bad_request"
    assert_nothing_stored(hub, alice, "dm:alice:hub", "c2")


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
