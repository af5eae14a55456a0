"""At-least-once delivery of plain MQTT publishes between nodes.

NatsLink (link.py) is at-most-once: what nats-py had taken just before a
connection broke, what nats-server holds when it restarts, what it drops for a
slow consumer, and what arrives while the receiving node has not resubscribed
yet after an outage, is gone. A publish is acknowledged to its publisher once
routed on its node, so these losses were losses of acknowledged messages.
`ReliableLinks` wraps the publish frames (node.py `_routed` / `_on_publish`)
so that every frame sent to a node reaches it, once, in order, unless that
node dies, restarts, or falls further behind than the resend window.

The design, the simplest correct one:

* **Sender, one stream per destination node.** Each frame gets the stream's
  next sequence number and carries the sender's name and incarnation (`inc`,
  peers.py) and the stream's `base`: the oldest number the sender can still
  resend. It is kept in the stream's resend window until acknowledged. The
  window is bounded in bytes (`cluster.resend_buffer_bytes`, per destination):
  beyond, the oldest frame is given up, counted (`dropped`,
  `roost_dropped_total{reason="cluster_resend_full"}`) and logged at a limited
  rate; `base` moves past it, so the receiver does not wait for it.
* **Receiver, in order only.** Per origin node it keeps the next number it
  expects (from the first frame's `base` on; a frame's `base` beyond it moves
  it there). A frame below it is a duplicate: dropped. A frame above it means
  one was lost: dropped too, and the receiver asks for a resend from the one
  it expects (once per RESEND_AFTER for the same number). NATS keeps one
  connection's messages in order, so frames only come out of order after a
  loss, and then the sender resends them all from the gap anyway (go-back-N):
  a reorder buffer would only hold copies of what is coming again.
* **Acks** are cumulative (the next number expected, so everything below it
  was routed here: an ack is sent only after the frame's handler finished and
  what it must keep is committed: a handler may answer an awaitable, the
  commit, and later frames are acked only after it), sent at the end of the
  loop turn that finished a frame (every frame of one read of NATS in one
  ack), or at once after ACK_EVERY frames, on `roost.ack.<origin>`: a
  publisher waits for them.
* **Resend** of the whole window from the receiver's number when the
  receiver asks (a gap, or NATS came back: it then tells every origin where it
  is), at most once per RESEND_AFTER per stream for the same number. When the
  window has made no progress for RESEND_AFTER while NATS is up (a lost tail
  that no later frame reveals, a lost ack or resend request), the newest frame
  alone goes again as a probe: a receiver that lost anything before it asks,
  one merely behind (busy, a backlog in NATS) drops it as a duplicate, so a
  slow receiver is not flooded with copies of the window. The sender probes
  at once when NATS comes back too (the receiver's word may have come before
  the sender had resubscribed).
* **Confirmations.** A QoS 1/2 publish sent to other nodes gets its
  PUBACK/PUBREC only once every one of them acknowledged its frame
  (`confirmation`, awaited by broker/mqtt/publish.py): the frame then is
  routed there, and kept in its store when a persistent session took it (the
  receiver acks a frame only after its journal committed what the frame left
  there). So a publisher's ack never outruns the nodes that must keep its
  message, and a node that dies with frames in its window has acknowledged none
  of them. A destination found dead, or a frame the window gave up, fails the
  wait (NotAcknowledged): the publisher is closed without its ack and sends the
  message again (by then the dead node's sessions are adopted elsewhere). While
  NATS is down, or after `confirm_within` without an ack from a node still
  alive, waiting cannot help and the frame is still in the window (resent): the
  publish is acknowledged and counted in `unconfirmed`; a node dying during a
  NATS outage loses those (the double fault, documented in docs/CLUSTER.md),
  and local delivery never stalls on NATS.
* **A peer dead, left or restarted** (node.py `_peer_dead`): both directions'
  state for it is dropped. The sender's numbers keep counting (a node found
  dead by silence may come back under the same incarnation: its receiver still
  expects the next number).

Cost per frame: one struct pack and two concatenations on the sender, a small
parse on the receiver; one ack per ACK_EVERY frames.

Wire: frame = 0x01, len(name), name, len(inc), inc, seq (u64), base (u64),
the publish frame (wire.encode_publish). Ack (on `roost.ack.<origin>`) = 0x01,
len(name), name, len(inc), inc of the acking node, len(inc), the origin's inc,
next seq (u64), flags (u8: 1 = resend from there).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from broker.cluster.wire import PREFIX, pub_subject
from broker.mqtt.hooks import NotAcknowledged

log = logging.getLogger("roost.cluster")

VERSION = 1
ACK_EVERY = 256           # frames routed before an ack goes at once (otherwise at the end of the loop turn)
RESEND_AFTER = 1.0        # seconds without progress before the window is resent
TICK = 0.25               # seconds between checks for streams without progress
ENTRY_BYTES = 48          # what one kept frame costs beyond its own bytes (bytes header, deque slot)
RESEND = 1                # ack flag: resend from this number

_NUMBERS = struct.Struct("!QQ")     # seq, base
_ACK_TAIL = struct.Struct("!QB")    # next expected, flags

Handler = Callable[[str, bytes], Awaitable[None]]
# A publish frame's handler: None, or what must complete before the frame is acked
# (the commit of what it left for persistent sessions).
FrameHandler = Callable[[str, bytes], Awaitable[Awaitable[None] | None]]


class Link(Protocol):
    """What this needs of NatsLink."""

    def send(self, subject: str, data: bytes) -> bool: ...

    def subscribe(self, subject: str, handler: Handler) -> None: ...

    @property
    def up(self) -> bool: ...


def ack_subject(node: str) -> str:
    return f"{PREFIX}.ack.{node}"


def _pstr(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError(f"{text!r} is too long for a frame header")
    return _pstr_raw(raw)


def _pstr_raw(raw: bytes) -> bytes:
    return bytes((len(raw),)) + raw


def _read_pstr(data: bytes, at: int) -> tuple[bytes, int]:
    n = data[at]
    end = at + 1 + n
    if end > len(data):
        raise ValueError("truncated frame header")
    return data[at + 1:end], end


class _Confirmation:
    """A publish's frames not yet acknowledged by every node they went to."""
    __slots__ = ("left", "future")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.left = 0
        self.future = future

    def one_done(self) -> None:
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(None)

    def failed(self, why: str) -> None:
        if not self.future.done():
            self.future.set_exception(NotAcknowledged(why))
            self.future.exception()     # a will's or the broker's own publish has no one waiting: not logged


