"""Cluster (issue 12 item 2, issue 13): live publishes between nodes keep what
MQTT 5 gives them, and a shared subscription group spread over nodes gets each
message once in the whole cluster. Two real broker processes (SQLite each) on a
private nats-server, paho-mqtt clients (v5, and 3.1.1 for the group members)."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import pytest

from broker.cluster import wire
from broker.cluster.peers import ShareGroups
from tests.clients import MqttClient
from tests.harness import RoostProcess
from tests.nats import NatsServer, wait_until
from tests.test_cluster_routing import NODE_TIMEOUT, client, start_nodes
from tests.test_mqtt5_restart import PROPS, V5Client, assert_props
from tests.test_mqtt_helpers import RawClient

PW = "pw-alice-123"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RoostProcess]]:
    root = tmp_path_factory.mktemp("cluster5")
    (root / "nats").mkdir()
    server = NatsServer(root / "nats").start()
    nodes = start_nodes(root, server.url, ["n1", "n2"], users={"alice": PW})
    yield nodes
    for node in nodes.values():
        node.kill()
    server.remove()


def until_routed5(pub: V5Client, sub: V5Client, topic: str) -> None:
    """Probes until `sub` (on the other node) gets one: its node's interest is known."""
    deadline = time.monotonic() + 10
    while True:
        pub.pub(topic, b"probe")
        try:
            sub.messages.get(timeout=0.2)
            break
        except queue.Empty:
            assert time.monotonic() < deadline, f"{topic} never reached the other node"
    while True:
        try:
            sub.messages.get(timeout=0.3)
        except queue.Empty:
            return


def test_v5_properties_expiry_and_retain_as_published_cross_nodes(two_nodes) -> None:
    n1, n2 = two_nodes["n1"], two_nodes["n2"]
    later = V5Client(n2, "alice.later", PW, clean_start=False, session_expiry=3600)
    assert later.sub("m5/q/#", sub_id=3) == [1]
    later.close()                  # offline: what is published meanwhile waits for it on n2
    sub = V5Client(n2, "alice.sub", PW)
    assert sub.sub("m5/rap/#", sub_id=9, retainAsPublished=True) == [1]
    assert sub.sub("m5/plain/#", sub_id=10) == [1]
    pub = V5Client(n1, "alice.pub", PW)
    try:
        until_routed5(pub, sub, "m5/plain/probe")
        pub.pub("m5/rap/a", b"a", retain=True, MessageExpiryInterval=3600, **PROPS)
        m = sub.next()
        assert (m.topic, m.payload, m.retain, m.properties.SubscriptionIdentifier) == ("m5/rap/a", b"a", 1, [9])
        assert_props(m)        # User Properties in order, Content Type, Response Topic, Correlation Data, format
        assert 3590 < m.properties.MessageExpiryInterval <= 3600
        pub.pub("m5/plain/b", b"b", retain=True, **PROPS)      # no Retain As Published here: RETAIN 0
        m = sub.next()
        assert (m.topic, m.retain, m.properties.SubscriptionIdentifier) == ("m5/plain/b", 0, [10])
        assert_props(m)
        assert not hasattr(m.properties, "MessageExpiryInterval")

        # the time left keeps counting on the receiving node: an expired message is not delivered
        pub.pub("m5/q/short", b"short", MessageExpiryInterval=2, **PROPS)
        pub.pub("m5/q/long", b"long", MessageExpiryInterval=3600, **PROPS)
        time.sleep(2.5)          # the time under test: the short one's 2 s pass on n2
        later = V5Client(n2, "alice.later", PW, clean_start=False, session_expiry=3600)
        assert later.session_present is True
        m = later.next()
        assert (m.topic, m.payload, m.properties.SubscriptionIdentifier) == ("m5/q/long", b"long", [3])
        assert_props(m)
        assert 3590 < m.properties.MessageExpiryInterval <= 3598
        with pytest.raises(queue.Empty):
            later.messages.get(timeout=0.5)
        later.close()

        # the retained message reached n2 with its properties and the time left of its expiry
        def retained_on_n2():
            fresh = V5Client(n2, "alice.fresh", PW)
            try:
                fresh.sub("m5/rap/a")
                return fresh.messages.get(timeout=0.5)
            except queue.Empty:
                return None
            finally:
                fresh.close()

        m = wait_until(retained_on_n2, what="the retained message on n2")
        assert (m.payload, m.retain) == (b"a", 1)
        assert_props(m)
        assert 3590 < m.properties.MessageExpiryInterval <= 3598
    finally:
        pub.close()
        sub.close()


