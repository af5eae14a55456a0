"""Cluster (issue 12, item 2): plain MQTT across nodes on a real nats-server.

Three real broker processes, each on its own SQLite file, meet on a private
nats-server; real MQTT clients on different nodes. A NATS observer (nats-py)
sees which node subjects publishes travel on: only nodes with matching interest
receive them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.clients import MqttClient
from tests.harness import RoostProcess
from tests.nats import NatsServer, wait_until

NODE_TIMEOUT = 3


def node_config(name: str, nats_url: str) -> dict[str, Any]:
    return {"cluster": {"node": name, "nats": {"servers": [nats_url]}, "node_timeout": NODE_TIMEOUT},
            "auth": {"allow_anonymous": True}, "sys_interval": 0}


def start_nodes(root: Path, nats_url: str, names: list[str], *, users: dict[str, str] | None = None,
                node_timeout: float = NODE_TIMEOUT) -> dict[str, RoostProcess]:
    """A formed cluster of `names`, each node with its own store holding `users` (name: password)."""
    nodes = {}
    for name in names:
        config = node_config(name, nats_url)
        config["cluster"]["node_timeout"] = node_timeout
        nodes[name] = RoostProcess(root / name, config)
    for node in nodes.values():
        for user, password in (users or {}).items():
            node.add_user(user, password)
        node.start()
    wait_until_formed(nodes)
    return nodes


def wait_until_formed(nodes: dict[str, RoostProcess]) -> None:
    """Every node has heard every other (each logs "node <name> joined")."""
    for name, node in nodes.items():
        for other in nodes:
            if other != name:
                wait_until(lambda n=node, o=other: f"node {o} joined" in n.log_path.read_text(errors="replace"),
                           what=f"{name} hearing {other}")


class NatsWatch:
    """Subjects seen on NATS under `pattern`, from a client of its own."""

    def __init__(self, url: str, pattern: str) -> None:
        self.subjects: list[str] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(url, pattern)), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the NATS observer did not connect"

    async def _run(self, url: str, pattern: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await nats.connect(url)

        async def seen(msg: Any) -> None:
            self.subjects.append(msg.subject)

        await nc.subscribe(pattern, cb=seen)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


def client(node: RoostProcess, cid: str, **kw: Any) -> MqttClient:
    will = kw.pop("will", None)
    return MqttClient(cid, **kw).connect(node.host, node.port, will=will)


def until_routed(pub: MqttClient, sub: MqttClient, topic: str, timeout: float = 10.0) -> None:
    """Publish probes until `sub` (on another node) receives one: the publisher's
    node has learnt the subscriber's interest. Then drain the probes."""
    deadline = time.monotonic() + timeout
    while True:
        pub.publish(topic, b"probe", qos=0)
        try:
            sub.wait_message(topic, timeout=0.2)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic} never reached the other node") from None
    while not sub.no_message(topic, wait=0.3):
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, dict[str, RoostProcess]]]:
    root = tmp_path_factory.mktemp("cluster")
    (root / "nats").mkdir()
    server = NatsServer(root / "nats").start()
    nodes = start_nodes(root, server.url, ["n1", "n2", "n3"])
    yield server, nodes
    for node in nodes.values():
        node.kill()
    server.remove()


def test_publish_reaches_only_interested_nodes_with_wildcards_and_qos(cluster) -> None:
    server, nodes = cluster
    watch = NatsWatch(server.url, "roost.pub.>")
    sub2 = client(nodes["n2"], "sub2")
    sub3 = client(nodes["n3"], "sub3")
    pub1 = client(nodes["n1"], "pub1")
    try:
        assert sub2.subscribe("home/+/temp", qos=1) == [1]
        until_routed(pub1, sub2, "home/probe/temp")
        watch.subjects.clear()
        for i in range(30):
            pub1.publish("home/kitchen/temp", str(i), qos=1)
        got = [sub2.wait_message("home/kitchen/temp") for _ in range(30)]
        assert [m.payload for m in got] == [str(i).encode() for i in range(30)]   # in order, none lost
        assert {m.qos for m in got} == {1}
        # n3 has no interest in home/...: nothing was sent to it
        wait_until(lambda: len(watch.subjects) >= 30, what="30 publishes seen on NATS")
        assert set(watch.subjects) == {"roost.pub.n2"}, set(watch.subjects)
        assert sub3.no_message(wait=0.3)

        # a QoS 0 subscription on n3 gets QoS 1 publishes at QoS 0 (min of both), multi-level wildcard
        assert sub3.subscribe("home/#", qos=0) == [0]
        until_routed(pub1, sub3, "home/probe/x")
        pub1.publish("home/hall/temp", "21", qos=1)
        m3 = sub3.wait_message("home/hall/temp")
        assert (m3.payload, m3.qos) == (b"21", 0)
        assert sub2.wait_message("home/hall/temp").qos == 1

        # a publish from n3 reaches n2 too (any node to any node); unsubscribing stops it
        until_routed(client(nodes["n3"], "pub3"), sub2, "home/probe/temp")
        sub3.unsubscribe("home/#")
        watch.subjects.clear()

        def n3_left_out() -> bool:
            watch.subjects.clear()
            pub1.publish("home/gone/temp", b"x", qos=1)
            sub2.wait_message("home/gone/temp")
            wait_until(lambda: "roost.pub.n2" in watch.subjects, what="the publish seen on NATS")
            return sub3.no_message("home/gone/temp", wait=0.1) and "roost.pub.n3" not in watch.subjects

        wait_until(n3_left_out, what="n3's interest withdrawn")
    finally:
        watch.close()
        for c in (sub2, sub3, pub1):
            c.disconnect()


