"""One client connection: an asyncio.Protocol with an incremental MQTT framer.

Packets are handled synchronously inside `data_received` whenever possible
(PUBLISH with a synchronous ACL and no interception, acks, PINGREQ): then
`engine.handle()` returns `DONE`. A packet that needs to await something
(CONNECT/auth, SUBSCRIBE, intercepted PUBLISH, async ACL) returns the awaitable
rest of its handling: one task awaits it and then every packet queued behind
it, so packets of one connection are always processed in order. A PUBACK or
PUBREC that waits for the store or for other nodes (publish.py) does not hold
the packets behind it: it goes into the connection's ack queue (`ack_later`),
written in the order of the publishes (MQTT-4.6.0-2..4), so a publisher's
stream keeps being routed while its acks wait; beyond ACKS_HIGH waiting acks
the publisher is held back until they are out.

Outgoing bytes are collected per connection and written with one
`transport.write` per loop iteration (the engine flushes all dirty connections);
while the load is light (at most QUIET_PACKETS packets per loop turn, engine.py)
a connection's first packet of the turn is written the moment it is made.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING, Any, Final

from broker.mqtt import codec, codec5
from broker.mqtt.codec import MALFORMED, ProtocolViolation
from broker.mqtt.codec5 import PACKET_TOO_LARGE
from broker.mqtt.hooks import DisconnectReason, NotAcknowledged
from broker.mqtt.session import loggable

if TYPE_CHECKING:
    from broker.mqtt.engine import Engine
    from broker.mqtt.properties import MsgProps
    from broker.mqtt.session import ClientInfo, SessionState

log = logging.getLogger("roost.mqtt")

NEW, CONNECTED, CLOSED = 0, 1, 2
# Packets waiting behind an awaited one; beyond this we stop reading the socket.
PENDING_HIGH = 256
PENDING_LOW = 32
# PUBACK/PUBREC waiting in order for commits (ack_later); beyond this the client's next
# packets wait until they are written.
ACKS_HIGH = 256
CLOSE_GRACE = 5.0   # seconds a closing transport may take to flush before it is aborted
DISCONNECT_LINGER = 1.0   # seconds an MQTT 5 client has to read the DISCONNECT we sent before we close
NOT_PAUSED: Final[frozenset[str]] = frozenset()   # the reasons reading is paused, while it is not
NO_BYTES: Final = b""   # a connection's buffer while it holds nothing (an empty bytearray is 56 bytes)
# The DISCONNECT reason an MQTT 5 client is sent when the broker closes its connection
_V5_REASONS = {DisconnectReason.TAKEN_OVER: codec5.SESSION_TAKEN_OVER,
               DisconnectReason.SHUTDOWN: codec5.SERVER_SHUTTING_DOWN,
               DisconnectReason.KEEPALIVE: codec5.KEEP_ALIVE_TIMEOUT,
               DisconnectReason.KICKED: codec5.ADMINISTRATIVE_ACTION}


class _Done:
    """An awaitable that is finished already: what engine.handle() returns for a
    packet it handled at once (most of them), so that no task is made for it."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


DONE: Final = _Done()


