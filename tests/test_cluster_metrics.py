"""The cluster's figures (issue 12): on /metrics (roost_cluster_*), in `roost
status` (JSON and text) and in $SYS. Two real broker processes on a private
nats-server; then NATS stops and the figures say so."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.services.sysinfo import ClusterFigures, cluster_document, cluster_topics
from client.cli_status import render
from tests.clients import MqttClient
from tests.harness import RoostProcess, free_port
from tests.nats import NatsServer, wait_until
from tests.test_cluster_routing import node_config, wait_until_formed
from tests.test_metrics import base_url, get, scrape
from tests.test_sys_topics import Figures


def start_nodes(root: Path, nats_url: str) -> dict[str, RoostProcess]:
    nodes = {}
    for name in ("n1", "n2"):
        cfg = node_config(name, nats_url)
        cfg["listeners"] = {"web": {"type": "http", "bind": f"127.0.0.1:{free_port()}"}}
        cfg["sys_interval"] = 0.5 if name == "n1" else 0
        nodes[name] = RoostProcess(root / name, cfg).start()
    wait_until_formed(nodes)
    return nodes


@pytest.fixture
def two_nodes(tmp_path: Path, nats_server: NatsServer) -> Iterator[dict[str, RoostProcess]]:
    nodes = start_nodes(tmp_path, nats_server.url)
    yield nodes
    for node in nodes.values():
        node.kill()


def cluster_metric(node: RoostProcess, name: str, **labels: str) -> float | None:
    return scrape(node).get((f"roost_cluster_{name}", tuple(sorted(labels.items()))))


def test_figures_show_the_other_node_then_nats_gone(two_nodes: dict[str, RoostProcess],
                                                    nats_server: NatsServer) -> None:
    n1 = two_nodes["n1"]
    m = scrape(n1)
    assert m[("roost_cluster_node_info", (("node", "n1"),))] == 1
    assert m[("roost_cluster_peer_up", (("node", "n2"),))] == 1
    assert m[("roost_cluster_nodes_alive", ())] == 2
    assert m[("roost_cluster_nats_connected", ())] == 1
    assert m[("roost_cluster_messages_sent_total", ())] > 0       # heartbeats at least
    assert m[("roost_cluster_messages_received_total", ())] > 0
    for zero in ("dropped_messages_total", "dropped_bytes_total", "slow_consumer_total", "nodes_dead_total",
                 "wills_published_total", "sessions_adopted_total"):
        assert m[(f"roost_cluster_{zero}", ())] == 0, zero
    assert m[("roost_dropped_total", (("reason", "cluster_queue_full"),))] == 0

    doc = json.loads(n1.cli("status", "--json").stdout)
    assert doc["cluster"]["node"] == "n1" and doc["cluster"]["peers"] == ["n2"]
    assert doc["cluster"]["nats_connected"] is True and doc["cluster"]["nodes_alive"] == 2
    text = n1.cli("status").stdout
    assert "cluster      node n1, 2 nodes alive (others: n2); NATS connected" in text, text
    svc = MqttClient("ha").connect(n1.host, n1.port, username="ha", password=n1.add_service("ha"))
    assert svc.subscribe("$SYS/broker/cluster/#", 0) == [0]
    sys = Figures(svc)
    # (the retained figures come first: one may be from before n2 joined, up to sys_interval old)
    sys.wait("$SYS/broker/cluster/node", lambda v: v == "n1")
    sys.wait("$SYS/broker/cluster/nodes/alive", lambda v: v == "2")
    sys.wait("$SYS/broker/cluster/nats/connected", lambda v: v == "1")

    nats_server.stop()
    wait_until(lambda: cluster_metric(n1, "nats_connected") == 0, what="n1 seeing NATS gone")
    assert cluster_metric(n1, "nats_reconnects_total") == 1
    assert "NATS NOT CONNECTED" in n1.cli("status").stdout
    assert json.loads(get(base_url(n1) + "/status.json")[1])["cluster"]["nats_connected"] is False
    sys.wait("$SYS/broker/cluster/nats/connected", lambda v: v == "0")
    svc.disconnect()


def test_not_in_a_cluster_no_cluster_figures(tmp_path: Path) -> None:
    node = RoostProcess(tmp_path / "solo", {"listeners": {"web": {"type": "http",
                                                                   "bind": f"127.0.0.1:{free_port()}"}},
                                             "sys_interval": 0}).start()
    try:
        assert not any(name.startswith("roost_cluster_") for name, _ in scrape(node))
        assert "cluster" not in json.loads(node.cli("status", "--json").stdout)
        assert "cluster " not in node.cli("status").stdout
    finally:
        node.kill()


FIGURES = ClusterFigures(node="n1", peers=("n2", "n3"), nats_connected=False, nats_outages=2, sent=10,
                         received=9, queued_bytes=1500, dropped=3, dropped_bytes=300, slow_consumer=1,
                         forwarded=4, from_peers=5, nodes_dead=1, nodes_left=0, resyncs=0, wills_published=2,
                         taken_over=0, sessions_handed=0, sessions_adopted=1)


def test_sys_topics_and_status_lines_of_the_cluster() -> None:
    t = cluster_topics(FIGURES)
    assert t["$SYS/broker/cluster/node"] == "n1"
    assert t["$SYS/broker/cluster/nodes/alive"] == "3"
    assert t["$SYS/broker/cluster/nats/connected"] == "0"
    assert t["$SYS/broker/cluster/nats/dropped/messages"] == "3"
    assert t["$SYS/broker/cluster/nats/dropped/bytes"] == "300"
    assert t["$SYS/broker/cluster/nats/slow_consumer"] == "1"
    assert t["$SYS/broker/cluster/wills/published"] == "2"
    assert all("+" not in k and "#" not in k for k in t)
    doc = {"version": "x", "uptime": 5, "ready": True, "listeners": [],
           "connections": {"current": 0, "maximum": 0, "accepted": 0},
           "sessions": {"total": 0, "disconnected": 0, "subscriptions": 0},
           "messages": {"received": 0, "sent": 0, "inflight": 0, "queued": 0, "queued_bytes": 0},
           "retained": {"count": 0, "bytes": 0},
           "store": {"path": "/x/roost.db", "bytes": 0, "writable": True}, "cluster": cluster_document(FIGURES)}
    lines = render(doc).splitlines()
    assert "  store        /x/roost.db, 0 B, writable" in lines     # SQLite: as before PostgreSQL
    cl = [i for i, line in enumerate(lines) if line.startswith("  cluster ")]
    assert len(cl) == 1
    assert lines[cl[0]] == "  cluster      node n1, 3 nodes alive (others: n2, n3); NATS NOT CONNECTED, 2 reconnects"
    assert "3 dropped (300 B), 1 slow-consumer losses" in lines[cl[0] + 1]
    assert "1 dead nodes, 2 wills published for them, 1 sessions adopted" in lines[cl[0] + 2]


def test_status_names_a_postgres_store_by_its_dsn_without_password(tmp_path: Path, postgres_dsn: str) -> None:
    dsn = postgres_dsn.replace("roost@", "roost:s3cret@", 1)   # trust auth: the password is ignored, not shown
    assert "s3cret" in dsn
    node = RoostProcess(tmp_path / "pg", {"storage": {"backend": "postgres", "dsn": dsn},
                                          "listeners": {"web": {"type": "http", "bind": f"127.0.0.1:{free_port()}"}},
                                          "sys_interval": 0}).start()
    try:
        shown = postgres_dsn   # postgresql://roost@127.0.0.1:PORT/DB
        text = node.cli("status").stdout
        line = next(line for line in text.splitlines() if line.startswith("  store "))
        assert line.startswith(f"  store        postgres {shown}, ") and line.endswith(", writable"), line
        assert "s3cret" not in text
        doc = json.loads(node.cli("status", "--json").stdout)["store"]
        assert (doc["engine"], doc["location"]) == ("postgres", shown)
        assert doc["bytes"] > 0                                        # pg_database_size
        assert scrape(node)[("roost_store_bytes", ())] > 0
    finally:
        node.kill()
