"""Per-client state: what plugins see (`ClientInfo`), one routed message
(`Message`, encoded once and shared by every subscriber), and the MQTT session
(`SessionState`: subscriptions, outgoing queue, inflight window) that outlives a
connection when clean_session=0.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, overload

from broker.mqtt import codec, codec5
from broker.mqtt.lazy import NO_DICT, NO_QUEUE, NO_SET, LazySet
from broker.mqtt.properties import MsgProps, stored_props
from broker.mqtt.topics import matches
from broker.store.base import MessageDone, MessageKept, SavedMessage
from contract.ids import principal_of_client_id

if TYPE_CHECKING:
    import asyncio

    from broker.mqtt.connection import Connection
    from broker.mqtt.figures import TrafficCounters

log = logging.getLogger("roost.mqtt")


class SessionHost(Protocol):
    """What a session uses of the engine: its limits and clock, the traffic
    counters, the byte budgets (budgets.py) and the release of publishers held
    for it (routing.py)."""

    limits: Any
    loop: asyncio.AbstractEventLoop
    counters: TrafficCounters
    queue_marks: tuple[int, int, int, int]   # Budgets.queue_marks


    def charge(self, st: SessionState, n: int) -> bool: ...
    def uncharge(self, st: SessionState, n: int) -> None: ...
    def count_drop(self, st: SessionState, why: str) -> None: ...
    def release(self, st: SessionState) -> None: ...


class WillMessage:
    """A client's will as its CONNECT gave it (ClientInfo.will_*)."""

    __slots__ = ("delay", "flag", "message", "props", "qos", "retain", "topic")

    def __init__(self) -> None:
        self.flag = False
        self.topic: str | None = None
        self.message: bytes | None = None
        self.qos = 0
        self.retain = False
        self.props: MsgProps | None = None
        self.delay = 0.0


# The will of every client that has none: read, never written (ClientInfo._set_will)
NO_WILL = WillMessage()

T = TypeVar("T")


class _WillField(Generic[T]):
    """`ClientInfo.will_<name>`: that field of the client's WillMessage. The first
    value other than the default gives the client a will of its own."""

    __slots__ = ("_name",)

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name.removeprefix("will_")

    @overload
    def __get__(self, info: None, owner: type) -> _WillField[T]: ...

    @overload
    def __get__(self, info: ClientInfo, owner: type) -> T: ...

    def __get__(self, info: ClientInfo | None, owner: type) -> T | _WillField[T]:
        if info is None:
            return self
        value: T = getattr(info._will, self._name)
        return value

    def __set__(self, info: ClientInfo, value: T) -> None:
        info._set_will(self._name, value)


