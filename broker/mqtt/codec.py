"""MQTT 3.1.1 and 3.1 wire format: decode what clients send into typed packets,
pre-encode what the broker sends (MQTT 5's additions: codec5.py, properties.py).

Decoding works on the body of one complete packet (the connection's incremental
framer finds packet boundaries); each decoder checks the fixed-header flags of
its type and returns one packet object. Every malformed packet raises
`ProtocolViolation`; the connection then closes (MQTT-4.8.0-1).

Packets are slots dataclasses, one per kind the broker receives. The ones a
client sends once (Connect, Subscribe, Unsubscribe) are frozen; Publish and Ack
come once per message and are not (a frozen dataclass costs four times as much
to build). MQTT 5 adds a reason code and a `properties` field to most of them
and subscription options to `Subscription`: each goes in as the last field of
its dataclass, and the decoders below read it at the end of the variable header.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

# Packet types (high nibble of the first byte).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

AUTH = 15

PINGRESP_BYTES = b"\xd0\x00"
MAX_REMAINING_LENGTH = 268_435_455


# MQTT 5 reason codes a violation closes the connection with (DISCONNECT to a v5 client)
MALFORMED = 0x81
PROTOCOL_ERROR = 0x82


class ProtocolViolation(Exception):
    """The client broke the protocol; the connection must be closed (an MQTT 5
    client is told `code` in a DISCONNECT first)."""

    def __init__(self, why: str, code: int = MALFORMED) -> None:
        super().__init__(why)
        self.code = code


class UnacceptableProtocol(Exception):
    """CONNECT with a protocol name/level we do not speak (CONNACK 1)."""


# ---- packets ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[int, Any] | None = None      # MQTT 5 will properties


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    clean_session: bool
    keep_alive: int
    username: str | None = None
    password: str | None = None            # the password bytes decoded leniently, for plugins
    will: Will | None = None
    password_bytes: bytes | None = field(default=None, repr=False)
    level: int = 4                                 # 3: MQTT 3.1 (MQIsdp), 4: 3.1.1, 5: MQTT 5
    properties: dict[int, Any] | None = None      # MQTT 5 only


@dataclass(slots=True)
class Publish:
    topic: str
    qos: int
    packet_id: int          # 0 for QoS 0 (0 is never a valid packet id)
    retain: bool
    dup: bool
    payload: bytes
    properties: Any = None   # MQTT 5: properties.MsgProps once decoded (codec5), else None


@dataclass(slots=True)
class Ack:
    """PUBACK, PUBREC, PUBREL or PUBCOMP: the packet type says which."""
    packet_id: int
    reason: int = 0          # MQTT 5


@dataclass(frozen=True, slots=True)
class Subscription:
    topic_filter: str
    qos: int
    options: int = 0         # MQTT 5 subscription options byte (bits 2-5: no local, RAP, retain handling)


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: dict[int, Any] | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: dict[int, Any] | None = None


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: int = 0
    properties: dict[int, Any] | None = None


Packet = Connect | Publish | Ack | Subscribe | Unsubscribe | PingReq | Disconnect

PING: Final = PingReq()
DISCONNECTED: Final = Disconnect()


# ---- decoders -----------------------------------------------------------------

# Every one-byte bytes object, by value: bytes((n,)) looks up __bytes__ and walks a
# tuple (about 360 instructions), an index into this tuple is one step. Per
# message on the hot path: the PUBLISH's first byte and its remaining length.
ONE_BYTE: Final[tuple[bytes, ...]] = tuple(bytes((i,)) for i in range(256))


def encode_varint(n: int) -> bytes:
    if n < 0x80:
        return ONE_BYTE[n]     # one byte: most packets (per message on the hot path)
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _str(body: bytes | memoryview, pos: int) -> tuple[str, int]:
    if pos + 2 > len(body):
        raise ProtocolViolation("truncated string")
    n = (body[pos] << 8) | body[pos + 1]
    end = pos + 2 + n
    if end > len(body):
        raise ProtocolViolation("truncated string")
    try:
        s = bytes(body[pos + 2:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("string is not valid UTF-8") from None
    if "\x00" in s:
        raise ProtocolViolation("string contains U+0000")
    return s, end


def _bin(body: bytes | memoryview, pos: int) -> tuple[bytes, int]:
    if pos + 2 > len(body):
        raise ProtocolViolation("truncated binary field")
    n = (body[pos] << 8) | body[pos + 1]
    end = pos + 2 + n
    if end > len(body):
        raise ProtocolViolation("truncated binary field")
    return bytes(body[pos + 2:end]), end


PropsReader = Callable[[bytes, int, str], tuple[dict[int, Any], int]]


def decode_connect(flags: int, body: bytes, read_props: PropsReader | None = None) -> Connect:
    """CONNECT of MQTT 3.1.1 or 3.1; of MQTT 5 too when `read_props` decodes
    properties (codec5.decode_connect passes it)."""
    if flags != 0:
        raise ProtocolViolation("CONNECT flags must be 0")
    name, pos = _str(body, 0)
    if pos >= len(body):
        raise ProtocolViolation("truncated CONNECT")
    level = body[pos]
    if name not in ("MQTT", "MQIsdp"):
        raise ProtocolViolation(f"unknown protocol name {name!r}")
    if (name, level) not in (("MQTT", 4), ("MQIsdp", 3)) and not (name == "MQTT" and level == 5 and read_props):
        raise UnacceptableProtocol(f"protocol {name} level {level}")
    if pos + 4 > len(body):
        raise ProtocolViolation("truncated CONNECT")
    cflags = body[pos + 1]
    keep_alive = (body[pos + 2] << 8) | body[pos + 3]
    pos += 4
    if cflags & 0x01:
        raise ProtocolViolation("CONNECT reserved flag set")
    clean = bool(cflags & 0x02)
    has_will = bool(cflags & 0x04)
    will_qos = (cflags >> 3) & 0x03
    will_retain = bool(cflags & 0x20)
    has_password = bool(cflags & 0x40)
    has_username = bool(cflags & 0x80)
    if not has_will and (will_qos or will_retain):
        raise ProtocolViolation("will QoS/retain without will flag")
    if will_qos == 3:
        raise ProtocolViolation("will QoS 3")
    if has_password and not has_username:
        raise ProtocolViolation("password without user name")
    props = will_props = None
    if level == 5:
        assert read_props is not None
        props, pos = read_props(body, pos, "connect")
    client_id, pos = _str(body, pos)
    will = username = password = password_bytes = None
    if has_will:
        if level == 5:
            assert read_props is not None
            will_props, pos = read_props(body, pos, "will")
        will_topic, pos = _str(body, pos)
        will_payload, pos = _bin(body, pos)
        will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
    if has_username:
        username, pos = _str(body, pos)
    if has_password:
        password_bytes, pos = _bin(body, pos)
        password = password_bytes.decode("utf-8", errors="replace")
    if pos != len(body):
        raise ProtocolViolation("trailing bytes in CONNECT")
    return Connect(client_id, clean, keep_alive, username, password, will, password_bytes, level, props)


def split_publish(flags: int, body: bytes) -> tuple[str, int, int, int]:
    """PUBLISH's fixed-header flags and variable header, the same in every protocol
    version: (topic, qos, packet id, offset of what follows: MQTT 5's properties,
    or the payload)."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolViolation("PUBLISH QoS 3")
    if qos == 0 and flags & 0x08:
        raise ProtocolViolation("PUBLISH QoS 0 with DUP set")
    if len(body) < 2:
        raise ProtocolViolation("truncated PUBLISH")
    n = (body[0] << 8) | body[1]
    end = 2 + n
    if end > len(body):
        raise ProtocolViolation("truncated PUBLISH topic")
    try:
        topic = body[2:end].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("topic is not valid UTF-8") from None
    pid = 0
    if qos:
        if end + 2 > len(body):
            raise ProtocolViolation("truncated PUBLISH packet id")
        pid = (body[end] << 8) | body[end + 1]
        if pid == 0:
            raise ProtocolViolation("packet id 0", PROTOCOL_ERROR)
        end += 2
    return topic, qos, pid, end


