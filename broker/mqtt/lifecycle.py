"""A client's life on the broker: accepted, CONNECT (authentication, session
take-over), counted while connected, closed (will, disconnect hooks).

* Authentication runs before any session is looked at; a refused CONNECT
  creates and changes nothing (amqtt defects 2, 9).
* Take-over: the old connection is closed without its will; the new
  connection's clean_session decides whether the old session is resumed
  (subscriptions, queue, inflight) or discarded (defect 3). The new connection
  is counted before the old one is closed: a count goes 1 -> 2 -> 1, never 0.
* Wills are published on every close except DISCONNECT, take-over and broker
  shutdown (defect 4).
* connect/take-over/disconnect hooks of one session key run one at a time
  (`_lock`), in the order things happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from amqtt.events import BrokerEvents

from broker.mqtt import codec, codec5
from broker.mqtt import properties as P
from broker.mqtt.codec import ProtocolViolation, UnacceptableProtocol
from broker.mqtt.connection import CLOSED, Connection
from broker.mqtt.figures import TrafficCounters
from broker.mqtt.hooks import ConnectRefused, DisconnectReason
from broker.mqtt.persistence import SessionPersistence
from broker.mqtt.plugins import PluginHooks
from broker.mqtt.publish import Publishing
from broker.mqtt.registry import SessionRegistry
from broker.mqtt.routing import Router
from broker.mqtt.session import ClientInfo, SessionHost, SessionState, loggable, session_key, use_protocol
from broker.mqtt.topics import valid_topic_name
from contract.ids import is_valid_principal_id

log = logging.getLogger("roost.mqtt")

_NO_WILL = (DisconnectReason.DISCONNECT, DisconnectReason.TAKEN_OVER, DisconnectReason.SHUTDOWN)


class ClientLifecycle:
    def __init__(self, *, limits: Any, listener_limits: dict[str, int], counters: TrafficCounters,
                 stats: dict[str, int], loop: asyncio.AbstractEventLoop, host: SessionHost,
                 plugins: PluginHooks, registry: SessionRegistry, persistence: SessionPersistence,
                 router: Router, publishing: Publishing) -> None:
        self._limits = limits
        self._listener_limits = listener_limits
        self._counters = counters
        self._stats = stats
        self._loop = loop
        self._host = host
        self._plugins = plugins
        self._registry = registry
        self._persistence = persistence
        self._router = router
        self._publishing = publishing
        # Every open connection, as the keys of a dict: a set's table grows to 4x its
        # entries (at 20,000 connections 131,072 slots of 16 bytes, ~105 bytes each),
        # a dict's keeps 24 bytes an entry plus a 4-byte index (~33 bytes each)
        self.conns: dict[Connection, None] = {}
        self.n_connected = 0
        self.per_listener: dict[str, int] = {}
        # Keep Alive values as one int object each: a value above 256 decoded from each
        # CONNECT is an int of its own (32 bytes) held as long as the client is, where
        # a home's clients use a few values (at most 65,536 entries: a 16-bit field)
        self._keep_alives: dict[int, int] = {}
        self.by_principal: dict[str, dict[str, Connection]] = {}
        # CONNECTs an auth plugin refused, by CONNACK code (4 bad credentials, 5 not authorized, ...)
        self.logins_refused: dict[int, int] = {}
        self.finishers: set[asyncio.Task[None]] = set()
        self._locks: dict[str, list[Any]] = {}
        self.stopping = False
        self.before_establish: Callable[[ClientInfo, bool], Awaitable[None]] | None = None

    # ---- accepted, counted, closed ----------------------------------------------------

    def connection_made(self, conn: Connection) -> None:
        cap = self._limits.max_connections
        if self.stopping or (cap and len(self.conns) >= cap + 256):
            # far over the limit (most are not even CONNECTed yet): do not read a byte
            conn.abort(DisconnectReason.KICKED)
            return
        self.conns[conn] = None

    def _count_in(self, conn: Connection) -> None:
        conn.counted = True
        self.n_connected += 1
        counters = self._counters
        counters.connections_total += 1
        if self.n_connected > counters.connections_max:
            counters.connections_max = self.n_connected
        self.per_listener[conn.listener_name] = self.per_listener.get(conn.listener_name, 0) + 1
        info = conn.info
        if info is not None and info.principal:
            self.by_principal.setdefault(info.principal, {})[info.client_id] = conn
        if info is not None:
            self._plugins.call_now(self._plugins.online, info)

    def _count_out(self, conn: Connection) -> None:
        if not conn.counted:
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
            info.last_activity = time.time() - (self._loop.time() - conn.last_recv)
            self._plugins.call_now(self._plugins.offline, info, conn.reason or DisconnectReason.LOST)

    def connection_closing(self, conn: Connection) -> None:
        """The broker decided to close it (DISCONNECT, keepalive, take-over, kick):
        it stops counting now, not when the transport reports the loss later."""
        self._count_out(conn)

    def connection_lost(self, conn: Connection) -> None:
        self.conns.pop(conn, None)
        self._count_out(conn)
        st = conn.session
        if st is not None and st.conn is conn:
            st.conn = None
            st.disconnected_at = time.time()
            if st.journal is not None:
                self._persistence.note(st)    # when it left: expiry counts from there, also after a crash
            if st.blocked is not None:
                self._router.release(st)
            if self._router.groups:
                self._router.redeliver_shared(st)
            if st.clean or st.expiry == 0:
                self._registry.discard(st)
            else:
                st.wake()
        if conn.info is not None and not conn.taken_over and (conn.announced or conn.session is not None):
            task = self._loop.create_task(self._finish(conn))
            self.finishers.add(task)
            task.add_done_callback(self.finishers.discard)

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
        st = conn.session
        if (reason not in _NO_WILL or conn.will_anyway) and info.will_flag and st is not None:
            delay = info.will_delay
            if delay and not st.discarded:
                # MQTT 5 Will Delay Interval: unless the session is resumed first,
                # at the latest when the session ends
                delay = min(delay, self._registry.expiry_of(st))
                st.will_timer = self._loop.call_later(delay, self._delayed_will, st, info)
            else:
                await self._publishing.publish_will(info)
        if conn.announced:
            async with self._lock(info.session_key):
                await self._plugins.call(self._plugins.disconnected, info, reason)
            await self._plugins.fire(BrokerEvents.CLIENT_DISCONNECTED, client_id=info.client_id, client_session=info)

    def _delayed_will(self, st: SessionState, info: ClientInfo) -> None:
        st.will_timer = None
        task = self._loop.create_task(self._publishing.publish_will(info))
        self.finishers.add(task)
        task.add_done_callback(self.finishers.discard)

    def disconnect(self, conn: Connection) -> None:
        """The client sent DISCONNECT: closed without its will."""
        assert conn.info is not None
        conn.info.will_flag = False
        conn.close(DisconnectReason.DISCONNECT)

    def disconnect5(self, conn: Connection, pkt: codec.Disconnect) -> None:
        """An MQTT 5 DISCONNECT: reason 0x04 asks for the will all the same; a
        Session Expiry Interval replaces the one given at CONNECT (but a session
        that was to end with its connection cannot be made to outlive it)."""
        st = conn.session
        assert conn.info is not None and st is not None
        expiry = (pkt.properties or {}).get(P.SESSION_EXPIRY)
        if expiry is not None:
            if expiry and (st.clean or st.expiry == 0):
                raise ProtocolViolation("DISCONNECT sets a Session Expiry Interval after CONNECT set 0",
                                        codec.PROTOCOL_ERROR)
            st.expiry = float(expiry)
        if pkt.reason == codec5.WITH_WILL:
            conn.will_anyway = True
        else:
            conn.info.will_flag = False
        conn.close(DisconnectReason.DISCONNECT)

    # ---- CONNECT -----------------------------------------------------------------------

    async def connect(self, conn: Connection, flags: int, body: bytes) -> None:
        try:
            pkt = codec5.decode_connect(flags, body)
        except UnacceptableProtocol as exc:
            log.info("refusing %s:%s: %s", *conn.remote, exc)
            self._refuse(conn, ConnectRefused.UNACCEPTABLE_PROTOCOL)
            return
        v5 = pkt.level == 5
        props: P.Props = pkt.properties or {}
        if v5:
            conn.v5 = True
            conn.handle = conn.engine.handle5
            conn.alias_in = {}
            conn.alias_out = {}
            if P.AUTH_METHOD in props:
                log.info("refusing %s:%s: enhanced authentication (%s) is not offered", *conn.remote,
                         props[P.AUTH_METHOD])
                self._refuse(conn, codec5.BAD_AUTH_METHOD)
                return
            conn.client_max_packet = props.get(P.MAXIMUM_PACKET_SIZE, 0)
            conn.problem_info = props.get(P.REQUEST_PROBLEM_INFO, 1) == 1
            conn.alias_out_max = props.get(P.TOPIC_ALIAS_MAXIMUM, 0)
        cid = pkt.client_id
        generated = False
        if not cid:
            if not pkt.clean_session and not v5:
                self._refuse(conn, ConnectRefused.IDENTIFIER_REJECTED)
                return
            # "<user>.auto-<hex>" passes Roost's client-id binding for an
            # authenticated user; anonymous clients get "auto-<hex>"
            suffix = "auto-" + secrets.token_hex(8)
            cid = f"{pkt.username}.{suffix}" if is_valid_principal_id(pkt.username) else suffix
            generated = True
        keep_alive = self._keep_alives.setdefault(pkt.keep_alive, pkt.keep_alive)
        connack_props: list[tuple[int, Any]] = []
        expiry: float | None = None
        if v5:
            expiry = float(props.get(P.SESSION_EXPIRY, 0))
            max_ka = self._limits.max_keepalive
            if not keep_alive or keep_alive > max_ka:
                keep_alive = max_ka
                connack_props.append((P.SERVER_KEEP_ALIVE, max_ka))
            if generated:
                connack_props.append((P.ASSIGNED_CLIENT_ID, cid))
            connack_props += [(P.RECEIVE_MAXIMUM, self._limits.max_inflight),
                              (P.MAXIMUM_PACKET_SIZE, conn.max_packet)]
            if self._limits.topic_alias_maximum:
                connack_props.append((P.TOPIC_ALIAS_MAXIMUM, self._limits.topic_alias_maximum))
        # MQTT 5: the session outlives the connection only with a Session Expiry
        # Interval; Clean Start only says whether an old session is resumed
        clean_start = pkt.clean_session
        # The username interned: a principal's clients (a person's phone and laptop, a
        # hub's devices) share one string, not ~60 bytes each for as long as they are held
        username = sys.intern(pkt.username) if pkt.username else pkt.username
        info = ClientInfo(client_id=cid, username=username, password=pkt.password,
                          remote_address=conn.remote_host, remote_port=conn.remote_port,
                          clean_session=pkt.clean_session if not v5 else not expiry, keep_alive=keep_alive,
                          listener_name=conn.listener_name, client_id_generated=generated)
        info.protocol_level = pkt.level
        will = pkt.will
        if will is not None:
            if not valid_topic_name(will.topic):
                raise ProtocolViolation("invalid will topic", codec5.TOPIC_NAME_INVALID)
            info.will_flag = True
            info.will_topic = will.topic
            info.will_message = will.payload
            info.will_qos = will.qos
            info.will_retain = will.retain
            if will.properties:
                info.will_props = P.message_props(will.properties, 0.0, None)   # expiry relative (publish_will)
                info.will_delay = float(will.properties.get(P.WILL_DELAY, 0))
                if info.will_props is not None and info.will_props.payload_utf8:
                    try:
                        will.payload.decode("utf-8")
                    except UnicodeDecodeError:
                        self._refuse(conn, codec5.PAYLOAD_FORMAT_INVALID)
                        return
        conn.info = info
        conn.keep_alive = keep_alive
        cap = self._limits.max_connections
        lcap = self._listener_limits.get(conn.listener_name, 0)
        if (cap and self.n_connected >= cap) or (lcap and self.per_listener.get(conn.listener_name, 0) >= lcap):
            self._stats["connections_refused"] += 1
            log.warning("refusing %s: connection limit reached", loggable(cid))
            self._refuse(conn, ConnectRefused.SERVER_UNAVAILABLE)
            return
        code = await self._plugins.authenticate(info)
        if conn.state == CLOSED:
            return
        if code:
            self.logins_refused[code] = self.logins_refused.get(code, 0) + 1
            log.info("refused CONNECT of %s from %s:%s (code %d)", loggable(cid), *conn.remote, code)
            self._refuse(conn, code)
            return
        info.password = None
        info.session_key = session_key(info.principal, info.client_id)
        if self.before_establish is not None:
            # the cluster (broker/cluster/): a session another node holds comes here first
            await self.before_establish(info, clean_start)
            if conn.state == CLOSED:
                return
        await self._establish(conn, info, clean_start, expiry, props, connack_props)

    @staticmethod
    def _refuse(conn: Connection, code: int) -> None:
        """CONNACK refusing (an MQTT 3.1.1 return code, or an MQTT 5 reason code >= 0x80)."""
        if conn.v5:
            conn.write(codec5.connack(False, codec5.CONNACK_V5.get(code, code)))
        else:
            conn.write(codec.connack(False, code))
        conn.close(DisconnectReason.KICKED)

    async def _establish(self, conn: Connection, info: ClientInfo, clean_start: bool, expiry: float | None,
                         props: P.Props, connack_props: list[tuple[int, Any]]) -> None:
        key = info.session_key
        registry = self._registry
        plugins = self._plugins
        async with self._lock(key):
            if conn.state == CLOSED:
                return
            old = registry.sessions.get(key)
            if old is not None and old.conn is None and registry.expired(old, time.time()):
                registry.discard(old)     # its Session Expiry Interval passed (the sweep is once a minute)
                old = None
            if not info.clean_session and (old is None or old.clean) and registry.too_many(info):
                self._refuse(conn, ConnectRefused.SERVER_UNAVAILABLE)
                return
            taken: Connection | None = None
            if old is not None and old.conn is not None:
                taken = old.conn
                taken.taken_over = True
                taken.reason = DisconnectReason.TAKEN_OVER
                old.conn = None
                log.info("client %s taken over by a new connection", loggable(info.client_id))
            if old is not None and old.will_timer is not None:
                # a new connection to the session before its Will Delay Interval passed: no will
                old.will_timer.cancel()
                old.will_timer = None
            if clean_start or old is None or old.clean:
                if old is not None:
                    registry.discard(old)
                st = SessionState(key, info.clean_session, info, self._host)
                registry.add(st)
                if not st.clean:
                    self._persistence.note(st)
                present = False
            else:
                st = old
                st.info = info
                st.acl_cache.clear()      # decisions were made for the previous login
                present = True
            st.expiry = expiry
            use_protocol(st, conn.v5)
            st.max_inflight = self._limits.max_inflight
            if conn.v5:
                st.max_inflight = min(st.max_inflight, props.get(P.RECEIVE_MAXIMUM, 65535))
            conn.session = st
            st.conn = conn
            conn.set_connected()
            self._count_in(conn)
            if taken is not None:
                # closed only once the new one is counted: 1 -> 2 -> 1, never 0
                taken.close(DisconnectReason.TAKEN_OVER)
            if conn.v5:
                conn.write(codec5.connack(present, 0, connack_props))
            else:
                conn.write(codec.connack(present, 0))
            st.resume()
            conn.announced = True
            await plugins.call(plugins.connected, info)
            await plugins.fire(BrokerEvents.CLIENT_CONNECTED, client_id=info.client_id, client_session=info)
            if taken is not None and taken.announced and taken.info is not None:
                await plugins.call(plugins.disconnected, taken.info, DisconnectReason.TAKEN_OVER)
                await plugins.fire(BrokerEvents.CLIENT_DISCONNECTED, client_id=taken.info.client_id,
                                   client_session=taken.info)

    @contextlib.asynccontextmanager
    async def _lock(self, key: str) -> AsyncIterator[None]:
        """Serialises connect/take-over/disconnect hooks of one session key."""
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]
                if not self._locks:
                    # a dict keeps its table when emptied: the one a burst of 20,000
                    # connects grew (~22 bytes a client) is let go once none is left
                    self._locks = {}

    # ---- by principal (BrokerApi) ---------------------------------------------------------

    def client_ids_of(self, principal: str) -> list[str]:
        return list(self.by_principal.get(principal, {}))

    def kick_principal(self, principal: str) -> int:
        conns = list(self.by_principal.get(principal, {}).values())
        for conn in conns:
            st = conn.session
            conn.close(DisconnectReason.KICKED)
            if st is not None:
                self._registry.discard(st)
        self._registry.discard_principal(principal)
        return len(conns)
