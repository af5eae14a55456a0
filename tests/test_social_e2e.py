"""The social layer over real MQTT (issue 4): contact changes on every client of
both sides, blocking that looks like being a stranger, search that leaks nothing,
profiles, and read receipts/unread counts converging across devices."""

from __future__ import annotations

import time

import pytest

from tests.clients import ImClient, RequestFailed


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def code_of(fn, *args, **kwargs) -> str:  # noqa: ANN001
    with pytest.raises(RequestFailed) as info:
        fn(*args, **kwargs)
    return info.value.code


def test_contact_changes_reach_every_client_of_both_sides(roost):
    apw, bpw = roost.add_user("alice", name="Alice"), roost.add_user("bob", name="Bob")
    a_phone = ImClient("alice", "phone").open(roost, apw)
    a_laptop = ImClient("alice", "laptop").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    assert [u["id"] for u in a_phone.call("user.search", q="Bo")["users"]] == ["bob"]
    a_phone.call("contact.request", to="bob", note="hello from Alice")
    for c in (a_phone, a_laptop, bob):
        ev = c.wait_event("contact", event="request")
        assert ev["note"] == "hello from Alice" and ev["by"] == "alice"
    bob.call("contact.accept", **{"from": "alice"})
    for c, other in ((a_phone, "bob"), (a_laptop, "bob"), (bob, "alice")):
        assert c.wait_event("contact", event="accepted")["with"] == other
    listing = a_laptop.call("contacts")["contacts"]
    assert [(c["id"], c["kind"], c["name"]) for c in listing] == [("bob", "user", "Bob")]
    assert listing[0]["presence"]["state"] == "online" and listing[0]["presence"]["clients"] == 1
    bob.call("profile.set", status="cooking")
    assert a_phone.call("profile.get", user="bob")["status"] == "cooking"
    bob.call("contact.remove", user="alice")
    for c in (a_phone, a_laptop, bob):
        assert c.wait_event("contact", event="removed")["by"] == "bob"
    assert code_of(a_phone.call, "send", to="bob", cmid="x", body=text("x")) == "forbidden"
    assert code_of(a_phone.call, "profile.get", user="bob") == "forbidden"


def test_a_blocked_principal_cannot_tell_it_from_being_a_stranger(roost):
    apw, mpw, spw = roost.add_user("alice"), roost.add_user("mallory"), roost.add_user("sam")
    alice = ImClient("alice", "phone").open(roost, apw)
    mallory = ImClient("mallory", "phone").open(roost, mpw)
    sam = ImClient("sam", "phone").open(roost, spw)
    mallory.call("contact.request", to="alice", note="hi")
    alice.wait_event("contact", event="request")
    alice.call("contact.block", user="mallory")
    alice.wait_event("contact", event="blocked")
    blocked = mallory.request("send", to="alice", cmid="1", body=text("hey"))
    stranger = sam.request("send", to="alice", cmid="1", body=text("hey"))
    assert blocked["error"] == stranger["error"] and blocked["error"]["code"] == "forbidden"
    assert mallory.request("contact.request", to="alice")["error"]["code"] == "forbidden"
    seen = []
    while True:
        try:
            seen.append(mallory.wait_message("roost/inbox/#", 0.3).json())
        except TimeoutError:
            break
    assert [(e["kind"], e["event"]) for e in seen] == [("contact", "request")]   # its own request, nothing more
    assert alice.no_message("roost/inbox/#", 0.5)                 # nothing reaches the blocker
    assert alice.call("contacts")["blocked"] == ["mallory"]


def test_search_lists_only_people_and_ones_own_devices(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    _secret, code = roost.add_device("alarm", "door_sensor", name="Alarm panel")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    alice.call("device.claim", device="alarm", code=code)
    assert [u["id"] for u in alice.call("user.search", q="Al")["users"]] == ["alarm", "alice"]
    assert [u["id"] for u in bob.call("user.search", q="Al")["users"]] == ["alice"]
    assert bob.call("user.search", q="alarm")["users"] == []
    assert bob.request("profile.get", user="alarm")["error"]["code"] == "not_found"
    assert alice.call("profile.get", user="alarm")["kind"] == "device"


def test_unread_counts_converge_across_devices_and_receipts_per_group_member(roost):
    pw = {p: roost.add_user(p) for p in ("alice", "bob", "carol")}
    phone = ImClient("alice", "phone").open(roost, pw["alice"])
    laptop = ImClient("alice", "laptop").open(roost, pw["alice"])
    bob = ImClient("bob", "phone").open(roost, pw["bob"])
    carol = ImClient("carol", "phone").open(roost, pw["carol"])
    for other in (bob, carol):
        phone.call("contact.request", to=other.principal)
        other.call("contact.accept", **{"from": "alice"})
    conv = phone.call("group.create", name="Dinner", members=["bob", "carol"])["conv"]
    bob.wait_event("group", event="created", conv=conv)
    for i in range(4):
        bob.call("send", conv=conv, cmid=f"b{i}", body=text(f"b{i}"))
    laptop.wait_event("msg", cmid="b3")
    phone.call("read", conv=conv, seq=1)
    laptop.call("read", conv=conv, seq=3)
    for c in (phone, laptop):
        # four arrivals, then the two reads: the same numbers on both devices
        counts = [(e["count"], e["total"]) for e in (c.wait_event("unread", conv=conv) for _ in range(6))]
        assert counts == [(1, 1), (2, 2), (3, 3), (4, 4), (3, 3), (1, 1)]
        assert c.call("convs")["total_unread"] == 1
    # bob hears of each read; carol is a member too and hears of alice's reads
    assert [bob.wait_event("read", conv=conv)["seq"] for _ in range(2)] == [1, 3]
    assert carol.wait_event("read", conv=conv, by="alice")["seq"] == 1
    # one delivered receipt per member that acked
    for c in (laptop, carol):
        c.call("ack", n=c.call("sync", after=0, limit=1000)["last"])
    receipts = {bob.wait_event("delivered", seq=4)["to"] for _ in range(2)}
    assert receipts == {"alice", "carol"}


def test_removing_a_person_clears_its_social_state_for_a_new_owner_of_the_id(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    alice.call("contact.request", to="bob")
    bob.call("contact.accept", **{"from": "alice"})
    bob.call("send", to="alice", cmid="1", body=text("old bob"))
    roost.cli("user", "remove", "bob")
    assert bob.wait_disconnected(5)
    deadline = time.monotonic() + 5
    while alice.call("contacts")["contacts"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alice.call("contacts")["contacts"] == []
    new_pw = roost.add_user("bob", password="another-secret")
    newbob = ImClient("bob", "laptop").open(roost, new_pw)
    assert newbob.call("sync", after=0)["events"] == []
    assert newbob.call("contacts")["contacts"] == []
    assert code_of(newbob.call, "send", to="alice", cmid="1", body=text("hi")) == "forbidden"
