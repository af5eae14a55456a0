"""Cluster (issue 12): a retained topic changed several times within one NATS hop
ends up the same on every node.

A peer's changes reach a node together (here: held back by a delaying proxy),
and the node's retained writes coalesce: the first change's write commits while
a later one is already in memory. That commit is the peer's change, not this
node's: were it sent back to the peers as the node's own, newest change, they
would replace the later change with it and the nodes would disagree for good."""

from __future__ import annotations

from tests.clients import MqttClient
from tests.harness import RoostProcess
from tests.nats import wait_until
from tests.test_cluster_presence_race import DELAY, DelayingProxy
from tests.test_cluster_routing import node_config, wait_until_formed

CHANGES = 20


def held(node: RoostProcess, topic: str) -> bytes | None:
    """The retained payload of `topic` on `node`, read by a client of its own."""
    reader = MqttClient("retained-reader").connect(node.host, node.port)
    try:
        reader.subscribe(topic, qos=1)
        return reader.wait_message(topic, timeout=2).payload
    except TimeoutError:
        return None
    finally:
        reader.disconnect()


def test_quick_retained_changes_of_a_peer_are_not_sent_back_as_this_nodes(tmp_path, nats_server) -> None:
    names = ["n1", "n2"]
    proxies = {name: DelayingProxy(nats_server.port, DELAY).start() for name in names}
    nodes = {name: RoostProcess(tmp_path / name, node_config(name, proxies[name].url)) for name in names}
    try:
        for node in nodes.values():
            node.start()
        wait_until_formed(nodes)
        n1, n2 = nodes["n1"], nodes["n2"]
        writer = MqttClient("lamp").connect(n2.host, n2.port)
        for i in range(CHANGES):
            writer.publish("house/lamp/state", f"v{i}", qos=1, retain=True)
        last = f"v{CHANGES - 1}".encode()
        wait_until(lambda: held(n2, "house/lamp/state") == last, what="n2 holding the last change")
        wait_until(lambda: held(n1, "house/lamp/state") == last, what="n1 holding the last change")
        # What n1 sends goes to n2 in order: once n2 holds a change n1 made after
        # hearing n2's, anything n1 sent back of n2's changes has arrived too.
        marker = MqttClient("marker").connect(n1.host, n1.port)
        marker.publish("house/marker", "after", qos=1, retain=True)
        marker.disconnect()
        wait_until(lambda: held(n2, "house/marker") == b"after", what="n2 holding n1's later change")
        assert held(n2, "house/lamp/state") == last
        assert held(n1, "house/lamp/state") == last
        writer.disconnect()
    finally:
        for node in nodes.values():
            node.kill()
        for proxy in proxies.values():
            proxy.close()