def test_retained_messages_are_seen_on_every_node(cluster) -> None:
    _, nodes = cluster
    pub = client(nodes["n1"], "rpub")
    pub.publish("cfg/mode", "eco", qos=1, retain=True)

    def retained_on(node: RoostProcess) -> bytes | None:
        c = client(node, f"rsub-{node.config['cluster']['node']}")
        try:
            c.subscribe("cfg/mode", qos=1)
            try:
                m = c.wait_message("cfg/mode", timeout=0.5)
            except TimeoutError:
                return None
            assert m.retain
            return m.payload
        finally:
            c.disconnect()

    for name in ("n2", "n3"):
        assert wait_until(lambda n=name: retained_on(nodes[n]) == b"eco", what=f"retained on {name}")
    # cleared on n3: gone on n1 too
    clearer = client(nodes["n3"], "rclear")
    clearer.publish("cfg/mode", b"", qos=1, retain=True)
    wait_until(lambda: retained_on(nodes["n1"]) is None, what="retained cleared on n1")
    clearer.disconnect()
    pub.disconnect()


def test_client_id_connecting_on_another_node_takes_over(cluster) -> None:
    _, nodes = cluster
    watcher = client(nodes["n2"], "will-watch")
    watcher.subscribe("status/dev7", qos=1)
    old = client(nodes["n1"], "dev7", will=("status/dev7", b"gone", 1, False))
    # paho reconnects a second after a close; on a slow machine that came before the
    # loop_stop below and took the id back from `new`: no reconnect within the test
    old.paho.reconnect_delay_set(min_delay=120, max_delay=120)
    new = client(nodes["n2"], "dev7")
    assert old.wait_disconnected(5), "the connection on n1 was not closed"
    old.paho.loop_stop()
    new.publish("status/dev7", b"alive", qos=1)   # the new connection works
    assert watcher.wait_message("status/dev7").payload == b"alive"
    assert watcher.no_message("status/dev7", wait=0.5)   # taken over: no will
    new.disconnect()
    watcher.disconnect()


def test_a_killed_node_is_noticed_and_its_clients_wills_published_once(tmp_path, nats_server) -> None:
    nodes = start_nodes(tmp_path, nats_server.url, ["a", "b", "c"])
    try:
        watch_a = client(nodes["a"], "watch-a")
        watch_c = client(nodes["c"], "watch-c")
        for w in (watch_a, watch_c):
            w.subscribe("status/#", qos=1)
        victim = client(nodes["b"], "lamp", will=("status/lamp", b"offline", 1, True))
        polite = client(nodes["b"], "fan", will=("status/fan", b"offline", 1, False))
        polite.disconnect()   # a clean DISCONNECT: no will, on any node
        # b's wills are known to a and c once b's publishes reach them (state travels first)
        until_routed(victim, watch_a, "status/probe")
        until_routed(victim, watch_c, "status/probe")
        killed_at = time.monotonic()
        nodes["b"].kill()
        victim.paho.loop_stop()   # it would try to reconnect to b
        m = watch_a.wait_message("status/lamp", timeout=NODE_TIMEOUT + 5)
        assert (m.payload, m.qos) == (b"offline", 1)
        assert time.monotonic() - killed_at < NODE_TIMEOUT + 4
        assert watch_c.wait_message("status/lamp").payload == b"offline"
        # published once (by the first survivor), and the polite client's will never
        assert watch_a.no_message("status/lamp", wait=1.0) and watch_a.no_message("status/fan", wait=0.1)
        assert watch_c.no_message("status/lamp", wait=0.1) and watch_c.no_message("status/fan", wait=0.1)
        # the will was retained: on both survivors
        late = client(nodes["c"], "late")
        late.subscribe("status/lamp", qos=1)
        assert late.wait_message("status/lamp").payload == b"offline"
        late.disconnect()
    finally:
        for node in nodes.values():
            node.kill()


def test_a_node_stopping_cleanly_is_forgotten_at_once_without_wills(tmp_path, nats_server) -> None:
    nodes = start_nodes(tmp_path, nats_server.url, ["a", "b"])
    try:
        watcher = client(nodes["a"], "watch")
        watcher.subscribe("status/#", qos=1)
        holder = client(nodes["b"], "plug", will=("status/plug", b"offline", 1, False))
        until_routed(holder, watcher, "status/probe")
        assert nodes["b"].stop() == 0     # SIGTERM: a clean stop
        wait_until(lambda: "node b left" in nodes["a"].log_path.read_text(errors="replace"), 5, "a hearing b leave")
        assert watcher.no_message("status/plug", wait=NODE_TIMEOUT + 1)   # neither b nor a published it
        holder.paho.loop_stop()
    finally:
        for node in nodes.values():
            node.kill()