def _received(member: MqttClient, into: list[int]) -> None:
    while True:
        try:
            into.append(int(member.messages.get_nowait().payload))
        except queue.Empty:
            return


def test_a_member_leaving_with_unacknowledged_messages_hands_them_to_a_member_on_another_node(two_nodes) -> None:
    """The group's only member on n2 leaves holding its share unacknowledged
    (QoS 1 not acked): n2 gives those messages to the member on n1."""
    n1, n2 = two_nodes["n1"], two_nodes["n2"]
    m1 = client(n1, "keeper1")
    pub = client(n1, "rdpub")
    assert m1.subscribe("$share/rd/rd/#") == [1]
    leaver = RawClient(n2.port)
    leaver.connect("leaver2", username=None, password=None)
    assert leaver.subscribe("$share/rd/rd/#", 1) == [1]
    assert leaver.subscribe("rdprobe", 0, pid=2) == [0]     # announced after its membership
    leaver.s.settimeout(0.2)
    deadline = time.monotonic() + 10
    while True:
        pub.publish("rdprobe", b"probe", qos=1)
        try:
            assert leaver.read_publish()[0] == "rdprobe"
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "n1 never learnt n2's membership"
    leaver.s.settimeout(5)
    n = 20
    for i in range(n):
        pub.publish("rd/job", str(i), qos=1)
    got1: list[int] = []
    unacked: list[int] = []
    while len(got1) + len(unacked) < n:
        _received(m1, got1)
        leaver.s.settimeout(0.2)
        try:
            topic, payload, qos, _pid, _dup, _retain = leaver.read_publish()
        except TimeoutError:
            continue
        if topic == "rd/job":
            assert qos == 1
            unacked.append(int(payload))       # never acknowledged
    assert unacked and got1, (got1, unacked)
    leaver.s.close()             # leaves with them: they go to keeper1 on n1
    wait_until(lambda: _received(m1, got1) or len(got1) >= n, what="the unacknowledged ones at keeper1")
    assert sorted(got1) == list(range(n)), (got1, unacked)
    m1.disconnect()
    pub.disconnect()


