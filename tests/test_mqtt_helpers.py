"""In-process brokers for the MQTT engine tests: RoostBroker (or stock amqtt)
running on its own event loop thread, on a free port, with tiny test-only
plugins. Real TCP, real paho clients; no mocks."""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin

from broker.config import config_from_dict

HELPERS = "tests.test_mqtt_helpers"
TIMEOUT = 5.0


# ---- test-only plugins ----------------------------------------------------------


def split_packet(buf: bytes) -> tuple[tuple[int, int, bytes] | None, bytes]:
    """Take one whole MQTT packet off the front of `buf`:
    ((type, flags, body) or None when incomplete, the rest of the buffer)."""
    if len(buf) < 2:
        return None, buf
    length, mult, i = 0, 1, 1
    while i < len(buf):
        b = buf[i]
        length += (b & 0x7F) * mult
        mult *= 128
        i += 1
        if not b & 0x80:
            end = i + length
            if len(buf) < end:
                return None, buf
            first = buf[0]
            return (first >> 4, first & 0x0F, bytes(buf[i:end])), buf[end:]
    return None, buf

class AllowAuth(BaseAuthPlugin):
    """Accepts everyone, except password 'wrong'; principal = username."""

    async def authenticate(self, *, session: Any) -> bool | None:
        if session.password == "wrong":
            return False
        session.principal = session.username or "anon"
        return True

    @dataclass
    class Config:
        pass


class DenyAcl(BaseTopicPlugin):
    """Sync ACL: denies any topic/filter containing 'secret' unless the username is 'boss';
    publishing to 'ro/...' is denied."""

    def check(self, session: Any, topic: str, action: Action) -> bool:
        if "secret" in topic and session.username != "boss":
            return False
        if action == Action.PUBLISH and topic.startswith("ro/"):
            return False
        return True

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        return self.check(session, topic or "", action)  # type: ignore[arg-type]

    @dataclass
    class Config:
        pass


class AsyncDenyAcl(BaseTopicPlugin):
    """The same rules, but only through amqtt's awaited topic_filtering (slow path)."""

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        await asyncio.sleep(0)
        return DenyAcl.check(self, session, topic or "", action)  # type: ignore[arg-type]

    @dataclass
    class Config:
        pass


EVENTS: list[tuple] = []  # written by Recorder (one test at a time)


