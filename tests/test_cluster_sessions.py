"""Cluster (issue 12, item 3): persistent MQTT sessions and nodes.

A persistent session's client connecting to another node takes its session
along (subscriptions and the QoS 1 messages it was owed, in order); each
node's sessions in a store the nodes share are its own (a clean stop of one
node neither loads nor wipes another's)."""

from __future__ import annotations

import asyncio

import pytest

from broker.cluster.sessions import NodeSessions
from broker.config import StorageConfig
from broker.store.base import MessageKept, SavedMessage, SavedSession, SessionUpsert
from broker.store.factory import open_store
from tests.clients import MqttClient
from tests.nats import wait_until
from tests.test_cluster_routing import client, start_nodes, until_routed


def test_a_persistent_session_moves_to_the_node_its_client_connects_to(tmp_path, nats_server) -> None:
    nodes = start_nodes(tmp_path, nats_server.url, ["n1", "n2"])
    try:
        n1, n2 = nodes["n1"], nodes["n2"]
        dev = MqttClient("dev9", clean_session=False).connect(n1.host, n1.port)
        dev.subscribe("box/#", qos=1)
        dev.disconnect()
        pub = client(n1, "boxpub")
        for i in range(5):
            pub.publish("box/item", str(i), qos=1)       # kept for dev9's session on n1
        # n2 knows n1 (a publish crosses) before dev9 comes back there
        watch = client(n2, "watch2")
        watch.subscribe("box/probe", qos=0)
        until_routed(pub, watch, "box/probe")

        dev = MqttClient("dev9", clean_session=False)
        dev.connect(n2.host, n2.port)
        assert dev.session_present
        got = [dev.wait_message("box/item").payload for _ in range(5)]
        assert got == [str(i).encode() for i in range(5)]
        # its subscription moved too: publishes on n1 reach it on n2 (once n1 heard of it)
        until_routed(pub, dev, "box/after")
        # and back to n1 while connected on n2: taken over there, the session comes along
        dev.paho.loop_stop()
        again = MqttClient("dev9", clean_session=False)
        again.connect(n1.host, n1.port)
        assert again.session_present
        pub.publish("box/last", b"y", qos=1)
        assert again.wait_message("box/last").payload == b"y"
        # a clean session ends the persistent one wherever it was
        again.disconnect()
        fresh = MqttClient("dev9", clean_session=True).connect(n2.host, n2.port)
        assert not fresh.session_present
        fresh.disconnect()
        back = MqttClient("dev9", clean_session=False)
        back.connect(n1.host, n1.port)
        assert not back.session_present
        back.disconnect()
        watch.disconnect()
        pub.disconnect()
    finally:
        for node in nodes.values():
            node.kill()


def test_a_cluster_node_keeps_its_persistent_sessions_over_a_restart(tmp_path, nats_server) -> None:
    nodes = start_nodes(tmp_path, nats_server.url, ["n1"])
    n1 = nodes["n1"]
    try:
        dev = MqttClient("dev3", clean_session=False).connect(n1.host, n1.port)
        dev.subscribe("s/#", qos=1)
        dev.disconnect()
        pub = client(n1, "spub")
        pub.publish("s/one", b"1", qos=1)
        pub.disconnect()
        n1.restart()
        dev = MqttClient("dev3", clean_session=False)
        wait_until(lambda: dev.connect(n1.host, n1.port) is not None, what="n1 back")
        assert dev.session_present
        assert dev.wait_message("s/one").payload == b"1"
        dev.disconnect()
    finally:
        n1.kill()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_each_node_sees_and_replaces_only_its_own_sessions_in_a_shared_store(tmp_path, request, backend) -> None:
    if backend == "postgres":
        storage = StorageConfig(backend="postgres", dsn=request.getfixturevalue("postgres_dsn"))
    else:
        storage = StorageConfig(path=str(tmp_path / "shared.db"))

    async def run() -> None:
        store = await open_store(storage)
        try:
            a, b = NodeSessions(store.sessions, "a"), NodeSessions(store.sessions, "b")
            msg = SavedMessage(1, "t/x", b"payload", 1)
            await a.apply([SessionUpsert("alice.phone", "alice", "user", {"t/#": 1}, 1.0),
                           MessageKept("alice.phone", msg)])
            await b.apply([SessionUpsert("bob.tv", "bob", "user", {"tv/#": 0}, 2.0)])
            assert [s.client_id for s in await a.load_sessions()] == ["alice.phone"]
            assert [s.client_id for s in await b.load_sessions()] == ["bob.tv"]
            # a clean stop of b replaces b's sessions only
            await b.save_sessions([SavedSession("bob.radio", "bob", "user", {"r/#": 1}, [], [], 0, 3.0)])
            (alice,) = await a.load_sessions()
            assert (alice.subscriptions, [m.payload for m in alice.messages]) == ({"t/#": 1}, [b"payload"])
            assert [s.client_id for s in await b.load_sessions()] == ["bob.radio"]
            # a session handed from a to b: gone from a, b's with its messages
            await b.move(alice, "a")
            assert await a.load_sessions() == []
            assert sorted(s.client_id for s in await b.load_sessions()) == ["alice.phone", "bob.radio"]
            # a dead node's sessions, as a survivor finds them
            (moved,) = [s for s in await b.load_of("b") if s.client_id == "alice.phone"]
            assert [m.payload for m in moved.messages] == [b"payload"]
            await a.drop_of("bob.radio", "b")
            assert [s.client_id for s in await b.load_sessions()] == ["alice.phone"]
        finally:
            await store.close()

    asyncio.run(run())
