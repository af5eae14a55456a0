"""Cluster (issue 12 item 4, issue 13): the MQTT 5 will of a client whose node is
SIGKILLed, published by a surviving node as its own node would have: with its
properties (User Property, Content Type, Message Expiry Interval), after its Will
Delay Interval, and not at all when the client connected again within the delay
on another node. Three real broker processes (SQLite each) on a private
nats-server, paho-mqtt v5 clients.

When the survivor noticed the death is read from a canary: a 3.1.1 client on the
same node whose will has no delay (published the moment the death is noticed)."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.cluster import wire
from broker.cluster.peers import Peers
from tests.clients import MqttClient
from tests.harness import RoostProcess
from tests.nats import NatsServer, wait_until
from tests.test_cluster_routing import start_nodes
from tests.test_mqtt5_restart import V5Client

PW = "pw-alice-123"
NODE_TIMEOUT = 1.5
DELAY = 2


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RoostProcess]]:
    root = tmp_path_factory.mktemp("cluster_wills")
    (root / "nats").mkdir()
    server = NatsServer(root / "nats").start()
    nodes = start_nodes(root, server.url, ["n1", "n2", "n3"], users={"alice": PW}, node_timeout=NODE_TIMEOUT)
    yield nodes
    for node in nodes.values():
        node.kill()
    server.remove()


class WillClient:
    """A paho v5 client of alice with a persistent session (so its will may wait)
    and a will carrying properties and a Will Delay Interval."""

    def __init__(self, node: RoostProcess, client_id: str, topic: str, *, delay: int = DELAY,
                 session_expiry: int = 3600) -> None:
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                             reconnect_on_failure=False)
        self.c.username_pw_set("alice", PW)
        will = Properties(PacketTypes.WILLMESSAGE)
        will.WillDelayInterval = delay
        will.UserProperty = [("why", "node-lost")]
        will.ContentType = "text/plain"
        will.MessageExpiryInterval = 600
        self.c.will_set(topic, b"offline", qos=1, retain=True, properties=will)
        self.acks: queue.Queue[int] = queue.Queue()
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.put(rc.value)
        connected: queue.Queue[int] = queue.Queue()
        self.c.on_connect = lambda c, u, f, rc, p: connected.put(rc.value)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        self.c.connect(node.host, node.port, clean_start=False, properties=props)
        self.c.loop_start()
        assert connected.get(timeout=5) == 0

    def pub(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1)
        assert self.acks.get(timeout=5) == 0


class Seen:
    """Every message a V5Client got, kept: waiting for one topic skips none of the others."""

    def __init__(self, sub: V5Client) -> None:
        self.sub = sub
        self.got: list[mqtt.MQTTMessage] = []

    def _on(self, topic: str) -> list[mqtt.MQTTMessage]:
        return [m for m in self.got if m.topic == topic]

    def first(self, topic: str, timeout: float) -> mqtt.MQTTMessage:
        """The first message on `topic`, or AssertionError."""
        deadline = time.monotonic() + timeout
        while not self._on(topic):
            try:
                self.got.append(self.sub.messages.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"nothing on {topic} within {timeout}s") from None
        return self._on(topic)[0]

    def count(self, topic: str, until: float) -> int:
        """How many messages on `topic` came by `until` (monotonic)."""
        while (left := until - time.monotonic()) > 0:
            try:
                self.got.append(self.sub.messages.get(timeout=left))
            except queue.Empty:
                break
        return len(self._on(topic))


def _known_everywhere(victim: WillClient, sub: V5Client) -> None:
    """The victim's node state (its wills) reached the subscriber's node: its
    publishes do (state travels first)."""
    deadline = time.monotonic() + 10
    while True:
        victim.pub("status/probe", b"probe")
        try:
            sub.messages.get(timeout=0.3)
            break
        except queue.Empty:
            assert time.monotonic() < deadline, "the victim's node never reached the subscriber's"
    while True:        # the probes still on their way
        try:
            sub.messages.get(timeout=0.3)
        except queue.Empty:
            return


def _canary(node: RoostProcess, name: str) -> MqttClient:
    canary = MqttClient(name)
    canary.connect(node.host, node.port, will=(f"status/{name}", b"gone", 1, False))
    return canary


def _kill(node: RoostProcess, *clients: Any) -> float:
    killed_at = time.monotonic()
    node.kill()
    for c in clients:       # they would try to reconnect to it
        getattr(c, "paho", getattr(c, "c", None)).loop_stop()
    return killed_at


def test_a_client_connecting_again_elsewhere_within_the_will_delay_has_no_will(three_nodes) -> None:
    n1, n2, n3 = three_nodes["n1"], three_nodes["n2"], three_nodes["n3"]
    sub = V5Client(n1, "alice.watch1", PW)
    sub.sub("status/#")
    lamp = WillClient(n3, "alice.lamp3", "status/lamp3")
    canary = _canary(n3, "canary3")
    _known_everywhere(lamp, sub)
    _kill(n3, lamp, canary)
    seen = Seen(sub)
    noticed = seen.first("status/canary3", NODE_TIMEOUT + 5).timestamp    # n1 (the survivor) noticed
    # within the delay it connects again, on n2: the pending will is cancelled everywhere
    back = V5Client(n2, "alice.lamp3", PW)
    assert time.monotonic() < noticed + DELAY - 0.5, "reconnected too late to test anything"
    assert seen.count("status/lamp3", noticed + DELAY + 1.0) == 0, "the will was published though its client came back"
    back.close()
    sub.close()


def test_a_dead_nodes_v5_will_keeps_its_properties_and_waits_for_its_delay(three_nodes) -> None:
    n1, n2 = three_nodes["n1"], three_nodes["n2"]
    sub = V5Client(n1, "alice.watch2", PW)
    sub.sub("status/#")
    lamp = WillClient(n2, "alice.lamp2", "status/lamp2")
    # its session ends 1 s after the connection: its will then, not after its delay
    short = WillClient(n2, "alice.short2", "status/short2", delay=600, session_expiry=1)
    # gone with DISCONNECT 0x04 (will all the same): its will waits on n2, which dies meanwhile
    bye = WillClient(n2, "alice.bye2", "status/bye2")
    canary = _canary(n2, "canary2")
    _known_everywhere(lamp, sub)
    bye.c.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
    wait_until(lambda: "will of alice.bye2 waits here" in n2.log_path.read_text(errors="replace"), 5,
               "n2 holding the will of alice.bye2")
    killed_at = _kill(n2, lamp, short, bye, canary)
    seen = Seen(sub)
    noticed = seen.first("status/canary2", NODE_TIMEOUT + 5).timestamp
    assert 1 - 0.1 <= seen.first("status/short2", 5).timestamp - noticed < DELAY
    m = seen.first("status/lamp2", DELAY + 5)
    assert m.timestamp - killed_at >= DELAY
    assert m.timestamp - noticed >= DELAY - 0.1, "published before its Will Delay Interval"
    assert seen.first("status/bye2", 5).timestamp - noticed >= DELAY - 0.1
    p: Any = m.properties
    assert (m.payload, m.qos) == (b"offline", 1)
    assert (p.UserProperty, p.ContentType) == ([("why", "node-lost")], "text/plain")
    assert 0 < p.MessageExpiryInterval <= 600
    assert seen.count("status/lamp2", time.monotonic() + 0.5) == 1, "published twice"
    sub.close()
    # retained with its properties
    late = V5Client(n1, "alice.late", PW)
    late.sub("status/lamp2")
    r = Seen(late).first("status/lamp2", 5)
    assert r.retain and r.payload == b"offline"
    assert (r.properties.UserProperty, r.properties.ContentType) == ([("why", "node-lost")], "text/plain")
    late.close()


def test_the_will_announcement_carries_mqtt5_only_when_set_and_a_reconnect_voids_it() -> None:
    plain = wire.Will("dev1#a1", None, "dev1", "status/dev1", b"gone", 1, False)
    assert set(plain.to_doc()) == {"key", "principal", "client_id", "topic", "payload", "qos", "retain"}
    v5 = wire.Will("alice.lamp#b2", "alice", "alice.lamp", "status/lamp", b"off", 1, True, b"\x03\x00\x01x", 60.0, 2.0)
    assert wire.Will.from_doc(wire.decode(wire.encode(v5.to_doc()))) == v5
    assert v5.session_key == "alice.lamp" and v5.size() > plain.size()
    peers = Peers(me="n1", timeout=3, clock=time.monotonic, ask_sync=lambda node: None,
                  on_dead=lambda peer, crashed: None, on_conns=lambda peer, changes: None)
    for name, will in (("n2", v5), ("n3", plain)):
        peers.on_state({"op": "hb", "node": name, "inc": name, "seq": 0})
        peers.on_snapshot({"node": name, "inc": name, "seq": 0, "part": 0, "last": True, "filters": [],
                           "wills": [will.to_doc()], "conns": {}})
    peers.reconnected("alice.lamp", "n2")        # again on its own node: that node's business
    assert "alice.lamp#b2" in peers.peers["n2"].wills
    peers.reconnected("alice.lamp", "n3")        # elsewhere: void
    peers.reconnected("dev1", "n1")
    assert not peers.peers["n2"].wills and not peers.peers["n3"].wills
