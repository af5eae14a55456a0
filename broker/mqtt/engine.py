"""The MQTT 3.1.1 engine: sessions, routing, retained messages, plugin hooks.

One `Engine` per broker. Connections (broker/mqtt/connection.py) hand it every
complete packet through `handle()`, which either finishes synchronously (the
fast path: QoS 0/1 PUBLISH with a synchronous ACL, acks, PINGREQ) or returns a
coroutine the connection awaits in order.

Behaviour worth knowing (see also broker/server.py):
* Authentication runs before any session is looked at; a refused CONNECT
  creates and changes nothing (amqtt defects 2, 9).
* Take-over: the old connection is closed without its will; the new
  connection's clean_session decides whether the old session is resumed
  (subscriptions, queue, inflight) or discarded (defect 3).
* Keepalive: a connection silent for 1.5 x keepalive is closed and its will
  published (defect 4). Wills are published on every close except DISCONNECT,
  take-over and broker shutdown.
* Un-acked QoS 1/2 messages stay in the session and are re-sent with DUP=1, in
  order, when a persistent session reconnects; there is no time-out (defect 5).
* Delivered QoS = min(publish QoS, granted QoS); overlapping subscriptions of one
  session get one copy at the highest granted QoS (defect 6).
* Each session holds at most limits.max_queued messages and limits.max_queued_bytes
  payload bytes (queue + in flight; also per principal and in total); when full
  the NEWEST message is dropped (counted per session and logged), so what was
  queued keeps its order. Queued messages keep the retain flag they were sent
  with: 0 for routed messages, 1 only for retained replay on SUBSCRIBE (defect 7).
  QoS 0 messages are not queued for offline clients.
* Backpressure: when a live session's queue reaches half of max_queued, the
  connections publishing to it stop being read (parsing stops mid-buffer) until
  the queue is down to a quarter, so fast publishers are slowed to the pace of
  their subscribers instead of losing QoS 1/2 messages. A client is never held
  for its own session, offline sessions never hold anyone, and a session that
  makes no progress for STALL_TIMEOUT stops holding publishers (it drops).
  broker.publish()/deliver() are never held: deliver() waits for room instead.
* Persistent (clean_session=0) sessions are journaled (journal.py) and discarded
  after SESSION_EXPIRY seconds (7 days) disconnected; a principal keeps at most
  limits.max_persistent_sessions_per_principal of them. Retained messages live in
  a byte-budgeted trie (retained.py), persisted through the RetainedStore.
* Nothing is acknowledged that is not stored: while the store cannot write, the
  acks wait for the journal/retained writes, which are retried (see journal.py).
* Subscription lookup: exact filters in a dict, wildcard filters in a trie
  (defect 10); no task is created per message or per subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from amqtt.contexts import Action
from amqtt.events import BrokerEvents
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from broker.mqtt import codec
from broker.mqtt.codec import ProtocolViolation, UnacceptableProtocol
from broker.mqtt.connection import CLOSED, CONNECTED, NEW, Connection
from broker.mqtt.hooks import ConnectRefused, DisconnectReason
from broker.mqtt.journal import RETRY_FIRST, RETRY_MAX, SessionJournal
from broker.mqtt.retained import Refused as RetainedRefused
from broker.mqtt.retained import RetainedIndex
from broker.mqtt.session import (
    ACL_CACHE_SIZE,
    ClientInfo,
    Message,
    SessionState,
    client_id_of_key,
    loggable,
    session_key,
)
from broker.mqtt.topics import SubscriptionIndex, is_wildcard, matches, valid_topic_filter, valid_topic_name
from broker.services.telemetry_influx import RateLimitedLog
from broker.store.base import RetainedMessage, SavedMessage, SavedSession, SessionDrop, SessionUpsert, StoreUnavailable
from contract.ids import is_valid_principal_id

log = logging.getLogger("roost.mqtt")

SESSION_EXPIRY = 7 * 86400.0     # seconds a disconnected persistent session is kept
CONNECT_TIMEOUT = 10.0           # seconds from TCP accept to CONNECT
AUTH_TIMEOUT = 60.0              # seconds a CONNECT may spend in authentication
DELIVER_WAIT = 10.0              # seconds deliver() waits for room in a full queue
TICK = 0.5                       # keepalive/timeout check period
PUB_ACL_CACHE = 256              # per-connection PUBLISH decisions
PAUSED_GRACE = 60.0              # extra seconds for a connection we stopped reading
STALL_TIMEOUT = 3.0              # a congested session without progress stops holding publishers
MAX_FILTER_LEVELS = 64           # wildcard filters deeper than this are refused (SUBACK 0x80): trie memory
# Filters that look valid but that nothing serves: refused (SUBACK 0x80), not
# granted and left silent. Shared subscriptions come with a later issue; $SYS is
# served when the broker publishes it (sys_interval > 0: Engine(serve_sys=True)).
UNSERVED_PREFIXES = ("$share/", "$SYS/", "$SYS")
REPLAY_CHUNK = 128               # retained replay yields to the loop every this many trie steps
MAX_RETAINED = 100_000           # retained topics kept; beyond, new topics are routed but not retained

_NO_WILL = (DisconnectReason.DISCONNECT, DisconnectReason.TAKEN_OVER, DisconnectReason.SHUTDOWN)


@dataclass(slots=True)
class TrafficCounters:
    """Totals since start, for $SYS and metrics; plain ints bumped on the hot path."""
    # PUBLISH packets from / to clients (re-sends included), by QoS: one list item
    # bumped per packet, the totals are summed when read
    received_qos: list[int] = field(default_factory=lambda: [0, 0, 0])
    sent_qos: list[int] = field(default_factory=lambda: [0, 0, 0])
    packets_received: int = 0      # MQTT packets of every type (Mosquitto's $SYS "messages")
    packets_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    connections_total: int = 0     # CONNECTs accepted
    connections_max: int = 0       # most connected at once

    @property
    def messages_received(self) -> int:
        return sum(self.received_qos)

    @property
    def messages_sent(self) -> int:
        return sum(self.sent_qos)


class Engine:
    def __init__(self, *, limits: Any, plugins: list[Any], plugins_manager: Any = None,
                 retained_store: Any = None, listener_limits: dict[str, int] | None = None,
                 session_store: Any = None, unsaved_prefixes: tuple[str, ...] = (),
                 serve_sys: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.limits = limits
        self.max_packet = limits.max_payload + 65535 + 2 + 2 + 16
        self.sessions: dict[str, SessionState] = {}
        self.index: SubscriptionIndex[SessionState] = SubscriptionIndex()
        self.retained = RetainedIndex(max_bytes=limits.max_retained_bytes,
                                      max_bytes_per_principal=limits.max_retained_bytes_per_principal,
                                      max_topics=MAX_RETAINED)
        # payload bytes held in session queues and in-flight windows, in total and per principal
        self.queued_bytes = 0
        self.queued_bytes_of: dict[str | None, int] = {}
        self.subscription_bytes = 0
        self.persistent_of: dict[str | None, int] = {}   # persistent sessions per principal
        self.conns: set[Connection] = set()
        self.n_connected = 0
        self.per_listener: dict[str, int] = {}
        self.listener_limits = listener_limits or {}
        self.by_principal: dict[str, dict[str, Connection]] = {}
        self.counters = TrafficCounters()
        self.started_at = time.time()
        self.stats = {"dropped": 0, "publish_denied": 0, "retained_write_errors": 0, "retained_refused": 0,
                      "subscriptions_refused": 0, "sessions_refused": 0, "connections_refused": 0,
                      "sessions_expired": 0}
        # CONNECTs an auth plugin refused, by CONNACK code (4 bad credentials, 5 not authorized, ...)
        self.logins_refused: dict[int, int] = {}
        self.unserved_prefixes = ("$share/",) if serve_sys else UNSERVED_PREFIXES
        self._retained_refused_log = RateLimitedLog(log)
        self._dirty: list[Connection] = []
        self._flush_scheduled = False
        self._locks: dict[str, list[Any]] = {}
        self._finishers: set[asyncio.Task[None]] = set()
        self.congested: set[SessionState] = set()
        self._pm = plugins_manager
        self._store = retained_store
        self._session_store = session_store
        self.journal = SessionJournal(session_store) if session_store is not None else None
        # Messages on these topics are not saved with a session: another durable
        # path delivers them again after a restart (the mailbox, from its cursor).
        self._unsaved_prefixes = unsaved_prefixes
        self._sessions_loaded = False   # nothing is saved over sessions never taken back
        self._retained_dirty: dict[str, tuple[bytes, int] | None] = {}
        self._retained_wake = asyncio.Event()
        self._retained_lock = asyncio.Lock()
        self._retained_unavailable_since: float | None = None
        self._tasks_bg: list[asyncio.Task[None]] = []
        self._stopping = False
        self._load_plugins(plugins)

    # ---- plugins -----------------------------------------------------------------

    def _load_plugins(self, plugins: list[Any]) -> None:
        self.auth_plugins = [p for p in plugins if isinstance(p, BaseAuthPlugin)]
        self.topic_plugins = [p for p in plugins if isinstance(p, BaseTopicPlugin)]
        self._checks: list[Callable[..., bool]] = []
        self.acl_async = False
        for p in self.topic_plugins:
            check = getattr(p, "check", None)
            if check is not None and callable(check) and not inspect.iscoroutinefunction(check):
                self._checks.append(check)
            else:
                self.acl_async = True
        self.acl_enabled = bool(self.topic_plugins)
        self.interceptors: list[tuple[tuple[str, ...], Any]] = []
        # The same interceptors with their optional synchronous variant
        # (`on_client_publish_nowait`): a publish that only such plugins intercept is
        # handled inside data_received, with no task per message (see _publish).
        self.sync_interceptors: list[tuple[tuple[str, ...], Any]] = []
        for p in plugins:
            prefixes = getattr(p, "publish_prefixes", None)
            fn = getattr(p, "on_client_publish", None)
            if prefixes and fn is not None:
                self.interceptors.append((tuple(prefixes), fn))
                nowait = getattr(p, "on_client_publish_nowait", None)
                self.sync_interceptors.append((tuple(prefixes), nowait if callable(nowait) else None))
        self.prefixes: tuple[str, ...] = tuple(x for pre, _ in self.interceptors for x in pre)

        def hooks(name: str) -> list[Callable[..., Any]]:
            return [getattr(p, name) for p in plugins if callable(getattr(p, name, None))]

        # amqtt's EventLoggerPlugin answers every on_* name with a coroutine
        # function: the synchronous hooks take only plain functions.
        self.h_online = [f for f in hooks("on_client_online") if not inspect.iscoroutinefunction(f)]
        self.h_offline = [f for f in hooks("on_client_offline") if not inspect.iscoroutinefunction(f)]
        self.h_connected = hooks("on_client_connected")
        self.h_disconnected = hooks("on_client_disconnected")
        self.h_subscribed = hooks("on_client_subscribed")
        self.h_unsubscribed = hooks("on_client_unsubscribed")
        self.h_start = hooks("on_roost_start")
        self.h_stop = hooks("on_roost_stop")

    async def _call(self, fns: list[Callable[..., Any]], *args: Any) -> None:
        for fn in fns:
            try:
                await fn(*args)
            except Exception:  # noqa: BLE001 - a plugin bug must not break the connection
                log.exception("plugin hook %s failed", getattr(fn, "__qualname__", fn))

    @staticmethod
    def _call_now(fns: list[Callable[..., Any]], *args: Any) -> None:
        """The synchronous hooks: called at the very moment of the change, so their
        order is the order things happened across all connections."""
        for fn in fns:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a plugin bug must not break the connection
                log.exception("plugin hook %s failed", getattr(fn, "__qualname__", fn))

    async def _fire(self, event: BrokerEvents, **kwargs: Any) -> None:
        """amqtt-style event for plain amqtt plugins (only when one listens)."""
        pm = self._pm
        if pm is not None and event in pm._event_plugin_callbacks:
            try:
                await pm.fire_event(event, **kwargs)
            except Exception:  # noqa: BLE001
                log.exception("amqtt event %s failed", event)

    # ---- access control ----------------------------------------------------------

    def check_sync(self, info: ClientInfo, topic: str, action: Action) -> bool:
        for check in self._checks:
            try:
                if not check(info, topic, action):
                    return False
            except Exception:  # noqa: BLE001 - deny on plugin error
                log.exception("ACL check failed; denying")
                return False
        return True

    async def allowed(self, info: ClientInfo, topic: str, action: Action) -> bool:
        if not self.acl_enabled:
            return True
        if not self.acl_async:
            return self.check_sync(info, topic, action)
        for p in self.topic_plugins:
            try:
                check = getattr(p, "check", None)
                if check is not None and not inspect.iscoroutinefunction(check):
                    ok = check(info, topic, action)
                else:
                    ok = await p.topic_filtering(session=info, topic=topic, action=action)
            except Exception:  # noqa: BLE001
                log.exception("ACL plugin %s failed; denying", type(p).__name__)
                return False
            if not ok:
                return False
        return True

    def can_receive(self, st: SessionState, topic: str) -> bool:
        """Sync RECEIVE decision (only valid when not acl_async), cached per session."""
        cache = st.acl_cache
        ok = cache.get(topic)
        if ok is None:
            ok = self.check_sync(st.info, topic, Action.RECEIVE)
            if len(cache) >= ACL_CACHE_SIZE:
                cache.clear()
            cache[topic] = ok
        return ok

    async def can_receive_async(self, st: SessionState, topic: str) -> bool:
        if not self.acl_enabled:
            return True
        cache = st.acl_cache
        ok = cache.get(topic)
        if ok is None:
            ok = await self.allowed(st.info, topic, Action.RECEIVE)
            if len(cache) >= ACL_CACHE_SIZE:
                cache.clear()
            cache[topic] = ok
        return ok

    def refresh_acl(self) -> None:
        for st in self.sessions.values():
            st.acl_cache.clear()
        for conn in self.conns:
            conn.pub_acl.clear()

    # ---- output batching ---------------------------------------------------------

    def mark_dirty(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()

    # ---- connection lifecycle ----------------------------------------------------

    def connection_made(self, conn: Connection) -> None:
        cap = self.limits.max_connections
        if self._stopping or (cap and len(self.conns) >= cap + 256):
            # far over the limit (most are not even CONNECTed yet): do not read a byte
            conn.abort(DisconnectReason.KICKED)
            return
        self.conns.add(conn)

    def _count_in(self, conn: Connection) -> None:
        conn.counted = True
        self.n_connected += 1
        self.counters.connections_total += 1
        if self.n_connected > self.counters.connections_max:
            self.counters.connections_max = self.n_connected
        self.per_listener[conn.listener_name] = self.per_listener.get(conn.listener_name, 0) + 1
        info = conn.info
        if info is not None and info.principal:
            self.by_principal.setdefault(info.principal, {})[info.client_id] = conn
        if info is not None:
            self._call_now(self.h_online, info)

    def _count_out(self, conn: Connection) -> None:
        if not getattr(conn, "counted", False):
            return
        conn.counted = False
        self.n_connected -= 1
        self.per_listener[conn.listener_name] -= 1
        info = conn.info
        if info is not None and info.principal:
            d = self.by_principal.get(info.principal)
            if d is not None and d.get(info.client_id) is conn:
                del d[info.client_id]
                if not d:
                    del self.by_principal[info.principal]
        if info is not None:
            # wall-clock time the client was last heard from (a keepalive expiry is
            # noticed 1.5 x keepalive after that)
            info.last_activity = time.time() - (self.loop.time() - conn.last_recv)
            self._call_now(self.h_offline, info, conn.reason or DisconnectReason.LOST)

    def connection_closing(self, conn: Connection) -> None:
        """The broker decided to close it (DISCONNECT, keepalive, take-over, kick):
        it stops counting now, not when the transport reports the loss later."""
        self._count_out(conn)

    def connection_lost(self, conn: Connection) -> None:
        self.conns.discard(conn)
        self._count_out(conn)
        st = conn.session
        if st is not None and st.conn is conn:
            st.conn = None
            st.disconnected_at = time.time()
            if st.journal is not None:
                self._journal_session(st)    # when it left: expiry counts from there, also after a crash
            if st.blocked is not None:
                self.release(st)
            if st.clean:
                self.discard(st)
            else:
                st.wake()
        if conn.info is not None and not conn.taken_over and (conn.announced or conn.session is not None):
            task = self.loop.create_task(self._finish(conn))
            self._finishers.add(task)
            task.add_done_callback(self._finishers.discard)

    async def _finish(self, conn: Connection) -> None:
        """After a connection closed: its will, then on_client_disconnected."""
        task = conn.task
        if task is not None and not task.done():
            await asyncio.wait([task])
        if conn.taken_over:
            return  # the take-over path reports it
        info = conn.info
        assert info is not None
        reason = conn.reason or DisconnectReason.LOST
        if reason not in _NO_WILL and info.will_flag and conn.session is not None:
            await self._publish_will(info)
        if conn.announced:
            async with self._lock(info.session_key):
                await self._call(self.h_disconnected, info, reason)
            await self._fire(BrokerEvents.CLIENT_DISCONNECTED, client_id=info.client_id, client_session=info)

    def discard(self, st: SessionState) -> None:
        """Forget a session: subscriptions, queue, inflight."""
        st.discarded = True
        if st.journal is not None:
            st.journal.append(SessionDrop(st.client_id))
            st.journal = None
        if st.blocked is not None:
            self.release(st)
        for f, _q in st.subs.items():
            self.index.remove(f, st)
            self.subscription_bytes -= subscription_cost(f)
        st.subs.clear()
        if st.bytes:
            self.uncharge(st, st.bytes)
        st.queue.clear()
        st.inflight.clear()
        st.incoming_qos2.clear()
        st.wake()
        if self.sessions.get(st.client_id) is st:
            del self.sessions[st.client_id]
            if not st.clean:
                self._count_persistent(st.info.principal, -1)

    def _add_session(self, st: SessionState) -> None:
        self.sessions[st.client_id] = st
        if not st.clean:
            self._count_persistent(st.info.principal, 1)

    def _count_persistent(self, principal: str | None, n: int) -> None:
        left = self.persistent_of.get(principal, 0) + n
        if left > 0:
            self.persistent_of[principal] = left
        else:
            self.persistent_of.pop(principal, None)

    @contextlib.asynccontextmanager
    async def _lock(self, cid: str) -> AsyncIterator[None]:
        """Serialises connect/take-over/disconnect hooks of one client id."""
        entry = self._locks.get(cid)
        if entry is None:
            entry = self._locks[cid] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[cid]

    # ---- packet dispatch ---------------------------------------------------------

    def handle(self, conn: Connection, ptype: int, flags: int, body: bytes) -> Any:
        if conn.state != CONNECTED:
            if conn.state == NEW and ptype == codec.CONNECT and conn.info is None:
                return self._connect(conn, flags, body)
            if conn.state == CLOSED:
                return None
            raise ProtocolViolation("the first packet must be CONNECT")
        if ptype == codec.PUBLISH:
            return self._publish(conn, flags, body)
        st = conn.session
        assert st is not None and conn.info is not None   # set once CONNECTED
        if flags and ptype != codec.PUBREL and ptype != codec.SUBSCRIBE and ptype != codec.UNSUBSCRIBE:
            # reserved flags must be 0 (MQTT-2.2.2-2); a DISCONNECT like that is a
            # protocol error, so the will is published
            raise ProtocolViolation(f"packet type {ptype} with reserved flags {flags:#x}")
        if ptype == codec.PUBACK:
            st.on_puback(codec.decode_packet_id(body))
        elif ptype == codec.PINGREQ:
            if body:
                raise ProtocolViolation("PINGREQ with a body")
            conn.write(codec.PINGRESP_BYTES)
        elif ptype == codec.PUBREC:
            st.on_pubrec(codec.decode_packet_id(body))
        elif ptype == codec.PUBCOMP:
            st.on_pubcomp(codec.decode_packet_id(body))
        elif ptype == codec.PUBREL:
            if flags != 0x02:
                raise ProtocolViolation("PUBREL flags must be 0010")
            pid = codec.decode_packet_id(body)
            st.incoming_qos2.discard(pid)
            conn.write(codec.ack(codec.PUBCOMP, pid))
        elif ptype == codec.SUBSCRIBE:
            return self._subscribe(conn, flags, body)
        elif ptype == codec.UNSUBSCRIBE:
            return self._unsubscribe(conn, flags, body)
        elif ptype == codec.DISCONNECT:
            if body:
                raise ProtocolViolation("DISCONNECT with a body")
            conn.info.will_flag = False
            conn.close(DisconnectReason.DISCONNECT)
        elif ptype == codec.CONNECT:
            raise ProtocolViolation("second CONNECT")
        else:
            raise ProtocolViolation(f"unexpected packet type {ptype}")
        return None

    # ---- CONNECT -----------------------------------------------------------------

    async def _connect(self, conn: Connection, flags: int, body: bytes) -> None:
        try:
            pkt = codec.decode_connect(flags, body)
        except UnacceptableProtocol as exc:
            log.info("refusing %s:%s: %s", *conn.remote, exc)
            conn.write(codec.connack(False, ConnectRefused.UNACCEPTABLE_PROTOCOL))
            conn.close(DisconnectReason.KICKED)
            return
        cid = pkt.client_id
        generated = False
        if not cid:
            if not pkt.clean_session:
                conn.write(codec.connack(False, ConnectRefused.IDENTIFIER_REJECTED))
                conn.close(DisconnectReason.KICKED)
                return
            # "<user>.auto-<hex>" passes Roost's client-id binding for an
            # authenticated user; anonymous clients get "auto-<hex>"
            suffix = "auto-" + secrets.token_hex(8)
            cid = f"{pkt.username}.{suffix}" if is_valid_principal_id(pkt.username) else suffix
            generated = True
        info = ClientInfo(client_id=cid, username=pkt.username, password=pkt.password,
                          remote_address=conn.remote[0], remote_port=conn.remote[1],
                          clean_session=pkt.clean_session, keep_alive=pkt.keep_alive,
                          listener_name=conn.listener_name, client_id_generated=generated)
        if pkt.will_topic is not None:
            if not valid_topic_name(pkt.will_topic):
                raise ProtocolViolation("invalid will topic")
            info.will_flag = True
            info.will_topic = pkt.will_topic
            info.will_message = pkt.will_payload
            info.will_qos = pkt.will_qos
            info.will_retain = pkt.will_retain
        conn.info = info
        conn.keep_alive = pkt.keep_alive
        cap = self.limits.max_connections
        lcap = self.listener_limits.get(conn.listener_name, 0)
        if (cap and self.n_connected >= cap) or (lcap and self.per_listener.get(conn.listener_name, 0) >= lcap):
            self.stats["connections_refused"] += 1
            log.warning("refusing %s: connection limit reached", loggable(cid))
            conn.write(codec.connack(False, ConnectRefused.SERVER_UNAVAILABLE))
            conn.close(DisconnectReason.KICKED)
            return
        code = await self.authenticate(info)
        if conn.state == CLOSED:
            return
        if code:
            self.logins_refused[code] = self.logins_refused.get(code, 0) + 1
            log.info("refused CONNECT of %s from %s:%s (code %d)", loggable(cid), *conn.remote, code)
            conn.write(codec.connack(False, code))
            conn.close(DisconnectReason.KICKED)
            return
        info.password = None
        info.session_key = session_key(info.principal, info.client_id)
        await self._establish(conn, info)

    async def authenticate(self, info: ClientInfo) -> int:
        """0 to accept, else a CONNACK return code. See hooks.py."""
        accepted = False
        for p in self.auth_plugins:
            try:
                r = await p.authenticate(session=info)
            except ConnectRefused as exc:
                return exc.code
            except Exception:  # noqa: BLE001
                log.exception("auth plugin %s failed", type(p).__name__)
                return ConnectRefused.SERVER_UNAVAILABLE
            if r is None:
                continue
            if not r:
                return ConnectRefused.BAD_CREDENTIALS
            accepted = True
        return 0 if accepted else ConnectRefused.NOT_AUTHORIZED

    async def _establish(self, conn: Connection, info: ClientInfo) -> None:
        cid = info.session_key
        async with self._lock(cid):
            if conn.state == CLOSED:
                return
            old = self.sessions.get(cid)
            if not info.clean_session and (old is None or old.clean) and self._too_many_sessions(info):
                conn.write(codec.connack(False, ConnectRefused.SERVER_UNAVAILABLE))
                conn.close(DisconnectReason.KICKED)
                return
            taken: Connection | None = None
            if old is not None and old.conn is not None:
                taken = old.conn
                taken.taken_over = True
                taken.reason = DisconnectReason.TAKEN_OVER
                old.conn = None
                log.info("client %s taken over by a new connection", loggable(info.client_id))
            if info.clean_session or old is None or old.clean:
                if old is not None:
                    self.discard(old)
                st = SessionState(cid, info.clean_session, info, self)
                self._add_session(st)
                if not st.clean:
                    self._journal_session(st)
                present = False
            else:
                st = old
                st.info = info
                st.acl_cache.clear()
                present = True
            conn.session = st
            st.conn = conn
            conn.set_connected()
            self._count_in(conn)
            if taken is not None:
                # closed only once the new one is counted: 1 -> 2 -> 1, never 0
                taken.close(DisconnectReason.TAKEN_OVER)
            conn.write(codec.connack(present, 0))
            st.resume()
            conn.announced = True
            await self._call(self.h_connected, info)
            await self._fire(BrokerEvents.CLIENT_CONNECTED, client_id=info.client_id, client_session=info)
            if taken is not None and taken.announced and taken.info is not None:
                await self._call(self.h_disconnected, taken.info, DisconnectReason.TAKEN_OVER)
                await self._fire(BrokerEvents.CLIENT_DISCONNECTED, client_id=taken.info.client_id,
                                 client_session=taken.info)

    def _too_many_sessions(self, info: ClientInfo) -> bool:
        """A new persistent session for a principal that already has
        limits.max_persistent_sessions_per_principal: refused (each one holds a
        copy of everything routed to it, in memory and on disk)."""
        principal = info.principal
        cap = self.limits.max_persistent_sessions_per_principal
        if principal is None or not cap:
            return False
        n = self.persistent_of.get(principal, 0)
        if n < cap:
            return False
        self.stats["sessions_refused"] += 1
        log.warning("refusing %s: %s already has %d persistent sessions "
                    "(limits.max_persistent_sessions_per_principal); connect with clean_session=1 "
                    "under an old client id to end one", info.client_id, principal, n)
        return True

    # ---- PUBLISH -----------------------------------------------------------------

    def _publish(self, conn: Connection, flags: int, body: bytes) -> Any:
        topic, qos, packet_id, retain, _dup, payload = codec.decode_publish(flags, body)
        pid = packet_id or 0        # QoS 0 has none; 0 is never a valid packet id
        self.counters.received_qos[qos] += 1
        if not valid_topic_name(topic):
            raise ProtocolViolation(f"invalid topic name {topic!r}")
        if len(payload) > self.limits.max_payload:
            raise ProtocolViolation(f"payload of {len(payload)} bytes exceeds limits.max_payload")
        st = conn.session
        info = conn.info
        assert st is not None and info is not None   # set once CONNECTED
        if qos == 2 and pid in st.incoming_qos2:
            conn.write(codec.ack(codec.PUBREC, pid))  # duplicate: already routed
            return None
        if topic[0] == "$":
            # MQTT 3.1.1 has no negative PUBACK: the message is acknowledged and not
            # routed ($ topics are the broker's, MQTT-4.7.2-1); said once per connection
            self.stats["publish_denied"] += 1
            if not conn.dollar_publish_logged:
                conn.dollar_publish_logged = True
                log.info("%s published to %s: topics starting with $ are reserved for the broker; "
                         "not routed (said once per connection)", info.client_id, topic)
        else:
            ok = conn.pub_acl.get(topic) if self.acl_enabled else True
            if self.acl_async:
                # async ACL plugins configured: RECEIVE checks must be awaited too
                return self._publish_async(conn, topic, qos, pid, retain, payload, acl_done=bool(ok))
            if ok is None:
                ok = self.check_sync(info, topic, Action.PUBLISH)
                cache = conn.pub_acl
                if len(cache) >= PUB_ACL_CACHE:
                    cache.clear()
                cache[topic] = ok
            if not ok:
                self.stats["publish_denied"] += 1
                log.debug("publish of %s to %s denied", info.client_id, topic)
            elif self.prefixes and topic.startswith(self.prefixes):
                consumed = None if retain else self._intercept_nowait(info, topic, payload, qos)
                if consumed is None:
                    return self._publish_async(conn, topic, qos, pid, retain, payload, acl_done=True)
                if not consumed:
                    self.route(Message(topic, payload, qos), conn)
            else:
                if retain:
                    self.set_retained(topic, payload, qos, info.principal)
                journal = self.journal
                mark = journal.appended if journal is not None else 0
                self.route(Message(topic, payload, qos), conn)
                kept = journal is not None and journal.appended != mark
                if qos and (kept or (retain and self._store is not None)):
                    # Acknowledge only once stored what must survive a SIGKILL right
                    # after PUBACK: a retained change, a message kept for a persistent
                    # session. Returning an awaitable keeps this client's later
                    # packets (and their acks) in order behind it.
                    if qos == 2:
                        st.incoming_qos2.add(pid)
                    return self._ack_when_stored(conn, qos, pid, retained=retain, kept=kept)
        if qos == 1:
            conn.write(codec.ack(codec.PUBACK, pid))
        elif qos == 2:
            st.incoming_qos2.add(pid)
            conn.write(codec.ack(codec.PUBREC, pid))
        return None

    def _intercept_nowait(self, info: ClientInfo, topic: str, payload: bytes, qos: int) -> bool | None:
        """Interception without a task, as _publish_checked does it: True consumed,
        False route it; None when a matching interceptor has no synchronous variant
        (then the caller takes the async path, which asks every interceptor)."""
        for prefixes, fn in self.sync_interceptors:
            if topic.startswith(prefixes) and fn is None:
                return None
        for prefixes, fn in self.sync_interceptors:
            if topic.startswith(prefixes):
                try:
                    if fn(info, topic, payload, qos, False):
                        return True
                except Exception:  # noqa: BLE001 - as in _publish_checked: logged, consumed
                    log.exception("on_client_publish_nowait of %s failed", getattr(fn, "__qualname__", fn))
                    return True
        return False

    async def _publish_async(self, conn: Connection, topic: str, qos: int, pid: int, retain: bool,
                             payload: bytes, acl_done: bool = False) -> None:
        info = conn.info
        st = conn.session
        assert st is not None and info is not None
        ok = acl_done
        if not ok:
            ok = await self.allowed(info, topic, Action.PUBLISH)
            cache = conn.pub_acl
            if len(cache) >= PUB_ACL_CACHE:
                cache.clear()
            cache[topic] = ok
        if ok:
            journal = self.journal
            mark = journal.appended if journal is not None else 0
            await self._publish_checked(info, topic, payload, qos, retain, conn)
            if qos:   # acknowledged only once stored (see _publish)
                if retain:
                    await self.flush_retained()
                if journal is not None and journal.appended != mark:
                    await journal.durable()
        else:
            self.stats["publish_denied"] += 1
        if qos == 2:
            st.incoming_qos2.add(pid)
        if conn.state == CLOSED:
            return
        if qos == 1:
            conn.write(codec.ack(codec.PUBACK, pid))
        elif qos == 2:
            conn.write(codec.ack(codec.PUBREC, pid))

    async def _ack_when_stored(self, conn: Connection, qos: int, pid: int, *, retained: bool,
                               kept: bool) -> None:
        if retained:
            await self.flush_retained()
        if kept and self.journal is not None:
            await self.journal.durable()
        if conn.state == CLOSED:
            return
        conn.write(codec.ack(codec.PUBACK if qos == 1 else codec.PUBREC, pid))

    async def _publish_checked(self, info: ClientInfo, topic: str, payload: bytes, qos: int, retain: bool,
                               src: Connection | None = None) -> None:
        """A publish that passed the PUBLISH ACL: interception, then retain + routing."""
        if self.prefixes and topic.startswith(self.prefixes):
            for prefixes, fn in self.interceptors:
                if topic.startswith(prefixes):
                    try:
                        if await fn(info, topic, payload, qos, retain):
                            return
                    except Exception:  # noqa: BLE001
                        log.exception("on_client_publish of %s failed", getattr(fn, "__qualname__", fn))
                        return
        if retain:
            self.set_retained(topic, payload, qos, info.principal)
        await self.route_any(Message(topic, payload, qos), src)

    async def _publish_will(self, info: ClientInfo) -> None:
        topic = info.will_topic
        if not topic or topic[0] == "$":
            return
        if not await self.allowed(info, topic, Action.PUBLISH):
            log.info("will of %s on %s denied by ACL", info.client_id, topic)
            return
        await self._publish_checked(info, topic, info.will_message or b"", info.will_qos, info.will_retain)

    # ---- routing -----------------------------------------------------------------

    def route(self, msg: Message, src: Connection | None = None) -> int:
        """Queue `msg` for every matching session (sync ACL path). `src`, the
        publishing connection, is held while a target session is congested."""
        assert not self.acl_async, "use route_any with async ACL plugins"
        targets = self.index.match(msg.topic)
        if not targets:
            return 0
        n = 0
        topic = msg.topic
        mq = msg.qos
        check = self.acl_enabled
        for st, q in targets.items():
            if check:
                ok = st.acl_cache.get(topic)
                if ok is None:
                    ok = self.can_receive(st, topic)
                if not ok:
                    continue
            if st.enqueue(msg, q if q < mq else mq):
                n += 1
            if src is not None and st.congested():
                self._congested(st, src)
        return n

    async def route_any(self, msg: Message, src: Connection | None = None) -> int:
        if not self.acl_async:
            return self.route(msg, src)
        targets = list(self.index.match(msg.topic).items())
        n = 0
        for st, q in targets:
            if st.discarded or not await self.can_receive_async(st, msg.topic):
                continue
            if st.enqueue(msg, min(q, msg.qos)):
                n += 1
            if src is not None and st.congested():
                self._congested(st, src)
        return n

    # ---- backpressure --------------------------------------------------------------

    def _congested(self, st: SessionState, src: Connection) -> None:
        """`st` is behind: hold the publisher `src` until st's queue is down to
        st.low. Never for offline sessions (they just queue, bounded), never a
        client for its own session, and not for a session that made no progress
        for STALL_TIMEOUT (then its queue overflows and drops instead)."""
        if st.conn is None or st.stalled or st.conn is src or src.state == CLOSED:
            return
        blocked = st.blocked
        if blocked is None:
            blocked = st.blocked = set()
            st.progress_at = self.loop.time()
            self.congested.add(st)
        if src not in blocked:
            blocked.add(src)
            src.block()

    def release(self, st: SessionState) -> None:
        blocked = st.blocked
        st.blocked = None
        self.congested.discard(st)
        if blocked:
            for conn in blocked:
                conn.unblock()

    def count_drop(self, st: SessionState, why: str) -> None:
        st.dropped += 1
        self.stats["dropped"] += 1
        if st.dropped == 1 or st.dropped % 1000 == 0:
            log.warning("session %s is full (%s): dropped the newest message (%d dropped so far)",
                        st.client_id, why, st.dropped)

    def charge(self, st: SessionState, n: int) -> bool:
        """Account `n` payload bytes held for `st`; False (nothing charged, the drop
        counted and logged) when that would exceed a byte budget. A session holding
        nothing may always take one message, so a payload larger than the
        per-session budget still reaches a client that reads."""
        limits = self.limits
        principal = st.info.principal
        why = None
        if st.bytes and st.bytes + n > limits.max_queued_bytes:
            why = f"{st.bytes} bytes held (limits.max_queued_bytes)"
        elif principal is not None and st.bytes and \
                self.queued_bytes_of.get(principal, 0) + n > limits.max_queued_bytes_per_principal:
            why = f"{principal} holds {self.queued_bytes_of.get(principal, 0)} bytes (limits.max_queued_bytes_per_principal)"
        elif self.queued_bytes + n > limits.max_queued_bytes_total:
            why = f"all sessions hold {self.queued_bytes} bytes (limits.max_queued_bytes_total)"
        if why is not None:
            self.count_drop(st, why)
            return False
        self._account(st, n)
        return True

    def _account(self, st: SessionState, n: int) -> None:
        principal = st.info.principal
        st.bytes += n
        self.queued_bytes += n
        self.queued_bytes_of[principal] = self.queued_bytes_of.get(principal, 0) + n

    def uncharge(self, st: SessionState, n: int) -> None:
        st.bytes -= n
        self.queued_bytes -= n
        principal = st.info.principal
        left = self.queued_bytes_of.get(principal, 0) - n
        if left > 0:
            self.queued_bytes_of[principal] = left
        else:
            self.queued_bytes_of.pop(principal, None)

    # ---- SUBSCRIBE / UNSUBSCRIBE -------------------------------------------------

    async def _subscribe(self, conn: Connection, flags: int, body: bytes) -> None:
        pid, filters = codec.decode_subscribe(flags, body)
        for f, _q in filters:
            if not valid_topic_filter(f):
                raise ProtocolViolation(f"invalid topic filter {f!r}")
        info = conn.info
        st = conn.session
        assert st is not None and info is not None
        codes: list[int] = []
        granted: list[tuple[str, int]] = []
        over_limit: list[str] = []     # logged once per SUBSCRIBE, not once per filter
        too_deep: list[str] = []
        unserved: list[str] = []
        index_full: list[str] = []
        for f, q in filters:
            if f not in st.subs and len(st.subs) >= self.limits.max_subscriptions:
                over_limit.append(f)
                codes.append(0x80)
                continue
            if f.startswith(self.unserved_prefixes):
                unserved.append(f)
                codes.append(0x80)
                continue
            if is_wildcard(f) and f.count("/") >= MAX_FILTER_LEVELS:
                too_deep.append(f)
                codes.append(0x80)
                continue
            if f not in st.subs and \
                    self.subscription_bytes + subscription_cost(f) > self.limits.max_subscription_bytes_total:
                index_full.append(f)
                codes.append(0x80)
                continue
            if not await self.allowed(info, f, Action.SUBSCRIBE):
                codes.append(0x80)
                continue
            if conn.state == CLOSED or st.discarded:
                return
            if f not in st.subs:
                self.subscription_bytes += subscription_cost(f)
            st.subs[f] = q
            self.index.add(f, st, q)
            codes.append(q)
            granted.append((f, q))
        if over_limit:
            log.info("%s: limits.max_subscriptions (%d) reached: refused %d filter(s), e.g. %s", info.client_id,
                     self.limits.max_subscriptions, len(over_limit), over_limit[0])
        if too_deep:
            log.info("%s: refused %d wildcard filter(s) of more than %d levels", info.client_id, len(too_deep),
                     MAX_FILTER_LEVELS)
        if index_full:
            self.stats["subscriptions_refused"] += len(index_full)
            log.warning("%s: limits.max_subscription_bytes_total (%d) reached: refused %d filter(s), e.g. %s",
                        info.client_id, self.limits.max_subscription_bytes_total, len(index_full), index_full[0])
        if unserved:
            log.info("%s: refused %d filter(s) this broker does not serve (shared subscriptions; "
                     "$SYS when sys_interval is 0), e.g. %s", info.client_id, len(unserved), unserved[0])
        if granted and st.journal is not None:
            self._journal_session(st)
            await st.journal.durable()      # SUBACK once the subscription would survive a crash
            if conn.state == CLOSED:
                return
        conn.write(codec.suback(pid, codes))
        for f, q in granted:
            await self._call(self.h_subscribed, info, f, q)
            await self._fire(BrokerEvents.CLIENT_SUBSCRIBED, client_id=info.client_id, topic=f, qos=q)
            if not st.discarded:
                await self._replay_retained(st, f, q)

    async def _replay_retained(self, st: SessionState, f: str, q: int) -> None:
        """Retained messages for one filter just subscribed (never for others: defect 1).
        The trie walk yields to the loop every REPLAY_CHUNK steps, and a full
        session queue is waited on (as deliver() does) rather than overrun."""
        steps = 0
        skipped = 0
        for item in self.retained.match(f):
            steps += 1
            if steps % REPLAY_CHUNK == 0:
                await asyncio.sleep(0)
                if st.discarded or st.conn is None:
                    return
            if item is None:
                continue
            topic, entry = item
            if not await self.can_receive_async(st, topic):
                continue
            if st.full() and not await self._wait_for_room(st):
                skipped += 1
                continue
            dq = entry.qos if entry.qos < q else q
            st.enqueue(Message(topic, entry.payload, entry.qos, retain=True), dq)
        if skipped:
            log.warning("%s did not read its retained messages for %s: %d not sent", st.client_id, f, skipped)

    async def _wait_for_room(self, st: SessionState, wait: float = DELIVER_WAIT) -> bool:
        """Wait (at most `wait` seconds) until a connected session has room."""
        deadline = self.loop.time() + wait
        while st.conn is not None and st.full() and not st.discarded:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return False
            fut = self.loop.create_future()
            st.waiters.append(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                return False
        return not st.discarded

    async def _unsubscribe(self, conn: Connection, flags: int, body: bytes) -> None:
        pid, filters = codec.decode_unsubscribe(flags, body)
        st = conn.session
        assert st is not None and conn.info is not None
        removed = []
        for f in filters:
            if st.subs.pop(f, None) is not None:
                self.index.remove(f, st)
                self.subscription_bytes -= subscription_cost(f)
                removed.append(f)
        if removed and st.journal is not None:
            self._journal_session(st)
        conn.write(codec.ack(codec.UNSUBACK, pid))
        for f in removed:
            await self._call(self.h_unsubscribed, conn.info, f)
            await self._fire(BrokerEvents.CLIENT_UNSUBSCRIBED, client_id=conn.info.client_id, topic=f)

    # ---- retained ----------------------------------------------------------------

    def set_retained(self, topic: str, payload: bytes, qos: int, owner: str | None = None) -> bool:
        """Retain (or, with an empty payload, clear) `topic`; False when a budget
        refuses it (counted, logged; the message is still routed)."""
        if not payload:
            if not self.retained.delete(topic):
                return True
            self._retained_dirty[topic] = None
        else:
            payload = bytes(payload)
            try:
                self.retained.put(topic, payload, qos, owner)
            except RetainedRefused as exc:
                self.stats["retained_refused"] += 1
                self._retained_refused_log.warning("not retaining %s: %s (%d refused so far)", topic, exc,
                                                   self.stats["retained_refused"])
                return False
            self._retained_dirty[topic] = (payload, qos)
        if topic[0] == "$":
            # the broker's own ($SYS): published again every sys_interval, never stored
            self._retained_dirty.pop(topic, None)
            return True
        if self._store is not None:
            self._retained_wake.set()
        return True

    async def load_retained(self) -> None:
        """The retained messages of the last run, as far as today's budgets allow."""
        if self._store is None:
            return
        refused = 0
        for m in await self._store.load_all():
            try:
                self.retained.put(m.topic, bytes(m.payload), m.qos, None)
            except RetainedRefused:
                refused += 1
        log.info("loaded %d retained messages (%d bytes)", len(self.retained), self.retained.bytes)
        if refused:
            log.warning("%d stored retained messages are over limits.max_retained_bytes and were not loaded",
                        refused)

    async def _retained_writer(self) -> None:
        """Writes retained changes to the store; repeated changes of one topic
        coalesce, so the backlog is bounded by the number of retained topics."""
        while True:
            await self._retained_wake.wait()
            self._retained_wake.clear()
            await self.flush_retained()

    async def flush_retained(self, *, give_up_after: float | None = None) -> bool:
        """Write pending retained changes; True once all are written. An entry
        leaves the dirty map only after its write committed (and only if it did
        not change meanwhile), so a cancelled flush loses nothing. While the store
        is unavailable (disk full, read-only) the writes are retried, and callers
        holding a PUBACK wait: nothing is acknowledged that is not stored. Only at
        shutdown (`give_up_after`) does it stop trying."""
        if self._store is None:
            return True
        async with self._retained_lock:
            dirty = self._retained_dirty
            delay = RETRY_FIRST
            started = self.loop.time()
            while dirty:
                topic, v = next(iter(dirty.items()))
                try:
                    if v is None:
                        await self._store.delete(topic)
                    else:
                        await self._store.put(RetainedMessage(topic, v[0], v[1]))
                except StoreUnavailable as exc:
                    self.stats["retained_write_errors"] += 1
                    if self._retained_unavailable_since is None:
                        self._retained_unavailable_since = self.loop.time()
                        log.error("cannot store retained messages (%s): holding the acknowledgements of "
                                  "%d pending retained change(s) until the store takes writes again",
                                  exc, len(dirty))
                    if give_up_after is not None and self.loop.time() - started > give_up_after:
                        log.error("stopping with %d retained change(s) not stored", len(dirty))
                        return False
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                except Exception:  # noqa: BLE001 - not retried: it would fail the same way
                    self.stats["retained_write_errors"] += 1
                    self.stats["retained_refused"] += 1
                    log.exception("the store refused the retained message on %s; it is kept in memory only", topic)
                delay = RETRY_FIRST
                if self._retained_unavailable_since is not None:
                    log.warning("retained messages stored again after %.1f s",
                                self.loop.time() - self._retained_unavailable_since)
                    self._retained_unavailable_since = None
                if dirty.get(topic, 0) is v:
                    del dirty[topic]
            return True

    # ---- API for plugins (BrokerApi) ---------------------------------------------

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        if not valid_topic_name(topic):
            raise ValueError(f"invalid topic name {topic!r}")
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {qos!r}")
        payload = bytes(payload)
        if retain:
            self.set_retained(topic, payload, qos)
        return await self.route_any(Message(topic, payload, qos))

    async def deliver(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        st = self.sessions.get(client_id)
        if st is None or st.discarded or not valid_topic_name(topic):
            return False
        granted = _granted_qos(st, topic)
        if granted < 0 or not await self.can_receive_async(st, topic):
            return False
        await self._wait_for_room(st)
        if st.discarded:
            return False
        q = min(qos, granted)
        return st.enqueue(Message(topic, bytes(payload), qos), q)

    def deliver_nowait(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool | None:
        """deliver() when it need not wait: True or False exactly as deliver() would
        answer; None when deliver() would have to wait (the connected session's queue
        is full, or an async ACL decision is not cached yet): call deliver() then.
        Saves a coroutine per message for callers that push a stream (inbox pushers)."""
        st = self.sessions.get(client_id)
        if st is None or st.discarded or not valid_topic_name(topic):
            return False
        granted = _granted_qos(st, topic)
        if granted < 0:
            return False
        if self.acl_enabled:
            ok = st.acl_cache.get(topic)
            if ok is None:
                if self.acl_async:
                    return None
                ok = self.can_receive(st, topic)
            if not ok:
                return False
        if st.conn is not None and st.full():
            return None
        return st.enqueue(Message(topic, bytes(payload), qos), qos if qos < granted else granted)

    def client_ids_of(self, principal: str) -> list[str]:
        return list(self.by_principal.get(principal, {}))

    async def kick_principal(self, principal: str) -> int:
        conns = list(self.by_principal.get(principal, {}).values())
        for conn in conns:
            st = conn.session
            conn.close(DisconnectReason.KICKED)
            if st is not None:
                self.discard(st)
        for st in [s for s in self.sessions.values() if s.info.principal == principal]:
            self.discard(st)
        return len(conns)

    # ---- timers and shutdown -----------------------------------------------------

    def start(self) -> None:
        self._tasks_bg = [self.loop.create_task(self._ticker())]
        if self.journal is not None:
            self.journal.start()
        if self._store is not None:
            self._tasks_bg.append(self.loop.create_task(self._retained_writer()))

    async def _ticker(self) -> None:
        last_sweep = time.time()
        while True:
            await asyncio.sleep(TICK)
            now = self.loop.time()
            wall = time.time()
            for conn in list(self.conns):
                if conn.state == CONNECTED:
                    expires_at = conn.info.expires_at if conn.info is not None else None
                    if expires_at is not None and wall >= expires_at:
                        # its login (a JWT) ran out: closed as EMQX does, will published
                        log.info("closing %s: its login token expired", conn.client_id)
                        conn.close(DisconnectReason.KICKED)
                        continue
                    ka = conn.keep_alive
                    if conn.paused_since is not None:
                        # we are not reading it (it does not read what we send, or its
                        # requests pile up): its pings cannot be heard; give it longer
                        if now - conn.paused_since > ka * 1.5 + PAUSED_GRACE:
                            log.warning("closing %s: stalled for %.0fs", conn.client_id, now - conn.paused_since)
                            conn.close(DisconnectReason.KEEPALIVE)
                    elif ka and now - conn.last_recv > ka * 1.5:
                        log.info("closing %s: nothing received for 1.5 x keepalive (%ds)", conn.client_id, ka)
                        conn.close(DisconnectReason.KEEPALIVE)
                elif conn.state == NEW:
                    limit = CONNECT_TIMEOUT if conn.info is None else AUTH_TIMEOUT
                    if now - conn.created > limit:
                        conn.abort(DisconnectReason.KICKED)
            for st in [s for s in self.congested if now - s.progress_at > STALL_TIMEOUT]:
                log.warning("%s made no progress for %.0fs with %d queued: no longer holding its publishers",
                            st.client_id, now - st.progress_at, len(st.queue))
                st.stalled = True
                self.release(st)
            wall = time.time()
            if wall - last_sweep > 60:
                last_sweep = wall
                self.expire_sessions(wall)

    def expire_sessions(self, now: float) -> int:
        old = [st for st in self.sessions.values()
               if st.conn is None and now - st.disconnected_at > SESSION_EXPIRY]
        for st in old:
            self.discard(st)
        if old:
            self.stats["sessions_expired"] += len(old)
            log.info("expired %d persistent sessions", len(old))
        return len(old)

    # ---- persistent sessions across a restart --------------------------------------

    def _journal_session(self, st: SessionState) -> None:
        """Start journaling a persistent session, or record its new subscriptions
        or departure time."""
        journal = self.journal
        if journal is None or st.clean or st.discarded:
            return
        st.journal = journal
        st.unjournaled = self._unsaved_prefixes
        info = st.info
        journal.append(SessionUpsert(st.client_id, info.principal, info.kind, dict(st.subs),
                                     st.disconnected_at or time.time()))

    def saved_sessions(self) -> list[SavedSession]:
        """Every persistent session as it stands, packet ids of in-flight messages
        included (called at a clean stop, when their clients are gone)."""
        out = []
        for st in self.sessions.values():
            if st.clean or st.discarded:
                continue
            messages = []
            for pid, (msg, qos, stage, seq) in st.inflight.items():
                if msg is None:           # QoS 2 past PUBREC: only the PUBREL is owed
                    messages.append(SavedMessage(seq, "", b"", qos, False, pid, stage))
                elif seq:
                    messages.append(SavedMessage(seq, msg.topic, msg.payload, qos, msg.retain, pid, stage))
            for msg, qos, seq in st.queue:
                if seq:
                    messages.append(SavedMessage(seq, msg.topic, msg.payload, qos, msg.retain))
            info = st.info
            out.append(SavedSession(st.client_id, info.principal, info.kind, dict(st.subs), messages,
                                    sorted(st.incoming_qos2), st._pid, st.disconnected_at or time.time()))
        return out

    def restore_session(self, saved: SavedSession,
                        shared: Callable[[SavedMessage], Message] | None = None) -> None:
        """Make a saved session live again, as if its client had just gone away.
        `shared` turns a saved message into the Message object to hold: the
        loader passes one that hands out one object per distinct message, so a
        message kept for 40 sessions is held once in memory, as before the restart."""
        if shared is None:
            shared = _new_message
        info = ClientInfo(client_id=client_id_of_key(saved.client_id), username=saved.principal, password=None,
                          remote_address="", remote_port=0, clean_session=False, keep_alive=0,
                          listener_name="")
        info.principal, info.kind, info.is_anonymous = saved.principal, saved.kind, saved.principal is None
        info.session_key = saved.client_id
        st = SessionState(saved.client_id, False, info, self)
        st.disconnected_at = saved.disconnected_at
        st._pid = saved.last_pid
        st.incoming_qos2.update(saved.incoming_qos2)
        st.journal = self.journal
        st.unjournaled = self._unsaved_prefixes
        for f, q in saved.subscriptions.items():
            st.subs[f] = q
            self.index.add(f, st, q)
        for f, _q in saved.subscriptions.items():
            self.subscription_bytes += subscription_cost(f)
        for m in saved.messages:
            st._seq = max(st._seq, m.seq)
            if m.pid is not None and m.pid not in st.inflight:
                msg = None if m.stage else shared(m)
                st.inflight[m.pid] = [msg, m.qos, m.stage, m.seq]
            else:    # after a crash: sent again as new messages (at least once)
                msg = shared(m)
                st.queue.append((msg, m.qos, m.seq))
            if msg is not None:
                # already accepted once: accounted, never refused (budgets may have shrunk)
                self._account(st, len(msg.payload))
        self._add_session(st)

    async def load_sessions(self, keep: Callable[[SavedSession], bool] = lambda s: True) -> None:
        """Bring back the persistent sessions of the last run (clean stop or crash)."""
        if self.journal is None:
            return
        kept = 0
        now = time.time()
        seen: dict[tuple[str, bytes, int, bool], Message] = {}

        def interner(m: SavedMessage) -> Message:
            key = (m.topic, m.payload, m.qos, m.retain)
            msg = seen.get(key)
            if msg is None:
                msg = seen[key] = _new_message(m)
            return msg

        for saved in await self._session_store.load_sessions():
            if now - saved.disconnected_at > SESSION_EXPIRY or not keep(saved):
                self.journal.append(SessionDrop(saved.client_id))
                continue
            self.restore_session(saved, interner)
            kept += 1
        self._sessions_loaded = True
        if kept:
            log.info("restored %d persistent sessions (%d messages owed)", kept,
                     sum(len(s.queue) + len(s.inflight) for s in self.sessions.values()))

    async def save_sessions(self) -> None:
        """At a clean stop: the journal's last changes, then the exact state."""
        journal = self.journal
        if journal is None or not self._sessions_loaded:
            return
        await journal.stop()
        saved = self.saved_sessions()
        try:
            await self._session_store.save_sessions(saved)
        except Exception:  # noqa: BLE001 - keep shutting down; the journal still has them
            log.exception("could not save the exact state of %d persistent sessions", len(saved))
            return
        if saved:
            log.info("saved %d persistent sessions (%d messages)", len(saved), sum(len(s.messages) for s in saved))

    async def stop(self) -> None:
        """Close every connection (reason shutdown, no wills), run their
        disconnect hooks, write pending retained changes and save the
        persistent sessions."""
        self._stopping = True
        for t in self._tasks_bg:
            t.cancel()
        for conn in list(self.conns):
            conn.close(DisconnectReason.SHUTDOWN)
        await asyncio.sleep(0)
        for _ in range(50):
            if not self._finishers and not self.conns:
                break
            await asyncio.sleep(0.02)
        if self._finishers:
            await asyncio.wait(list(self._finishers), timeout=5)
        for conn in list(self.conns):
            conn.abort(DisconnectReason.SHUTDOWN)
        await self.flush_retained(give_up_after=5.0)
        await self.save_sessions()


def _new_message(m: SavedMessage) -> Message:
    return Message(m.topic, m.payload, m.qos, m.retain)


def subscription_cost(f: str) -> int:
    """Estimated bytes one subscription holds in the index: the filter, the
    session's dict entry and, for wildcards, one trie node per level."""
    levels = f.count("/") + 1
    return len(f) + 120 + (levels * 450 if is_wildcard(f) else 0)   # ~430 bytes a trie level, measured


def _granted_qos(st: SessionState, topic: str) -> int:
    """The highest QoS of the session's filters matching `topic`; -1 for none."""
    granted = -1
    for f, q in st.subs.items():
        if q > granted and matches(topic, f):
            granted = q
    return granted
