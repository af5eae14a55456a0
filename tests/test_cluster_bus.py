"""ClusterBus (broker/cluster/bus.py): the event bus Protocol across nodes, on a
real nats-server. Shared events reach the other node's handlers exactly once
and are not sent on again; the others stay local."""

from __future__ import annotations

import asyncio
from typing import Any

from broker.cluster import wire
from broker.cluster.bus import (
    MAILBOX_FRAME,
    ClusterBus,
    decode_event,
    decode_mailbox,
    encode_event,
    pack_mailbox_event,
)
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


PROBE = "roost.test.probe"


def probed(link: NatsLink) -> asyncio.Event:
    """Before `link` starts: set once it hears a probe (see hear)."""
    heard = asyncio.Event()

    async def on_probe(_subject: str, _data: bytes) -> None:
        heard.set()
    link.subscribe(PROBE, on_probe)
    return heard


async def hear(sender: NatsLink, heard: asyncio.Event) -> None:
    """Probe until the other link heard `sender`, as nodes wait for each other's
    heartbeats: a subscription flushed right after connecting to a fresh
    nats-server 2.9.10 has now and then missed the first messages here."""
    for _ in range(200):
        sender.send(PROBE, b"")
        try:
            await asyncio.wait_for(heard.wait(), 0.05)
            return
        except TimeoutError:
            continue
    raise AssertionError("the links never heard each other")


def test_shared_events_survive_the_wire() -> None:
    for event in SHARED_EXAMPLES:
        assert decode_event(encode_event(event)) == event


def test_a_mailbox_frame_carries_the_pushed_bytes_and_rejects_bad_ones() -> None:
    from broker.services.inbox import encode_event as inbox_bytes

    events = SHARED_EXAMPLES[0].events
    frame = MAILBOX_FRAME + b"".join(pack_mailbox_event(e) for e in events)
    back = decode_mailbox(frame)
    assert back == events
    # the receiving node pushes the committing node's bytes, not a new encoding
    assert [e.wire for e in back] == [inbox_bytes(e.doc) for e in events]
    for bad in (frame[:-1], frame[:5], b"{}", MAILBOX_FRAME + pack_mailbox_event(MailboxEvent("x", 1, {}))[:-2]
                + b"[]"):
        try:
            decode_mailbox(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_shared_events_reach_the_other_node_once_and_local_ones_stay(nats_server) -> None:
    async def run() -> None:
        buses, links, probes = [], [], []
        for name in ("a", "b"):
            bus = ClusterBus(share=True)
            link = NatsLink([nats_server.url], name=name, max_pending_bytes=1 << 20)
            link.subscribe(wire.EVENT, lambda _s, data, bus=bus: bus.from_peer(data))
            probes.append(probed(link))
            bus.attach(lambda data, link=link: link.send(wire.EVENT, data))
            await link.start()
            await asyncio.wait_for(link.connected.wait(), 10)
            buses.append(bus)
            links.append(link)
        await hear(links[0], probes[1])
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


def test_targeted_mailbox_events_of_one_loop_turn_travel_in_one_frame_in_order(nats_server) -> None:
    """The events committed in one loop turn go to a node as one frame (a frame
    over MAILBOX_FRAME_BYTES is split), in commit order, and only where targeted."""
    from broker.cluster.bus import MAILBOX_FRAME_BYTES, mailbox_subject

    async def run() -> None:
        a, b = ClusterBus(share=True), ClusterBus(share=True)
        link_a = NatsLink([nats_server.url], name="a", max_pending_bytes=1 << 24)
        link_b = NatsLink([nats_server.url], name="b", max_pending_bytes=1 << 24)
        link_b.subscribe(mailbox_subject("b"), lambda _s, data: b.from_peer(data))
        heard = probed(link_b)
        a.attach(lambda data: link_a.send(wire.EVENT, data))
        a.target(lambda node, data: link_a.send(mailbox_subject(node), data),
                 lambda principal: ("b",) if principal.startswith("b") else ())
        for link in (link_a, link_b):
            await link.start()
            await asyncio.wait_for(link.connected.wait(), 10)
        await hear(link_a, heard)
        got: list[MailboxEvent] = []
        b.subscribe(MailboxAppended, lambda ev: got.extend(ev.events))

        def burst(first: int, count: int, text: str = "x") -> list[MailboxEvent]:
            out = []
            for n in range(first, first + count):
                mine = MailboxEvent(f"bob{n % 3}", n, {"n": n, "kind": "msg", "body": {"text": text}})
                a.publish_nowait(MailboxAppended((mine, MailboxEvent("alice", n, {"n": n, "kind": "msg"}))))
                out.append(mine)
            return out

        want = burst(1, 50)                         # one loop turn: one frame
        await asyncio.sleep(0)
        assert a.mailbox_frames == 1
        big = "y" * 10_000
        want += burst(51, 60, big)                 # ~600 kB in one turn: split, still in order
        for _ in range(1000):
            if len(got) >= len(want):
                break
            await asyncio.sleep(0.01)
        assert got == want and [e.wire for e in got] == [e.wire or inbox_json(e.doc) for e in want]
        assert a.mailbox_frames >= 1 + (60 * 10_000) // MAILBOX_FRAME_BYTES
        assert (a.mailbox_sent, b.mailbox_received) == (110, 110)
        for link in (link_a, link_b):
            await link.stop()

    asyncio.run(run())


def inbox_json(doc: dict[str, Any]) -> bytes:
    from broker.services.inbox import encode_event as inbox_bytes

    return inbox_bytes(doc)
