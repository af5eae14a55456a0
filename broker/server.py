"""RoostBroker: amqtt's Broker shell around Roost's own MQTT 3.1.1 engine.

Pinned to amqtt 0.12.1 (checked at import; a different version logs a warning
because the private methods below may have changed).

Kept from amqtt: `Broker.__init__` (config parsing, the PluginManager loading
plugins from `plugins:` with their `Config` dataclasses, BrokerContext), the
state machine, `Broker._split_bindaddr_port`, `Server` (listener bookkeeping,
close_instance), websocket serving through `websockets.serve` with subprotocol
`mqtt`, `PluginManager.fire_event` for amqtt's broker events (start/shutdown,
client connected/disconnected/subscribed/unsubscribed; not per message),
`PluginManager.close`.

Replaced, each because the upstream version is wrong or slow. The defect
numbers used below (and in tests/test_amqtt_defects.py, which proves each one
on stock amqtt) are: 1 retained messages leak to clients that never subscribed
(no ACL); 2 a failed CONNECT deletes the victim's session; 3 take-over leaves
the new connection receiving nothing; 4 keepalive never enforced, no will;
5 un-acked QoS 1/2 dropped on disconnect, never re-sent; 6 delivered QoS is the
subscription's, not min(publish, subscription); 7 unbounded offline queue,
replayed with retain=1; 9 refused CONNECTs leave sessions behind; 10 every
publish scans every subscription and makes a task per subscriber.
* `Broker.start` - loads retained messages and persistent sessions from the
  store, starts our engine (keepalive ticker, session journal, retained writer)
  instead of `_broadcast_loop` (one task per message and subscriber, defect 10)
  and `_session_monitor`; calls `on_roost_start` hooks.
* `Broker._start_listeners`, `Broker._create_server_instance`,
  `Broker._create_ssl_context` - listeners come from RoostConfig (resolved
  paths, independent listeners; amqtt copies fields of the "default" listener
  into the others). `bind_listeners` builds every TLS context (same settings as
  amqtt's, but naming the file at fault and never prompting for a key
  passphrase) and binds every socket before `roost serve` touches the store
  (broker/startup.py: start-up failures are one line); the servers are then
  made on those sockets (`sock=`). TCP listeners use `loop.create_server` with
  our asyncio.Protocol (`broker.mqtt.connection.Connection`) instead of
  StreamReader/StreamWriter; WS listeners use `websockets.serve` as upstream.
  Listeners of type `http` (not MQTT; /metrics, /healthz, /readyz,
  /status.json) are Roost's own: left out of amqtt's config, served by aiohttp
  (broker/http/) on their bound sockets, closed with the others.
* `Broker.ws_connected`, `Broker.stream_connected`, `Broker.external_connected`,
  `Broker._client_connected`, `Broker._initialize_client_session`,
  `Broker._handle_client_session`, `Broker._client_message_loop`,
  `Broker._handle_disconnect`, `Broker._authenticate`,
  `Broker._handle_subscription`, `Broker._handle_unsubscription`,
  `Broker._handle_message_delivery`, `Broker._topic_filtering`,
  `Broker._delete_session`, `Broker._cleanup_session`, `Broker.add_subscription`,
  `Broker._publish_session_retained_messages`,
  `Broker._publish_retained_messages_for_subscription` and
  `BrokerProtocolHandler` as a whole - all connection handling is in our
  engine (broker/mqtt/engine.py lists its modules): auth before any session
  lookup (defects 2, 9) and take-over (3) in lifecycle.py, keepalive (4) in
  timers.py and wills (4) in lifecycle.py, redelivery (5) and bounded queues
  (7) in session.py, QoS downgrade (6) in routing.py, retained replay only for
  the filters just subscribed with a RECEIVE check (1) in subscriptions.py.
* `Broker._broadcast_message` / `internal_message_broadcast` (what
  `BrokerContext.broadcast_message` calls) - route through our engine.
* `Broker.retain_message` - our retained trie (broker/mqtt/retained.py),
  persisted via the RetainedStore.
* `Broker.sessions`, `Broker.subscriptions`, `Broker.retained_messages` -
  read-only views built from the engine (for BrokerContext users).
* `Broker.shutdown` - `on_roost_stop` hooks, closes every connection with
  reason "shutdown" (no wills), flushes retained writes, saves the persistent
  sessions, then amqtt's shutdown events and plugin `close()`.
Not supported: `BrokerContext.add_subscription` / `Broker.create_offline_session`
(raise NotImplementedError).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import amqtt
import websockets
from amqtt.broker import Broker, Server
from amqtt.errors import BrokerError
from amqtt.events import BrokerEvents

from broker.config import ListenerConfig, RoostConfig
from broker.mqtt.connection import CLOSED, Connection
from broker.mqtt.engine import Engine
from broker.services.events import RetainedChanged
from broker.startup import StartupError
from broker.store.base import SavedSession
from contract import topics

log = logging.getLogger("roost.broker")
# amqtt's state machine library logs every transition callback at INFO: noise in roost's log
logging.getLogger("transitions").setLevel(logging.WARNING)

AMQTT_VERSION = "0.12.1"
if amqtt.__version__ != AMQTT_VERSION:  # pragma: no cover - depends on the installed version
    log.warning("RoostBroker was written against amqtt %s but %s is installed: the replaced private "
                "methods listed in broker/server.py must be re-checked", AMQTT_VERSION, amqtt.__version__)

WS_WRITE_HIGH = 256 * 1024
WS_WRITE_LOW = 64 * 1024
WS_CLOSE_TIMEOUT = 2.0
# "mqtt" is MQTT 3.1.1's registered name; "mqttv3.1" is what MQTT 3.1 clients
# (and older MQTT.js/Paho builds) offer, and Mosquitto serves both.
WS_SUBPROTOCOLS = [websockets.Subprotocol("mqtt"), websockets.Subprotocol("mqttv3.1")]


class _WsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets logs a failed opening handshake (a port scan, a plain HTTP
    request, a client that speaks no WebSocket) as an ERROR with a traceback:
    here it is one INFO line naming the peer and the reason."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR and msg == "opening handshake failed":
            exc = sys.exc_info()[1]
            ws = (kwargs.get("extra") or {}).get("websocket")
            peer = getattr(getattr(ws, "transport", None), "get_extra_info", lambda _k: None)("peername")
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0] if exc is not None else "unknown"
            self.logger.info("websocket handshake from %s failed: %s", _peer(peer), reason)
            return
        super().log(level, msg, *args, **kwargs)


def _peer(peer: Any) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


_BACKGROUND: set[asyncio.Task[Any]] = set()   # websocket close handshakes in flight


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


class _Retained:
    """What amqtt's `retained_messages` values look like to plugins."""

    __slots__ = ("topic", "data", "qos", "retain")

    def __init__(self, topic: str, data: bytes, qos: int) -> None:
        self.topic, self.data, self.qos, self.retain = topic, data, qos, True


