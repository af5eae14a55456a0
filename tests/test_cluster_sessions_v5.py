"""Cluster (issue 12 item 3, issue 13): a persistent MQTT 5 session keeps its
MQTT 5 state when it moves between nodes (real nats-server, one PostgreSQL,
paho-mqtt v5 clients): handed over to the node its client connects to, and
taken over from the store by a survivor after its node was SIGKILLed. The
state: Session Expiry Interval, subscription options (No Local, Retain As
Published) and identifiers, queued messages' properties and the time left of
their Message Expiry Interval (it keeps counting). And a client reconnecting
to another node before its killed node is declared dead waits for its
session instead of getting a fresh one."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from broker.cluster import wire
from broker.cluster.sessions import NodeSessions
from broker.config import StorageConfig
from broker.store.base import SavedMessage, SavedSession
from broker.store.factory import open_store
from tests.clients import MqttClient
from tests.nats import wait_until
from tests.test_cluster_im import pg_nodes
from tests.test_cluster_routing import NODE_TIMEOUT, client
from tests.test_mqtt5_restart import PROPS, V5Client, assert_props

PW = "pw-alice-123"


def session(node, client_id: str = "alice.dev", expiry: int = 3600, **kw) -> V5Client:
    return V5Client(node, client_id, PW, clean_start=False, session_expiry=expiry, **kw)


def test_a_v5_session_moves_and_is_adopted_with_its_mqtt5_state(tmp_path, nats_server, postgres_dsn) -> None:
    nodes = pg_nodes(tmp_path, nats_server.url, postgres_dsn, ["n1", "n2"], users=("alice",))
    n1, n2 = nodes["n1"], nodes["n2"]
    try:
        dev = session(n1)
        assert dev.sub("v5/h/#", sub_id=42, noLocal=True, retainAsPublished=True) == [1]
        assert dev.sub("v5/p/#", sub_id=7) == [1]
        dev.close()
        short = session(n2, "alice.short", expiry=2)      # ends 2 s after it left (not limits.session_expiry)
        assert short.sub("v5/x/#") == [1]
        short.close()
        pub = V5Client(n1, "alice.pub", PW)
        pub.pub("v5/h/a", b"ha", retain=True, MessageExpiryInterval=3600, **PROPS)   # queued for dev on n1
        pub.pub("v5/p/b", b"pb", retain=True, MessageExpiryInterval=3600, **PROPS)
        pub.close()

        # dev connects to n2: its session is handed over from n1, MQTT 5 state and all
        dev = session(n2)
        assert dev.session_present is True
        got = [dev.next(), dev.next()]
        assert [(m.topic, m.retain, m.properties.SubscriptionIdentifier) for m in got] == [
            ("v5/h/a", 1, [42]), ("v5/p/b", 0, [7])]      # Retain As Published on v5/h/# only
        for m in got:
            assert_props(m)
            assert 3500 < m.properties.MessageExpiryInterval <= 3600
        dev.pub("v5/h/own", b"mine")           # No Local: not delivered back
        other = V5Client(n2, "alice.other", PW)
        other.pub("v5/h/theirs", b"theirs")
        m = dev.next()
        assert (m.topic, m.properties.SubscriptionIdentifier) == ("v5/h/theirs", [42])
        assert dev.messages.empty()
        dev.close()
        other.pub("v5/h/short", b"s", MessageExpiryInterval=2, **PROPS)    # expires before it is delivered
        other.pub("v5/h/c", b"hc", retain=True, MessageExpiryInterval=3600, **PROPS)
        other.close()
        left = time.monotonic()

        # n2 SIGKILLed: n1 takes its sessions over from the store, with their MQTT 5 state
        n2.kill()
        wait_until(lambda: "took over 2 persistent session(s) of node n2" in n1.log_path.read_text(),
                   NODE_TIMEOUT + 10, "n1 taking over n2's sessions")
        assert time.monotonic() - left > 2
        dev = session(n1)
        assert dev.session_present is True
        m = dev.next()          # v5/h/short expired meanwhile
        assert (m.topic, m.payload, m.retain, m.properties.SubscriptionIdentifier) == ("v5/h/c", b"hc", 1, [42])
        assert_props(m)
        assert 3500 < m.properties.MessageExpiryInterval <= 3600
        dev.pub("v5/h/own2", b"mine")          # No Local still
        other = V5Client(n1, "alice.other", PW)
        other.pub("v5/h/theirs2", b"theirs")
        other.close()
        assert dev.next().topic == "v5/h/theirs2"
        assert dev.messages.empty()
        dev.close()
        short = session(n1, "alice.short", expiry=2)
        assert short.session_present is False     # its 2 s Session Expiry Interval came along
        short.close()
    finally:
        for node in nodes.values():
            node.kill()


def test_a_moved_session_keeps_its_mqtt5_state_in_the_shared_store(postgres_dsn) -> None:
    """What a node writes when it takes a session (hand-over or adoption): the
    rows a later restart or survivor loads carry the MQTT 5 state too; and the
    hand-over's NATS documents carry all of it."""
    saved = SavedSession("alice|alice.dev", "alice", "user", {"v5/h/#": 1}, [
        SavedMessage(1, "v5/h/a", b"ha", 1, True, None, 0, b"\x03\x00\x0atext/plain", time.time() + 3600)],
        [], 0, time.time(), 3600.0, {"v5/h/#": (0x0D, 42)})
    assert wire.session_from_parts([wire.decode(wire.encode(p)) for p in wire.session_parts(saved)]) == saved

    async def run() -> None:
        store = await open_store(StorageConfig(backend="postgres", dsn=postgres_dsn))
        try:
            a, b = NodeSessions(store.sessions, "a"), NodeSessions(store.sessions, "b")
            await a.save_sessions([saved])
            await b.move(saved, "a")
            (moved,) = await b.load_sessions()
            assert (moved.expiry, moved.subscription_options) == (3600.0, {"v5/h/#": (0x0D, 42)})
            assert moved.messages == saved.messages
        finally:
            await store.close()

    asyncio.run(run())


