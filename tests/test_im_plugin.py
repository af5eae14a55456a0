"""The IM plugin over real MQTT: the bound on requests in progress, one answer per
request under load, inbox pushes across take-over, unsubscribe and resubscribe."""

from __future__ import annotations

import json
import time

from tests.clients import ImClient


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def befriend(a: ImClient, b: ImClient) -> None:
    a.call("contact.request", to=b.principal)
    b.call("contact.accept", **{"from": a.principal})


def test_requests_in_progress_are_bounded_and_each_answered_once(roost_factory):
    roost = roost_factory({"limits": {"max_pending_requests": 2, "request_rate": 10000, "request_burst": 10000}})
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    befriend(alice, bob)
    n = 60
    for i in range(n):
        alice.publish(f"roost/req/{alice.client_id}",
                      {"id": f"p{i}", "op": "send", "to": "bob", "cmid": f"c{i}", "body": text(str(i))},
                      qos=1, wait=False)
    docs = [alice.wait_message("roost/resp/alice.phone", 10).json() for _ in range(n)]
    assert sorted(d["id"] for d in docs) == sorted(f"p{i}" for i in range(n))
    assert alice.no_message("roost/resp/#", 0.3)
    refused = [d for d in docs if not d["ok"]]
    assert all(d["error"]["code"] == "rate_limited" for d in refused)
    assert refused, "60 back-to-back sends never had more than 2 in progress"
    stored = bob.call("history", conv="dm:alice:bob", limit=200)["messages"]
    ok_cmids = {f"c{d['id'][1:]}" for d in docs if d["ok"]}
    assert {m["cmid"] for m in stored} == ok_cmids               # refused ones stored nothing
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))


def test_take_over_keeps_one_ordered_inbox_stream(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    old = ImClient("bob", "phone").open(roost, bpw)
    befriend(alice, old)
    alice.call("send", to="bob", cmid="before", body=text("before"))
    old.wait_event("msg", cmid="before")
    new = ImClient("bob", "phone").open(roost, bpw)   # same client id: takes over
    assert old.wait_disconnected(5)
    for i in range(5):
        alice.call("send", to="bob", cmid=f"after{i}", body=text(str(i)))
    got = [new.wait_event("msg")["cmid"] for _ in range(5)]
    assert got == [f"after{i}" for i in range(5)]
    new.wait_event("unread", count=6)                       # the count that came with the last one
    assert new.no_message("roost/inbox/#", 0.5)             # nothing twice
    ns = [e["n"] for e in new.events]
    assert ns == list(range(ns[0], ns[0] + len(ns)))        # one gap-free stream


def test_unsubscribe_stops_pushes_and_resubscribe_resumes_live(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    befriend(alice, bob)
    bob.wait_event("contact", event="request")
    bob.wait_event("contact", event="accepted")
    bob.unsubscribe("roost/inbox/bob")
    time.sleep(0.3)  # UNSUBACK
    alice.call("send", to="bob", cmid="quiet", body=text("while unsubscribed"))
    assert bob.no_message("roost/inbox/#", 0.5)
    assert bob.subscribe("roost/inbox/bob") == [1]
    alice.call("send", to="bob", cmid="loud", body=text("after"))
    ev = bob.wait_event("msg")
    assert ev["cmid"] == "loud"
    # What it missed is there for sync.
    page = bob.call("sync", after=0)
    assert [e["cmid"] for e in page["events"] if e["kind"] == "msg"] == ["quiet", "loud"]


def test_responses_go_only_to_the_requesting_client(roost):
    apw = roost.add_user("alice")
    phone = ImClient("alice", "phone").open(roost, apw)
    laptop = ImClient("alice", "laptop").open(roost, apw)
    phone.publish("roost/req/alice.phone", json.dumps({"id": "only-me", "op": "convs"}), qos=1)
    assert phone.wait_message("roost/resp/alice.phone").json()["id"] == "only-me"
    assert laptop.no_message("roost/resp/#", 0.5)


def test_unsubscribing_one_of_two_inbox_filters_keeps_the_pushes(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)            # subscribed to roost/inbox/bob
    befriend(alice, bob)
    assert bob.subscribe("roost/inbox/+") == [1]                # a second filter matching its inbox
    bob.unsubscribe("roost/inbox/bob")
    time.sleep(0.3)  # UNSUBACK
    alice.call("send", to="bob", cmid="still", body=text("still pushed"))
    assert bob.wait_event("msg", cmid="still")["body"]["text"] == "still pushed"
    assert bob.wait_event("unread", conv="dm:alice:bob")["count"] == 1
    bob.unsubscribe("roost/inbox/+")                            # the last one: pushes stop
    time.sleep(0.3)
    alice.call("send", to="bob", cmid="quiet", body=text("not pushed"))
    assert bob.no_message("roost/inbox/#", 0.5)
    assert [e["cmid"] for e in bob.call("sync", after=0)["events"] if e["kind"] == "msg"] == ["still", "quiet"]


def test_an_oversized_request_is_refused_before_parsing_with_its_leading_id(roost):
    apw = roost.add_user("alice")
    alice = ImClient("alice", "phone").open(roost, apw)
    big = "x" * 500_000                       # above what any request may need, below max_payload
    alice.send_raw(json.dumps({"id": "big-1", "op": "send", "to": "bob", "cmid": "c", "body": text(big)}))
    alice.send_raw(json.dumps({"op": "send", "id": "big-2", "cmid": "c", "body": text(big)}))
    alice.send_raw("{" + " " * 500_000)        # not even JSON: still one clear answer
    docs = [alice.wait_message("roost/resp/alice.phone", 10).json() for _ in range(3)]
    assert [(d["id"], d["error"]["code"]) for d in docs] == [("big-1", "too_large"), (None, "too_large"),
                                                             (None, "too_large")]
    assert alice.no_message("roost/resp/#", 0.3)
    assert alice.call("convs") == {"convs": [], "total_unread": 0}
