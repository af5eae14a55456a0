"""Messaging over real MQTT against a broker subprocess (issue 3): hostile
requests, several clients per person, persistent-session replay, restart and
SIGKILL in the middle of a stream of sends."""

from __future__ import annotations

import json
import threading
import time

from tests.clients import ImClient, MqttClient, RequestFailed, eventually_ok


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def befriend(a: ImClient, b: ImClient) -> None:
    a.call("contact.request", to=b.principal)
    b.call("contact.accept", **{"from": a.principal})


def responses(c: MqttClient, count: int, timeout: float = 5.0) -> list[dict]:
    return [c.wait_message(f"roost/resp/{c.client_id}", timeout).json() for _ in range(count)]


def test_hostile_requests_get_one_clear_answer_each(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    befriend(alice, bob)
    cases: list[tuple[bytes | str, str | None, str]] = [
        (b"\xff\xfe not json", None, "bad_request"),
        ("[1, 2, 3]", None, "bad_request"),
        ('"just a string"', None, "bad_request"),
        ('{"op": "send"}', None, "bad_request"),
        (json.dumps({"id": "x" * 65, "op": "convs"}), None, "bad_request"),
        (json.dumps({"id": 7, "op": "convs"}), None, "bad_request"),
        (json.dumps({"id": "h1", "op": 5}), "h1", "bad_request"),
        (json.dumps({"id": "h2", "op": "no.such.op"}), "h2", "bad_request"),
        (json.dumps({"id": "h3", "op": "send", "to": "bob", "cmid": "c", "body": text("x" * 70000)}), "h3",
         "too_large"),
        (json.dumps({"id": "h4", "op": "send", "to": ["bob"], "cmid": "c", "body": text("x")}), "h4", "bad_request"),
        (json.dumps({"id": "h5", "op": "sync", "after": -1}), "h5", "bad_request"),
        (json.dumps({"id": "h6", "op": "sync", "limit": 100000}), "h6", "bad_request"),
        (json.dumps({"id": "h7", "op": "history", "conv": "dm:zed:alice"}), "h7", "bad_request"),
        (json.dumps({"id": "h8", "op": "send", "conv": "grp:../../etc", "cmid": "c", "body": text("x")}), "h8",
         "bad_request"),
        (json.dumps({"id": "h9", "op": "ack", "n": 10 ** 30}), "h9", "bad_request"),
        (json.dumps({"id": "h10", "op": "send", "to": "bob", "cmid": "c", "body": {"type": "text", "text": None}}),
         "h10", "bad_request"),
        (json.dumps({"id": "h12", "op": "sync", "after": 10 ** 30}), "h12", "bad_request"),
        ('{"id": "h15", "op": "send", "to": "bob", "cmid": "deep", "body": {"type": "text", "text": "x", "d": '
         + "[" * 900 + "]" * 900 + "}}", "h15", "bad_request"),
        (json.dumps({"id": "h13", "op": "history", "conv": "dm:alice:bob", "before": 10 ** 30}), "h13",
         "bad_request"),
        (json.dumps({"id": "h14", "op": "read", "conv": "dm:alice:bob", "seq": 1.5}), "h14", "bad_request"),
        ("{" * 5000, None, "bad_request"),
        ("[" * 100000 + "]" * 100000, None, "bad_request"),
        (json.dumps({"id": "h11", "op": "send", "to": "bob", "cmid": "c", "body": {"type": "text", "text": "x",
                                                                             "deep": [[[[[[[[[[[]]]]]]]]]]]}}),
         "h11", "ok"),
    ]
    for payload, rid, code in cases:
        alice.send_raw(payload)
        doc = alice.wait_message(f"roost/resp/{alice.client_id}").json()
        if code == "ok":
            assert doc["ok"] is True and doc["id"] == rid, doc
            continue
        assert doc["ok"] is False and doc["id"] == rid and doc["error"]["code"] == code, (payload[:80], doc)
        assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    assert alice.no_message("roost/resp/#", 0.3)  # exactly one answer each
    # Nothing was stored, and everyone carries on.
    assert [e["kind"] for e in bob.call("sync", after=0)["events"]] == ["contact", "contact", "msg", "unread"]
    assert bob.call("send", to="alice", cmid="ok", body=text("still here"))["seq"] == 2
    assert alice.wait_event("msg", cmid="ok")["body"]["text"] == "still here"


def test_requests_are_rate_limited_per_client(roost_factory):
    roost = roost_factory({"limits": {"request_rate": 2, "request_burst": 5}})
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    for i in range(20):
        alice.publish(f"roost/req/{alice.client_id}", {"id": f"q{i}", "op": "convs"}, qos=1, wait=False)
    docs = responses(alice, 20)
    assert sorted(d["id"] for d in docs) == sorted(f"q{i}" for i in range(20))
    limited = [d for d in docs if not d["ok"]]
    assert limited and all(d["error"]["code"] == "rate_limited" for d in limited)
    assert len(docs) - len(limited) <= 7
    assert bob.call("convs") == {"convs": [], "total_unread": 0}  # another client is not affected
    assert eventually_ok(alice, "convs")["total_unread"] == 0  # tokens come back


def test_every_client_of_a_person_sees_the_same_thread_and_counts(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    phone = ImClient("alice", "phone").open(roost, apw)
    laptop = ImClient("alice", "laptop").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    befriend(phone, bob)
    for i in range(3):
        r = bob.call("send", to="alice", cmid=f"b{i}", body=text(f"hello {i}"))
        assert r == {"conv": "dm:alice:bob", "seq": i + 1, "ts": r["ts"], "dup": False}
    for c in (phone, laptop):
        got = [c.wait_event("msg", cmid=f"b{i}")["seq"] for i in range(3)]
        assert got == [1, 2, 3]
    phone.call("send", to="bob", cmid="a0", body=text("hi bob"))
    mine = laptop.wait_event("msg", cmid="a0")        # the sender's other client sees it too
    assert mine["from"] == "alice" and mine["seq"] == 4
    assert bob.wait_event("msg", cmid="a0")["body"] == text("hi bob")
    # A read on the laptop updates the counts on the phone as well, and tells bob.
    r = laptop.call("read", conv="dm:alice:bob", seq=2)
    assert r == {"conv": "dm:alice:bob", "seq": 2, "unread": 1, "total_unread": 1}
    for c in (phone, laptop):
        # each of bob's messages raised the count as it arrived; the read lowered it
        counts = [c.wait_event("unread", conv="dm:alice:bob") for _ in range(4)]
        assert [(ev["count"], ev["total"]) for ev in counts] == [(1, 1), (2, 2), (3, 3), (1, 1)]
    assert bob.wait_event("read", conv="dm:alice:bob")["seq"] == 2
    convs = phone.call("convs")
    assert convs["total_unread"] == 1 and convs["convs"][0]["unread"] == 1 and convs["convs"][0]["peer"] == "bob"
    # Delivered receipts once a client of the recipient acks.
    last = phone.call("sync", after=0, limit=1000)["last"]
    phone.call("ack", n=last)
    delivered = bob.wait_event("delivered", conv="dm:alice:bob", seq=1)
    assert delivered["to"] == "alice"
    # Mailbox numbers are gap-free on every client.
    ns = [e["n"] for e in phone.call("sync", after=0, limit=1000)["events"]]
    assert ns == list(range(1, len(ns) + 1))


def test_concurrent_senders_in_a_group_get_one_gap_free_sequence(roost):
    people = ["alice", "bob", "carol", "dave"]
    pw = {p: roost.add_user(p) for p in people}
    clients = {p: ImClient(p, "phone").open(roost, pw[p]) for p in people}
    alice = clients["alice"]
    for p in people[1:]:
        alice.call("contact.request", to=p)
        clients[p].call("contact.accept", **{"from": "alice"})
    conv = alice.call("group.create", name="all", members=people[1:])["conv"]
    per_sender = 40

    def burst(p: str) -> None:
        c = clients[p]
        for i in range(per_sender):
            c.publish(f"roost/req/{c.client_id}",
                      {"id": f"{p}{i}", "op": "send", "conv": conv, "cmid": f"{p}-{i}", "body": text(str(i))},
                      qos=1, wait=False)

    threads = [threading.Thread(target=burst, args=(p,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = []
    for p in people:
        docs = [clients[p].wait_message(f"roost/resp/{clients[p].client_id}", 10).json() for _ in range(per_sender)]
        assert all(d["ok"] for d in docs), [d for d in docs if not d["ok"]][:3]
        seqs += [d["result"]["seq"] for d in docs]
    total = per_sender * len(people)
    assert sorted(seqs) == list(range(1, total + 1))
    for p in people:                      # every member is pushed the whole thread in seq order
        got = [clients[p].wait_event("msg", conv=conv, timeout=10)["seq"] for _ in range(total)]
        assert got == list(range(1, total + 1))
    history = alice.call("history", conv=conv, limit=200)["messages"]
    assert [m["seq"] for m in history] == list(range(1, total + 1))


def test_persistent_client_is_pushed_what_it_missed(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    fw = ImClient("bob", "fw", clean_session=False).open(roost, bpw)
    befriend(alice, fw)
    alice.call("send", to="bob", cmid="m0", body=text("0"))
    first = fw.wait_event("msg", cmid="m0")
    fw.call("ack", n=first["n"])
    fw.disconnect()
    for i in range(1, 6):
        alice.call("send", to="bob", cmid=f"m{i}", body=text(str(i)))
    # Reconnect on the persistent session without subscribing again.
    fw2 = ImClient("bob", "fw", clean_session=False)
    fw2.connect(roost.host, roost.port, username="bob", password=bpw)
    assert fw2.session_present
    got = [fw2.wait_event("msg")["cmid"] for _ in range(5)]
    assert got == [f"m{i}" for i in range(1, 6)]
    fw2.wait_event("unread", count=6)         # m1..m5 raised the count to 6
    # everything after the cursor: m0's count (not acked), then each message with its count
    assert [e["n"] for e in fw2.events] == list(range(first["n"] + 1, first["n"] + 12))
    # Live events continue the same sequence.
    alice.call("send", to="bob", cmid="m6", body=text("6"))
    assert fw2.wait_event("msg")["n"] == first["n"] + 12
    assert fw2.wait_event("unread", count=7)["n"] == first["n"] + 13
    assert fw2.no_message("roost/inbox/#", 0.3)


def test_persistent_client_resumes_from_its_cursor_after_a_broker_restart(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    fw = ImClient("bob", "fw", clean_session=False).open(roost, bpw)
    befriend(alice, fw)
    for i in range(3):
        alice.call("send", to="bob", cmid=f"m{i}", body=text(str(i)))
    got = [fw.wait_event("msg")["n"] for _ in range(3)]
    fw.call("ack", n=got[1] + 1)    # the second one and its count; the third one is received but not acknowledged
    fw.drop()
    alice.drop()
    roost.restart()
    alice = ImClient("alice", "phone").open(roost, apw)
    for i in range(3, 6):
        alice.call("send", to="bob", cmid=f"m{i}", body=text(str(i)))
    # Firmware reconnects and subscribes again (its session may not have survived).
    fw2 = ImClient("bob", "fw", clean_session=False).open(roost, bpw)
    cmids = [fw2.wait_event("msg")["cmid"] for _ in range(4)]
    assert cmids == ["m2", "m3", "m4", "m5"]
    fw2.wait_event("unread", count=6)
    ns = [e["n"] for e in fw2.events]
    assert ns == list(range(got[1] + 2, got[1] + 10))           # each message followed by its count
    assert fw2.no_message("roost/inbox/#", 0.5)


def test_firmware_gets_commands_sent_before_its_first_connection(roost):
    apw = roost.add_user("alice")
    secret, code = roost.add_device("porch", "light", name="Porch light")
    alice = ImClient("alice", "phone").open(roost, apw)
    alice.call("device.claim", device="porch", code=code)
    sent = [alice.call("send", to="porch", cmid=f"cmd{i}",
                       body={"type": "command", "name": "set", "args": {"on": i % 2 == 0}}) for i in range(3)]
    fw = ImClient("porch", None, clean_session=False).open(roost, secret)   # never acked: gets everything
    cmds = [fw.wait_event("msg") for _ in range(3)]
    assert [c["seq"] for c in cmds] == [s["seq"] for s in sent]
    assert all(c["from"] == "alice" and c["body"]["type"] == "command" for c in cmds)
    for c in cmds:
        fw.call("send", to="alice", cmid=f"res{c['seq']}",
                body={"type": "result", "for": c["seq"], "status": "ok", "data": {"on": c["body"]["args"]["on"]}})
    fw.call("ack", n=cmds[-1]["n"])
    results = [alice.wait_event("msg", cmid=f"res{s['seq']}") for s in sent]
    assert [r["body"]["for"] for r in results] == [s["seq"] for s in sent]
    assert {alice.wait_event("delivered", seq=s["seq"])["to"] for s in sent} == {"porch"}


def test_offline_client_syncs_everything_across_a_restart(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    befriend(alice, bob)
    seen = bob.call("sync", after=0)["last"]
    bob.disconnect()
    for i in range(10):
        alice.call("send", to="bob", cmid=f"x{i}", body=text(str(i)))
    alice.disconnect()
    roost.restart()
    bob = ImClient("bob", "laptop").open(roost, bpw)
    page = bob.call("sync", after=seen)
    msgs = [e for e in page["events"] if e["kind"] == "msg"]
    assert [e["cmid"] for e in msgs] == [f"x{i}" for i in range(10)]
    assert [e["seq"] for e in msgs] == list(range(1, 11))
    assert [e["count"] for e in page["events"] if e["kind"] == "unread"] == list(range(1, 11))
    assert [e["n"] for e in page["events"]] == list(range(seen + 1, seen + 21))
    alice = ImClient("alice", "phone").open(roost, apw)
    assert alice.call("send", to="bob", cmid="after", body=text("after"))["seq"] == 11


def test_sigkill_during_a_send_stream_loses_and_duplicates_nothing(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    befriend(alice, bob)
    total = 400
    answered: dict[str, int] = {}
    stop = threading.Event()

    def stream() -> None:
        for i in range(total):
            if stop.is_set():
                return
            try:
                alice.publish(f"roost/req/{alice.client_id}",
                              {"id": f"s{i}", "op": "send", "to": "bob", "cmid": f"k{i}", "body": text(str(i))},
                              qos=1, wait=False)
            except Exception:  # noqa: BLE001 - the broker died under us
                return
            time.sleep(0.002)

    sender = threading.Thread(target=stream)
    sender.start()
    deadline = time.monotonic() + 20
    while len(answered) < 60 and time.monotonic() < deadline:
        try:
            doc = alice.wait_message("roost/resp/alice.phone", 1.0).json()
        except TimeoutError:
            continue
        if doc["ok"]:
            answered[f"k{doc['id'][1:]}"] = doc["result"]["seq"]
    roost.kill()
    stop.set()
    sender.join(10)
    # Answers already on the wire before the kill count too.
    while True:
        try:
            doc = alice.wait_message("roost/resp/alice.phone", 0.2).json()
        except TimeoutError:
            break
        if doc["ok"]:
            answered[f"k{doc['id'][1:]}"] = doc["result"]["seq"]
    assert len(answered) >= 60
    alice.drop()
    bob.drop()
    roost.start()
    bob = ImClient("bob", "again").open(roost, bpw)
    stored: list[dict] = []
    before = None
    while True:
        page = bob.call("history", conv="dm:alice:bob", limit=200, **({"before": before} if before else {}))
        stored = page["messages"] + stored
        if not page["more"]:
            break
        before = page["messages"][0]["seq"]
    seqs = [m["seq"] for m in stored]
    assert seqs == list(range(1, len(stored) + 1))                   # no gaps
    cmids = [m["cmid"] for m in stored]
    assert len(set(cmids)) == len(cmids)                               # no duplicates
    by_cmid = {m["cmid"]: m["seq"] for m in stored}
    for cmid, seq in answered.items():                                 # every ok'd send survived
        assert by_cmid.get(cmid) == seq, cmid
    # Retrying the whole stream stores only what was missing, once.
    alice = ImClient("alice", "retry").open(roost, apw)
    for i in range(0, total, 7):
        r = alice.call("send", to="bob", cmid=f"k{i}", body=text(str(i)))
        assert r["dup"] is (f"k{i}" in by_cmid)
    after = bob.call("history", conv="dm:alice:bob", limit=200)["messages"]
    assert after[-1]["seq"] == len(stored) + sum(1 for i in range(0, total, 7) if f"k{i}" not in by_cmid)
    # Mailbox numbering continued without a gap after the restart.
    ns, after_n = [], 0
    while True:
        page = bob.call("sync", after=after_n, limit=1000)
        ns += [e["n"] for e in page["events"]]
        after_n = page["last"]
        if not page["more"]:
            break
    assert ns == list(range(1, len(ns) + 1))


def test_mailbox_overflow_is_announced(roost_factory):
    roost = roost_factory({"mailbox": {"max_events": 20}})
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone").open(roost, bpw)
    befriend(alice, bob)
    bob.disconnect()
    for i in range(40):
        alice.call("send", to="bob", cmid=str(i), body=text(str(i)))
    bob = ImClient("bob", "laptop").open(roost, bpw)
    deadline = time.monotonic() + 10   # a pruning round runs every second
    while len(events := bob.call("sync", after=0, limit=1000)["events"]) > 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(events) <= 20
    dropped = [e for e in events if e["kind"] == "dropped"]
    assert dropped and dropped[-1]["reason"] == "queue_full"
    kept = [e for e in events if e["kind"] == "msg"]
    assert kept[-1]["cmid"] == "39"                                    # the newest are kept
    # 2 contact events and 40 x (message, unread), plus each announcement: numbered
    # without a gap up to the newest, the oldest discarded (a round may run while
    # the sends go on, and a later round may discard an earlier announcement)
    ns = [e["n"] for e in events]
    assert ns == list(range(ns[0], ns[0] + len(ns))) and ns[-1] >= 82 + len(dropped)
    assert dropped[-1]["count"] >= 1 and ns[0] - 1 >= dropped[-1]["count"]
    try:
        bob.call("ack", n=10 ** 6)
    except RequestFailed as err:
        assert err.code == "bad_request"
