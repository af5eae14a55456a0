"""Repeated SIGKILL during mixed load (issue 10): IM sends both ways, QoS 1
publishes queued for an offline persistent session, retained QoS 1 publishes;
the broker is killed at a seeded random moment and restarted on the same store,
several times. Then what users observe: every acknowledged message is there
exactly once (mailbox seqs without gaps or repeats), every PUBACKed QoS 1
message reaches the persistent subscriber, once and in order (it was offline
throughout, so nothing was in flight to it: README's at-least-once re-send
after a crash does not apply), and every retained topic holds a value at least
as new as the last one PUBACKed."""

from __future__ import annotations

import itertools
import json
import random
import socket
import threading
import time
from collections import Counter
from typing import Any

from broker.mqtt import codec
from tests.clients import ImClient, MqttClient
from tests.harness import RoostProcess
from tests.test_faults_fuzz import befriend, sync_all, tracebacks
from tests.test_mqtt_helpers import RawClient

SEED = 20261011
ROUNDS = 4
MAX_OPS = 3000          # per load loop and round: bounds every loop, never reached before the kill
RET_TOPICS = 4


class Lost(Exception):
    """The broker went away under this client."""


class RawMqtt:
    """A byte-level client that knows exactly what was acknowledged: one QoS 1
    PUBLISH at a time, PUBACK awaited; broker PUBLISHes (responses) acknowledged."""

    def __init__(self, roost: RoostProcess, client_id: str, principal: str, password: str) -> None:
        self.client_id = client_id
        self.pids = itertools.cycle(range(1, 65536))
        try:
            self.raw = RawClient(roost.port)
            # no Nagle: a PUBACK then the next request must not wait for a delayed ACK
            self.raw.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.raw.connect(client_id, username=principal, password=password)
        except (OSError, EOFError, AssertionError) as exc:
            raise Lost(str(exc)) from exc

    def _read(self) -> tuple[int, int, bytes]:
        try:
            return self.raw.read()
        except (OSError, EOFError) as exc:
            raise Lost(str(exc)) from exc

    def _send(self, data: bytes) -> None:
        try:
            self.raw.send(data)
        except OSError as exc:
            raise Lost(str(exc)) from exc

    def subscribe(self, topic_filter: str) -> None:
        try:
            assert self.raw.subscribe(topic_filter, 1) == [1]
        except (OSError, EOFError) as exc:
            raise Lost(str(exc)) from exc

    def publish(self, topic: str, payload: bytes, retain: bool = False,
                until: Any = None) -> dict[str, Any] | None:
        """QoS 1 PUBLISH; returns after its PUBACK (and, with `until`, after the
        broker PUBLISH for which `until(topic, payload)` returns a document)."""
        pid = next(self.pids)
        self._send(codec.encode_publish(topic, payload, 1, retain, pid))
        acked, doc = False, None
        while not acked or (until is not None and doc is None):
            ptype, flags, body = self._read()
            if ptype == codec.PUBACK and codec.decode_packet_id(body) == pid:
                acked = True
            elif ptype == codec.PUBLISH:
                pub = codec.decode_publish(flags, body)
                if pub.qos:
                    self._send(codec.ack(codec.PUBACK, pub.packet_id))
                if until is not None and doc is None:
                    doc = until(pub.topic, pub.payload)
        return doc

    def close(self) -> None:
        self.raw.close()


