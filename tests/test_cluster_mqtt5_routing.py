"""Cluster (issue 12 item 2, issue 13): live publishes between nodes keep what
MQTT 5 gives them. Two real broker processes (SQLite each) on a private
nats-server, paho-mqtt v5 clients."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import pytest

from tests.harness import RoostProcess
from tests.nats import NatsServer
from tests.test_cluster_routing import node_config, wait_until_formed
from tests.test_mqtt5_restart import PROPS, V5Client, assert_props

PW = "pw-alice-123"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RoostProcess]]:
    root = tmp_path_factory.mktemp("cluster5")
    (root / "nats").mkdir()
    server = NatsServer(root / "nats").start()
    nodes = {name: RoostProcess(root / name, node_config(name, server.url)) for name in ("n1", "n2")}
    for node in nodes.values():
        node.add_user("alice", PW)
        node.start()
    wait_until_formed(nodes)
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
    finally:
        pub.close()
        sub.close()