# ---- listeners: bound before the store is opened ---------------------------------

LISTEN_BACKLOG = 1024


@dataclass
class Listening:
    """One listener made ready before `roost serve` touches the store: its TLS
    context built and its sockets bound (not yet listening: see bind_listeners)."""

    sockets: list[socket.socket]
    ssl_context: ssl.SSLContext | None

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()   # a no-op for a socket its server has closed already


def bind_listeners(config: RoostConfig) -> dict[str, Listening]:
    """Every listener's TLS context and sockets, or StartupError naming the
    listener, the address or file, and what is wrong.

    TLS files come first (reading them changes nothing). The sockets are bound
    but only listen once their server is made (RoostBroker.start): a listening
    socket accepts connections while the store is still opening, and whoever
    waits for the port to open would take the broker for ready. SO_REUSEADDR
    lets a restart bind past TIME_WAIT connections; two sockets that both set it
    can share an address only while neither listens, so a second broker racing
    this one for the port fails at listen() instead, reported the same way."""
    contexts = {name: _tls_context(name, lst, config.resolve) if lst.ssl else None
                for name, lst in config.listeners.items()}
    listening: dict[str, Listening] = {}
    try:
        for name, lst in config.listeners.items():
            listening[name] = Listening(_bind(name, lst.bind), contexts[name])
    except BaseException:
        for ready in listening.values():
            ready.close()
        raise
    return listening