class _Outgoing:
    """Frames sent to one node and not yet acknowledged."""
    __slots__ = ("subject", "next_seq", "window", "bytes", "progress_at", "resent_at", "resent_from", "waiting")

    def __init__(self, subject: str, next_seq: int, now: float) -> None:
        self.subject = subject
        self.next_seq = next_seq
        self.window: deque[bytes] = deque()     # numbers base .. next_seq - 1, contiguous
        self.bytes = 0
        self.progress_at = now      # last ack that freed something (or the window's first frame)
        self.resent_at = 0.0
        self.resent_from = 0
        self.waiting: deque[tuple[int, _Confirmation]] = deque()    # by frame number, ascending

    @property
    def base(self) -> int:
        """The number of the oldest frame kept (next_seq when none is)."""
        return self.next_seq - len(self.window)


class _Incoming:
    """One origin node's stream as received here."""
    __slots__ = ("origin", "header", "ack_subject", "inc", "expected", "done", "routed", "committing", "unacked",
                 "asked_for", "asked_at")

    def __init__(self, origin: str, header: bytes, inc: bytes, expected: int) -> None:
        self.origin = origin
        self.header = header
        self.ack_subject = ack_subject(origin)
        self.inc = inc
        self.expected = expected    # next number accepted
        self.done = expected        # every number below was routed here, and committed where it must be
        self.routed = expected      # every number below was routed here
        self.committing = 0         # frames whose commit is awaited
        self.unacked = 0
        self.asked_for = -1
        self.asked_at = 0.0


