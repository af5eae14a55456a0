"""ClusterBus (broker/cluster/bus.py): the event bus Protocol across nodes, on a
real nats-server. Shared events reach the other node's handlers exactly once
and are not sent on again; the others stay local."""

from __future__ import annotations

import asyncio
from typing import Any

from broker.cluster import wire
from broker.cluster.bus import ClusterBus, decode_event, encode_event
from broker.cluster.link import NatsLink
from broker.services.events import (
    BlockChanged,
    ContactChanged,
    DeviceShared,
    DeviceUnshared,
    GroupChanged,
    MailboxAppended,
    PrincipalRemoved,
)
from broker.store.base import MailboxEvent

SHARED_EXAMPLES: list[Any] = [
    MailboxAppended((MailboxEvent("alice", 7, {"n": 7, "kind": "msg", "ts": 1.5, "body": {"text": "é"}}),
                     MailboxEvent("bob", 3, {"n": 3, "kind": "receipt"}))),
    ContactChanged("alice", "bob", True),
    BlockChanged("alice", "mallory", True),
    GroupChanged("grp:0123456789abcdef", frozenset({"alice", "bob"})),
    DeviceShared("lamp1", "bob", "sharee"),
    DeviceUnshared("lamp1", "bob"),
]


def test_shared_events_survive_the_wire() -> None:
    for event in SHARED_EXAMPLES:
        assert decode_event(encode_event(event)) == event


def test_shared_events_reach_the_other_node_once_and_local_ones_stay(nats_server) -> None:
    async def run() -> None:
        buses, links = [], []
        for name in ("a", "b"):
            bus = ClusterBus(share=True)
            link = NatsLink([nats_server.url], name=name, max_pending_bytes=1 << 20)
            link.subscribe(wire.EVENT, lambda _s, data, bus=bus: bus.from_peer(data))
            bus.attach(lambda data, link=link: link.send(wire.EVENT, data))
            await link.start()
            await asyncio.wait_for(link.connected.wait(), 10)
            buses.append(bus)
            links.append(link)
        seen: dict[str, list[Any]] = {"a": [], "b": []}
        for name, bus in zip(("a", "b"), buses, strict=True):
            for cls in (*{type(e) for e in SHARED_EXAMPLES}, PrincipalRemoved):
                bus.subscribe(cls, seen[name].append)
        a, b = buses
        for event in SHARED_EXAMPLES:
            await a.publish(event)
        a.publish_nowait(PrincipalRemoved("carol"))    # each node makes these itself: not shared
        for _ in range(500):
            if len(seen["b"]) >= len(SHARED_EXAMPLES):
                break
            await asyncio.sleep(0.01)
        assert seen["b"] == SHARED_EXAMPLES
        assert seen["a"] == [*SHARED_EXAMPLES, PrincipalRemoved("carol")]
        assert (a.shared, b.received, b.shared) == (len(SHARED_EXAMPLES), len(SHARED_EXAMPLES), 0)
        for link in links:
            await link.stop()

    asyncio.run(run())
