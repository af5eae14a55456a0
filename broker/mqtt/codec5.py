"""MQTT 5 wire format: what differs from MQTT 3.1.1 (codec.py), packet by packet.

The packets decode into the same dataclasses as 3.1.1's, with their reason
code and properties filled in; an MQTT 3.1.1 connection never calls anything
here. Encoders build what the broker sends a v5 client: CONNACK with its
properties, acks with a reason code (a success ack without properties is the
same two bytes as in 3.1.1, codec.ack), SUBACK/UNSUBACK with reason codes,
DISCONNECT with a reason, and PUBLISH with properties (see session.SessionState5).
"""

from __future__ import annotations

from typing import Any

from broker.mqtt import codec
from broker.mqtt import properties as P
from broker.mqtt.codec import MALFORMED, PROTOCOL_ERROR, ProtocolViolation, encode_varint

_ALLOWED = {"connect": P.CONNECT_PROPS, "will": P.WILL_PROPS}

# MQTT 5 reason codes the broker sends
SUCCESS = 0x00
NO_MATCHING_SUBSCRIBERS = 0x10
NO_SUBSCRIPTION_EXISTED = 0x11
UNSPECIFIED = 0x80
IMPLEMENTATION_SPECIFIC = 0x83
UNSUPPORTED_PROTOCOL = 0x84
CLIENT_ID_NOT_VALID = 0x85
BAD_CREDENTIALS = 0x86
NOT_AUTHORIZED = 0x87
SERVER_UNAVAILABLE = 0x88
SERVER_SHUTTING_DOWN = 0x8B
BAD_AUTH_METHOD = 0x8C
KEEP_ALIVE_TIMEOUT = 0x8D
SESSION_TAKEN_OVER = 0x8E
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
PACKET_ID_NOT_FOUND = 0x92
RECEIVE_MAXIMUM_EXCEEDED = 0x93
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
QUOTA_EXCEEDED = 0x97
ADMINISTRATIVE_ACTION = 0x98
PAYLOAD_FORMAT_INVALID = 0x99
SHARED_NOT_SUPPORTED = 0x9E
WITH_WILL = 0x04          # DISCONNECT from a client: publish my will anyway

# MQTT 3.1.1 CONNACK return codes (what auth plugins raise) -> MQTT 5 reason codes
CONNACK_V5 = {1: UNSUPPORTED_PROTOCOL, 2: CLIENT_ID_NOT_VALID, 3: SERVER_UNAVAILABLE,
              4: BAD_CREDENTIALS, 5: NOT_AUTHORIZED}


def _read_props(body: bytes, pos: int, kind: str) -> tuple[P.Props, int]:
    return P.decode(body, pos, _ALLOWED[kind])


def decode_connect(flags: int, body: bytes) -> codec.Connect:
    """A CONNECT of any protocol level Roost speaks (3.1, 3.1.1, 5)."""
    return codec.decode_connect(flags, body, _read_props)


def decode_publish(flags: int, body: bytes) -> tuple[codec.Publish, P.Props | None, int | None]:
    """PUBLISH: the packet (topic may be "" when a Topic Alias stands for it), its
    properties (None when it has none but perhaps a Topic Alias: the usual v5
    publish, read without the general decoder and without a dict) and its Topic
    Alias (None: none given)."""
    topic, qos, pid, end = codec.split_publish(flags, body)
    size = len(body)
    first = body[end] if end < size else -1
    props: P.Props | None
    if first == 0:
        props, alias = None, None
        end += 1
    elif first == 3 and end + 4 <= size and body[end + 1] == P.TOPIC_ALIAS:
        props, alias = None, (body[end + 2] << 8) | body[end + 3]
        end += 4
    else:
        props, end = P.decode(body, end, P.PUBLISH_PROPS)
        if P.SUBSCRIPTION_ID in props:
            raise ProtocolViolation("Subscription Identifier in a client's PUBLISH", PROTOCOL_ERROR)
        alias = props.get(P.TOPIC_ALIAS)
    return codec.Publish(topic, qos, pid, bool(flags & 0x01), bool(flags & 0x08), body[end:]), props, alias


def decode_ack(ptype: int, flags: int, body: bytes) -> codec.Ack:
    if flags != (0x02 if ptype == codec.PUBREL else 0):
        raise ProtocolViolation(f"packet type {ptype} with reserved flags {flags:#x}")
    if len(body) < 2:
        raise ProtocolViolation("bad packet id field")
    pid = (body[0] << 8) | body[1]
    reason = body[2] if len(body) > 2 else 0
    if len(body) > 3:
        P.decode(body, 3, P.ACK_PROPS)
    return codec.Ack(pid, reason)