def _bind(name: str, bind: str) -> list[socket.socket]:
    """Sockets for `bind` as loop.create_server would make them: one per address
    the host resolves to (all interfaces for an empty host), IPv6 ones v6-only."""
    host, port = Broker._split_bindaddr_port(bind, 1883)
    host = host.strip("[]") if host else None   # "[::]:1883" -> "::"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise StartupError(f"cannot listen on {bind} (listener {name}): unknown host {host}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):   # unique, in order
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:   # an address family this machine lacks (e.g. no IPv6)
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise StartupError(listen_problem(name, bind, port, exc)) from None
    if not sockets:
        raise StartupError(f"cannot listen on {bind} (listener {name}): no usable address")
    return sockets


def listen_problem(name: str, bind: str, port: int, exc: OSError) -> str:
    """The one line for a socket that cannot bind or listen."""
    reasons = {errno.EADDRINUSE: "address already in use",
               errno.EADDRNOTAVAIL: "no such address on this machine",
               errno.EACCES: "permission denied"}
    reason = reasons.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
    if exc.errno == errno.EACCES and 0 < port < 1024:
        reason += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return f"cannot listen on {bind} (listener {name}): {reason}"


class _EncryptedKey(Exception):
    """Raised by the passphrase callback: a broker cannot stop to ask for one."""


def _no_passphrase() -> str:
    raise _EncryptedKey


def _tls_context(name: str, lst: ListenerConfig, resolve: Callable[[str], Path]) -> ssl.SSLContext:
    """amqtt's server context (CLIENT_AUTH defaults, optional client certificates),
    built here so that a bad file is named in one line."""
    certfile, keyfile = resolve(lst.certfile or ""), resolve(lst.keyfile or "")
    cafile = resolve(lst.cafile) if lst.cafile else None
    where = f"listener {name}"
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cafile)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"{where}: cafile {cafile} is not a usable PEM CA certificate ({_ssl_reason(exc)})") from None
    try:
        # the certificate alone first, so that a bad one is not blamed on the key
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=certfile)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"{where}: certfile {certfile} is not a PEM certificate ({_ssl_reason(exc)})") from None
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_passphrase)
    except _EncryptedKey:
        raise StartupError(f"{where}: keyfile {keyfile} is encrypted; roost needs it without a passphrase") from None
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"{where}: keyfile {keyfile} is not the PEM private key of certfile {certfile} "
                           f"({_ssl_reason(exc)})") from None
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _ssl_reason(exc: ssl.SSLError | OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason.lower().replace("_", " ") if exc.reason else str(exc)
    return (exc.strerror or str(exc)).lower()


class _ListenerServers:
    """A listener served on several sockets (one per address its host resolves
    to; loop.create_server takes one `sock`): what amqtt's Server and
    bound_ports use of an asyncio.Server."""

    def __init__(self) -> None:
        self.servers: list[Any] = []

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self.servers for sock in server.sockets]

    def close(self) -> None:
        for server in self.servers:
            server.close()

    async def wait_closed(self) -> None:
        for server in self.servers:
            await server.wait_closed()


