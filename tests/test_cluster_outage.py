"""Cluster (issue 12, item 4): a NATS outage. Local delivery goes on while NATS
is down; what was published for other nodes meanwhile waits (bounded) and is
delivered once NATS is back, in order; nobody is declared dead meanwhile."""

from __future__ import annotations

from tests.clients import MqttClient
from tests.test_cluster_routing import client, start_nodes, until_routed


def test_nats_outage_keeps_local_delivery_and_resumes_cross_node(tmp_path, nats_server) -> None:
    nodes = start_nodes(tmp_path, nats_server.url, ["n1", "n2"])
    try:
        far = MqttClient("far", clean_session=False).connect(nodes["n2"].host, nodes["n2"].port)
        far.subscribe("plant/#", qos=1)
        near = client(nodes["n1"], "near")
        near.subscribe("plant/#", qos=1)
        will_holder = client(nodes["n2"], "sensor", will=("plant/sensor/status", b"lost", 1, False))
        pub = client(nodes["n1"], "pub")
        until_routed(pub, far, "plant/probe")
        while not near.no_message("plant/probe", wait=0.2):
            pass

        nats_server.kill()
        for i in range(20):
            pub.publish("plant/level", str(i), qos=1)
        # local delivery does not wait for NATS
        assert [near.wait_message("plant/level").payload for _ in range(20)] == [str(i).encode() for i in range(20)]

        nats_server.start()
        # what waited is delivered, in order, once NATS is back
        got = [far.wait_message("plant/level", timeout=15).payload for _ in range(20)]
        assert got == [str(i).encode() for i in range(20)]
        # cross-node delivery goes on both ways, and n2 was not declared dead (no will of its client)
        pub.publish("plant/after", b"1", qos=1)
        assert far.wait_message("plant/after").payload == b"1"
        back = client(nodes["n2"], "back")
        until_routed(back, near, "plant/from-n2")
        assert near.no_message("plant/sensor/status", wait=0.5)
        will_holder.disconnect()
        far.disconnect()
    finally:
        for node in nodes.values():
            node.kill()