def decode_publish(flags: int, body: bytes) -> Publish:
    topic, qos, pid, end = split_publish(flags, body)
    return Publish(topic, qos, pid, bool(flags & 0x01), bool(flags & 0x08), body[end:])


def decode_packet_id(body: bytes) -> int:
    if len(body) != 2:
        raise ProtocolViolation("bad packet id field")
    return (body[0] << 8) | body[1]


def decode_ack(ptype: int, flags: int, body: bytes) -> Ack:
    """PUBACK, PUBREC, PUBCOMP (flags 0) or PUBREL (flags 0010)."""
    if flags != (0x02 if ptype == PUBREL else 0):
        if ptype == PUBREL:
            raise ProtocolViolation("PUBREL flags must be 0010")
        raise ProtocolViolation(f"packet type {ptype} with reserved flags {flags:#x}")
    return Ack(decode_packet_id(body))


def subscribe_packet_id(flags: int, body: bytes) -> int:
    """SUBSCRIBE's fixed-header flags and packet id, the same in every protocol version."""
    if flags != 0x02:
        raise ProtocolViolation("SUBSCRIBE flags must be 0010")
    if len(body) < 2:
        raise ProtocolViolation("truncated SUBSCRIBE")
    pid = (body[0] << 8) | body[1]
    if pid == 0:
        raise ProtocolViolation("packet id 0", PROTOCOL_ERROR)
    return pid