class Ledger:
    """What the load clients were told: the ground truth for the assertions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, tuple[str, int]] = {}     # cmid -> (conv, seq) answered ok
        self.tried: set[str] = set()                   # every cmid ever sent
        self.unanswered: dict[str, list[str]] = {"alice": [], "bob": []}   # retried next round
        self.q1_acked: list[int] = []
        self.q1_tried: set[int] = set()
        self.ret_acked: dict[str, int] = {}
        self.ret_tried: dict[str, set[int]] = {}
        self.errors: list[str] = []


def im_load(roost: RoostProcess, principal: str, password: str, peer: str, ledger: Ledger,
            stop: threading.Event, counter: itertools.count) -> None:
    try:
        client = RawMqtt(roost, f"{principal}.load", principal, password)
        client.subscribe(f"roost/resp/{client.client_id}")
    except Lost:
        return
    resp = f"roost/resp/{client.client_id}"
    retries = ledger.unanswered[principal]
    for _ in range(MAX_OPS):
        if stop.is_set():
            break
        cmid = retries.pop(0) if retries else f"{principal}-{next(counter)}"
        rid = f"q-{cmid}"
        ledger.tried.add(cmid)
        request = {"id": rid, "op": "send", "to": peer, "cmid": cmid, "body": {"type": "text", "text": cmid}}

        def answer(topic: str, data: bytes, rid: str = rid) -> dict[str, Any] | None:
            doc = json.loads(data) if topic == resp else None
            return doc if doc is not None and doc.get("id") == rid else None

        try:
            doc = client.publish(f"roost/req/{client.client_id}", json.dumps(request).encode(), until=answer)
        except Lost:
            retries.append(cmid)    # its fate is unknown: a real client sends it again
            break
        assert doc is not None
        if doc["ok"]:
            result = doc["result"]
            with ledger.lock:
                if cmid in ledger.sent and ledger.sent[cmid] != (result["conv"], result["seq"]):
                    ledger.errors.append(f"{cmid} answered {result} after {ledger.sent[cmid]}")
                ledger.sent[cmid] = (result["conv"], result["seq"])
        elif doc["error"]["code"] in ("unavailable", "rate_limited"):
            retries.append(cmid)    # "retry later" (a loaded machine): nothing was stored
        else:
            ledger.errors.append(f"send {cmid}: {doc['error']}")
    client.close()


def publish_load(roost: RoostProcess, password: str, stop: threading.Event, counter: itertools.count,
                 client_id: str, topic_of: Any, tried: Any, acked: Any, retain: bool = False) -> None:
    """QoS 1 publishes of 1, 2, 3, ... (from `counter`) to `topic_of(k)`, each
    recorded with `tried(k)` before it is sent and `acked(k)` after its PUBACK."""
    try:
        client = RawMqtt(roost, client_id, "alice", password)
    except Lost:
        return
    for _ in range(MAX_OPS):
        if stop.is_set():
            break
        k = next(counter)
        tried(k)
        try:
            client.publish(topic_of(k), str(k).encode(), retain=retain)
        except Lost:
            break
        acked(k)
    client.close()


def q1_load(roost: RoostProcess, password: str, ledger: Ledger, stop: threading.Event,
            counter: itertools.count) -> None:
    publish_load(roost, password, stop, counter, "alice.q1", lambda k: "load/q1/x",
                 ledger.q1_tried.add, ledger.q1_acked.append)


def retained_load(roost: RoostProcess, password: str, ledger: Ledger, stop: threading.Event,
                  counter: itertools.count) -> None:
    def topic(k: int) -> str:
        return f"load/ret/{k % RET_TOPICS}"

    def acked(k: int) -> None:
        ledger.ret_acked[topic(k)] = k

    publish_load(roost, password, stop, counter, "alice.ret", topic,
                 lambda k: ledger.ret_tried.setdefault(topic(k), set()).add(k), acked, retain=True)


def check_mailbox(client: ImClient, ledger: Ledger) -> None:
    msgs = [e for e in sync_all(client) if e["kind"] == "msg"]
    assert {e["conv"] for e in msgs} == {"dm:alice:bob"}
    cmids = Counter(e["cmid"] for e in msgs)
    assert [c for c, n in cmids.items() if n > 1] == [], "stored twice"
    assert sorted(e["seq"] for e in msgs) == list(range(1, len(msgs) + 1)), "seqs with gaps or repeats"
    assert set(cmids) <= ledger.tried
    stored = {e["cmid"]: (e["conv"], e["seq"]) for e in msgs}
    lost = {c: v for c, v in ledger.sent.items() if stored.get(c) != v}
    assert lost == {}, "acknowledged sends missing (or under another seq)"


def test_repeated_sigkill_under_mixed_load_loses_nothing_acknowledged(roost_factory):
    roost = roost_factory({"limits": {"request_rate": 100_000, "request_burst": 100_000,
                                      "max_pending_requests": 10_000, "max_queued": 100_000}})
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    befriend(roost, "alice", apw, "bob", bpw)
    sub = MqttClient("bob.sub", clean_session=False).connect(roost.host, roost.port, username="bob", password=bpw)
    assert sub.subscribe("load/q1/#", 1) == [1]
    sub.disconnect()                       # offline from here on: everything is queued for it

    rng = random.Random(SEED)
    ledger = Ledger()
    cmids, q1s, rets = itertools.count(1), itertools.count(1), itertools.count(1)
    for _round in range(ROUNDS):
        stop = threading.Event()
        loads = [threading.Thread(target=im_load, args=(roost, "alice", apw, "bob", ledger, stop, cmids)),
                 threading.Thread(target=im_load, args=(roost, "bob", bpw, "alice", ledger, stop, cmids)),
                 threading.Thread(target=q1_load, args=(roost, apw, ledger, stop, q1s)),
                 threading.Thread(target=retained_load, args=(roost, apw, ledger, stop, rets))]
        for t in loads:
            t.start()
        time.sleep(rng.uniform(0.3, 1.5))  # let the load run; the kill lands wherever it is
        roost.kill()
        stop.set()
        for t in loads:
            t.join(30)
            assert not t.is_alive()
        roost.start()

    assert ledger.errors == []
    # the load did run (a few hundred of each on a quiet machine)
    assert len(ledger.sent) >= 20 and len(ledger.q1_acked) >= 20 and len(ledger.ret_acked) == RET_TOPICS

    # IM: every acknowledged send exactly once, seqs gap-free, in both mailboxes
    alice, bob = ImClient("alice", "check").open(roost, apw), ImClient("bob", "check").open(roost, bpw)
    check_mailbox(alice, ledger)
    check_mailbox(bob, ledger)
    for cmid in sorted(ledger.sent)[:3]:   # and a retry after all that is recognised
        sender, peer = (alice, "bob") if cmid.startswith("alice") else (bob, "alice")
        r = sender.call("send", to=peer, cmid=cmid, body={"type": "text", "text": "again"})
        assert (r["conv"], r["seq"], r["dup"]) == (*ledger.sent[cmid], True)

    # QoS 1: the persistent subscriber gets every PUBACKed message, once, in order
    sub = MqttClient("bob.sub", clean_session=False).connect(roost.host, roost.port, username="bob", password=bpw)
    assert sub.session_present is True
    got: list[int] = []
    missing = set(ledger.q1_acked)
    for _ in range(len(ledger.q1_tried) + 100):   # until all arrived, then until quiet: no more duplicates
        try:
            k = int(sub.wait_message("load/q1/#", timeout=10 if missing else 1.0).payload)
        except TimeoutError:
            break
        got.append(k)
        missing.discard(k)
    assert sorted(missing) == [], "PUBACKed messages lost"
    assert got == sorted(set(got)), "delivered twice or out of order"
    assert set(got) <= ledger.q1_tried

    # retained: each topic at least as new as its last PUBACKed value
    reader = MqttClient("alice.reader").connect(roost.host, roost.port, username="alice", password=apw)
    reader.subscribe("load/ret/#", 1)
    retained = {}
    for _ in range(RET_TOPICS):
        m = reader.wait_message("load/ret/#")
        assert m.retain
        retained[m.topic] = int(m.payload)
    assert reader.no_message("load/ret/#", wait=0.5)
    for topic in ledger.ret_acked:
        assert ledger.ret_acked[topic] <= retained[topic], topic
        assert retained[topic] in ledger.ret_tried[topic], topic

    assert roost.running
    assert tracebacks(roost) == []
