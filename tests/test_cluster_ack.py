"""Cluster (issue 12, item 4): a QoS 1 publish sent to another node is
acknowledged to its publisher only once that node has it (and has committed it
for a persistent session there). Before, node 1 answered PUBACK as soon as it
had routed the message: with NATS stalled (a stopped or partitioned server),
the frame sat in node 1's resend window, and node 1 dying then lost a message
its publisher had been told was taken.

The stall is a SIGSTOPped nats-server: node 1 still believes the link is up
(its pings go unanswered for ~10 s before it calls it an outage), so it must
hold the PUBACK; once NATS runs again, node 2 gets the frame, acks it, and the
PUBACK follows. When the other node dies instead (found dead after
cluster.node_timeout), the publisher is closed without its PUBACK: it sends
the message again, and is never told that a message was taken which no node
has."""

from __future__ import annotations

import os
import signal

from tests.clients import MqttClient
from tests.nats import wait_until
from tests.test_cluster_metrics import start_nodes
from tests.test_cluster_routing import client, until_routed
from tests.test_cluster_routing import start_nodes as start_named_nodes
from tests.test_metrics import scrape

WINDOW = ("roost_cluster_resend_window_bytes", ())


def test_puback_waits_until_the_other_node_has_the_message(tmp_path, nats_server) -> None:
    nodes = start_nodes(tmp_path, nats_server.url)       # n1, n2 with /metrics
    n1, n2 = nodes["n1"], nodes["n2"]
    stopped = False
    try:
        far = MqttClient("far", clean_session=False).connect(n2.host, n2.port)
        far.subscribe("ack/#", qos=1)
        pub = MqttClient("pub").connect(n1.host, n1.port)
        until_routed(pub, far, "ack/probe")
        info = pub.paho.publish("ack/flowing", b"1", qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
        assert far.wait_message("ack/flowing").payload == b"1"

        assert nats_server.proc is not None
        os.kill(nats_server.proc.pid, signal.SIGSTOP)
        stopped = True
        info = pub.paho.publish("ack/stalled", b"2", qos=1)
        wait_until(lambda: scrape(n1)[WINDOW] > 0, what="n1 sent the frame to n2 (unacknowledged)")
        info.wait_for_publish(1.0)
        assert not info.is_published(), "PUBACK sent while the only node with a subscriber could not have it"

        os.kill(nats_server.proc.pid, signal.SIGCONT)
        stopped = False
        assert far.wait_message("ack/stalled", timeout=15).payload == b"2"
        info.wait_for_publish(15)
        assert info.is_published()
        wait_until(lambda: scrape(n1)[WINDOW] == 0, what="n2's ack freed n1's window")
        assert scrape(n1)[("roost_cluster_publishes_unconfirmed_total", ())] == 0
        far.disconnect()
        pub.disconnect()
    finally:
        if stopped and nats_server.proc is not None:
            os.kill(nats_server.proc.pid, signal.SIGCONT)
        for node in nodes.values():
            node.kill()


def test_a_publish_for_a_node_that_dies_is_not_acknowledged(tmp_path, nats_server) -> None:
    nodes = start_named_nodes(tmp_path, nats_server.url, ["n1", "n2"], node_timeout=3.0)
    n1, n2 = nodes["n1"], nodes["n2"]
    try:
        far = client(n2, "far-gone", clean_session=False)
        far.subscribe("gone/#", qos=1)
        pub = client(n1, "pub-gone")
        until_routed(pub, far, "gone/probe")
        assert n2.proc is not None
        os.kill(n2.proc.pid, signal.SIGSTOP)     # alive to the kernel, silent to the cluster
        pub.paho.publish("gone/x", b"1", qos=1)
        try:
            wait_until(lambda: "closing pub-gone unacknowledged: node n2 is gone"
                       in n1.log_path.read_text(errors="replace"), timeout=20,
                       what="n1 closing the publisher without the ack once n2 is found dead")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; n1's log:\n{n1.log_path.read_text(errors='replace')[-3000:]}") from None
        pub.disconnect()
    finally:
        for node in nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                os.kill(node.proc.pid, signal.SIGCONT)
            node.kill()