class ClientInfo:
    """One connection's identity, passed to plugins as `session` (see hooks.ClientSession).

    Attribute names follow amqtt's `Session`, so amqtt's own auth/topic plugins
    (which read username, password, client_id, is_anonymous) keep working.
    Slotted (one per connection, 20,000 idle ones on a home server): a plugin keeps
    its own data in `attributes`, not in new attributes of its own.
    """

    __slots__ = ("_attributes", "_will", "clean_session", "client_id", "client_id_generated", "connected_at",
                 "expires_at", "is_anonymous", "keep_alive", "kind", "last_activity", "listener_name", "password",
                 "principal", "protocol_level", "publish_properties", "publish_refused", "remote_address",
                 "remote_port", "session_key", "username")

    def __init__(self, *, client_id: str, username: str | None, password: str | None,
                 remote_address: str, remote_port: int, clean_session: bool, keep_alive: int,
                 listener_name: str, client_id_generated: bool = False) -> None:
        self.client_id = client_id
        self.username = username
        self.password = password
        self.remote_address = remote_address
        self.remote_port = remote_port
        self.clean_session = clean_session
        self.keep_alive = keep_alive
        self.listener_name = listener_name
        # True when the client sent an empty client id and the broker made one up
        self.client_id_generated = client_id_generated
        # The key of the MQTT session: client_id, or "<principal>|<client_id>" for a
        # client id that is not of the principal's own form (see session_key).
        self.session_key = client_id
        self.is_anonymous = False
        self.principal: str | None = None
        self.kind: str | None = None
        self.connected_at = time.time()
        # The will (will_flag, will_topic... below): the shared NO_WILL until one is set,
        # seven slots (56 bytes) less for every client that has none
        self._will = NO_WILL
        self.protocol_level = 4                  # 3: MQTT 3.1, 4: 3.1.1, 5: MQTT 5
        # While an interceptor (hooks.py) is called for an MQTT 5 publish: its
        # properties.MsgProps (response_topic, correlation_data); None otherwise
        self.publish_properties: MsgProps | None = None
        # Set by an interceptor during that call: the MQTT 5 reason code of the PUBACK/PUBREC
        # for a publish it consumed but refused (0: a plain ack); the engine reads and clears it
        self.publish_refused = 0
        self._attributes: dict[str, Any] | None = None   # see `attributes`
        self.last_activity: float | None = None  # set when the connection ends: last packet received
        # epoch seconds when the login ends (a JWT's exp): the engine closes the connection then
        self.expires_at: float | None = None

    # The will, as plugins and the engine see it (hooks.ClientSession): one WillMessage field each
    will_flag: _WillField[bool] = _WillField()
    will_topic: _WillField[str | None] = _WillField()
    will_message: _WillField[bytes | None] = _WillField()
    will_qos: _WillField[int] = _WillField()
    will_retain: _WillField[bool] = _WillField()
    will_props: _WillField[MsgProps | None] = _WillField()   # MQTT 5 will properties (forwarded with the will)
    will_delay: _WillField[float] = _WillField()             # MQTT 5 Will Delay Interval, seconds

    def _set_will(self, name: str, value: Any) -> None:
        will = self._will
        if will is NO_WILL:
            if value == getattr(NO_WILL, name):
                return   # the default again (will_flag = False on a clean DISCONNECT): nothing to own
            will = self._will = WillMessage()
        setattr(will, name, value)

    @property
    def attributes(self) -> dict[str, Any]:
        """Plugin-owned data, like amqtt's Session.attributes (a dict made at first use)."""
        attrs = self._attributes
        if attrs is None:
            attrs = self._attributes = {}
        return attrs

    def __repr__(self) -> str:
        return f"<ClientInfo {self.client_id} principal={self.principal} {self.remote_address}:{self.remote_port}>"


def loggable(client_id: str, limit: int = 64) -> str:
    """A client id as it may appear in a log line: ids of printable ASCII as they
    are, anything else quoted (a newline in an id must not forge a log line) and
    long ones cut (a 65 KB id must not flood the log)."""
    if len(client_id) <= limit and client_id.isprintable() and client_id.isascii() and " " not in client_id:
        return client_id
    text = repr(client_id)
    return text if len(text) <= limit + 2 else f"{text[:limit]}...({len(client_id)} chars)"


def session_key(principal: str | None, client_id: str) -> str:
    """Sessions are keyed by principal and client id, so that integrations on
    their default (random) client ids, e.g. two people's Home Assistant both
    using "homeassistant", never collide with or take over each other's session.
    A client id of the principal's own form (`alice`, `alice.phone`: what IM
    clients use, and what plugins deliver to) is its own key; any other is
    prefixed with its principal and "|", which no principal id or label contains."""
    if principal is None:
        return client_id if "|" not in client_id else f"|{client_id}"
    if principal_of_client_id(client_id) == principal:
        return client_id
    return f"{principal}|{client_id}"


def client_id_of_key(key: str) -> str:
    return key.split("|", 1)[1] if "|" in key else key