class Connection(asyncio.Protocol):
    # One per client, 20,000 idle ones on a home server: slots save ~1.2 KB each
    # (an instance dict); a new attribute needs its name here.
    __slots__ = ("_acks", "_acks_task", "_eof", "_lost", "_out", "_pending", "_pending_bytes", "_pending_full", "_read_paused_by",
                 "_write_paused", "alias_in", "alias_out", "alias_out_max", "announced", "blockers", "buf",
                 "client_max_packet", "counted", "created", "disconnect_sent", "dollar_publish_logged", "engine",
                 "handle", "info", "keep_alive", "last_recv", "listener_name", "max_packet", "max_pending_bytes",
                 "paused_since", "problem_info", "reason", "remote_host", "remote_port", "session", "state",
                 "taken_over", "task", "transport", "v5",
                 "plain_props", "will_anyway", "writable", "written_in")

    def __init__(self, engine: Engine, listener_name: str) -> None:
        self.engine = engine
        self.listener_name = listener_name
        self.transport: Any = None
        self.state = NEW
        # bytes received but not yet a whole packet: a bytearray only while it holds some
        self.buf: bytes | bytearray = NO_BYTES
        self.info: ClientInfo | None = None
        self.session: SessionState | None = None
        self.keep_alive = 0
        self.last_recv = 0.0
        self.created = 0.0
        self.reason: DisconnectReason | None = None
        self.taken_over = False
        self.counted = False            # included in the engine's connection counts
        self.announced = False          # on_client_connected was called
        self.writable = False           # connected and transport not paused
        self._write_paused = False
        # why reading is paused ("write", "backpressure"): frozensets, so that an unpaused
        # connection shares NOT_PAUSED where its own empty set() cost 216 bytes
        self._read_paused_by = NOT_PAUSED
        self.paused_since: float | None = None   # loop time we stopped reading the socket
        self.blockers = 0                         # congested sessions this client is held for
        # packets written in this loop turn (None: nothing to flush), and packets waiting
        # behind an awaited one (None: none); lists only while they hold something, ~56
        # bytes each of 20,000 idle connections otherwise
        self._out: list[bytes] | None = None
        self.written_in = -1       # the engine's loop turn of this connection's last written-through packet
        self.plain_props: MsgProps | None = None   # MQTT 5: its publishes without properties (v5.py)
        self._pending: list[tuple[int, int, bytes]] | None = None
        self._pending_bytes = 0
        self._pending_full = False      # reading and parsing stopped until the pending packets drain
        # PUBACK/PUBREC waiting for what they must follow, in order (ack_later); None: none
        self._acks: deque[tuple[Awaitable[None] | None, bytes]] | None = None
        self._acks_task: asyncio.Task[None] | None = None
        self.max_pending_bytes = engine.limits.max_pending_bytes
        self.task: asyncio.Task[None] | None = None
        self.dollar_publish_logged = False
        self._eof = False       # the peer half-closed while packets were being handled
        self._lost = False      # the transport is gone but received packets are still being handled
        # the peer address: two slots, not a tuple (56 bytes) per connection
        self.remote_host = ""
        self.remote_port = 0
        self.max_packet = engine.max_packet
        # Decodes and handles one packet: engine.handle, or engine.handle5 once an
        # MQTT 5 CONNECT arrived (the protocol is chosen once per connection).
        self.handle = engine.handle3
        self.v5 = False
        # alias_in / alias_out: the MQTT 5 topic aliases the client set, and those we set
        # (up to the client's maximum): dicts made at an MQTT 5 CONNECT only (lifecycle.py)
        self.alias_in: dict[int, str]
        self.alias_out: dict[str, int]
        self.alias_out_max = 0
        self.client_max_packet = 0              # the client's Maximum Packet Size (0: none)
        self.disconnect_sent = False
        self.problem_info = True                # MQTT 5 Request Problem Information: reason strings wanted
        self.will_anyway = False                # MQTT 5 DISCONNECT 0x04: publish the will all the same

    # ---- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            # interned: the clients of one host share their address string
            self.remote_host = sys.intern(str(peer[0]))
            self.remote_port = int(peer[1])
        self.created = self.last_recv = self.engine.loop.time()
        self.engine.connection_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == CLOSED and self.transport is None:
            return
        self.writable = False
        self._out = None
        self.transport = None
        if self.state == NEW and self.task is not None and not self._pending:
            # gone during its CONNECT with nothing sent behind it (a scanner, an
            # abandoned attempt): stop authenticating it, nothing waits for the answer
            self.task.cancel()
        elif self.state != CLOSED and self.task is not None:
            # The peer closed with packets still being handled (a client may send
            # CONNECT, PUBLISH, DISCONNECT and close at once, as mosquitto_pub does):
            # every packet received before the close is handled in order first;
            # _run reports the loss when it is done.
            self._lost = True
            if self.state == CONNECTED:
                # gone now for presence, whatever is still being handled
                if self.reason is None and any(p[0] == codec.DISCONNECT for p in self._pending or ()):
                    self.reason = DisconnectReason.DISCONNECT
                self.engine.connection_closing(self)
            return
        self.state = CLOSED
        self.engine.connection_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self.writable = False
        # A client that does not read its acks must not keep flooding us.
        self.pause_reading("write")

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.state == CONNECTED:
            self.writable = True
            if self.session is not None and self.session.conn is self:
                self.session.pump()
        self.resume_reading("write")

    def pause_reading(self, why: str) -> None:
        if not self._read_paused_by:
            self.paused_since = self.engine.loop.time()
            if self.transport is not None:
                try:
                    self.transport.pause_reading()
                except (RuntimeError, AttributeError):
                    pass
        self._read_paused_by |= {why}

    def resume_reading(self, why: str) -> None:
        if why in self._read_paused_by:
            self._read_paused_by = self._read_paused_by - {why} or NOT_PAUSED
            if not self._read_paused_by:
                self.paused_since = None
                # we did not read while paused: the client's PINGREQs were not heard
                self.last_recv = self.engine.loop.time()
                if self.transport is not None and self.state != CLOSED:
                    try:
                        self.transport.resume_reading()
                    except (RuntimeError, AttributeError):
                        pass

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        engine = self.engine
        self.last_recv = engine.loop.time()
        engine.counters.bytes_received += len(data)
        engine.read_started()
        try:
            buf = self.buf
            if buf or self.blockers:
                if buf:
                    buf += data     # a bytearray: in place
                else:
                    self.buf = bytearray(data)
                if not self.blockers:
                    self._parse()
            else:
                # nothing left over (the usual case): parse the bytes as received, without
                # copying them into the buffer first; only an incomplete rest is kept
                pos = self._parse_in(data)
                if pos >= 0 and pos < len(data):
                    self.buf = bytearray(memoryview(data)[pos:])
        finally:
            # even when handling failed: writing through ends with the read
            engine.read_done()

    def _parse(self) -> None:
        """Handle every complete packet in the buffer, stopping early while a
        subscriber we publish to is congested (backpressure: `block()`)."""
        buf = self.buf
        pos = self._parse_in(buf)
        if pos < 0 or pos >= len(buf):
            self.buf = NO_BYTES     # all handled: give the (perhaps grown) buffer back
        elif pos > 0:
            del buf[:pos]   # type: ignore[union-attr]   # only a bytearray holds bytes

    def _parse_in(self, buf: bytes | bytearray) -> int:
        """Handle the complete packets in `buf`; how many bytes of it were handled,
        or -1 when the connection closed (nothing more is to be kept)."""
        pos = 0
        end_buf = len(buf)
        acked: SessionState | None = None   # its PUBACKs freed room: after_acks() once at the end
        try:
            while end_buf - pos >= 2:
                # remaining length: 1..4 bytes, 7 bits each
                i = pos + 1
                b = buf[i]
                rl = b & 0x7F
                if b & 0x80:
                    shift = 7
                    while True:
                        i += 1
                        if i >= end_buf:
                            break
                        b = buf[i]
                        rl |= (b & 0x7F) << shift
                        if not b & 0x80:
                            break
                        shift += 7
                        if shift > 21:
                            raise ProtocolViolation("remaining length longer than 4 bytes")
                    if i >= end_buf:
                        break
                if rl > self.max_packet:
                    raise ProtocolViolation(f"packet of {rl} bytes exceeds the limit", PACKET_TOO_LARGE)
                start = i + 1
                end = start + rl
                if end > end_buf:
                    break
                self.engine.counters.packets_received += 1
                first = buf[pos]
                if first == 0x40 and rl == 2 and self.state == CONNECTED and self.task is None \
                        and not self._pending:
                    # PUBACK, the most frequent packet a subscriber sends: handled here
                    # as engine.handle would, without a body copy or the dispatch.
                    pos = end
                    session = self.session
                    assert session is not None   # set once CONNECTED
                    if session.release_puback((buf[start] << 8) | buf[start + 1]):
                        acked = session
                else:
                    if acked is not None:
                        # what follows is handled with the window's room already used
                        acked.after_acks()
                        acked = None
                    # a slice of bytes is bytes already (bytes() of it would cost a
                    # lookup of __bytes__ and __index__); a bytearray's is copied
                    body = buf[start:end] if type(buf) is bytes else bytes(buf[start:end])
                    pos = end
                    self._packet(first >> 4, first & 0x0F, body)
                if self.state == CLOSED:
                    return -1
                if self.blockers:
                    break
        except ProtocolViolation as exc:
            self.violation(str(exc), exc.code)
            return -1
        if acked is not None and self.state != CLOSED:
            acked.after_acks()
        return pos

    # ---- backpressure ----------------------------------------------------------------

    def block(self) -> None:
        """A session this client publishes to is congested: stop reading its packets."""
        self.blockers += 1
        if self.blockers == 1:
            self.pause_reading("backpressure")

    def unblock(self) -> None:
        if self.blockers <= 0:
            return
        self.blockers -= 1
        if self.blockers == 0:
            self.resume_reading("backpressure")
            if self.buf and self.state != CLOSED:
                # packets already received wait in the buffer; not re-entrantly
                self.engine.loop.call_soon(self._resume_parse)

    def _resume_parse(self) -> None:
        if not self.blockers and self.state != CLOSED:
            self._parse()

    def eof_received(self) -> bool | None:
        """The peer half-closed (shutdown(SHUT_WR)) after sending its packets. With
        some still being handled, keep our side open so their answers (CONNACK,
        PUBACK) reach it; _run closes when it is done. Otherwise close now."""
        if (self.task is not None or self._acks is not None) and self.state != CLOSED:
            self._eof = True
            return True
        return None

    # ---- dispatch ----------------------------------------------------------------

    def _packet(self, ptype: int, flags: int, body: bytes) -> None:
        if self.task is not None or self._pending:
            pending = self._pending
            if pending is None:
                pending = self._pending = []
            pending.append((ptype, flags, body))
            self._pending_bytes += len(body)
            if len(pending) >= PENDING_HIGH or self._pending_bytes >= self.max_pending_bytes:
                # stop reading: what is already in the buffer waits there, bounded too
                if not self._pending_full:
                    self._pending_full = True
                    self.block()
            return
        work = self.handle(self, ptype, flags, body)
        if work is not DONE:
            self.task = self.engine.loop.create_task(self._run(work))

    async def _run(self, work: Awaitable[None]) -> None:
        try:
            await work
            while self._pending and self.state != CLOSED:
                pending = self._pending   # a new list may come while a packet is awaited
                ptype, flags, body = pending.pop(0)
                if not pending:
                    self._pending = None
                self._pending_bytes -= len(body)
                if self._pending_full and len(pending) <= PENDING_LOW \
                        and self._pending_bytes <= self.max_pending_bytes // 4:
                    self._pending_full = False
                    self.unblock()     # parses what waited in the buffer, then reads again
                work = self.handle(self, ptype, flags, body)
                if work is not DONE:
                    await work
        except ProtocolViolation as exc:
            self.violation(str(exc), exc.code)
        except Exception as exc:  # noqa: BLE001 - one broken connection must not hurt others
            self._failed(exc, "handling packets")
        finally:
            self.task = None
            if self._pending_full:
                self._pending_full = False
                self.unblock()
            if self._lost:
                self._lost = False
                self._pending = None
                self._pending_bytes = 0
                self.state = CLOSED
                self.engine.connection_lost(self)
            elif self.state == CLOSED:
                self._pending = None
                self._pending_bytes = 0
            elif self._eof and self._acks is None:
                self.close(DisconnectReason.LOST)    # all it sent is handled and answered

    def _failed(self, exc: Exception, doing: str) -> None:
        """Handling this client's packets failed: close it (logged)."""
        if isinstance(exc, NotAcknowledged):
            # what this client sent is not kept: closing without the ack makes it resend
            log.warning("closing %s unacknowledged: %s", self.client_id, exc)
        else:
            log.error("error %s of %s", doing, self.client_id, exc_info=exc)
        self.close(DisconnectReason.KICKED)

    # ---- acks in order --------------------------------------------------------------

    def write_ack(self, packet: bytes) -> None:
        """A PUBACK/PUBREC due now: written at once, or behind the acks still waiting."""
        acks = self._acks
        if acks is None:
            self.write(packet)
        else:
            acks.append((None, packet))

    def ack_later(self, done: Awaitable[None], packet: bytes) -> Awaitable[None]:
        """Write PUBACK/PUBREC `packet` once `done` completed and the acks queued
        before it are written; the client's next packets are handled meanwhile.
        Answers DONE, or, with ACKS_HIGH acks waiting, what the caller awaits so
        that the client is held back until they are out."""
        acks = self._acks
        if acks is None:
            acks = self._acks = deque()
            self._acks_task = self.engine.loop.create_task(self._write_acks(acks))
        acks.append((done, packet))
        if len(acks) < ACKS_HIGH:
            return DONE
        task = self._acks_task
        assert task is not None
        return asyncio.shield(task)

    async def _write_acks(self, acks: deque[tuple[Awaitable[None] | None, bytes]]) -> None:
        try:
            while acks:
                done, packet = acks[0]
                if done is not None:
                    await done
                acks.popleft()
                if self.state != CLOSED:
                    self.write(packet)
        except Exception as exc:  # noqa: BLE001 - one broken connection must not hurt others
            self._failed(exc, "acknowledging publishes")
        finally:
            for done, _packet in acks:      # not to be acknowledged now: never started
                if asyncio.iscoroutine(done):
                    done.close()
            self._acks = None
            self._acks_task = None
            if self._eof and self.task is None and self.state != CLOSED:
                self.close(DisconnectReason.LOST)    # all it sent is handled and answered

    # ---- output --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """One packet (counted for $SYS): written at once when it is this connection's
        first of a light-load turn, else sent with the others of this loop turn (engine.py)."""
        engine = self.engine
        engine.counters.packets_sent += 1
        out = self._out
        if out is not None:
            out.append(data)
        elif engine.writing_through and self.written_in != engine.turn and self.transport is not None:
            self.written_in = engine.turn
            engine.counters.bytes_sent += len(data)
            self.transport.write(data)
        else:
            self._out = [data]
            engine.mark_dirty(self)

    def flush(self) -> None:
        out = self._out
        if out is None:
            return
        self._out = None
        if self.transport is None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        self.engine.counters.bytes_sent += len(data)
        self.transport.write(data)

    def set_connected(self) -> None:
        self.state = CONNECTED
        self.writable = not self._write_paused
        # only the CONNECT and auth timeouts read `created` (timers.py): a connected
        # client's own float (24 bytes) is let go
        self.created = 0.0

    # ---- closing -----------------------------------------------------------------

    @property
    def remote(self) -> tuple[str, int]:
        """The peer's (address, port); ("", 0) when the transport does not say."""
        return (self.remote_host, self.remote_port)

    @property
    def client_id(self) -> str:
        """For log lines: the client id made safe to print, else the peer address."""
        return loggable(self.info.client_id) if self.info is not None else f"{self.remote_host}:{self.remote_port}"

    def violation(self, why: str, code: int = MALFORMED) -> None:
        log.info("closing %s: protocol violation: %s", self.client_id, why)
        self.send_disconnect(code)
        self.close(DisconnectReason.KICKED)

    def send_disconnect(self, code: int, reason_string: str | None = None) -> None:
        """MQTT 5: tell the client why the broker closes its connection (once)."""
        if self.v5 and self.state == CONNECTED and not self.disconnect_sent:
            self.disconnect_sent = True
            self.write(codec5.disconnect(code, reason_string))

    def close(self, reason: DisconnectReason) -> None:
        """Flush what is written so far and close; connection_lost does the rest."""
        if self.state == CLOSED:
            return
        if self.reason is None:
            self.reason = reason
        if self.v5:
            code = _V5_REASONS.get(reason)
            if code is not None:
                self.send_disconnect(code)
        self.writable = False
        self.engine.connection_closing(self)
        t = self.transport
        if t is None:
            self.state = CLOSED     # the peer is already gone (see connection_lost)
            return
        if self._out:
            self.flush()
        self.state = CLOSED
        can_write_eof = getattr(t, "can_write_eof", None)    # not on the WebSocket transport
        if self.disconnect_sent and can_write_eof is not None and can_write_eof():
            # MQTT 5: the client reads our DISCONNECT (and what came before it) without
            # its own writes meeting a reset; what it still sends is ignored
            t.write_eof()
            self.engine.loop.call_later(DISCONNECT_LINGER, t.close)
        else:
            t.close()
        # connection_lost runs later from the loop and calls engine.connection_lost;
        # a peer that never reads would keep a closing transport (and us) forever
        self.engine.loop.call_later(CLOSE_GRACE, self._force_abort, t)

    def _force_abort(self, t: Any) -> None:
        if self.transport is t:
            t.abort()

    def abort(self, reason: DisconnectReason) -> None:
        if self.reason is None:
            self.reason = reason
        self.engine.connection_closing(self)
        t = self.transport
        self.state = CLOSED
        self.writable = False
        if t is not None:
            t.abort()