def test_a_client_back_before_its_killed_node_is_declared_dead_resumes_its_session(
        tmp_path, nats_server, postgres_dsn) -> None:
    """Both clients reach another node while n1 is silent, not yet dead: each
    CONNACK waits until n1 is declared dead and n2 (the survivor) took n1's
    sessions over from the store; meter on n3 then has it handed over from n2."""
    nodes = pg_nodes(tmp_path, nats_server.url, postgres_dsn, ["n1", "n2", "n3"], users=())
    n1 = nodes["n1"]
    try:
        for cid in ("meter", "meter2"):
            dev = MqttClient(cid, clean_session=False).connect(n1.host, n1.port)
            dev.subscribe(f"{cid}/#", qos=1)
            dev.disconnect()
        pub = client(n1, "qpub")
        for i in range(3):
            for cid in ("meter", "meter2"):
                pub.publish(f"{cid}/r", str(i), qos=1)    # PUBACK once kept in the store
        pub.paho.loop_stop()
        n1.kill()
        killed = time.monotonic()

        def back(cid: str, node) -> MqttClient:
            return MqttClient(cid, clean_session=False).connect(node.host, node.port, timeout=NODE_TIMEOUT + 10)

        with ThreadPoolExecutor(2) as pool:
            futures = {cid: pool.submit(back, cid, nodes[name]) for cid, name in (("meter", "n3"), ("meter2", "n2"))}
            clients = {cid: f.result() for cid, f in futures.items()}
        assert time.monotonic() - killed < NODE_TIMEOUT + 8
        for cid, c in clients.items():
            assert c.session_present, cid
            assert [c.wait_message(f"{cid}/r").payload for _ in range(3)] == [b"0", b"1", b"2"]
            c.disconnect()
    finally:
        for node in nodes.values():
            node.kill()
