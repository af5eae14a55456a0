"""MQTT 5 properties: decoding them from a packet, encoding them, and the
properties of one application message as the broker forwards it (`MsgProps`).

Properties are decoded into a dict keyed by property id; User Property (0x26)
and Subscription Identifier (0x0B) may repeat and are lists. A property the
packet type does not allow, a repeated single property, or a value out of range
is a protocol error (reason 0x82); bytes that cannot be parsed are malformed
(0x81). Only MQTT 5 packets have properties: MQTT 3.1.1 packets never build one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from broker.mqtt.codec import MALFORMED, PROTOCOL_ERROR, ProtocolViolation, encode_varint

PAYLOAD_FORMAT = 0x01
MESSAGE_EXPIRY = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_ID = 0x0B
SESSION_EXPIRY = 0x11
ASSIGNED_CLIENT_ID = 0x12
SERVER_KEEP_ALIVE = 0x13
AUTH_METHOD = 0x15
AUTH_DATA = 0x16
REQUEST_PROBLEM_INFO = 0x17
WILL_DELAY = 0x18
REQUEST_RESPONSE_INFO = 0x19
RESPONSE_INFO = 0x1A
SERVER_REFERENCE = 0x1C
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_AVAILABLE = 0x28
SUBSCRIPTION_ID_AVAILABLE = 0x29
SHARED_AVAILABLE = 0x2A

_BYTE, _TWO, _FOUR, _VARINT, _STR, _BIN, _PAIR = range(7)
_TYPES = {
    PAYLOAD_FORMAT: _BYTE, MESSAGE_EXPIRY: _FOUR, CONTENT_TYPE: _STR, RESPONSE_TOPIC: _STR,
    CORRELATION_DATA: _BIN, SUBSCRIPTION_ID: _VARINT, SESSION_EXPIRY: _FOUR, ASSIGNED_CLIENT_ID: _STR,
    SERVER_KEEP_ALIVE: _TWO, AUTH_METHOD: _STR, AUTH_DATA: _BIN, REQUEST_PROBLEM_INFO: _BYTE,
    WILL_DELAY: _FOUR, REQUEST_RESPONSE_INFO: _BYTE, RESPONSE_INFO: _STR, SERVER_REFERENCE: _STR,
    REASON_STRING: _STR, RECEIVE_MAXIMUM: _TWO, TOPIC_ALIAS_MAXIMUM: _TWO, TOPIC_ALIAS: _TWO,
    MAXIMUM_QOS: _BYTE, RETAIN_AVAILABLE: _BYTE, USER_PROPERTY: _PAIR, MAXIMUM_PACKET_SIZE: _FOUR,
    WILDCARD_AVAILABLE: _BYTE, SUBSCRIPTION_ID_AVAILABLE: _BYTE, SHARED_AVAILABLE: _BYTE,
}
_REPEATABLE = (USER_PROPERTY, SUBSCRIPTION_ID)

# What a client may send in each packet (the server-only ones are a protocol error).
CONNECT_PROPS = frozenset((SESSION_EXPIRY, RECEIVE_MAXIMUM, MAXIMUM_PACKET_SIZE, TOPIC_ALIAS_MAXIMUM,
                           REQUEST_RESPONSE_INFO, REQUEST_PROBLEM_INFO, USER_PROPERTY, AUTH_METHOD, AUTH_DATA))
WILL_PROPS = frozenset((WILL_DELAY, PAYLOAD_FORMAT, MESSAGE_EXPIRY, CONTENT_TYPE, RESPONSE_TOPIC,
                        CORRELATION_DATA, USER_PROPERTY))
PUBLISH_PROPS = frozenset((PAYLOAD_FORMAT, MESSAGE_EXPIRY, TOPIC_ALIAS, RESPONSE_TOPIC, CORRELATION_DATA,
                           USER_PROPERTY, SUBSCRIPTION_ID, CONTENT_TYPE))
ACK_PROPS = frozenset((REASON_STRING, USER_PROPERTY))
SUBSCRIBE_PROPS = frozenset((SUBSCRIPTION_ID, USER_PROPERTY))
UNSUBSCRIBE_PROPS = frozenset((USER_PROPERTY,))
DISCONNECT_PROPS = frozenset((SESSION_EXPIRY, REASON_STRING, USER_PROPERTY, SERVER_REFERENCE))
AUTH_PROPS = frozenset((AUTH_METHOD, AUTH_DATA, REASON_STRING, USER_PROPERTY))

# Forwarded unchanged from a PUBLISH (or a will) to its subscribers (MQTT-3.3.2-*)
_FORWARDED = (PAYLOAD_FORMAT, CONTENT_TYPE, RESPONSE_TOPIC, CORRELATION_DATA, USER_PROPERTY)

Props = dict[int, Any]


def read_varint(body: bytes | memoryview, pos: int) -> tuple[int, int]:
    n = shift = 0
    for _ in range(4):
        if pos >= len(body):
            raise ProtocolViolation("truncated variable byte integer", MALFORMED)
        b = body[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7
    raise ProtocolViolation("variable byte integer longer than 4 bytes", MALFORMED)


def _utf8(raw: bytes) -> str:
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("property string is not valid UTF-8", MALFORMED) from None
    if "\x00" in s:
        raise ProtocolViolation("property string contains U+0000", MALFORMED)
    return s


def decode(body: bytes | memoryview, pos: int, allowed: frozenset[int]) -> tuple[Props, int]:
    """The properties at `pos` (length first); returns them and the position after."""
    length, pos = read_varint(body, pos)
    end = pos + length
    if end > len(body):
        raise ProtocolViolation("properties longer than the packet", MALFORMED)
    out: Props = {}
    while pos < end:
        pid = body[pos]
        pos += 1
        kind = _TYPES.get(pid)
        if kind is None:
            raise ProtocolViolation(f"unknown property {pid:#x}", MALFORMED)
        if pid not in allowed:
            raise ProtocolViolation(f"property {pid:#x} not allowed in this packet", PROTOCOL_ERROR)
        value: Any
        if kind == _BYTE:
            if pos + 1 > end:
                raise ProtocolViolation("truncated property", MALFORMED)
            value = body[pos]
            pos += 1
        elif kind == _TWO:
            if pos + 2 > end:
                raise ProtocolViolation("truncated property", MALFORMED)
            value = (body[pos] << 8) | body[pos + 1]
            pos += 2
        elif kind == _FOUR:
            if pos + 4 > end:
                raise ProtocolViolation("truncated property", MALFORMED)
            value = int.from_bytes(body[pos:pos + 4], "big")
            pos += 4
        elif kind == _VARINT:
            value, pos = read_varint(body, pos)
            if pos > end:
                raise ProtocolViolation("truncated property", MALFORMED)
        else:
            pairs = 2 if kind == _PAIR else 1
            items: list[Any] = []
            for _ in range(pairs):
                if pos + 2 > end:
                    raise ProtocolViolation("truncated property", MALFORMED)
                n = (body[pos] << 8) | body[pos + 1]
                stop = pos + 2 + n
                if stop > end:
                    raise ProtocolViolation("truncated property", MALFORMED)
                raw = bytes(body[pos + 2:stop])
                items.append(raw if kind == _BIN else _utf8(raw))
                pos = stop
            value = tuple(items) if kind == _PAIR else items[0]
        if pid in _REPEATABLE:
            out.setdefault(pid, []).append(value)
        elif pid in out:
            raise ProtocolViolation(f"property {pid:#x} given twice", PROTOCOL_ERROR)
        else:
            out[pid] = value
    if pos != end:
        raise ProtocolViolation("properties overrun their length", MALFORMED)
    _check_values(out)
    return out, end


def _check_values(props: Props) -> None:
    for pid in (PAYLOAD_FORMAT, REQUEST_PROBLEM_INFO, REQUEST_RESPONSE_INFO):
        if props.get(pid, 0) > 1:
            raise ProtocolViolation(f"property {pid:#x} must be 0 or 1", PROTOCOL_ERROR)
    if props.get(RECEIVE_MAXIMUM) == 0:
        raise ProtocolViolation("Receive Maximum 0", PROTOCOL_ERROR)
    if props.get(MAXIMUM_PACKET_SIZE) == 0:
        raise ProtocolViolation("Maximum Packet Size 0", PROTOCOL_ERROR)
    if 0 in props.get(SUBSCRIPTION_ID, ()):
        raise ProtocolViolation("Subscription Identifier 0", PROTOCOL_ERROR)
    topic = props.get(RESPONSE_TOPIC)
    if topic is not None and (not topic or "+" in topic or "#" in topic):
        raise ProtocolViolation("Response Topic is not a topic name", PROTOCOL_ERROR)


def _encode_one(pid: int, value: Any) -> bytes:
    kind = _TYPES[pid]
    head = bytes((pid,))
    if kind == _BYTE:
        return head + bytes((value,))
    if kind == _TWO:
        return head + value.to_bytes(2, "big")
    if kind == _FOUR:
        return head + value.to_bytes(4, "big")
    if kind == _VARINT:
        return head + encode_varint(value)
    if kind == _PAIR:
        k, v = (x.encode("utf-8") for x in value)
        return head + len(k).to_bytes(2, "big") + k + len(v).to_bytes(2, "big") + v
    raw = value if kind == _BIN else value.encode("utf-8")
    return head + len(raw).to_bytes(2, "big") + raw


def encode_items(items: list[tuple[int, Any]]) -> bytes:
    """Properties without their length prefix (to be joined with others)."""
    return b"".join(_encode_one(pid, v) for pid, v in items)


def encode(items: list[tuple[int, Any]]) -> bytes:
    """Properties with their length prefix."""
    raw = encode_items(items)
    return encode_varint(len(raw)) + raw


@dataclass(slots=True)
class MsgProps:
    """What an MQTT 5 publish (or will) adds to its message, as forwarded:
    `forwarded` the encoded properties passed through unchanged, `expires_at`
    (loop time) from its Message Expiry Interval (None: never), `origin` the
    publishing session (for No Local)."""

    forwarded: bytes
    expires_at: float | None
    origin: Any
    payload_utf8: bool = False
    response_topic: str | None = None      # for interceptors answering a request (plugins/im.py)
    correlation_data: bytes | None = None


def message_props(props: Props, now: float, origin: Any) -> MsgProps | None:
    """MsgProps of a publish or will; None when it carries nothing to forward."""
    if not props or (len(props) == 1 and TOPIC_ALIAS in props):
        # the usual publish (none, or a Topic Alias alone): nothing to look up or encode
        return None if origin is None else MsgProps(b"", None, origin)
    items: list[tuple[int, Any]] = []
    for pid in _FORWARDED:
        value = props.get(pid)
        if value is None:
            continue
        if pid == USER_PROPERTY:
            items.extend((pid, pair) for pair in value)
        else:
            items.append((pid, value))
    expiry = props.get(MESSAGE_EXPIRY)
    if not items and expiry is None and origin is None:
        return None
    return MsgProps(encode_items(items), None if expiry is None else now + expiry, origin,
                    props.get(PAYLOAD_FORMAT) == 1, props.get(RESPONSE_TOPIC), props.get(CORRELATION_DATA))


def stored_props(props: MsgProps | None, loop_now: float) -> tuple[bytes | None, float | None]:
    """A message's MQTT 5 properties as stored: the forwarded ones (encoded) and
    the end of its Message Expiry Interval turned from loop time into epoch s,
    so the time left keeps counting while the broker is down."""
    if props is None:
        return None, None
    expires_at = None if props.expires_at is None else time.time() + (props.expires_at - loop_now)
    return props.forwarded, expires_at