class Recorder(BasePlugin):
    """Records lifecycle hooks; intercepts publishes under 'icpt/'."""

    publish_prefixes = ("icpt/",)

    async def on_client_connected(self, session: Any) -> None:
        EVENTS.append(("connected", session.client_id))

    async def on_client_disconnected(self, session: Any, reason: str) -> None:
        EVENTS.append(("disconnected", session.client_id, str(reason)))

    async def on_client_subscribed(self, session: Any, topic_filter: str, qos: int) -> None:
        EVENTS.append(("subscribed", session.client_id, topic_filter, qos))

    async def on_client_unsubscribed(self, session: Any, topic_filter: str) -> None:
        EVENTS.append(("unsubscribed", session.client_id, topic_filter))

    async def on_client_publish(self, session: Any, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        EVENTS.append(("publish", session.client_id, topic, payload))
        return topic.startswith("icpt/eat")

    async def on_roost_start(self, broker: Any) -> None:
        EVENTS.append(("start",))

    async def on_roost_stop(self) -> None:
        EVENTS.append(("stop",))

    @dataclass
    class Config:
        pass


DEFAULT_PLUGINS = {f"{HELPERS}.AllowAuth": {}, f"{HELPERS}.DenyAcl": {}, f"{HELPERS}.Recorder": {}}


# ---- brokers on a thread -----------------------------------------------------------

class LoopThread:
    def __init__(self) -> None:
        if os.environ.get("ROOST_TEST_UVLOOP"):   # run the engine tests on uvloop too
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class InProcRoost:
    """RoostBroker in this process. `config` is merged into a one-listener config."""

    config: dict[str, Any] = field(default_factory=dict)
    plugins: dict[str, dict] | None = None
    db_path: Path | None = None

    def start(self) -> InProcRoost:
        from broker.server import RoostBroker
        from broker.store.sqlite import SqliteStore

        self.lt = LoopThread()
        data: dict[str, Any] = {"listeners": {"default": {"bind": "127.0.0.1:0"}}}
        data.update(self.config)
        cfg = config_from_dict(data, base_dir=str(self.db_path.parent if self.db_path else "."))
        plugins = DEFAULT_PLUGINS if self.plugins is None else self.plugins

        async def boot() -> Any:
            store = None
            if self.db_path is not None:
                store = SqliteStore(self.db_path)
                await store.open()
            broker = RoostBroker(cfg, plugins=plugins, services=None,
                                 retained_store=store.retained if store else None,
                                 session_store=store.sessions if store else None)
            await broker.start()
            return broker, store

        self.broker, self.store = self.lt.run(boot())
        ports = self.broker.bound_ports()
        self.ports = ports
        self.port = ports.get("default") or next(iter(ports.values()))
        return self

    def call(self, coro: Any, timeout: float = 20.0) -> Any:
        return self.lt.run(coro, timeout)

    def sync(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)
        return self.lt.run(run())

    def stop(self) -> None:
        if getattr(self, "stopped", False):
            return
        self.stopped = True

        async def down() -> None:
            await self.broker.shutdown()
            if self.store is not None:
                await self.store.close()
        try:
            self.lt.run(down())
        finally:
            self.lt.close()


@dataclass
class InProcStock:
    """Stock amqtt 0.12.1 Broker in this process (anonymous unless `plugins` says otherwise)."""

    plugins: dict[str, dict] | None = None

    def start(self) -> InProcStock:
        from amqtt.broker import Broker

        self.lt = LoopThread()
        self.port = free_port()

        async def boot() -> Any:
            b = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                        "plugins": self.plugins or {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                                                    {"allow_anonymous": True}}})
            await b.start()
            return b

        self.broker = self.lt.run(boot())
        return self

    def sync(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)
        return self.lt.run(run())

    def stop(self) -> None:
        try:
            self.lt.run(self.broker.shutdown(), timeout=30)
        except Exception:  # noqa: BLE001 - stock shutdown is not always clean
            pass
        finally:
            self.lt.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a small paho wrapper ------------------------------------------------------------

# paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map them back
_V3_CODE = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


@dataclass
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int = 0