class Message:
    """An application message as routed; its PUBLISH encodings are built once and
    shared by every subscriber."""

    __slots__ = ("topic", "payload", "qos", "retain", "_tb", "_p0", "_rlq", "props", "pub_retain", "group", "remote")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool = False, props: MsgProps | None = None,
                 topic_header: bytes | None = None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props = props          # MQTT 5 properties (None: a 3.1.1 publish, or none given)
        self.pub_retain = False     # the publisher's retain flag (Retain As Published)
        self.group: Any = None      # the shared subscription group it was given to (routing.ShareGroup)
        # Set by the cluster when routing sent it to other nodes (QoS 1/2): done once
        # they all have it; its publisher's PUBACK/PUBREC waits for it (publish.py)
        self.remote: Awaitable[None] | None = None
        if topic_header is None:    # the topic as PUBLISH carries it (given by copy_for)
            t = topic.encode("utf-8")
            topic_header = len(t).to_bytes(2, "big") + t
        self._tb = topic_header
        self._p0: bytes | None = None
        self._rlq: bytes | None = None

    def copy_for(self, group: Any) -> Message:
        """This message as given to one member of a shared subscription group."""
        msg = Message(self.topic, self.payload, self.qos, self.retain, self.props, self._tb)
        msg.pub_retain = self.pub_retain
        msg.group = group
        return msg

    def packet0(self) -> bytes:
        """The QoS 0 PUBLISH (same bytes for every subscriber)."""
        p = self._p0
        if p is None:
            rl = len(self._tb) + len(self.payload)
            p = self._p0 = b"".join((codec.ONE_BYTE[0x30 | (1 if self.retain else 0)], codec.encode_varint(rl),
                                     self._tb, self.payload))
        return p

    def packet(self, qos: int, pid: int, dup: bool = False) -> bytes:
        rlq = self._rlq
        if rlq is None:
            rlq = self._rlq = codec.encode_varint(len(self._tb) + 2 + len(self.payload))
        first = 0x30 | (qos << 1) | (1 if self.retain else 0) | (0x08 if dup else 0)
        return b"".join((codec.ONE_BYTE[first], rlq, self._tb, pid.to_bytes(2, "big"), self.payload))


