"""ClusterBus: the event bus Protocol (broker/services/events.py) across nodes.

Local handlers run exactly as on InProcessBus (it does the work). A shared
event is also sent to the other nodes, whose local handlers then run; an event
from another node is never sent on again.

Which events are shared, and why the others are not:
* relations (ContactChanged, BlockChanged, GroupChanged, DeviceShared,
  DeviceUnshared), ProfileChanged, TelemetrySaved and MailboxAppended: every
  node keeps relations, the principals' directory and the devices' latest
  readings in memory (each service applies its own events, events.py) and
  pushes mailbox events to its own clients. Shared only when the nodes
  share one store (`storage.backend: postgres`): with a store per node these
  facts are about another node's data. Once the node targets them (`target`),
  a MailboxAppended goes only to the nodes with pushers of its principals, each
  with only those principals' events (node.py says how none is missed).
* PrincipalAdded/Removed, SecretChanged: every node polls the shared admin log
  and makes them itself.
* PresenceChanged, RetainedChanged, TelemetryReceived: the MQTT publishes they
  stand for are routed between nodes already (retained messages by node.py).
  A TelemetryReceived is handled (Home Assistant state, the web app) on the
  node the device is connected to; the readings reach the others once saved
  (TelemetrySaved, batched by the write-behind flush).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Callable, Iterable
from typing import Any

from broker.cluster import wire
from broker.services.events import (
    BlockChanged,
    ContactChanged,
    DeviceShared,
    DeviceUnshared,
    E,
    Event,
    GroupChanged,
    Handler,
    InProcessBus,
    MailboxAppended,
    ProfileChanged,
    TelemetrySaved,
)
from broker.services.inbox import event_payload
from broker.store.base import LatestReading, MailboxEvent

log = logging.getLogger("roost.cluster")

SHARED: dict[str, type[Any]] = {cls.__name__: cls for cls in (
    MailboxAppended, ContactChanged, BlockChanged, GroupChanged, DeviceShared, DeviceUnshared, ProfileChanged,
    TelemetrySaved)}


def mailbox_subject(node: str) -> str:
    """Where a node hears the mailbox events sent to it alone."""
    return f"{wire.EVENT}.mailbox.{node}"


# ---- a targeted mailbox frame (mailbox_subject) -----------------------------------------
#
#   b"M", then per event: principal length (2 bytes), n (8 bytes), doc length (4 bytes),
#   the principal, the doc as the compact JSON pushed to the clients (inbox.event_payload)
#
# The doc's bytes travel as they are pushed: encoded once on the committing node (for
# every node it goes to) and never again on the receiving one, whose pushers send the
# same bytes (MailboxEvent.wire). A frame starting with "{" is the older JSON encoding.

MAILBOX_FRAME = b"M"
MAILBOX_FRAME_BYTES = 256 * 1024   # a frame past this is sent at once (well below NATS's max payload)
_EV_HEAD = struct.Struct("!HqI")


def pack_mailbox_event(e: MailboxEvent) -> bytes:
    p = e.principal.encode()
    doc = event_payload(e)
    return _EV_HEAD.pack(len(p), e.n, len(doc)) + p + doc


def decode_mailbox(data: bytes) -> tuple[MailboxEvent, ...]:
    """The events of a mailbox frame (ValueError if malformed)."""
    if data[:1] != MAILBOX_FRAME:
        raise ValueError("not a mailbox frame")
    events = []
    pos, end, head = 1, len(data), _EV_HEAD.size
    try:
        while pos < end:
            plen, n, dlen = _EV_HEAD.unpack_from(data, pos)
            pos += head
            principal = data[pos:pos + plen].decode()
            pos += plen
            doc_bytes = data[pos:pos + dlen]
            pos += dlen
            if pos > end:
                raise ValueError("truncated mailbox frame")
            doc = json.loads(doc_bytes)
            if not isinstance(doc, dict):
                raise ValueError("a mailbox event that is not a JSON object")
            events.append(MailboxEvent(principal, n, doc, doc_bytes))
    except struct.error:
        raise ValueError("truncated mailbox frame") from None
    return tuple(events)


def encode_event(event: Event) -> bytes:
    if isinstance(event, MailboxAppended):
        fields: dict[str, Any] = {"events": [{"principal": e.principal, "n": e.n, "doc": e.doc} for e in event.events]}
    elif isinstance(event, GroupChanged):
        fields = {"group_id": event.group_id, "members": sorted(event.members)}
    elif isinstance(event, TelemetrySaved):
        fields = {"readings": [{"device": r.device, "ts": r.ts, "fields": r.fields} for r in event.readings]}
    else:
        fields = {name: getattr(event, name) for name in type(event).__slots__}
    return wire.encode({"type": type(event).__name__, "fields": fields})


def decode_event(data: bytes) -> Event:
    doc = wire.decode(data)
    cls = SHARED[doc["type"]]
    fields = doc["fields"]
    if cls is MailboxAppended:
        return MailboxAppended(tuple(MailboxEvent(e["principal"], int(e["n"]), e["doc"]) for e in fields["events"]))
    if cls is GroupChanged:
        return GroupChanged(fields["group_id"], frozenset(fields["members"]))
    if cls is TelemetrySaved:
        return TelemetrySaved(tuple(LatestReading(str(r["device"]), float(r["ts"]), dict(r["fields"]))
                                    for r in fields["readings"]))
    event: Event = cls(**fields)
    return event


class ClusterBus:
    def __init__(self, *, share: bool, max_pending: int = 10000) -> None:
        self.local = InProcessBus(max_pending=max_pending)
        self.share = share           # the nodes share one store
        self._send: Callable[[bytes], object] | None = None     # set by the node once its link exists
        self.shared = 0
        self.received = 0
        # (node, frame) and principal -> nodes with its pushers, once targeted
        self._send_to: Callable[[str, bytes], object] | None = None
        self._nodes_of: Callable[[str], Iterable[str]] | None = None
        # Targeted mailbox events of this loop turn, by node: one frame per node per
        # turn (the sends committed together travel together), sent when the turn ends
        self._outbox: dict[str, list[bytes]] = {}
        self._outbox_bytes: dict[str, int] = {}
        self._flush_due: asyncio.Handle | None = None
        self.mailbox_frames = 0      # mailbox frames sent (a frame holds the events of one loop turn)
        self.mailbox_sent = 0        # mailbox events sent to other nodes (one per node it went to)
        self.mailbox_received = 0    # mailbox events received from other nodes

    # the InProcessBus figures the monitor reads
    @property
    def failures(self) -> int:
        return self.local.failures

    @property
    def dropped(self) -> int:
        return self.local.dropped

    def attach(self, send: Callable[[bytes], object]) -> None:
        self._send = send

    def target(self, send_to: Callable[[str, bytes], object], nodes_of: Callable[[str], Iterable[str]]) -> None:
        """Send mailbox events only to the nodes `nodes_of` their principals."""
        self._send_to, self._nodes_of = send_to, nodes_of

    def subscribe(self, event_type: type[E], handler: Handler[E]) -> None:
        self.local.subscribe(event_type, handler)

    def subscribers(self, event_type: type[Any]) -> int:
        return self.local.subscribers(event_type)

    async def publish(self, event: Event) -> None:
        self._out(event)
        await self.local.publish(event)

    def publish_nowait(self, event: Event) -> None:
        self._out(event)
        self.local.publish_nowait(event)

    async def drain(self) -> None:
        await self.local.drain()

    async def from_peer(self, data: bytes) -> None:
        """An event another node published: run the local handlers only."""
        try:
            event = MailboxAppended(decode_mailbox(data)) if data[:1] == MAILBOX_FRAME else decode_event(data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("cluster: an undecodable event from another node: %s", exc)
            return
        self.received += 1
        if isinstance(event, MailboxAppended):
            self.mailbox_received += len(event.events)
        await self.local.publish(event)

    def _out(self, event: Event) -> None:
        if not (self.share and self._send is not None and type(event).__name__ in SHARED):
            return
        self.shared += 1
        if isinstance(event, MailboxAppended):
            if self._send_to is not None and self._nodes_of is not None:
                self._send_targeted(event, self._nodes_of)
                return
            self.mailbox_sent += len(event.events)
        self._send(encode_event(event))

    def _send_targeted(self, event: MailboxAppended, nodes_of: Callable[[str], Iterable[str]]) -> None:
        outbox, sizes = self._outbox, self._outbox_bytes
        queued = False
        for e in event.events:
            packed = None
            for node in nodes_of(e.principal):
                if packed is None:       # once per event, whatever the number of nodes
                    packed = pack_mailbox_event(e)
                parts = outbox.get(node)
                if parts is None:
                    parts = outbox[node] = [MAILBOX_FRAME]
                    sizes[node] = 1
                elif sizes[node] + len(packed) > MAILBOX_FRAME_BYTES:
                    self._frame_to(node, parts)          # what came before goes first: in order
                    parts = outbox[node] = [MAILBOX_FRAME]
                    sizes[node] = 1
                parts.append(packed)
                sizes[node] += len(packed)
                self.mailbox_sent += 1
                queued = True
        if not queued or self._flush_due is not None:
            return
        loop = asyncio.get_running_loop()
        # Handlers of this turn's other commits run before it: their events join the frame.
        # Where each event goes was decided above, at its commit (the barrier counts on that).
        self._flush_due = loop.call_soon(self.flush_mailbox)

    def flush_mailbox(self) -> None:
        """Send the targeted mailbox events queued so far, one frame per node, in order."""
        self._flush_due = None
        outbox, self._outbox, self._outbox_bytes = self._outbox, {}, {}
        for node, parts in outbox.items():
            self._frame_to(node, parts)

    def _frame_to(self, node: str, parts: list[bytes]) -> None:
        if self._send_to is not None:
            self.mailbox_frames += 1
            self._send_to(node, b"".join(parts))
