"""What nodes tell each other over NATS: subjects and their encodings.

Subjects (every node subscribes to the broadcast ones and to its own):

    roost.hb              heartbeat        {"node", "inc", "seq"}           (broadcast)
    roost.state           state change     {"node", "inc", "seq", "op", ...} (broadcast)
    roost.sync.<node>     ask <node> for its whole state: {"node": asker}
    roost.snap.<node>     a state snapshot for <node>, in parts: {"node", "inc", "seq", "part", "last", ...}
    roost.pub.<node>      a publish routed to <node> (binary: see encode_publish)
                          inside reliable.py's numbered frame (per-destination seq)
    roost.ack.<node>      reliable.py's cumulative acks and resend requests for <node>'s streams
    roost.retained        a retained message committed on a node  (broadcast)
                          {"node", "topic", "qos", "at", "owner", "payload"; MQTT 5: "props", "left"}
    roost.event           a shared domain event (broadcast, bus.py)
    roost.bye             a node leaving cleanly {"node", "inc"}
    roost.release         a persistent session's client connects on "node": whoever holds "key" hands it over
    roost.released.<node> the answers, each node's: {"id", "node", "held", session parts (session_parts)}
    roost.adopted         "node" took over "key" from "from": "from" forgets its rows of it;
                          with "all": true and "inc", "node" finished taking over every session
                          of dead node "from" (incarnation "inc"): clients waiting for it ask again

`inc` (incarnation) is random per process start: a node restarted under the same
name is a new incarnation, and the old one is dead. `seq` counts the state
changes of one incarnation; a receiver that sees a gap asks for a snapshot.

State ops: "sub"/"unsub" (a filter gained by the first / lost by the last
session on that node), "share" (`f` a `$share/<group>/<filter>`, `n` its
members on that node now; 0: none), "will"/"unwill" (a connected client's will, by session
key and connection: Will.to_doc, with its MQTT 5 properties and delay), "up"/"down" (a
counted connection of a principal, for presence).
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any

from broker.store.base import SavedMessage, SavedSession

PREFIX = "roost"
HEARTBEAT = f"{PREFIX}.hb"
STATE = f"{PREFIX}.state"
RETAINED = f"{PREFIX}.retained"
EVENT = f"{PREFIX}.event"
BYE = f"{PREFIX}.bye"
RELEASE = f"{PREFIX}.release"
ADOPTED = f"{PREFIX}.adopted"


def sync_subject(node: str) -> str:
    return f"{PREFIX}.sync.{node}"


def snap_subject(node: str) -> str:
    return f"{PREFIX}.snap.{node}"


def pub_subject(node: str) -> str:
    return f"{PREFIX}.pub.{node}"


def released_subject(node: str) -> str:
    return f"{PREFIX}.released.{node}"


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


# ---- a routed publish ------------------------------------------------------------------
#
#   flags (1 byte: QoS in bits 0-1, then the RETAIN, PROPS, EXPIRY and GROUPS bits),
#   topic length (2 bytes), topic,
#   [PROPS:  length (4 bytes), the MQTT 5 properties forwarded unchanged (properties.MsgProps.forwarded)]
#   [EXPIRY: seconds left of the Message Expiry Interval (8-byte float)]
#   [GROUPS: count (2 bytes), then each: length (2 bytes), `$share/<group>/<filter>`]
#   payload (the rest)
#
# A 3.1.1 publish sets none of the bits: the frame is the flags byte, the topic and
# the payload, as before MQTT 5. RETAIN is the publisher's retain flag (for Retain
# As Published; the retained message itself travels on roost.retained). GROUPS: the
# shared subscription groups the receiving node serves this message to (the
# publishing node picked it for them, peers.ShareGroups); it serves no other group.

_HEAD = struct.Struct("!BH")
_LEN = struct.Struct("!I")
_EXPIRY = struct.Struct("!d")
_COUNT = struct.Struct("!H")
PUB_RETAIN = 0x04
PUB_PROPS = 0x08
PUB_EXPIRY = 0x10
PUB_GROUPS = 0x20
_PUB_KNOWN = 0x03 | PUB_RETAIN | PUB_PROPS | PUB_EXPIRY | PUB_GROUPS


# A publish from another node, as decode_publish reads it: (topic, payload, qos,
# the publisher's retain flag, the MQTT 5 properties passed on unchanged (encoded)
# or None, the seconds left of its Message Expiry Interval or None, the shared
# subscription groups served here). A plain tuple: the cheapest to build per publish.
RoutedPublish = tuple[str, bytes, int, bool, bytes | None, float | None, tuple[str, ...]]


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool = False, forwarded: bytes | None = None,
                   expires_in: float | None = None, groups: tuple[str, ...] | list[str] = ()) -> bytes:
    t = topic.encode()
    if not (retain or forwarded or expires_in is not None or groups):
        return _HEAD.pack(qos, len(t)) + t + payload
    flags = qos | (PUB_RETAIN if retain else 0)
    parts = [b"", t]
    if forwarded:
        flags |= PUB_PROPS
        parts += (_LEN.pack(len(forwarded)), forwarded)
    if expires_in is not None:
        flags |= PUB_EXPIRY
        parts.append(_EXPIRY.pack(expires_in))
    if groups:
        flags |= PUB_GROUPS
        parts.append(_COUNT.pack(len(groups)))
        for key in groups:
            k = key.encode()
            parts += (_COUNT.pack(len(k)), k)
    parts[0] = _HEAD.pack(flags, len(t))
    parts.append(payload)
    return b"".join(parts)


def decode_publish(data: bytes) -> RoutedPublish:
    try:
        flags, n = _HEAD.unpack_from(data)
    except struct.error:
        raise ValueError("malformed publish frame: too short") from None
    pos = 3 + n                 # _HEAD.size + the topic
    if pos > len(data):
        raise ValueError("malformed publish frame: truncated topic")
    topic = data[3:pos].decode()
    if flags <= 2:        # a QoS and nothing else (every 3.1.1 publish)
        return topic, bytes(data[pos:]), flags, False, None, None, ()
    qos = flags & 0x03
    if qos > 2 or flags & ~_PUB_KNOWN:
        raise ValueError("malformed publish frame: unknown flags")
    try:
        forwarded = None
        if flags & PUB_PROPS:
            (size,) = _LEN.unpack_from(data, pos)
            pos += _LEN.size
            forwarded = bytes(data[pos:pos + size])
            pos += size
        expires_in = None
        if flags & PUB_EXPIRY:
            (expires_in,) = _EXPIRY.unpack_from(data, pos)
            pos += _EXPIRY.size
        groups: list[str] = []
        if flags & PUB_GROUPS:
            (count,) = _COUNT.unpack_from(data, pos)
            pos += _COUNT.size
            for _ in range(count):
                (size,) = _COUNT.unpack_from(data, pos)
                pos += _COUNT.size
                groups.append(data[pos:pos + size].decode())
                pos += size
    except struct.error:
        raise ValueError("malformed publish frame: truncated") from None
    if pos > len(data):
        raise ValueError("malformed publish frame: truncated")
    return topic, bytes(data[pos:]), qos, bool(flags & PUB_RETAIN), forwarded, expires_in, tuple(groups)


@dataclass(frozen=True, slots=True)
class Will:
    """A connected client's will, kept by every node so a survivor can publish it.
    MQTT 5: `props` its forwarded properties (properties.MsgProps.forwarded: User
    Properties, Content Type, Response Topic, Correlation Data, Payload Format
    Indicator), `expiry` its Message Expiry Interval (s, runs from its publication),
    `delay` how long after the connection is lost it is published (the Will Delay
    Interval, or the Session Expiry Interval when shorter; 0: at once). In the
    document only when set ("props", "exp", "delay"): a 3.1.1 will is as before."""
    key: str                 # session key and connection ("<session key>#<connection>")
    principal: str | None
    client_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes | None = None
    expiry: float | None = None
    delay: float = 0.0

    @property
    def session_key(self) -> str:
        return self.key.rpartition("#")[0] or self.key

    def size(self) -> int:
        return len(self.key) + len(self.topic) + len(self.payload) + len(self.props or b"") + 96

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": self.key, "principal": self.principal, "client_id": self.client_id,
                               "topic": self.topic, "payload": b64(self.payload), "qos": self.qos,
                               "retain": self.retain}
        if self.props:
            doc["props"] = b64(self.props)
        if self.expiry is not None:
            doc["exp"] = self.expiry
        if self.delay:
            doc["delay"] = self.delay
        return doc

    @staticmethod
    def from_doc(doc: dict[str, Any]) -> Will:
        props, expiry = doc.get("props"), doc.get("exp")
        return Will(str(doc["key"]), doc.get("principal"), str(doc["client_id"]), str(doc["topic"]),
                    unb64(doc["payload"]), int(doc["qos"]), bool(doc["retain"]),
                    unb64(props) if props else None, None if expiry is None else float(expiry),
                    max(0.0, float(doc.get("delay", 0.0))))


# ---- a persistent session handed to another node, in parts ----------------------------

SESSION_PART_BYTES = 256 * 1024


def session_parts(saved: SavedSession) -> list[dict[str, Any]]:
    """`saved` as documents of at most ~SESSION_PART_BYTES each (messages split),
    its MQTT 5 state included: Session Expiry Interval, subscription options and
    identifiers, each message's forwarded properties and expiry (epoch s, so the
    time left keeps counting)."""
    head = {"client_id": saved.client_id, "principal": saved.principal, "kind": saved.kind,
            "subscriptions": saved.subscriptions, "incoming_qos2": saved.incoming_qos2,
            "last_pid": saved.last_pid, "disconnected_at": saved.disconnected_at,
            "expiry": saved.expiry, "sub_opts": {f: list(o) for f, o in saved.subscription_options.items()}}
    parts: list[dict[str, Any]] = [{"head": head, "messages": []}]
    size = 0
    for m in saved.messages:
        if size > SESSION_PART_BYTES:
            parts.append({"messages": []})
            size = 0
        props = None if m.properties is None else b64(m.properties)
        parts[-1]["messages"].append([m.seq, m.topic, b64(m.payload), m.qos, m.retain, m.pid, m.stage,
                                      props, m.expires_at])
        size += len(m.topic) + (len(m.payload) + len(m.properties or b"")) * 4 // 3 + 60
    return parts


def _saved_message(row: list[Any]) -> SavedMessage:
    seq, topic, payload, qos, retain, pid, stage, props, expires_at = row
    return SavedMessage(int(seq), str(topic), unb64(payload), int(qos), bool(retain),
                        None if pid is None else int(pid), int(stage),
                        None if props is None else unb64(props), None if expires_at is None else float(expires_at))


def session_from_parts(parts: list[dict[str, Any]]) -> SavedSession:
    head = parts[0]["head"]
    messages = [_saved_message(row) for part in parts for row in part["messages"]]
    expiry = head["expiry"]
    return SavedSession(str(head["client_id"]), head["principal"], head["kind"],
                        {str(f): int(q) for f, q in head["subscriptions"].items()}, messages,
                        [int(p) for p in head["incoming_qos2"]], int(head["last_pid"]),
                        float(head["disconnected_at"]), None if expiry is None else float(expiry),
                        {str(f): (int(o), int(sid)) for f, (o, sid) in head["sub_opts"].items()})
