"""Cluster (issue 12, item 3): presence stays right when a principal's clients
come and go on two nodes within one NATS hop.

Each node reaches nats-server through a proxy that holds what the server sends
it for DELAY seconds, so a node hears the other's connection changes late: a
phone closing on n1 before n1 heard of the laptop just opened on n2, and a
laptop opening on n2 before n2 heard the phone close on n1. Whichever node
owns the principal's presence (one principal owned by each node), the retained
state on both nodes ends up as what is true: online, one client.

And a whole cluster SIGKILLed with a client connected: once the nodes are
back and have heard each other, its retained `online` is corrected."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from typing import Any

from broker.cluster.node import presence_owner
from tests.clients import MqttClient
from tests.harness import RoostProcess
from tests.nats import wait_until
from tests.test_cluster_routing import NODE_TIMEOUT, node_config, start_nodes, wait_until_formed

DELAY = 0.4
PW = "pw-presence-123"


class DelayingProxy:
    """A TCP proxy to nats-server that passes what the server sends the client
    DELAY seconds late, in order (what the client sends goes straight on)."""

    def __init__(self, target_port: int, delay: float) -> None:
        self._target = target_port
        self._delay = delay
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delaying-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> DelayingProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        async def shut() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self._target)
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                held.put_nowait((time.monotonic() + self._delay, data))

        async def release() -> None:
            while True:
                due, data = await held.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(t()) for t in (upstream, downstream, release)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for w in (client_w, server_w):
                with contextlib.suppress(Exception):
                    w.close()


def connect(node: RoostProcess, principal: str, device: str) -> MqttClient:
    return MqttClient(f"{principal}.{device}").connect(node.host, node.port, username=principal, password=PW)


def retained(node: RoostProcess, principal: str) -> dict[str, Any] | None:
    """The retained presence of `principal` on `node`, read by a transient client of its own."""
    reader = connect(node, principal, "cli-check")
    try:
        reader.subscribe(f"roost/presence/{principal}", qos=1)
        return reader.wait_message(f"roost/presence/{principal}", timeout=2).json()
    except TimeoutError:
        return None
    finally:
        reader.disconnect()


def settles(nodes: dict[str, RoostProcess], principal: str, state: str, clients: int) -> None:
    seen: list[str] = []

    def right() -> bool:
        docs = {name: retained(node, principal) for name, node in nodes.items()}
        seen[:] = [f"{name}: {d}" for name, d in docs.items()]
        return all(d is not None and d["state"] == state and d["clients"] == clients for d in docs.values())
    try:
        wait_until(right, timeout=15, what=f"{principal} {state} with {clients} client(s) on every node",
                   interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; retained: {'; '.join(seen)}") from None


def principals_owned_by(nodes: list[str]) -> list[str]:
    """One principal owned by each node."""
    found: dict[str, str] = {}
    for i in range(1000):
        found.setdefault(presence_owner(f"user{i}", nodes), f"user{i}")
        if len(found) == len(nodes):
            return [found[n] for n in nodes]
    raise AssertionError("no principal for every node")


def test_presence_converges_when_two_nodes_change_it_within_one_hop(tmp_path, nats_server) -> None:
    names = ["n1", "n2"]
    principals = principals_owned_by(names)
    proxies = {name: DelayingProxy(nats_server.port, DELAY).start() for name in names}
    nodes = {name: RoostProcess(tmp_path / name, node_config(name, proxies[name].url)) for name in names}
    try:
        for node in nodes.values():
            for principal in principals:
                node.add_user(principal, PW)
            node.start()
        wait_until_formed(nodes)
        n1, n2 = nodes["n1"], nodes["n2"]
        for principal in principals:
            phone = connect(n1, principal, "phone")
            settles(nodes, principal, "online", 1)
            # the phone closes on n1 before n1 hears of the laptop opened on n2
            laptop = connect(n2, principal, "laptop")
            phone.disconnect()
            settles(nodes, principal, "online", 1)
            phone = connect(n1, principal, "phone")
            settles(nodes, principal, "online", 2)
            # the laptop opens again on n2 before n2 hears that the phone closed on n1
            laptop.disconnect()
            phone.disconnect()
            laptop = connect(n2, principal, "laptop")
            settles(nodes, principal, "online", 1)
            laptop.disconnect()
            settles(nodes, principal, "offline", 0)
    finally:
        for node in nodes.values():
            node.kill()
        for proxy in proxies.values():
            proxy.close()


def stored_presence(node: RoostProcess, principal: str) -> str | None:
    """The state of the retained presence in the node's store (SQLite, read-only)."""
    conn = sqlite3.connect(f"file:{node.config['storage']['path']}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT payload FROM retained WHERE topic = ?", (f"roost/presence/{principal}",)).fetchone()
    finally:
        conn.close()
    return None if row is None or not row[0] else str(json.loads(row[0])["state"])


def test_a_whole_cluster_killed_has_its_retained_presence_corrected(tmp_path, nats_server) -> None:
    nodes = start_nodes(tmp_path, nats_server.url, ["n1", "n2"], users={"alice": PW})
    try:
        phone = connect(nodes["n1"], "alice", "phone")
        settles(nodes, "alice", "online", 1)
        for node in nodes.values():     # written behind: on disk before the kill
            wait_until(lambda n=node: stored_presence(n, "alice") == "online", what="online stored")
        for node in nodes.values():
            node.kill()
        phone.paho.loop_stop()      # gone with the cluster: paho must not reconnect it
        for node in nodes.values():
            node.start()
        wait_until_formed(nodes)
        # the nodes cannot tell at once that nobody holds alice's phone any more
        wait_until(lambda: all((retained(n, "alice") or {}).get("state") == "offline" for n in nodes.values()),
                   timeout=NODE_TIMEOUT + 10, what="alice offline on every node", interval=0.2)
    finally:
        for node in nodes.values():
            node.kill()


def test_presence_owners_move_only_with_the_node_that_joins_or_leaves() -> None:
    principals = [f"user{i}" for i in range(3000)]
    three = {p: presence_owner(p, ["n1", "n2", "n3"]) for p in principals}
    assert all(p_owner == presence_owner(p, ["n3", "n1", "n2"]) for p, p_owner in three.items())  # order-free
    shares = {n: sum(1 for o in three.values() if o == n) for n in ("n1", "n2", "n3")}
    assert min(shares.values()) > 800, shares          # spread over the nodes
    two = {p: presence_owner(p, ["n1", "n2"]) for p in principals}
    moved = [p for p in principals if two[p] != three[p]]
    assert moved and all(three[p] == "n3" for p in moved)   # only n3's principals move when n3 goes
