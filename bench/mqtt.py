"""A minimal raw MQTT 3.1.1 / 5 client for load generation (asyncio.Protocol, no paho).

Only what the benchmark needs: CONNECT, SUBSCRIBE, PUBLISH QoS 0/1, PUBACK,
DISCONNECT; with `version=5` the same packets in their MQTT 5 form (empty
property lists, except a publisher's Topic Alias), and the CONNACK's Topic Alias
Maximum is kept so a publisher knows whether it may use an alias. Packets are encoded once where possible; incoming bytes are parsed
in one pass per `data_received` call and the PUBACKs that call owes are written
back in a single `transport.write`, so the generator stays cheap per message.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

now_ns = time.monotonic_ns  # CLOCK_MONOTONIC: comparable across processes on one host

DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"


class MqttError(Exception):
    pass


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def connect_packet(client_id: str, username: str | None = None, password: str | None = None,
                   keepalive: int = 600, clean: bool = True, version: int = 4) -> bytes:
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
        if password is not None:
            flags |= 0x40
            payload += _str(password)
    var = _str("MQTT") + bytes([version, flags]) + keepalive.to_bytes(2, "big")
    if version == 5:
        var += b"\x00"    # no CONNECT properties (so the server sends us no topic aliases)
    body = var + payload
    return b"\x10" + varint(len(body)) + body


def subscribe_packet(pid: int, filters: list[tuple[str, int]], version: int = 4) -> bytes:
    props = b"\x00" if version == 5 else b""
    body = pid.to_bytes(2, "big") + props + b"".join(_str(f) + bytes([q]) for f, q in filters)
    return b"\x82" + varint(len(body)) + body


def publish_prefix(topic: str, qos: int, payload_len: int, props: bytes = b"") -> bytes:
    """Fixed header + topic of a PUBLISH whose payload is `payload_len` bytes.

    For QoS 1 the 2-byte packet id goes right after this prefix, then `props` (MQTT 5:
    the encoded property list, see `v5_props`; MQTT 3.1.1: empty), then the payload.
    """
    t = _str(topic)
    rl = len(t) + (2 if qos else 0) + len(props) + payload_len
    return bytes([0x30 | (qos << 1)]) + varint(rl) + t


TOPIC_ALIAS = 0x23
TOPIC_ALIAS_MAXIMUM = 0x22


def v5_props(topic_alias: int = 0) -> bytes:
    """An MQTT 5 PUBLISH property list: empty, or one Topic Alias."""
    if not topic_alias:
        return b"\x00"
    return b"\x03" + bytes([TOPIC_ALIAS]) + topic_alias.to_bytes(2, "big")


def _props_span(buf: bytearray, i: int) -> tuple[int, int]:
    """Where the properties of the MQTT 5 property list at `i` (its varint length first)
    start and end."""
    rl, mult = 0, 1
    while True:
        b = buf[i]
        i += 1
        rl += (b & 127) * mult
        if b < 128:
            return i, i + rl
        mult *= 128


def _props_end(buf: bytearray, i: int) -> int:
    return _props_span(buf, i)[1]


def _topic_alias_maximum(props: bytes) -> int:
    """The Topic Alias Maximum of a CONNACK property list (0: absent, no aliases)."""
    i = 0
    while i < len(props):
        pid = props[i]
        i += 1
        if pid == TOPIC_ALIAS_MAXIMUM:
            return int.from_bytes(props[i:i + 2], "big")
        # Skip the other CONNACK properties by their type (MQTT 5.0, 2.2.2.2).
        if pid in (0x24, 0x25, 0x28, 0x29, 0x2A):            # byte
            i += 1
        elif pid in (0x13, 0x21):                            # two-byte integer
            i += 2
        elif pid in (0x11, 0x27):                            # four-byte integer
            i += 4
        elif pid in (0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F):    # string / binary
            i += 2 + int.from_bytes(props[i:i + 2], "big")
        elif pid == 0x26:                                    # user property: two strings
            i += 2 + int.from_bytes(props[i:i + 2], "big")
            i += 2 + int.from_bytes(props[i:i + 2], "big")
        else:
            raise MqttError(f"unknown CONNACK property 0x{pid:02x}")
    return 0


def publish_packet(topic: str, payload: bytes, qos: int = 0, pid: int = 0) -> bytes:
    pre = publish_prefix(topic, qos, len(payload))
    return pre + (pid.to_bytes(2, "big") if qos else b"") + payload


OnMessage = Callable[[bytes, bytes, int], None]   # (topic, payload, receive time ns)
OnPuback = Callable[[int], None]


class Conn(asyncio.Protocol):
    """One MQTT connection. Callbacks run inside data_received: keep them short."""

    def __init__(self, on_message: OnMessage | None = None, on_puback: OnPuback | None = None,
                 version: int = 4) -> None:
        self.version = version
        self.topic_alias_maximum = 0     # MQTT 5: from the CONNACK
        self.on_message = on_message
        self.on_puback = on_puback
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.subacks: dict[int, asyncio.Future[bytes]] = {}
        self.closed: asyncio.Future[None] = loop.create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.received = 0

    # -- asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        if not self.connack.done():
            self.connack.set_exception(MqttError(f"connection lost before CONNACK: {exc}"))
        for fut in self.subacks.values():
            if not fut.done():
                fut.set_exception(MqttError("connection lost before SUBACK"))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        t = now_ns()
        buf = self.buf
        buf += data
        n = len(buf)
        pos = 0
        acks: list[bytes] = []
        on_message = self.on_message
        v5 = self.version == 5
        while n - pos >= 2:
            h = buf[pos]
            i = pos + 1
            rl = 0
            mult = 1
            while True:
                if i >= n:
                    rl = -1
                    break
                b = buf[i]
                i += 1
                rl += (b & 127) * mult
                if b < 128:
                    break
                mult *= 128
            if rl < 0 or i + rl > n:
                break
            end = i + rl
            kind = h >> 4
            if kind == 3:
                te = i + 2 + ((buf[i] << 8) | buf[i + 1])
                if h & 0x06:
                    acks.append(b"\x40\x02" + bytes(buf[te:te + 2]))
                    ps = te + 2
                else:
                    ps = te
                if v5:
                    ps = _props_end(buf, ps)
                self.received += 1
                if on_message is not None:
                    on_message(bytes(buf[i + 2:te]), bytes(buf[ps:end]), t)
            elif kind == 4:
                if self.on_puback is not None:
                    self.on_puback((buf[i] << 8) | buf[i + 1])
            elif kind == 2:
                if not self.connack.done():
                    if v5 and end > i + 2:
                        try:
                            start, stop = _props_span(buf, i + 2)
                            self.topic_alias_maximum = _topic_alias_maximum(bytes(buf[start:stop]))
                        except MqttError as exc:
                            self.connack.set_exception(exc)
                            pos = end
                            continue
                    self.connack.set_result(buf[i + 1])
            elif kind == 9:
                fut = self.subacks.pop((buf[i] << 8) | buf[i + 1], None)
                if fut is not None and not fut.done():
                    fut.set_result(bytes(buf[_props_end(buf, i + 2) if v5 else i + 2:end]))
            pos = end
        if pos:
            del buf[:pos]
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))

    # -- helpers ----------------------------------------------------------------
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def subscribe(self, filters: list[tuple[str, int]], pid: int = 1, timeout: float = 10.0) -> bytes:
        fut = asyncio.get_running_loop().create_future()
        self.subacks[pid] = fut
        self.write(subscribe_packet(pid, filters, self.version))
        codes = await asyncio.wait_for(fut, timeout)
        if any(c >= 0x80 for c in codes):
            raise MqttError(f"subscription refused: {filters} -> {codes!r}")
        return codes

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write(DISCONNECT)
            finally:
                self.transport.close()


async def connect(host: str, port: int, client_id: str, username: str | None = None,
                  password: str | None = None, *, on_message: OnMessage | None = None,
                  on_puback: OnPuback | None = None, keepalive: int = 600, clean: bool = True,
                  timeout: float = 10.0, source: str | None = None, version: int = 4) -> Conn:
    """Open a TCP connection (from address `source` when given: many clients need more
    than one source address's ephemeral ports), send CONNECT, wait for CONNACK 0 (else MqttError)."""
    loop = asyncio.get_running_loop()
    transport, conn = await asyncio.wait_for(
        loop.create_connection(lambda: Conn(on_message, on_puback, version), host, port,
                               local_addr=(source, 0) if source else None), timeout)
    if conn.transport is None:  # uvloop may return before calling connection_made
        conn.connection_made(transport)
    conn.write(connect_packet(client_id, username, password, keepalive, clean, version))
    try:
        code = await asyncio.wait_for(conn.connack, timeout)
    except BaseException:
        conn.transport.close()  # type: ignore[union-attr]
        raise
    if code != 0:
        conn.transport.close()  # type: ignore[union-attr]
        raise MqttError(f"CONNACK {code} for {client_id}")
    return conn