class RoostBroker(Broker):
    def __init__(self, config: RoostConfig, *, plugins: dict[str, dict[str, Any]], services: Any,
                 retained_store: Any | None, session_store: Any | None = None,
                 listening: dict[str, Listening] | None = None,
                 http_app: Callable[[], Any] | None = None) -> None:
        self.roost_config = config
        # makes the aiohttp Application of an http listener, one per socket (broker/http/)
        self._http_app = http_app
        self.monitor: Any = None   # broker.monitor.Monitor, set by the composition root
        # bound by `roost serve` before it opened the store; None: bound at start()
        self._listening = listening
        self.services = services
        self.retained_store = retained_store
        super().__init__(self._amqtt_config(config, plugins))
        # plugins.base.broker_of(plugin) reads context._broker (plugin contexts are copies)
        self.plugins_manager.context._broker = self  # type: ignore[attr-defined]
        for p in self.plugins_manager.plugins:
            p.context._broker = self  # type: ignore[attr-defined]
        self.engine = Engine(limits=config.limits, plugins=list(self.plugins_manager.plugins),
                             plugins_manager=self.plugins_manager, retained_store=retained_store,
                             listener_limits={n: lst.max_connections for n, lst in config.listeners.items()},
                             session_store=session_store, unsaved_prefixes=(topics.INBOX,),
                             serve_sys=config.sys_interval > 0, on_retained_stored=self._retained_stored)

    def _retained_stored(self, topic: str, payload: bytes) -> None:
        if self.services is not None:   # engine tests run a broker without services
            self.services.bus.publish_nowait(RetainedChanged(topic, payload))

    @staticmethod
    def _amqtt_config(config: RoostConfig, plugins: dict[str, dict[str, Any]]) -> dict[str, Any]:
        listeners: dict[str, Any] = {}
        for name, lst in config.listeners.items():
            if lst.type == "http":
                continue   # not MQTT: served by broker/http, unknown to amqtt
            d: dict[str, Any] = {"type": lst.type, "bind": lst.bind, "ssl": lst.ssl,
                                 "max_connections": lst.max_connections}
            for key in ("certfile", "keyfile", "cafile"):
                value = getattr(lst, key)
                if value and lst.ssl:  # amqtt insists that every named file exists
                    d[key] = str(config.resolve(value))
            listeners[name] = d
        if "default" not in listeners:
            listeners["default"] = dict(next(iter(listeners.values())))
        return {"listeners": listeners, "plugins": dict(plugins)}

    # ---- start / stop ------------------------------------------------------------

    async def start(self) -> None:
        try:
            self.transitions.start()
        except Exception as exc:
            raise BrokerError(f"Broker instance can't be started: {exc}") from exc
        await self.plugins_manager.fire_event(BrokerEvents.PRE_START, wait=True)
        try:
            await self.engine.load_retained()
            await self.engine.load_sessions(keep=self._session_still_allowed)
            self.engine.start()
            await self._start_listeners()
            self.transitions.starting_success()
        except Exception as exc:
            if not isinstance(exc, StartupError):   # that one says all a person needs in one line
                log.exception("broker start failed")
            self.transitions.starting_fail()
            await self._close_servers()
            await self.engine.stop()
            if isinstance(exc, StartupError):
                raise
            raise BrokerError(f"Broker instance can't be started: {exc}") from exc
        await self.plugins_manager.fire_event(BrokerEvents.POST_START, wait=True)
        for hook in self.engine.h_start:
            await hook(self)

    def _session_still_allowed(self, saved: SavedSession) -> bool:
        """A saved session comes back only if its client could still log in as the
        same principal (not removed, anonymous access still on)."""
        if saved.principal is None:
            return self.roost_config.auth.allow_anonymous
        identity = getattr(self.services, "identity", None)
        return identity is None or identity.get_cached(saved.principal) is not None

    async def _start_listeners(self) -> None:
        listening = self._listening if self._listening is not None else bind_listeners(self.roost_config)
        try:
            for name, lst in self.roost_config.listeners.items():
                await self._serve_listener(name, lst, listening[name])
        finally:
            for ready in listening.values():
                ready.close()   # those not handed to a server (a failed start); the others are no-ops

    async def _serve_listener(self, name: str, lst: ListenerConfig, ready: Listening) -> None:
        group = _ListenerServers()
        # registered first, so that a failed start closes whatever part of it was served
        self._servers[name] = Server(name, cast(Any, group), lst.max_connections)
        for sock in ready.sockets:
            try:
                group.servers.append(await self._serve_socket(name, lst.type, sock, ready.ssl_context))
            except OSError as exc:   # listen() lost a race for the port (see bind_listeners)
                port = sock.getsockname()[1]
                raise StartupError(listen_problem(name, lst.bind, port, exc)) from None
        ready.sockets = []   # owned by their servers now
        log.info("listener %s (%s%s) bound to %s", name, lst.type, "+tls" if lst.ssl else "",
                 ", ".join(_address(sock) for sock in group.sockets))

    async def _serve_socket(self, listener_name: str, listener_type: str, sock: socket.socket,
                            ssl_context: ssl.SSLContext | None) -> Any:
        if listener_type == "tcp":
            engine = self.engine
            return await asyncio.get_running_loop().create_server(
                lambda: Connection(engine, listener_name), sock=sock, ssl=ssl_context, backlog=LISTEN_BACKLOG)
        if listener_type == "ws":
            return await websockets.serve(
                partial(self.ws_connected, listener_name=listener_name), sock=sock,
                ssl=ssl_context, subprotocols=WS_SUBPROTOCOLS, backlog=LISTEN_BACKLOG,
                max_size=self.engine.max_packet + 8, close_timeout=WS_CLOSE_TIMEOUT,
                logger=_WsLog(logging.getLogger("roost.ws"), {}))
        if listener_type == "http":
            if self._http_app is None:
                raise BrokerError(f"listener {listener_name}: type http needs an http app (broker/app.py)")
            from broker.http.server import serve_http

            return await serve_http(self._http_app(), sock, ssl_context, LISTEN_BACKLOG)
        raise BrokerError(f"Unsupported listener type: {listener_type}")

    async def _create_server_instance(self, listener_name: str, listener_type: Any, address: str | None,
                                      port: int, ssl_context: ssl.SSLContext | None) -> Any:
        raise NotImplementedError("RoostBroker serves listeners on sockets bound by bind_listeners")

    def bound_ports(self) -> dict[str, int]:
        ports = {}
        for name, server in self._servers.items():
            socks = getattr(server.instance, "sockets", None) or []
            if socks:
                ports[name] = socks[0].getsockname()[1]
        return ports

    async def _close_servers(self) -> None:
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()

    async def shutdown(self) -> None:
        for hook in self.engine.h_stop:
            try:
                await hook()
            except Exception:  # noqa: BLE001 - keep shutting down
                log.exception("on_roost_stop failed")
        await self.plugins_manager.fire_event(BrokerEvents.PRE_SHUTDOWN, wait=True)
        self.engine.stopping = True
        await self._close_servers()
        await self.engine.stop()
        for server in self._servers.values():
            try:
                await asyncio.wait_for(server.close_instance(), 5)
            except (TimeoutError, Exception):  # noqa: BLE001
                log.warning("listener %s did not close cleanly", server.listener_name)
        try:
            self.transitions.shutdown()
        except Exception:  # noqa: BLE001 - shutdown of a broker that failed to start
            pass
        await self.plugins_manager.fire_event(BrokerEvents.POST_SHUTDOWN, wait=True)
        await self.plugins_manager.close()
        try:
            self.transitions.stopping_success()
        except Exception:  # noqa: BLE001
            pass
        log.info("broker stopped")

    # ---- connections -------------------------------------------------------------

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        conn = Connection(self.engine, listener_name)
        transport = _WsTransport(websocket, conn)
        conn.connection_made(transport)
        try:
            async for message in websocket:
                if not transport.reading.is_set():
                    await transport.reading.wait()
                if isinstance(message, str):
                    log.info("closing websocket client: text frame (MQTT needs binary frames)")
                    break
                conn.data_received(message)
                if conn.state == CLOSED:
                    break
        except websockets.ConnectionClosed:
            pass
        finally:
            await transport.finish()
            conn.connection_lost(None)

    async def stream_connected(self, reader: Any, writer: Any, listener_name: str) -> None:
        raise NotImplementedError("RoostBroker serves TCP through broker.mqtt.connection.Connection")

    async def external_connected(self, reader: Any, writer: Any, listener_name: str) -> None:
        raise NotImplementedError("external listeners are not supported by RoostBroker")

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        raise NotImplementedError("replaced by broker.mqtt (lifecycle.py)")

    def create_offline_session(self, client_id: str) -> Any:
        raise NotImplementedError("RoostBroker does not create sessions without a connection")

    async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
        raise NotImplementedError("RoostBroker subscriptions are made by clients")

    # ---- amqtt BrokerContext compatibility ---------------------------------------

    async def _broadcast_message(self, session: Any, topic: str | None, data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        if topic is None:
            return
        await self.engine.publish(topic, bytes(data or b""), force_qos or 0)

    async def retain_message(self, source_session: Any, topic_name: str | None, data: bytes | bytearray | None,
                             qos: int | None = None) -> None:
        if topic_name is not None:
            self.engine.set_retained(topic_name, bytes(data or b""), qos or 0)

    @property
    def sessions(self) -> dict[str, tuple[Any, None]]:  # type: ignore[override]
        # keyed by client id as amqtt's plugins expect (two principals' sessions
        # under one foreign client id show as one entry here; the engine keeps both)
        return {st.info.client_id: (st.info, None) for st in self.engine.sessions.values()}

    @property
    def subscriptions(self) -> dict[str, list[tuple[Any, int]]]:  # type: ignore[override]
        out: dict[str, list[tuple[Any, int]]] = {}
        for f, st, q in self.engine.index.items():
            out.setdefault(f, []).append((st.info, q))
        return out

    @property
    def retained_messages(self) -> dict[str, Any]:  # type: ignore[override]
        return {t: _Retained(t, r.payload, r.qos) for t, r in self.engine.retained.items()}

    # ---- BrokerApi (broker/mqtt/hooks.py) ----------------------------------------

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        return await self.engine.publish(topic, payload, qos, retain)

    async def deliver(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        return await self.engine.deliver(client_id, topic, payload, qos)

    def deliver_nowait(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool | None:
        return self.engine.deliver_nowait(client_id, topic, payload, qos)

    def retained(self, topic: str) -> bytes | None:
        v = self.engine.retained.get(topic)
        return v.payload if v is not None else None

    def client_ids_of(self, principal: str) -> list[str]:
        return self.engine.client_ids_of(principal)

    async def kick_principal(self, principal: str) -> int:
        return await self.engine.kick_principal(principal)

    def refresh_acl(self) -> None:
        self.engine.refresh_acl()


class _WsTransport:
    """The asyncio.Transport subset Connection uses, on top of a websockets
    connection: writes go through one writer task; pause_reading holds the
    reader loop in RoostBroker.ws_connected."""

    def __init__(self, ws: Any, protocol: Connection) -> None:
        self.ws = ws
        self.protocol = protocol
        self.reading = asyncio.Event()
        self.reading.set()
        self._out: deque[bytes] = deque()
        self._size = 0
        self._paused = False
        self._closing = False
        self._lost = False
        self._wake = asyncio.Event()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.ws.remote_address
        return default

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        self._out.append(data)
        self._size += len(data)
        self._wake.set()
        if not self._paused and self._size > WS_WRITE_HIGH:
            self._paused = True
            self.protocol.pause_writing()

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._out:
                    data = self._out.popleft()
                    self._size -= len(data)
                    await self.ws.send(data)
                    if self._paused and self._size < WS_WRITE_LOW:
                        self._paused = False
                        self.protocol.resume_writing()
                if self._closing:
                    # the broker closed it: report it now, do not wait for the
                    # closing handshake of a client that may be gone
                    self._report_lost()
                    await self.ws.close()
                    return
        except websockets.ConnectionClosed:
            pass

    def _report_lost(self) -> None:
        if not self._lost:
            self._lost = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    def abort(self) -> None:
        self._closing = True
        self._out.clear()
        self._writer.cancel()
        self._report_lost()
        task = asyncio.get_running_loop().create_task(self.ws.close())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    def get_write_buffer_size(self) -> int:
        return self._size

    async def finish(self) -> None:
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), 2)
        except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
            self._writer.cancel()