def decode_subscribe(flags: int, body: bytes) -> codec.Subscribe:
    pid = codec.subscribe_packet_id(flags, body)
    props, pos = P.decode(body, 2, P.SUBSCRIBE_PROPS)
    if len(props.get(P.SUBSCRIPTION_ID, ())) > 1:
        raise ProtocolViolation("more than one Subscription Identifier", PROTOCOL_ERROR)
    out: list[codec.Subscription] = []
    while pos < len(body):
        f, pos = codec._str(body, pos)
        if pos >= len(body):
            raise ProtocolViolation("truncated SUBSCRIBE")
        opts = body[pos]
        pos += 1
        if opts & 0xC0 or (opts & 0x03) == 3 or ((opts >> 4) & 0x03) == 3:
            raise ProtocolViolation("SUBSCRIBE options with reserved bits or values", MALFORMED)
        out.append(codec.Subscription(f, opts & 0x03, opts))
    if not out:
        raise ProtocolViolation("SUBSCRIBE without filters", PROTOCOL_ERROR)
    return codec.Subscribe(pid, tuple(out), props)


def decode_unsubscribe(flags: int, body: bytes) -> codec.Unsubscribe:
    if flags != 0x02:
        raise ProtocolViolation("UNSUBSCRIBE flags must be 0010")
    if len(body) < 2:
        raise ProtocolViolation("truncated UNSUBSCRIBE")
    pid = (body[0] << 8) | body[1]
    if pid == 0:
        raise ProtocolViolation("packet id 0", PROTOCOL_ERROR)
    props, pos = P.decode(body, 2, P.UNSUBSCRIBE_PROPS)
    out: list[str] = []
    while pos < len(body):
        f, pos = codec._str(body, pos)
        out.append(f)
    if not out:
        raise ProtocolViolation("UNSUBSCRIBE without filters", PROTOCOL_ERROR)
    return codec.Unsubscribe(pid, tuple(out), props)


def decode_disconnect(flags: int, body: bytes) -> codec.Disconnect:
    if flags:
        raise ProtocolViolation(f"packet type {codec.DISCONNECT} with reserved flags {flags:#x}")
    if not body:
        return codec.DISCONNECTED
    props = P.decode(body, 1, P.DISCONNECT_PROPS)[0] if len(body) > 1 else {}
    return codec.Disconnect(body[0], props)


# ---- encoders -------------------------------------------------------------------------

def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def connack(session_present: bool, reason: int, props: list[tuple[int, Any]] | None = None) -> bytes:
    return _packet(0x20, bytes((1 if session_present else 0, reason)) + P.encode(props or []))


def ack(ptype: int, pid: int, reason: int) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP with a reason code. No reason string:
    some clients (Paho's test client among them) refuse acks with properties."""
    if not reason:
        return codec.ack(ptype, pid)
    first = (ptype << 4) | (0x02 if ptype == codec.PUBREL else 0)
    return _packet(first, pid.to_bytes(2, "big") + bytes((reason,)))


def suback(pid: int, codes: list[int], reason_string: str | None = None, ptype: int = codec.SUBACK) -> bytes:
    """SUBACK (or UNSUBACK) with one reason code per filter."""
    props = P.encode([(P.REASON_STRING, reason_string)] if reason_string else [])
    return _packet(ptype << 4, pid.to_bytes(2, "big") + props + bytes(codes))


def disconnect(reason: int, reason_string: str | None = None) -> bytes:
    props = [(P.REASON_STRING, reason_string)] if reason_string else []
    return _packet(0xE0, bytes((reason,)) + P.encode(props))


def publish(topic_bytes: bytes, payload: bytes, qos: int, retain: bool, pid: int, dup: bool,
            props: bytes) -> bytes:
    """A PUBLISH: `topic_bytes` length-prefixed already, `props` without its length."""
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    n = len(props)
    plen = codec.ONE_BYTE[n] if n < 0x80 else encode_varint(n)
    rl = len(topic_bytes) + len(plen) + n + len(payload) + (2 if qos else 0)
    # a small message's fixed header is two bytes: made at once, without encode_varint
    head = ((first << 8) | rl).to_bytes(2, "big") if rl < 0x80 else codec.ONE_BYTE[first] + encode_varint(rl)
    if qos:
        return b"".join((head, topic_bytes, pid.to_bytes(2, "big"), plen, props, payload))
    return b"".join((head, topic_bytes, plen, props, payload))


def encode_connect(client_id: str, *, clean: bool = True, keep_alive: int = 60,
                   props: list[tuple[int, Any]] | None = None, username: str | None = None,
                   password: str | None = None) -> bytes:
    """An MQTT 5 CONNECT, for tests that need raw ones."""
    def s(x: str) -> bytes:
        b = x.encode()
        return len(b).to_bytes(2, "big") + b
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = s("MQTT") + bytes((5, flags)) + keep_alive.to_bytes(2, "big") + P.encode(props or []) + s(client_id)
    if username is not None:
        body += s(username)
    if password is not None:
        body += s(password)
    return _packet(0x10, body)
