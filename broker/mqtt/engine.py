"""The MQTT engine (3.1.1, 3.1 and 5): one per broker, made of rooms with one job each.

Connections (connection.py) hand every complete packet to `handle()`, which
decodes it (codec.py: typed packets) and passes it to the room that handles it.
`handle()` returns `DONE` when the packet was handled at once (the fast path:
QoS 0/1 PUBLISH with a synchronous ACL, acks, PINGREQ) or the awaitable rest
of its handling, which the connection awaits in order.

    lifecycle.py      accepted, CONNECT (auth, take-over), counted, closed (wills, hooks)
    v5.py             the packets of an MQTT 5 connection (codec5.py, properties.py): handle5
    publish.py        PUBLISH from clients (ACL, interception, retain, route, ack once stored),
                      wills, the broker's own publishes
    subscriptions.py  SUBSCRIBE/UNSUBSCRIBE, retained replay for the filters just granted
    routing.py        the subscription index, routing, delivery to one session, backpressure
    acl.py            access-control decisions and their one cache
    plugins.py        which plugin implements which hook (hooks.py), and calling them
    retained.py       retained messages: the budgeted trie and its store writer
    registry.py       sessions by key: add, discard, expire, persistent sessions per principal
    persistence.py    persistent sessions across restarts (through journal.py)
    session.py        one session: queue, in-flight window, redelivery; ClientInfo, Message
    budgets.py        byte budgets of session queues and of the subscription index
    timers.py         keepalive, CONNECT/auth time-outs, login expiry, stalls, session expiry
    figures.py        traffic counters and refusal stats (monitor.py reads them)

Behaviour worth knowing, beyond those modules' docstrings (see also broker/server.py):
* Un-acked QoS 1/2 messages stay in the session and are re-sent with DUP=1, in
  order, when a persistent session reconnects; there is no time-out (defect 5).
* Each session holds at most limits.max_queued messages and limits.max_queued_bytes
  payload bytes (queue + in flight; also per principal and in total); when full
  the NEWEST message is dropped (counted per session and logged), so what was
  queued keeps its order. Queued messages keep the retain flag they were sent
  with: 0 for routed messages, 1 only for retained replay on SUBSCRIBE (defect 7).
  QoS 0 messages are not queued for offline clients.
* Persistent (clean_session=0) sessions are journaled and discarded after
  SESSION_EXPIRY seconds (7 days) disconnected; a principal keeps at most
  limits.max_persistent_sessions_per_principal of them.
* Nothing is acknowledged that is not stored: while the store cannot write, the
  acks wait for the journal/retained writes, which are retried (see journal.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from broker.mqtt import codec
from broker.mqtt.acl import AccessControl
from broker.mqtt.budgets import Budgets
from broker.mqtt.codec import ProtocolViolation
from broker.mqtt.connection import CLOSED, CONNECTED, DONE, NEW, Connection
from broker.mqtt.figures import TrafficCounters, new_stats
from broker.mqtt.hooks import DisconnectReason
from broker.mqtt.lifecycle import ClientLifecycle
from broker.mqtt.persistence import SessionPersistence
from broker.mqtt.plugins import PluginHooks
from broker.mqtt.properties import MsgProps
from broker.mqtt.publish import Publishing
from broker.mqtt.registry import SessionRegistry
from broker.mqtt.retained import RetainedMessages
from broker.mqtt.routing import Router
from broker.mqtt.session import Message, SessionState
from broker.mqtt.subscriptions import Subscriptions
from broker.mqtt.timers import Ticker
from broker.mqtt.v5 import V5Packets
from broker.store.base import SavedSession

log = logging.getLogger("roost.mqtt")

# A loop turn that handled at most this many packets is light load: during the next
# turn's reads a connection's first packet is written at once, not with the turn's
# flush (see read_started)
QUIET_PACKETS = 8


class Engine:
    def __init__(self, *, limits: Any, plugins: list[Any], plugins_manager: Any = None,
                 retained_store: Any = None, listener_limits: dict[str, int] | None = None,
                 session_store: Any = None, unsaved_prefixes: tuple[str, ...] = (),
                 serve_sys: bool = False, on_retained_stored: Callable[[str, bytes], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.limits = limits
        self.max_packet = limits.max_payload + 65535 + 2 + 2 + 16
        self.started_at = time.time()
        self.counters = TrafficCounters()
        self.stats = new_stats()
        self.plugins = PluginHooks(plugins, plugins_manager)
        self.acl = AccessControl(self.plugins.topic_plugins)
        self.budgets = Budgets(limits, self.stats)
        self.persistence = SessionPersistence(session_store, unsaved_prefixes=unsaved_prefixes)
        self.journal = self.persistence.journal
        self._retained = RetainedMessages(limits=limits, store=retained_store, stats=self.stats,
                                         on_stored=on_retained_stored)
        self.retained = self._retained.index
        self.sessions: dict[str, SessionState] = {}
        self.router = Router(sessions=self.sessions, acl=self.acl, budgets=self.budgets, loop=self.loop)
        self.index = self.router.index
        self.registry = SessionRegistry(self.sessions, limits=limits, stats=self.stats, budgets=self.budgets,
                                        router=self.router, persistence=self.persistence)
        self.publishing = Publishing(limits=limits, counters=self.counters, stats=self.stats, acl=self.acl,
                                     plugins=self.plugins, retained=self._retained, router=self.router,
                                     journal=self.journal)
        self.subscriptions = Subscriptions(limits=limits, stats=self.stats, router=self.router,
                                           budgets=self.budgets, acl=self.acl, plugins=self.plugins,
                                           persistence=self.persistence, retained=self.retained,
                                           serve_sys=serve_sys)
        self.lifecycle = ClientLifecycle(limits=limits, listener_limits=listener_limits or {},
                                         counters=self.counters, stats=self.stats, loop=self.loop, host=self,
                                         plugins=self.plugins, registry=self.registry,
                                         persistence=self.persistence, router=self.router,
                                         publishing=self.publishing)
        # Connections hand their packets to handle3 (this engine's handle, bound once and
        # shared: a bound method is 64 bytes per connection), MQTT 5 ones to handle5 (v5.py)
        self.handle3: Callable[[Connection, int, int, bytes], Awaitable[None]] = self.handle
        self.handle5 = V5Packets(limits=limits, loop=self.loop, publish=self.publishing.publish,
                                 subscriptions=self.subscriptions, lifecycle=self.lifecycle).handle
        self._ticker = Ticker(lifecycle=self.lifecycle, registry=self.registry, router=self.router, loop=self.loop)
        # What sessions (SessionHost) and connections call, bound once: no extra hop per message.
        self.charge = self.budgets.charge
        self.queue_marks = self.budgets.queue_marks
        self.uncharge = self.budgets.uncharge
        self.count_drop = self.budgets.count_drop
        self.release = self.router.release
        self.connection_made = self.lifecycle.connection_made
        self.connection_closing = self.lifecycle.connection_closing
        self.connection_lost = self.lifecycle.connection_lost
        # The BrokerApi (hooks.py) that RoostBroker forwards.
        self.publish = self.publishing.publish_own
        self.deliver = self.router.deliver
        self.deliver_nowait = self.router.deliver_nowait
        self.client_ids_of = self.lifecycle.client_ids_of
        self.set_retained = self._retained.set
        self.flush_retained = self._retained.flush
        self.expire_sessions = self.registry.expire
        self._publish_in = self.publishing.publish
        self._dirty: list[Connection] = []
        self._flush_scheduled = False
        self._turn_start = 0        # counters.packets_received at the last flush (see read_started)
        self.turn = 0               # loop turns flushed so far (Connection.written_in)
        self.quiet = True           # the last turn handled at most QUIET_PACKETS packets
        self.writing_through = False   # inside a read of a light-load turn (Connection.write)
        self._tasks_bg: list[asyncio.Task[None]] = []

    # ---- figures and views others read (monitor.py, server.py, tests) --------------------

    @property
    def conns(self) -> dict[Connection, None]:
        """Every open connection (the keys; iterate, len, `in`)."""
        return self.lifecycle.conns

    @property
    def n_connected(self) -> int:
        return self.lifecycle.n_connected

    @property
    def per_listener(self) -> dict[str, int]:
        return self.lifecycle.per_listener

    @property
    def logins_refused(self) -> dict[int, int]:
        return self.lifecycle.logins_refused

    @property
    def queued_bytes(self) -> int:
        return self.budgets.queued_bytes

    @property
    def acl_async(self) -> bool:
        return self.acl.is_async

    @property
    def h_start(self) -> list[Callable[..., Any]]:
        return self.plugins.start

    @property
    def h_stop(self) -> list[Callable[..., Any]]:
        return self.plugins.stop

    @property
    def stopping(self) -> bool:
        """No new connections are accepted (the broker is shutting down)."""
        return self.lifecycle.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.lifecycle.stopping = value

    # ---- packet dispatch -------------------------------------------------------------------

    def handle(self, conn: Connection, ptype: int, flags: int, body: bytes) -> Awaitable[None]:
        """Handle one packet of `conn`: DONE, or the awaitable rest of its handling."""
        if conn.state != CONNECTED:
            if conn.state == NEW and ptype == codec.CONNECT and conn.info is None:
                return self.lifecycle.connect(conn, flags, body)
            if conn.state == CLOSED:
                return DONE
            raise ProtocolViolation("the first packet must be CONNECT")
        if ptype == codec.PUBLISH:
            return self._publish_in(conn, codec.decode_publish(flags, body))
        st = conn.session
        assert st is not None   # set once CONNECTED
        if ptype == codec.PUBACK:
            st.on_puback(codec.decode_ack(ptype, flags, body).packet_id)
        elif ptype == codec.PINGREQ:
            codec.decode_pingreq(flags, body)
            conn.write(codec.PINGRESP_BYTES)
        elif ptype == codec.PUBREC:
            st.on_pubrec(codec.decode_ack(ptype, flags, body).packet_id)
        elif ptype == codec.PUBCOMP:
            st.on_pubcomp(codec.decode_ack(ptype, flags, body).packet_id)
        elif ptype == codec.PUBREL:
            pid = codec.decode_ack(ptype, flags, body).packet_id
            st.incoming_qos2.discard(pid)
            conn.write(codec.ack(codec.PUBCOMP, pid))
        elif ptype == codec.SUBSCRIBE:
            return self.subscriptions.subscribe(conn, codec.decode_subscribe(flags, body))
        elif ptype == codec.UNSUBSCRIBE:
            return self.subscriptions.unsubscribe(conn, codec.decode_unsubscribe(flags, body))
        elif ptype == codec.DISCONNECT:
            codec.decode_disconnect(flags, body)
            self.lifecycle.disconnect(conn)
        elif flags:
            raise ProtocolViolation(f"packet type {ptype} with reserved flags {flags:#x}")
        elif ptype == codec.CONNECT:
            raise ProtocolViolation("second CONNECT")
        else:
            raise ProtocolViolation(f"unexpected packet type {ptype}")
        return DONE

    # ---- output batching: write at once when the loop is idle, coalesce under load --------
    #
    # Every read callback makes sure a flush runs once this loop turn's callbacks are
    # done (_flush, through call_soon). While the load is light (the last turn and this
    # one so far handled at most QUIET_PACKETS packets: paced traffic, where a turn often
    # has two or three small reads) a connection's first packet of the turn is written
    # the moment it is made (Connection.write), so a message goes out before the rest of
    # its read is handled (the publisher's PUBACK, the end of the parse): about 5 us of
    # a paced message's ~35 us in the broker (bench/RESULTS.md). Only the first: what
    # reaches that connection later in the turn waits for the turn's flush, so a
    # subscriber fed by several publishers (fan-in) gets two writes a turn, not one per
    # packet (per-read writes cost fan-in QoS 1 ~15 % more CPU per message). Under load
    # (many packets per turn) everything goes out in the one flush: a single
    # transport.write per connection and turn.

    def read_started(self) -> None:
        self.writing_through = self.quiet and self.counters.packets_received - self._turn_start <= QUIET_PACKETS

    def read_done(self) -> None:
        # scheduled here, not at the read's start: after its first packets are out
        self.writing_through = False
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def mark_dirty(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        handled = self.counters.packets_received
        self.quiet = handled - self._turn_start <= QUIET_PACKETS
        self._turn_start = handled
        self.turn += 1
        self._write_out()

    def _write_out(self) -> None:
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()

    # ---- BrokerApi calls that reach several rooms -------------------------------------------

    async def kick_principal(self, principal: str) -> int:
        return self.lifecycle.kick_principal(principal)

    def refresh_acl(self) -> None:
        self.acl.forget(self.sessions.values())

    # ---- the cluster (broker/cluster/) -------------------------------------------------------

    def route_from_peer(self, topic: str, payload: bytes, qos: int, retain: bool = False,
                        forwarded: bytes | None = None, expires_in: float | None = None,
                        groups: tuple[str, ...] = ()) -> Awaitable[int]:
        """Route a publish another node received (retained there already) to the
        sessions here, without sharing it back out: `retain` the publisher's flag
        (Retain As Published), `forwarded` its MQTT 5 properties passed on,
        `expires_in` the seconds left of its Message Expiry Interval, `groups`
        the shared subscription groups served here (that node picked this one)."""
        props = None
        if forwarded is not None or expires_in is not None:
            props = MsgProps(forwarded or b"", None if expires_in is None else self.loop.time() + expires_in, None)
        msg = Message(topic, payload, qos, False, props)
        msg.pub_retain = retain
        return self.router.route_awaited(msg, share=False, served=groups)

    def take_over_here(self, key: str) -> bool:
        """A client with session key `key` connected on another node: close its
        connection here like a take-over (no will; disconnect hooks run)."""
        st = self.sessions.get(key)
        if st is None or st.conn is None:
            return False
        st.conn.close(DisconnectReason.TAKEN_OVER)
        return True

    # ---- start and stop --------------------------------------------------------------------

    async def load_retained(self) -> None:
        await self._retained.load()

    async def load_sessions(self, keep: Callable[[SavedSession], bool] = lambda s: True) -> None:
        await self.persistence.load(keep, host=self, registry=self.registry, router=self.router,
                                    budgets=self.budgets)

    def start(self) -> None:
        self._tasks_bg = [self.loop.create_task(self._ticker.run())]
        if self.journal is not None:
            self.journal.start()
        if self._retained.persisted:
            self._tasks_bg.append(self.loop.create_task(self._retained.run_writer()))

    async def stop(self) -> None:
        """Close every connection (reason shutdown, no wills), run their
        disconnect hooks, write pending retained changes and save the
        persistent sessions."""
        lifecycle = self.lifecycle
        lifecycle.stopping = True
        for t in self._tasks_bg:
            t.cancel()
        for conn in list(lifecycle.conns):
            conn.close(DisconnectReason.SHUTDOWN)
        await asyncio.sleep(0)
        for _ in range(50):
            if not lifecycle.finishers and not lifecycle.conns:
                break
            await asyncio.sleep(0.02)
        if lifecycle.finishers:
            await asyncio.wait(list(lifecycle.finishers), timeout=5)
        for conn in list(lifecycle.conns):
            conn.abort(DisconnectReason.SHUTDOWN)
        await self._retained.flush(give_up_after=5.0)
        await self.persistence.save(self.sessions)