def test_a_shared_group_on_two_nodes_gets_each_message_once(two_nodes) -> None:
    """Members on n1 and n2, the publisher on n1: each message goes to one of
    them, both get some, a plain subscriber gets all. Then n2's only member is
    an offline persistent one: the connected member on n1 gets all. Then n2 is
    killed with a connected member: once it is declared dead its share goes to
    the member on n1. (Last in the module: it kills n2.)"""
    n1, n2 = two_nodes["n1"], two_nodes["n2"]
    m1 = client(n1, "member1")
    m2 = client(n2, "member2")
    plain = client(n2, "plain")
    pub = client(n1, "shpub")
    assert m1.subscribe("$share/workers/sh/#") == [1]
    assert m2.subscribe("$share/workers/sh/#") == [1]
    assert plain.subscribe("sh/#") == [1]
    assert plain.subscribe("shprobe") == [1]     # announced after m2's membership: n1 knows both once it routes
    deadline = time.monotonic() + 10
    while True:
        pub.publish("shprobe", b"probe", qos=1)
        if not plain.no_message("shprobe", wait=0.2):
            break
        assert time.monotonic() < deadline, "n1 never learnt n2's interest"

    n = 40
    for i in range(n):
        pub.publish("sh/job", str(i), qos=1)
    got1: list[int] = []
    got2: list[int] = []

    def all_in() -> bool:
        _received(m1, got1)
        _received(m2, got2)
        return len(got1) + len(got2) >= n

    wait_until(all_in, what="every message at one member")
    assert [int(plain.wait_message("sh/#").payload) for _ in range(n)] == list(range(n))
    time.sleep(0.5)          # any duplicate would arrive by now
    _received(m1, got1)
    _received(m2, got2)
    assert sorted(got1 + got2) == list(range(n)), (got1, got2)
    assert len(got1) >= n // 4 and len(got2) >= n // 4, (got1, got2)   # weighted round-robin: 20 each

    # n2's members now: only a persistent one, offline; the connected member on n1 gets every message
    m3 = MqttClient("member3", clean_session=False).connect(n2.host, n2.port)
    assert m3.subscribe("$share/workers/sh/#") == [1]
    m3.disconnect()
    m2.disconnect()
    assert plain.subscribe("shprobe2") == [1]    # announced after those: n1 knows them once it routes
    while plain.no_message("shprobe2", wait=0.2):
        pub.publish("shprobe2", b"probe", qos=1)
    got1.clear()
    for i in range(10):
        pub.publish("sh/job", str(i), qos=1)
    wait_until(lambda: _received(m1, got1) or len(got1) >= 10, what="the connected member getting all")
    assert sorted(got1) == list(range(10))

    # n2, with a connected member again, dies: its share goes to n1's member once n2 is declared dead
    m4 = client(n2, "member4")
    assert m4.subscribe("$share/workers/sh/#") == [1]
    assert plain.subscribe("shprobe3") == [1]
    while plain.no_message("shprobe3", wait=0.2):
        pub.publish("shprobe3", b"probe", qos=1)
    n2.kill()
    wait_until(lambda: "node n2 not heard from" in n1.log_path.read_text(errors="replace"),
               NODE_TIMEOUT + 10, "n1 declaring n2 dead")
    got1.clear()
    for i in range(10):
        pub.publish("sh/job", str(i), qos=1)
    wait_until(lambda: _received(m1, got1) or len(got1) >= 10, what="the survivor's member getting all")
    assert sorted(got1) == list(range(10))
    for c in (m1, pub):
        c.disconnect()


def test_the_publish_frame_is_compact_and_checked() -> None:
    """In process: a 3.1.1 publish's frame is the QoS byte, topic and payload
    (as before MQTT 5); the optional parts round-trip; a cut frame is refused."""
    assert wire.encode_publish("a/b", b"hi", 1) == b"\x01\x00\x03a/bhi"
    assert wire.decode_publish(b"\x01\x00\x03a/bhi") == ("a/b", b"hi", 1, False, None, None, ())
    full = wire.encode_publish("a/b", b"hi", 2, True, b"\x03\x00\x01x", 12.5, ["$share/g/a/#"])
    assert wire.decode_publish(full) == ("a/b", b"hi", 2, True, b"\x03\x00\x01x", 12.5, ("$share/g/a/#",))
    for cut in range(len(full) - len(b"hi")):
        with pytest.raises(ValueError):
            wire.decode_publish(full[:cut])
    with pytest.raises(ValueError):
        wire.decode_publish(b"\x83\x00\x01a")       # unknown flag bit


def test_share_groups_pick_by_connected_members() -> None:
    """In process: turns in proportion to connected members; offline ones only
    when nobody is connected; a node gone leaves the count."""
    groups = ShareGroups()
    groups.set("$share/g/t/#", "n1", 1, 1)
    groups.set("$share/g/t/#", "n2", 3, 2)
    turns = [next(iter(groups.pick("t/x") or {})) for _ in range(30)]
    assert (turns.count("n1"), turns.count("n2")) == (10, 20)
    assert groups.pick("other") == {}
    groups.set("$share/g/t/#", "n2", 3, 0)
    assert {next(iter(groups.pick("t/x") or {})) for _ in range(5)} == {"n1"}
    groups.set("$share/g/t/#", "n1", 1, 0)            # nobody connected: by members
    turns = [next(iter(groups.pick("t/x") or {})) for _ in range(8)]
    assert (turns.count("n1"), turns.count("n2")) == (2, 6)
    assert groups.elsewhere("$share/g/t/#", "n2") == "n1"
    groups.drop_node("n1")
    groups.drop_node("n2")
    assert groups.pick("t/x") is None and groups.elsewhere("$share/g/t/#", "n1") is None