class SessionState:
    """The MQTT session of one client id.

    `queue` holds messages not yet sent (client offline, inflight window full, or
    transport paused) as (message, qos, seq); `inflight` the QoS 1/2 messages sent
    and not yet acknowledged, in send order: pid -> [message, qos, stage, seq]
    (stage 0: PUBLISH sent, 1: PUBREL sent). `seq` > 0 marks a message written to
    the session journal (persistent sessions, see journal.py); 0: memory only.
    """

    __slots__ = ("client_id", "clean", "subs", "conn", "info", "queue", "inflight", "_pid",
                 "incoming_qos2", "disconnected_at", "dropped", "acl_cache", "waiters", "host",
                 "discarded", "max_inflight", "max_queued", "marks", "blocked", "progress_at",
                 "stalled", "journal", "_seq", "unjournaled", "bytes",
                 "sub_opts", "expiry", "will_timer", "grants", "__weakref__")

    def __init__(self, client_id: str, clean: bool, info: ClientInfo, host: SessionHost) -> None:
        self.client_id = client_id
        self.clean = clean
        self.info = info
        self.host = host
        self.subs: dict[str, int] = NO_DICT      # filter -> QoS; own_subs() to add (idle sessions share NO_DICT)
        self.conn: Connection | None = None
        # An idle session's empty deque and set were ~1 KB of its ~4.5 (lazy.py): the
        # queue is the shared NO_QUEUE until the first message is queued (own_queue()).
        self.queue: deque[tuple[Message, int, int]] = NO_QUEUE
        self.inflight: dict[int, list[Any]] = NO_DICT     # until the first send: own_inflight()
        self._pid = 0
        self.incoming_qos2: LazySet[int] = NO_SET   # own_incoming_qos2() to add (idle sessions share NO_SET)
        self.disconnected_at = 0.0
        self.dropped = 0
        self.acl_cache: dict[str, int] = NO_DICT   # topic -> ACL decisions known (acl.py; own_acl_cache())
        self.waiters: list[Any] | None = None    # deliver() calls waiting for room (routing.py); made at first
        self.discarded = False
        self.max_inflight = host.limits.max_inflight
        self.max_queued = host.limits.max_queued
        # Backpressure: at `high` queued messages the publishers feeding this
        # session are paused (`blocked`) until the queue is down to `low`; the same
        # in payload bytes held (queue + in flight), against limits.max_queued_bytes.
        # The same for every session: the host's tuple (high, low, high_bytes, low_bytes),
        # one slot, not four (nor ~100 bytes of int copies) each.
        self.marks = host.queue_marks
        self.bytes = 0
        self.blocked: set[Connection] | None = None
        self.progress_at = 0.0
        self.stalled = False     # congested without progress: publishers are no longer held for it
        # The engine's SessionJournal for a persistent session (None: memory only),
        # the last journal seq used, and topic prefixes never journaled.
        self.journal: Any = None
        self._seq = 0
        self.unjournaled: tuple[str, ...] = ()
        # MQTT 5: filter -> (subscription options byte, subscription identifier or 0),
        # the Session Expiry Interval (None: limits.session_expiry), a pending delayed will
        self.sub_opts: dict[str, tuple[int, int]] = NO_DICT   # own_sub_opts() to add
        self.expiry: float | None = None
        self.will_timer: Any = None
        # topic -> the QoS its filters grant (-1: none, or not a valid topic name), for
        # the broker's own deliveries to this one session (routing.deliver_nowait: an
        # inbox pusher's stream, request responses); reset when the subscriptions change
        self.grants: dict[str, tuple[int, bytes]] = NO_DICT   # topic -> (granted QoS, encoded topic)

    def own_inflight(self) -> dict[int, list[Any]]:
        """This session's own in-flight dict (NO_DICT until the first message sent)."""
        if self.inflight is NO_DICT:
            self.inflight = {}
        return self.inflight

    def own_subs(self) -> dict[str, int]:
        """This session's own subscriptions dict (NO_DICT until the first)."""
        if self.subs is NO_DICT:
            self.subs = {}
        return self.subs

    def own_grants(self) -> dict[str, tuple[int, bytes]]:
        """This session's own grants cache (NO_DICT until the first direct delivery)."""
        if self.grants is NO_DICT:
            self.grants = {}
        return self.grants

    def own_acl_cache(self) -> dict[str, int]:
        """This session's own ACL decision cache (NO_DICT until the first decision)."""
        if self.acl_cache is NO_DICT:
            self.acl_cache = {}
        return self.acl_cache

    def own_sub_opts(self) -> dict[str, tuple[int, int]]:
        """This session's own MQTT 5 subscription options (NO_DICT until the first)."""
        if self.sub_opts is NO_DICT:
            self.sub_opts = {}
        return self.sub_opts

    def own_incoming_qos2(self) -> LazySet[int]:
        """This session's own QoS 2 packet ids (NO_SET until the first)."""
        if self.incoming_qos2 is NO_SET:
            self.incoming_qos2 = LazySet()
        return self.incoming_qos2

    def own_queue(self) -> deque[tuple[Message, int, int]]:
        """This session's own queue, made at the first message queued (NO_QUEUE
        refuses additions)."""
        queue = self.queue
        if queue is NO_QUEUE:
            queue = self.queue = deque()
        return queue

    def __repr__(self) -> str:
        return f"<SessionState {self.client_id} subs={len(self.subs)} queued={len(self.queue)} inflight={len(self.inflight)}>"

    def _next_pid(self) -> int:
        pid = self._pid
        inflight = self.inflight
        while True:
            pid = pid + 1 if pid < 65535 else 1
            if pid not in inflight:
                self._pid = pid
                return pid

    def _keep(self, msg: Message, qos: int, pid: int | None = None) -> int:
        """Journal a QoS 1/2 message owed to a persistent session; its seq (0: not journaled).
        A QoS 2 message is journaled with its packet id once it has one (see _sent)."""
        journal = self.journal
        if journal is None or not qos or (self.unjournaled and msg.topic.startswith(self.unjournaled)):
            return 0
        self._seq += 1
        journal.append(MessageKept(self.client_id, SavedMessage(self._seq, msg.topic, msg.payload, qos,
                                                                self.retain_as_kept(msg), pid if qos == 2 else None,
                                                                0, *self._stored_props(msg))))
        return self._seq

    def retain_as_kept(self, msg: Message) -> bool:
        """The RETAIN flag `msg` is saved with for this session: the publisher's
        flag (pub_retain) is not saved, so Retain As Published (an MQTT 5
        subscription option) is applied here, as _wire would send it."""
        if msg.retain or not msg.pub_retain or not self.sub_opts:
            return msg.retain
        group = msg.group
        for f, (o, _) in self.sub_opts.items():
            if o & 0x08 and (f == group.key if group is not None
                             else not f.startswith("$share/") and matches(msg.topic, f)):
                return True
        return False

    def _stored_props(self, msg: Message) -> tuple[bytes | None, float | None]:
        """An MQTT 5 message's properties and expiry as journaled, so they survive a crash too."""
        return (None, None) if msg.props is None else stored_props(msg.props, self.host.loop.time())

    def _sent(self, msg: Message, pid: int, seq: int) -> None:
        """A journaled QoS 2 message went out under `pid`: journal the id, so after
        a crash it is re-sent under it (with DUP), never delivered a second time
        as a new message, and the id is not reused while the client holds it."""
        if self.journal is not None:
            self.journal.append(MessageKept(self.client_id, SavedMessage(seq, msg.topic, msg.payload, 2,
                                                                         self.retain_as_kept(msg), pid, 0,
                                                                         *self._stored_props(msg))))

    def _done(self, seq: int) -> None:
        if seq and self.journal is not None:
            self.journal.append(MessageDone(self.client_id, seq))

    def enqueue(self, msg: Message, qos: int) -> bool:
        """Send now if the window allows, else queue (bounded in messages and
        bytes). False if dropped (counted and logged by the budgets)."""
        conn = self.conn
        if conn is not None and not self.queue and conn.writable:
            if qos == 0:
                conn.write(msg.packet0())
                self.host.counters.sent_qos[0] += 1
                return True
            if len(self.inflight) < self.max_inflight:
                if not self.host.charge(self, len(msg.payload)):
                    return False
                pid = self._next_pid()
                if self.inflight is NO_DICT:
                    self.inflight = {}
                self.inflight[pid] = [msg, qos, 0, self._keep(msg, qos, pid) if self.journal is not None else 0]
                conn.write(msg.packet(qos, pid))
                self.host.counters.sent_qos[qos] += 1
                return True
        elif conn is None and (qos == 0 or self.clean or self.discarded):
            # QoS 0 is not queued for offline clients (MQTT-3.1.2-5 makes it optional)
            return False
        if len(self.queue) >= self.max_queued:
            self.host.count_drop(self, f"{len(self.queue)} messages queued (limits.max_queued)")
            return False
        if not self.host.charge(self, len(msg.payload)):
            return False
        self.own_queue().append((msg, qos, self._keep(msg, qos) if self.journal is not None else 0))
        return True

    def full(self) -> bool:
        """No room for another message (deliver() waits while this holds)."""
        return len(self.queue) >= self.max_queued or self.bytes >= self.host.limits.max_queued_bytes

    def congested(self) -> bool:
        high, _low, high_bytes, _low_bytes = self.marks
        return len(self.queue) >= high or self.bytes >= high_bytes

    def _check_release(self) -> None:
        if len(self.queue) <= self.marks[1] and self.bytes <= self.marks[3]:
            self.stalled = False
            if self.blocked is not None:
                self.host.release(self)

    def pump(self) -> None:
        """Move queued messages to the wire while the window and transport allow."""
        conn = self.conn
        queue = self.queue
        if conn is None:
            return
        before = len(queue)
        while queue and conn.writable:
            msg, qos, seq = queue[0]
            props = msg.props
            if props is not None and props.expires_at is not None and props.expires_at <= self.host.loop.time():
                queue.popleft()      # an MQTT 5 publisher's Message Expiry Interval passed while queued
                self.host.uncharge(self, len(msg.payload))
                self._done(seq)
                continue
            if qos:
                if len(self.inflight) >= self.max_inflight:
                    break
                queue.popleft()
                pid = self._next_pid()
                if self.inflight is NO_DICT:
                    self.inflight = {}
                self.inflight[pid] = [msg, qos, 0, seq]
                if seq and qos == 2:
                    self._sent(msg, pid, seq)
                conn.write(msg.packet(qos, pid))
                self.host.counters.sent_qos[qos] += 1
            else:
                queue.popleft()
                self.host.uncharge(self, len(msg.payload))
                conn.write(msg.packet0())
                self.host.counters.sent_qos[0] += 1
        if self.waiters and not self.full():
            self.wake()
        if len(queue) <= self.marks[1] and self.bytes <= self.marks[3]:
            self._check_release()
        elif self.blocked is not None and len(queue) < before:
            self.progress_at = self.host.loop.time()

    def _after_ack(self) -> None:
        """An ack freed bytes with nothing queued behind: let held publishers and
        waiting deliver() calls go on."""
        if self.waiters and not self.full():
            self.wake()
        self._check_release()

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    def resume(self) -> None:
        """After a reconnect: re-send every unacknowledged message in order with
        DUP=1 (PUBREL for QoS 2 already past PUBREC), then the queue."""
        conn = self.conn
        if conn is None:
            return
        for pid, (msg, qos, stage, _seq) in self.inflight.items():
            if stage == 0:
                conn.write(msg.packet(qos, pid, dup=True))
                self.host.counters.sent_qos[qos] += 1
            else:
                conn.write(codec.ack(codec.PUBREL, pid))
        self.pump()

    def on_puback(self, pid: int) -> None:
        if self.release_puback(pid):
            self.after_acks()

    def release_puback(self, pid: int) -> bool:
        """A PUBACK's bookkeeping, without moving the queue: True when it freed a
        QoS 1 message of the window. A connection handling a read's PUBACKs calls
        after_acks() once for them all (one pump, not one per ack)."""
        entry = self.inflight.get(pid)
        if entry is None or entry[1] != 1:
            return False
        del self.inflight[pid]
        self.host.uncharge(self, len(entry[0].payload))
        if entry[3]:
            self._done(entry[3])
        return True

    def after_acks(self) -> None:
        """Room was freed in the window: send what is queued, or let held
        publishers and waiting deliver() calls go on."""
        if self.queue:
            self.pump()
        elif self.blocked is not None or self.waiters:
            self._after_ack()

    def on_pubrec(self, pid: int) -> None:
        entry = self.inflight.get(pid)
        if entry is not None and entry[1] == 2 and entry[2] == 0:
            entry[2] = 1
            self.host.uncharge(self, len(entry[0].payload))
            entry[0] = None  # the payload is no longer needed
            seq = entry[3]
            if seq and self.journal is not None:
                # the client has it: after a crash only the PUBREL is owed, under this id
                self.journal.append(MessageKept(self.client_id, SavedMessage(seq, "", b"", 2, False, pid, 1)))
        if self.conn is not None:
            self.conn.write(codec.ack(codec.PUBREL, pid))

    def on_pubcomp(self, pid: int) -> None:
        entry = self.inflight.get(pid)
        if entry is not None and entry[1] == 2:
            del self.inflight[pid]
            if entry[0] is not None:    # PUBCOMP without PUBREC first: still charged
                self.host.uncharge(self, len(entry[0].payload))
            self._done(entry[3])
            if self.queue:
                self.pump()
            elif self.blocked is not None or self.waiters:
                self._after_ack()