class ReliableLinks:
    def __init__(self, link: Link, *, name: str, inc: str, window_bytes: int, confirm_within: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`confirm_within`: seconds a publish waits at most for a node that is
        alive but acknowledges nothing (longer than a silent node takes to be found
        dead: twice cluster.node_timeout)."""
        self._link = link
        self._confirm_within = confirm_within
        self._name = name
        self._inc = inc.encode()
        self._max = window_bytes
        self._clock = clock
        self._prefix = bytes((VERSION,)) + _pstr(name) + _pstr(inc)
        self._out: dict[str, _Outgoing] = {}
        self._in: dict[str, _Incoming] = {}         # by origin node
        self._by_header: dict[bytes, _Incoming] = {}     # by the frames' origin and incarnation bytes
        self._next_seqs: dict[str, int] = {}        # a forgotten stream's next number (numbers never repeat)
        self._dirty: dict[str, _Incoming] = {}      # streams with frames routed but not acked
        self._ack_timer: asyncio.Handle | None = None
        self._ticker: asyncio.Task[None] | None = None
        # figures
        self.dropped = 0            # frames given up: the window was full (cluster_resend_full)
        self.dropped_bytes = 0
        self.resent = 0             # frames sent again
        self.duplicates = 0         # frames received twice (dropped here)
        self.gaps = 0               # resends asked after a lost frame
        self.unconfirmed = 0        # publishes acknowledged without every node's ack (NATS down, a silent node)
        link.subscribe(ack_subject(name), self._on_ack)

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="cluster-resend")

    async def stop(self) -> None:
        self._flush_acks()
        self.release_all()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    @property
    def window_bytes(self) -> int:
        return sum(out.bytes for out in self._out.values())

    # ---- sending -----------------------------------------------------------------------

    def send(self, node: str, frame: bytes) -> int:
        """Send publish `frame` to `node`, kept until `node` acknowledges it; its number."""
        out = self._out.get(node)
        if out is None:
            out = self._out[node] = _Outgoing(pub_subject(node), self._next_seqs.pop(node, 1), self._clock())
        seq = out.next_seq
        out.next_seq = seq + 1
        window = out.window
        if not window:
            out.progress_at = self._clock()
        window.append(frame)
        out.bytes += len(frame) + ENTRY_BYTES
        if out.bytes > self._max:
            self._overflow(node, out)
        self._link.send(out.subject, self._prefix + _NUMBERS.pack(seq, seq + 1 - len(window)) + frame)
        return seq

    def confirmation(self, sent: list[tuple[str, int]]) -> asyncio.Future[None] | None:
        """Done once every (node, frame number) in `sent` is acknowledged (or can
        no longer be: see the module docstring); None when there is nothing to
        wait for."""
        if not self._link.up:
            self.unconfirmed += 1
            return None
        conf = None
        for node, seq in sent:
            out = self._out.get(node)
            if out is None or seq < out.base:
                continue
            if conf is None:
                conf = _Confirmation(asyncio.get_running_loop().create_future())
            conf.left += 1
            out.waiting.append((seq, conf))
        return conf.future if conf is not None else None

    def _settle(self, out: _Outgoing, below: int, *, acked: bool = False, lost: str | None = None) -> None:
        """The waits on `out`'s frames numbered below `below` are over: `acked` by
        the node; `lost`: why they will never reach it (their publishers are not
        acknowledged: closed, they send them again); otherwise released (the
        frames stay in the window; counted when that was a publish's last wait)."""
        waiting = out.waiting
        while waiting and waiting[0][0] < below:
            conf = waiting.popleft()[1]
            if lost is not None:
                conf.failed(lost)
                continue
            if not acked and conf.left == 1:
                self.unconfirmed += 1
            conf.one_done()

    def release_all(self) -> None:
        """NATS is down (or this node stops): no publish waits for another node."""
        for out in self._out.values():
            self._settle(out, out.next_seq, acked=False)

    def _overflow(self, node: str, out: _Outgoing) -> None:
        window = out.window
        while out.bytes > self._max and len(window) > 1:     # the newest always stays (base <= its seq)
            old = window.popleft()
            out.bytes -= len(old) + ENTRY_BYTES
            self.dropped += 1
            self.dropped_bytes += len(old)
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("cluster: node %s has not acknowledged %d bytes of publishes "
                            "(cluster.resend_buffer_bytes): the oldest can no longer be resent (%d so far)",
                            node, out.bytes, self.dropped)
        self._settle(out, out.base, lost=f"its publish was given up for node {node} (cluster.resend_buffer_bytes)")

    def _resend(self, out: _Outgoing, start: int, now: float) -> None:
        if out.resent_from == start and now - out.resent_at < RESEND_AFTER:
            return      # just did (the receiver asks again for every frame past the gap)
        out.resent_from, out.resent_at = start, now
        base = out.base
        send, subject, prefix, pack = self._link.send, out.subject, self._prefix, _NUMBERS.pack
        first = max(start, base)
        for seq, frame in enumerate(itertools.islice(out.window, first - base, None), first):
            if not send(subject, prefix + pack(seq, base) + frame):
                break       # the outgoing queue is full: the rest at the next round
            self.resent += 1

    async def _on_ack(self, subject: str, data: bytes) -> None:
        if data[0] != VERSION:
            return
        name, at = _read_pstr(data, 1)
        _, at = _read_pstr(data, at)           # the acking node's incarnation
        origin_inc, at = _read_pstr(data, at)
        if origin_inc != self._inc:
            return      # meant for an earlier incarnation of this node
        nxt, flags = _ACK_TAIL.unpack_from(data, at)
        out = self._out.get(name.decode())
        if out is None:
            return
        window = out.window
        now = self._clock()
        acked = min(nxt - out.base, len(window))
        if acked > 0:
            for _ in range(acked):
                out.bytes -= len(window.popleft()) + ENTRY_BYTES
            out.progress_at = now
            if out.waiting:
                self._settle(out, out.base, acked=True)
        if flags & RESEND and window:
            self._resend(out, nxt, now)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            if not self._link.up:
                continue
            now = self._clock()
            for out in self._out.values():
                if out.window and now - out.progress_at > RESEND_AFTER and now - out.resent_at > RESEND_AFTER:
                    self._probe(out, now)
                if out.waiting and now - out.progress_at > self._confirm_within:
                    self._settle(out, out.next_seq, acked=False)

    def _probe(self, out: _Outgoing, now: float) -> None:
        """No ack for a while: the newest frame again, alone. A receiver that lost
        any before it sees the gap and asks (then the window goes again, from
        there); one that is only behind finds it a duplicate and acks. A slow
        receiver so costs one frame per RESEND_AFTER, not the whole window."""
        out.resent_at = now
        frame = out.window[-1]
        if self._link.send(out.subject, self._prefix + _NUMBERS.pack(out.next_seq - 1, out.base) + frame):
            self.resent += 1

    # ---- receiving ---------------------------------------------------------------------

    def receiving(self, handler: FrameHandler) -> Handler:
        """The handler for this node's publish subject: `handler(subject, frame)`
        gets each frame once, in order; acks follow once it returned and what it
        answered (None, or an awaitable: the commit) completed."""
        unpack, streams = _NUMBERS.unpack_from, self._by_header

        async def on_frame(subject: str, data: bytes) -> None:
            if data[0] != VERSION:
                raise ValueError(f"unknown publish frame version {data[0]}")
            n = data[1]
            at = 3 + n + data[2 + n]            # past the origin's name and incarnation
            seq, base = unpack(data, at)
            stream = streams.get(data[1:at])
            if stream is None:
                stream = self._new_stream(data[1:at], base)
            if seq != stream.expected or base > stream.expected:
                if not self._out_of_order(stream, seq, base):
                    return
            stream.expected = seq + 1
            commit = None
            try:
                commit = await handler(subject, data[at + 16:])
            finally:   # a frame its handler refused is not asked for again
                stream.routed = seq + 1
                if commit is not None:
                    stream.committing += 1
                    asyncio.get_running_loop().create_task(self._ack_after(stream, seq, commit))
                elif not stream.committing:
                    stream.done = seq + 1
                    self._count_ack(stream)
        return on_frame

    async def _ack_after(self, stream: _Incoming, seq: int, commit: Awaitable[None]) -> None:
        """Frame `seq`, and those routed after it that had nothing to commit, are
        acked once its commit is done (commits complete in the order asked)."""
        try:
            await commit
        except Exception:   # noqa: BLE001 - the store gave up (stopping): not acked, resent to the next node
            log.warning("cluster: a publish from %s could not be kept here; not acknowledged", stream.origin)
            return
        finally:
            stream.committing -= 1
        if self._in.get(stream.origin) is not stream:
            return      # that incarnation is forgotten meanwhile
        stream.done = max(stream.done, stream.routed if not stream.committing else seq + 1)
        self._count_ack(stream)

    def _count_ack(self, stream: _Incoming) -> None:
        stream.unacked += 1
        if stream.unacked >= ACK_EVERY:
            self._send_ack(stream, 0)
            self._dirty.pop(stream.origin, None)
        else:
            self._ack_later(stream)

    def _ack_later(self, stream: _Incoming) -> None:
        """Ack `stream` with the others at the end of this loop turn."""
        self._dirty[stream.origin] = stream
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_soon(self._flush_acks)

    def _new_stream(self, header: bytes, base: int) -> _Incoming:
        """The first frame of a node here, or of its new incarnation."""
        raw_name, at = _read_pstr(header, 0)
        inc, _ = _read_pstr(header, at)
        origin = raw_name.decode()
        old = self._in.get(origin)
        if old is not None:
            self._by_header.pop(old.header, None)
        stream = self._in[origin] = self._by_header[header] = _Incoming(origin, header, inc, base)
        return stream

    def _out_of_order(self, stream: _Incoming, seq: int, base: int) -> bool:
        """Whether frame `seq` is the one to route after all (the sender gave up
        the ones before it); a duplicate is acked, a gap asks for a resend."""
        if base > stream.expected:      # given up by the sender (its window overflowed, or it forgot us)
            stream.expected = stream.routed = base
            if not stream.committing:
                stream.done = base
        if seq == stream.expected:
            return True
        if seq < stream.expected:
            self.duplicates += 1
            stream.unacked += 1          # the ack stops the resending
            self._ack_later(stream)
            return False
        now = self._clock()
        if stream.asked_for != stream.expected or now - stream.asked_at > RESEND_AFTER:
            stream.asked_for, stream.asked_at = stream.expected, now
            self.gaps += 1
            self._send_ack(stream, RESEND)
        return False

    def _flush_acks(self) -> None:
        self._ack_timer = None
        dirty, self._dirty = self._dirty, {}
        for stream in dirty.values():
            self._send_ack(stream, 0)

    def _send_ack(self, stream: _Incoming, flags: int) -> None:
        stream.unacked = 0
        nxt = stream.expected if flags & RESEND else stream.done
        self._link.send(stream.ack_subject, self._prefix + _pstr_raw(stream.inc) + _ACK_TAIL.pack(nxt, flags))

    # ---- NATS and peers ----------------------------------------------------------------

    def link_up(self) -> None:
        """NATS is back: every origin hears where its stream stands here (it
        resends what was lost meanwhile), every destination with frames not
        acked gets a probe (it asks for what it lacks, in case this node's
        subscription missed its word); the senders' clocks start again."""
        now = self._clock()
        for out in self._out.values():
            out.progress_at = max(out.progress_at, now)
            if out.window:
                self._probe(out, now)
        for stream in self._in.values():
            stream.asked_for, stream.asked_at = stream.expected, now
            self._send_ack(stream, RESEND)

    def forget(self, node: str, inc: str | None = None) -> None:
        """`node` (incarnation `inc`) is dead, left or restarted: what was kept
        for it goes, and what was known of that incarnation's stream (a newer
        one's frames may have come first: they are another stream)."""
        out = self._out.pop(node, None)
        if out is not None:
            self._next_seqs[node] = out.next_seq
            self._settle(out, out.next_seq, lost=f"node {node} is gone before it had its publish")
        stream = self._in.get(node)
        if stream is not None and (inc is None or stream.inc == inc.encode()):
            del self._in[node]
            self._by_header.pop(stream.header, None)
            self._dirty.pop(node, None)