class Client:
    """paho client with a message queue. `auto_ack=False` withholds PUBACK/PUBREC
    (paho's manual_ack) so tests can leave QoS 1/2 messages un-acknowledged."""

    def __init__(self, port: int, client_id: str, *, clean: bool = True, username: str | None = "u",
                 password: str | None = "p", keepalive: int = 60, will: tuple | None = None,
                 auto_ack: bool = True, connect: bool = True, transport: str = "tcp",
                 tls: dict | None = None, ws_path: str = "/", host: str = "127.0.0.1") -> None:
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                             protocol=mqtt.MQTTv311, transport=transport, manual_ack=not auto_ack,
                             reconnect_on_failure=False)
        if transport == "websockets":
            self.c.ws_set_options(path=ws_path)
        if tls is not None:
            self.c.tls_set(**tls)
        if username is not None:
            self.c.username_pw_set(username, password)
        if will is not None:
            self.c.will_set(*will)
        self.messages: queue.Queue[Msg] = queue.Queue()
        self.connack: queue.Queue[int] = queue.Queue()
        self.disconnected = threading.Event()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.c.on_message = lambda c, u, m: self.messages.put(
            Msg(m.topic, m.payload, m.qos, bool(m.retain), bool(m.dup), m.mid))
        self.c.on_connect = lambda c, u, f, rc, p=None: self.connack.put(
            _V3_CODE.get(rc.value, rc.value) if hasattr(rc, "value") else rc)
        self.c.on_disconnect = lambda c, u, f, rc, p=None: self.disconnected.set()
        self.c.on_subscribe = lambda c, u, mid, rcs, p=None: self.subacks.put(
            [r.value if hasattr(r, "value") else r for r in rcs])
        self.port, self.host, self.keepalive = port, host, keepalive
        if connect:
            self.connect()

    def connect(self, expect: int = 0) -> int:
        self.disconnected.clear()
        self.c.connect(self.host, self.port, keepalive=self.keepalive)
        self.c.loop_start()
        try:
            rc = self.connack.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError("no CONNACK") from None
        if expect is not None:
            assert rc == expect, f"CONNACK {rc}, expected {expect}"
        return rc

    def sub(self, topic: str, qos: int = 0) -> list[int]:
        self.c.subscribe(topic, qos)
        return self.subacks.get(timeout=TIMEOUT)

    def unsub(self, topic: str) -> None:
        ev = threading.Event()
        self.c.on_unsubscribe = lambda *a: ev.set()
        self.c.unsubscribe(topic)
        assert ev.wait(TIMEOUT), "no UNSUBACK"

    def pub(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False, wait: bool = True) -> None:
        info = self.c.publish(topic, payload, qos, retain)
        if wait and qos:
            info.wait_for_publish(TIMEOUT)

    def get(self, timeout: float = TIMEOUT) -> Msg:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no message arrived") from None

    def none(self, wait: float = 0.5) -> None:
        time.sleep(wait)
        assert self.messages.empty(), f"unexpected message {self.messages.queue[0]}"

    def drain(self, wait: float = 0.3) -> list[Msg]:
        time.sleep(wait)
        out = []
        while not self.messages.empty():
            out.append(self.messages.get())
        return out

    def ack(self, m: Msg) -> None:
        self.c.ack(m.mid, m.qos)

    def disconnect(self) -> None:
        self.c.disconnect()
        self.disconnected.wait(TIMEOUT)
        self.c.loop_stop()

    def drop(self) -> None:
        """Lose the connection without DISCONNECT (the broker sees a dead socket)."""
        sock = self.c.socket()
        self.c.loop_stop()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def raw_connect(port: int, packet: bytes, read: int = 4, timeout: float = 3.0) -> bytes:
    """Send raw bytes and return what comes back until close/timeout (max `read` bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(packet)
        out = b""
        try:
            while len(out) < read:
                chunk = s.recv(read - len(out))
                if not chunk:
                    break
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def closed_after(sock: socket.socket, timeout: float = 3.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


class RawClient:
    """A byte-level MQTT client for what paho will not do (withhold PUBREC, odd packets)."""

    def __init__(self, port: int, timeout: float = TIMEOUT) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def connect(self, client_id: str, expect: bytes | None = b"\x20\x02", **kw: Any) -> bytes:
        from broker.mqtt import codec

        kw.setdefault("username", "u")
        kw.setdefault("password", "p")
        self.send(codec.encode_connect(client_id, **kw))
        ptype, flags, body = self.read()
        assert ptype == 2, ptype
        return body

    def subscribe(self, topic: str, qos: int, pid: int = 1) -> list[int]:
        t = topic.encode()
        body = pid.to_bytes(2, "big") + len(t).to_bytes(2, "big") + t + bytes((qos,))
        self.send(bytes((0x82, len(body))) + body)
        ptype, _flags, body = self.read()
        assert ptype == 9, ptype
        return list(body[2:])

    def read(self) -> tuple[int, int, bytes]:
        """One packet -> (type, flags, body); raises EOFError when the broker closed."""
        while True:
            packet, self.buf = split_packet(self.buf)
            if packet is not None:
                return packet
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("closed by broker")
            self.buf += chunk

    def read_publish(self) -> tuple[str, bytes, int, int, bool, bool]:
        """-> (topic, payload, qos, pid, dup, retain)"""
        ptype, flags, body = self.read()
        assert ptype == 3, f"expected PUBLISH, got type {ptype}"
        n = int.from_bytes(body[:2], "big")
        topic = body[2:2 + n].decode()
        qos = (flags >> 1) & 3
        pos = 2 + n
        pid = 0
        if qos:
            pid = int.from_bytes(body[pos:pos + 2], "big")
            pos += 2
        return topic, body[pos:], qos, pid, bool(flags & 8), bool(flags & 1)

    def closed(self, timeout: float = 3.0) -> bool:
        self.s.settimeout(timeout)
        try:
            while True:
                if not self.s.recv(4096):
                    return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.s.close()