def decode_subscribe(flags: int, body: bytes) -> Subscribe:
    pid = subscribe_packet_id(flags, body)
    pos = 2
    out: list[Subscription] = []
    while pos < len(body):
        f, pos = _str(body, pos)
        if pos >= len(body):
            raise ProtocolViolation("truncated SUBSCRIBE")
        q = body[pos]
        pos += 1
        if q > 2:
            raise ProtocolViolation("SUBSCRIBE QoS > 2 or reserved bits set")
        out.append(Subscription(f, q))
    if not out:
        raise ProtocolViolation("SUBSCRIBE without filters")
    return Subscribe(pid, tuple(out))


def decode_unsubscribe(flags: int, body: bytes) -> Unsubscribe:
    if flags != 0x02:
        raise ProtocolViolation("UNSUBSCRIBE flags must be 0010")
    if len(body) < 2:
        raise ProtocolViolation("truncated UNSUBSCRIBE")
    pid = (body[0] << 8) | body[1]
    if pid == 0:
        raise ProtocolViolation("packet id 0")
    pos = 2
    out: list[str] = []
    while pos < len(body):
        f, pos = _str(body, pos)
        out.append(f)
    if not out:
        raise ProtocolViolation("UNSUBSCRIBE without filters")
    return Unsubscribe(pid, tuple(out))


def decode_pingreq(flags: int, body: bytes) -> PingReq:
    if flags:
        raise ProtocolViolation(f"packet type {PINGREQ} with reserved flags {flags:#x}")
    if body:
        raise ProtocolViolation("PINGREQ with a body")
    return PING


def decode_disconnect(flags: int, body: bytes) -> Disconnect:
    # a DISCONNECT like these is a protocol error, so the will is published
    if flags:
        raise ProtocolViolation(f"packet type {DISCONNECT} with reserved flags {flags:#x}")
    if body:
        raise ProtocolViolation("DISCONNECT with a body")
    return DISCONNECTED


# ---- encoders -----------------------------------------------------------------

def connack(session_present: bool, code: int) -> bytes:
    return bytes((0x20, 0x02, 1 if session_present else 0, code))


def ack(ptype: int, pid: int) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP / UNSUBACK."""
    first = (ptype << 4) | (0x02 if ptype == PUBREL else 0)
    return ((first << 24) | 0x020000 | pid).to_bytes(4, "big")   # one call, not a tuple and bytes()


def suback(pid: int, codes: list[int]) -> bytes:
    return bytes((0x90,)) + encode_varint(2 + len(codes)) + bytes((pid >> 8, pid & 0xFF)) + bytes(codes)


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool, pid: int = 0, dup: bool = False) -> bytes:
    t = topic.encode("utf-8")
    rl = 2 + len(t) + (2 if qos else 0) + len(payload)
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    parts = [bytes((first,)), encode_varint(rl), len(t).to_bytes(2, "big"), t]
    if qos:
        parts.append(pid.to_bytes(2, "big"))
    parts.append(payload)
    return b"".join(parts)


def encode_connect(client_id: str, *, clean: bool = True, keep_alive: int = 60, username: str | None = None,
                   password: str | None = None, level: int = 4, will: tuple[str, bytes, int, bool] | None = None,
                   name: str = "MQTT") -> bytes:
    """Used by tests that need to send raw or odd CONNECTs."""
    def s(x: str) -> bytes:
        b = x.encode()
        return len(b).to_bytes(2, "big") + b
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    if will is not None:
        flags |= 0x04 | (will[2] << 3) | (0x20 if will[3] else 0)
    body = s(name) + bytes((level, flags)) + keep_alive.to_bytes(2, "big") + s(client_id)
    if will is not None:
        body += s(will[0]) + len(will[1]).to_bytes(2, "big") + will[1]
    if username is not None:
        body += s(username)
    if password is not None:
        body += s(password)
    return bytes((0x10,)) + encode_varint(len(body)) + body