class SessionState5(SessionState):
    """A session while an MQTT 5 client holds it: the same queue and window, but
    each PUBLISH is built for this client (properties, subscription identifiers,
    Retain As Published, topic aliases, its Maximum Packet Size), expired
    messages are dropped instead of sent, and No Local is honoured. A session
    changes class when a client of the other protocol resumes it (same slots),
    so the 3.1.1 path keeps its shared, pre-encoded packets."""

    __slots__ = ()

    def _wire(self, msg: Message, qos: int, pid: int, dup: bool = False, live: bool = True) -> bytes | None:
        """This client's PUBLISH of `msg`; None when it must not be sent (expired
        while queued, or larger than the client's Maximum Packet Size)."""
        conn = self.conn
        assert conn is not None
        props = msg.props
        # The properties, encoded: bytes concatenated, since the usual publish has at
        # most a Topic Alias (a list and a join cost more than the message's own bytes)
        extra = b""
        if props is not None:
            if props.expires_at is not None:
                left = props.expires_at - self.host.loop.time()
                if left <= 0 and live:
                    return None
                extra = b"\x02" + max(1, int(left + 0.999)).to_bytes(4, "big")
            if props.forwarded:
                extra += props.forwarded
        retain = msg.retain
        topic = msg.topic
        if self.sub_opts:
            group = msg.group
            own = props is not None and props.origin is self    # No Local filters do not deliver it
            for f, (o, sid) in self.sub_opts.items():
                if group is not None:
                    if f != group.key:
                        continue
                elif f.startswith("$share/") or (own and o & 0x04) or not matches(topic, f):
                    continue
                if sid:
                    extra += b"\x0b" + codec.encode_varint(sid)
                if o & 0x08 and msg.pub_retain:
                    retain = True
        tb = msg._tb
        new_alias = False
        if conn.alias_out_max:
            alias = conn.alias_out.get(topic)
            if alias is not None:
                tb = b"\x00\x00"
            elif len(conn.alias_out) < conn.alias_out_max:
                alias = conn.alias_out[topic] = len(conn.alias_out) + 1
                new_alias = True
            if alias is not None:
                extra += b"\x23" + alias.to_bytes(2, "big")
        data = codec5.publish(tb, msg.payload, qos, retain, pid, dup, extra)
        if conn.client_max_packet and len(data) > conn.client_max_packet:
            if new_alias:
                del conn.alias_out[topic]
            log.debug("not sending %s a message on %s: larger than its Maximum Packet Size", self.client_id, topic)
            return None
        return data

    def _no_local(self, msg: Message) -> bool:
        """Every filter of ours matching this message of our own has No Local set."""
        topic = msg.topic
        hit = False
        for f, (o, _sid) in self.sub_opts.items():
            if not f.startswith("$share/") and matches(topic, f):
                if not o & 0x04:
                    return False
                hit = True
        return hit

    def enqueue(self, msg: Message, qos: int) -> bool:
        props = msg.props
        if props is not None and props.origin is self and msg.group is None and self._no_local(msg):
            return False
        conn = self.conn
        if conn is not None and not self.queue and conn.writable:
            if qos == 0:
                data = self._wire(msg, 0, 0)
                if data is None:
                    return False
                conn.write(data)
                self.host.counters.sent_qos[0] += 1
                return True
            if len(self.inflight) < self.max_inflight:
                if not self.host.charge(self, len(msg.payload)):
                    return False
                pid = self._next_pid()
                data = self._wire(msg, qos, pid)
                if data is None:
                    self.host.uncharge(self, len(msg.payload))
                    return False
                if self.inflight is NO_DICT:
                    self.inflight = {}
                self.inflight[pid] = [msg, qos, 0, self._keep(msg, qos, pid) if self.journal is not None else 0]
                conn.write(data)
                self.host.counters.sent_qos[qos] += 1
                return True
        elif conn is None and (qos == 0 or self.clean or self.discarded):
            return False
        if len(self.queue) >= self.max_queued:
            self.host.count_drop(self, f"{len(self.queue)} messages queued (limits.max_queued)")
            return False
        if not self.host.charge(self, len(msg.payload)):
            return False
        self.own_queue().append((msg, qos, self._keep(msg, qos) if self.journal is not None else 0))
        return True

    def pump(self) -> None:
        conn = self.conn
        queue = self.queue
        if conn is None:
            return
        before = len(queue)
        while queue and conn.writable:
            msg, qos, seq = queue[0]
            if qos:
                if len(self.inflight) >= self.max_inflight:
                    break
                queue.popleft()
                pid = self._next_pid()
                data = self._wire(msg, qos, pid)
                if data is None:      # expired while queued, or too large for this client
                    self.host.uncharge(self, len(msg.payload))
                    self._done(seq)
                    continue
                if self.inflight is NO_DICT:
                    self.inflight = {}
                self.inflight[pid] = [msg, qos, 0, seq]
                if seq and qos == 2:
                    self._sent(msg, pid, seq)
                conn.write(data)
                self.host.counters.sent_qos[qos] += 1
            else:
                queue.popleft()
                self.host.uncharge(self, len(msg.payload))
                data = self._wire(msg, 0, 0)
                if data is not None:
                    conn.write(data)
                    self.host.counters.sent_qos[0] += 1
        if self.waiters and not self.full():
            self.wake()
        if len(queue) <= self.marks[1] and self.bytes <= self.marks[3]:
            self._check_release()
        elif self.blocked is not None and len(queue) < before:
            self.progress_at = self.host.loop.time()

    def resume(self) -> None:
        conn = self.conn
        if conn is None:
            return
        for pid, entry in list(self.inflight.items()):
            msg, qos, stage, seq = entry
            if stage == 0:
                data = self._wire(msg, qos, pid, dup=True, live=False)
                if data is None:
                    del self.inflight[pid]
                    self.host.uncharge(self, len(msg.payload))
                    self._done(seq)
                    continue
                conn.write(data)
                self.host.counters.sent_qos[qos] += 1
            else:
                conn.write(codec.ack(codec.PUBREL, pid))
        self.pump()

    def on_pubrec_refused(self, pid: int) -> None:
        """PUBREC with a reason code of 0x80 or more: the client will not take it; done."""
        entry = self.inflight.get(pid)
        if entry is not None and entry[1] == 2 and entry[2] == 0:
            entry[2] = 1
            self.on_pubcomp(pid)


def use_protocol(st: SessionState, v5: bool) -> None:
    """Give the session the behaviour of the protocol of the client now holding it."""
    st.__class__ = SessionState5 if v5 else SessionState
