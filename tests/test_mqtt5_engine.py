"""MQTT 5 (and 3.1) in the engine, over real sockets: paho-mqtt with
protocol=MQTTv5 for what a library does, and a byte-level v5 client for what
must be seen exactly (reason codes, properties, aliases, flow control).
Eclipse Paho's own suite is run by hand (docs/MQTT5.md)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.mqtt import codec, codec5
from broker.mqtt import properties as P
from tests.test_mqtt_helpers import InProcRoost, RawClient

ALL_PROPS = P.PUBLISH_PROPS | P.ACK_PROPS | frozenset((
    P.ASSIGNED_CLIENT_ID, P.SERVER_KEEP_ALIVE, P.RECEIVE_MAXIMUM, P.TOPIC_ALIAS_MAXIMUM, P.MAXIMUM_PACKET_SIZE,
    P.SESSION_EXPIRY, P.REASON_STRING))


@pytest.fixture(scope="module")
def b():
    broker = InProcRoost().start()
    yield broker
    broker.stop()


def eventually(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


class Raw5(RawClient):
    """RawClient speaking MQTT 5."""

    def connect5(self, client_id: str, props: list[tuple[int, Any]] | None = None, *, clean: bool = True,
                 keep_alive: int = 60) -> tuple[int, int, P.Props]:
        """-> (session present, reason code, CONNACK properties)"""
        self.send(codec5.encode_connect(client_id, clean=clean, keep_alive=keep_alive, props=props,
                                        username="u", password="p"))
        ptype, _flags, body = self.read()
        assert ptype == codec.CONNACK
        got, _ = P.decode(body, 2, ALL_PROPS)
        return body[0], body[1], got

    def sub5(self, topic_filter: str, options: int, pid: int = 1, sub_id: int = 0) -> tuple[list[int], P.Props]:
        t = topic_filter.encode()
        props = P.encode([(P.SUBSCRIPTION_ID, sub_id)] if sub_id else [])
        body = pid.to_bytes(2, "big") + props + len(t).to_bytes(2, "big") + t + bytes((options,))
        self.send(b"\x82" + codec.encode_varint(len(body)) + body)
        ptype, _f, body = self.read()
        assert ptype == codec.SUBACK
        got, pos = P.decode(body, 2, ALL_PROPS)
        return list(body[pos:]), got

    def pub5(self, topic: str, payload: bytes, qos: int = 0, pid: int = 0, retain: bool = False,
             props: list[tuple[int, Any]] | None = None) -> None:
        t = topic.encode()
        body = len(t).to_bytes(2, "big") + t + (pid.to_bytes(2, "big") if qos else b"") + P.encode(props or [])
        first = 0x30 | (qos << 1) | (1 if retain else 0)
        self.send(bytes((first,)) + codec.encode_varint(len(body + payload)) + body + payload)

    def ack5(self) -> tuple[int, int, int]:
        """-> (packet type, packet id, reason code) of the next ack"""
        ptype, _f, body = self.read()
        return ptype, int.from_bytes(body[:2], "big"), body[2] if len(body) > 2 else 0

    def publish5(self) -> tuple[str, bytes, int, int, bool, P.Props]:
        """-> (topic, payload, qos, pid, retain, properties) of the next PUBLISH"""
        ptype, flags, body = self.read()
        assert ptype == codec.PUBLISH, ptype
        n = int.from_bytes(body[:2], "big")
        topic = body[2:2 + n].decode()
        qos = (flags >> 1) & 3
        pos = 2 + n
        pid = 0
        if qos:
            pid = int.from_bytes(body[pos:pos + 2], "big")
            pos += 2
        props, pos = P.decode(body, pos, ALL_PROPS)
        return topic, body[pos:], qos, pid, bool(flags & 1), props

    def nothing(self, wait: float = 0.3) -> bool:
        self.s.settimeout(wait)
        try:
            data = self.s.recv(65536)
        except TimeoutError:
            return True
        finally:
            self.s.settimeout(5)
        self.buf += data
        return False


class Paho5:
    """paho-mqtt speaking MQTT 5: messages with their properties, disconnect reasons."""

    def __init__(self, port: int, client_id: str, *, clean_start: bool = True,
                 props: Properties | None = None) -> None:
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                             reconnect_on_failure=False)
        self.c.username_pw_set("u", "p")
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected: queue.Queue[tuple[Any, Any, bool]] = queue.Queue()
        self.disconnects: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.acks: queue.Queue[int] = queue.Queue()
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_connect = lambda c, u, f, rc, p: self.connected.put((rc, p, f.session_present))
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc.value)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.put(rc.value)
        self.c.connect("127.0.0.1", port, clean_start=clean_start, properties=props)
        self.c.loop_start()
        self.rc, self.props, self.session_present = self.connected.get(timeout=5)

    def sub(self, topic_filter: str, qos: int = 1, **options: Any) -> list[int]:
        self.c.subscribe(topic_filter, options=mqtt.SubscribeOptions(qos=qos, **options))
        return self.subacks.get(timeout=5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_connack_properties_and_assigned_client_id(b):
    raw = Raw5(b.port)
    present, reason, props = raw.connect5("", keep_alive=120)
    assert (present, reason) == (0, 0)
    assert props[P.ASSIGNED_CLIENT_ID].startswith("u.auto-")     # <principal>.<label>, Roost's identity rule
    assert props[P.SERVER_KEEP_ALIVE] == 60                      # limits.max_keepalive
    assert props[P.TOPIC_ALIAS_MAXIMUM] == 10
    assert props[P.RECEIVE_MAXIMUM] == 100
    raw.close()


def test_mqtt31_is_accepted(b):
    raw = RawClient(b.port)
    assert raw.connect("old31", name="MQIsdp", level=3) == b"\x00\x00"
    raw.subscribe("old/t", 1)
    raw.send(codec.encode_publish("old/t", b"hi", 1, False, 7))
    got = {raw.read()[0]: None for _ in range(2)}       # our PUBACK and the message, in either order
    assert set(got) == {codec.PUBACK, codec.PUBLISH}
    raw.close()


def test_authentication_method_refused_with_0x8c(b):
    raw = Raw5(b.port)
    assert raw.connect5("am", [(P.AUTH_METHOD, "SCRAM-SHA-1")])[1] == codec5.BAD_AUTH_METHOD
    assert raw.closed()


def test_properties_pass_through_and_request_response(b):
    sub = Paho5(b.port, "pp-sub")
    sub.sub("pp/req")
    pub = Paho5(b.port, "pp-pub")
    pub.sub("pp/resp")
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("a", "1"), ("b", "2")]
    props.ContentType = "text/plain"
    props.PayloadFormatIndicator = 1
    props.ResponseTopic = "pp/resp"
    props.CorrelationData = b"\x01\x02"
    props.MessageExpiryInterval = 60
    pub.c.publish("pp/req", "ping", qos=1, properties=props)
    m = sub.messages.get(timeout=5)
    got = m.properties
    assert got.UserProperty == [("a", "1"), ("b", "2")]
    assert (got.ContentType, got.PayloadFormatIndicator) == ("text/plain", 1)
    assert (got.ResponseTopic, got.CorrelationData) == ("pp/resp", b"\x01\x02")
    assert 0 < got.MessageExpiryInterval <= 60
    reply = Properties(PacketTypes.PUBLISH)
    reply.CorrelationData = got.CorrelationData
    sub.c.publish(got.ResponseTopic, "pong", qos=1, properties=reply)
    r = pub.messages.get(timeout=5)
    assert (r.payload, r.properties.CorrelationData) == (b"pong", b"\x01\x02")
    sub.close()
    pub.close()


def test_negative_acks(b):
    raw = Raw5(b.port)
    raw.connect5("neg")
    raw.pub5("ro/x", b"x", 1, pid=1)                       # the ACL denies publishing to ro/
    assert raw.ack5() == (codec.PUBACK, 1, codec5.NOT_AUTHORIZED)
    raw.pub5("ro/x", b"x", 2, pid=2)
    assert raw.ack5() == (codec.PUBREC, 2, codec5.NOT_AUTHORIZED)
    raw.pub5("neg/t", b"\xff\xfe", 1, pid=3, props=[(P.PAYLOAD_FORMAT, 1)])
    assert raw.ack5() == (codec.PUBACK, 3, codec5.PAYLOAD_FORMAT_INVALID)
    codes, props = raw.sub5("a/secret/#", 1)
    assert codes == [codec5.NOT_AUTHORIZED] and "not authorized" in props[P.REASON_STRING]
    codes, props = raw.sub5("$share/onlygroup", 1, pid=2)
    assert codes == [codec5.TOPIC_FILTER_INVALID] and props[P.REASON_STRING]
    raw.send(b"\xa2\x06\x00\x03\x00\x00\x01x")             # UNSUBSCRIBE of a filter never subscribed
    assert raw.read() == (codec.UNSUBACK, 0, b"\x00\x03\x00" + bytes((codec5.NO_SUBSCRIPTION_EXISTED,)))
    raw.close()


def test_3_1_1_publisher_denied_still_gets_a_plain_ack(b):
    raw = RawClient(b.port)
    raw.connect("neg311")
    raw.send(codec.encode_publish("ro/x", b"x", 1, False, 5))
    assert raw.read() == (codec.PUBACK, 0, b"\x00\x05")
    raw.close()


def test_topic_aliases_both_ways(b):
    rx = Raw5(b.port)
    rx.connect5("alias-rx", [(P.TOPIC_ALIAS_MAXIMUM, 2)])
    rx.sub5("al/#", 0)
    tx = Raw5(b.port)
    tx.connect5("alias-tx")
    tx.pub5("al/one", b"1", props=[(P.TOPIC_ALIAS, 1)])
    tx.pub5("", b"2", props=[(P.TOPIC_ALIAS, 1)])           # the alias stands for al/one
    first, second = rx.publish5(), rx.publish5()
    assert (first[0], first[1], first[5][P.TOPIC_ALIAS]) == ("al/one", b"1", 1)
    assert (second[0], second[1], second[5][P.TOPIC_ALIAS]) == ("", b"2", 1)   # we use the alias we set
    tx.pub5("", b"3", props=[(P.TOPIC_ALIAS, 11)])          # over Topic Alias Maximum (10)
    ptype, _f, body = tx.read()
    assert (ptype, body[0]) == (codec.DISCONNECT, codec5.TOPIC_ALIAS_INVALID)
    assert tx.closed()
    rx.close()


def test_subscription_options_and_identifiers(b):
    c = Raw5(b.port)
    c.connect5("opts")
    assert c.sub5("so/t", 0x04 | 1, sub_id=7)[0] == [1]            # No Local
    assert c.sub5("so/#", 0x08 | 1, pid=2, sub_id=9)[0] == [1]     # Retain As Published
    c.pub5("so/t", b"mine", 1, pid=1, retain=True)
    topic, payload, _q, pid, retain, props = c.publish5()         # via so/# only: so/t is No Local
    assert (topic, payload, retain, props[P.SUBSCRIPTION_ID]) == ("so/t", b"mine", True, [9])
    assert c.ack5() == (codec.PUBACK, 1, 0)
    c.send(codec.ack(codec.PUBACK, pid))
    other = Raw5(b.port)
    other.connect5("opts-other")
    assert other.sub5("so/t", 0x20 | 1)[0] == [1]                  # Retain Handling 2: no retained
    assert other.nothing()
    assert other.sub5("so/t", 0x10 | 1, pid=2)[0] == [1]           # 1: only for a new subscription
    assert other.nothing()
    other.pub5("so/t", b"", 0, retain=True)
    c.close()
    other.close()


def test_receive_maximum_and_maximum_packet_size_of_the_client(b):
    rx = Raw5(b.port)
    rx.connect5("rm-rx", [(P.RECEIVE_MAXIMUM, 1), (P.MAXIMUM_PACKET_SIZE, 64)])
    rx.sub5("rm/t", 1)
    tx = Raw5(b.port)
    tx.connect5("rm-tx")
    tx.pub5("rm/t", b"x" * 100, 1, pid=1)                          # too large for rx: not sent
    tx.pub5("rm/t", b"a", 1, pid=2)
    tx.pub5("rm/t", b"b", 1, pid=3)
    first = rx.publish5()
    assert first[1] == b"a"
    assert rx.nothing()                                            # one in flight at a time
    rx.send(codec.ack(codec.PUBACK, first[3]))
    assert rx.publish5()[1] == b"b"
    rx.close()
    tx.close()


def test_message_expiry_of_queued_and_retained_messages(b):
    rx = Raw5(b.port)
    rx.connect5("exp-rx", [(P.SESSION_EXPIRY, 300)])
    rx.sub5("exp/t", 1)
    rx.send(b"\xe0\x00")
    assert rx.closed()
    old = RawClient(b.port)                     # an MQTT 3.1.1 persistent session: expiry applies too
    old.connect("exp-311", clean=False)
    old.subscribe("exp/t", 1)
    old.close()
    tx = Raw5(b.port)
    tx.connect5("exp-tx")
    tx.pub5("exp/t", b"short", 1, pid=1, props=[(P.MESSAGE_EXPIRY, 1)])
    tx.pub5("exp/t", b"long", 1, pid=2, props=[(P.MESSAGE_EXPIRY, 100)])
    tx.pub5("exp/r", b"ret", 1, pid=3, retain=True, props=[(P.MESSAGE_EXPIRY, 1)])
    for _ in range(3):
        tx.ack5()
    time.sleep(1.3)      # the condition is the passing of time: 1 s Message Expiry Interval
    rx = Raw5(b.port)
    assert rx.connect5("exp-rx", [(P.SESSION_EXPIRY, 300)], clean=False)[0] == 1
    topic, payload, _q, _pid, _r, props = rx.publish5()
    assert (topic, payload) == ("exp/t", b"long") and 95 <= props[P.MESSAGE_EXPIRY] < 100
    assert rx.sub5("exp/r", 1)[0] == [1]
    assert rx.nothing()                                             # the retained one expired
    old = RawClient(b.port)
    assert old.connect("exp-311", clean=False) == b"\x01\x00"
    assert old.read_publish()[:2] == ("exp/t", b"long")
    rx.close()
    tx.close()
    old.close()


def test_session_expiry_and_take_over_reason(b):
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = 0
    a = Paho5(b.port, "se", props=p)
    a.sub("se/t")
    a.close()
    again = Paho5(b.port, "se", clean_start=False, props=p)
    assert not again.session_present
    raw = Raw5(b.port)
    assert raw.connect5("se", [(P.SESSION_EXPIRY, 60)], clean=False)[0] == 0   # expiry 0: it ended
    assert again.disconnects.get(timeout=5) == codec5.SESSION_TAKEN_OVER
    raw.send(b"\xe0\x00")
    raw = Raw5(b.port)
    assert raw.connect5("se", clean=False)[0] == 1                  # 60 s: still there
    raw.close()


def test_will_delay_and_disconnect_with_will(b):
    watcher = Paho5(b.port, "wd-watch")
    watcher.sub("wd/#")
    raw = Raw5(b.port)
    body = (b"\x00\x04MQTT\x05" + bytes((0x02 | 0x04 | 0x80 | 0x40,)) + (60).to_bytes(2, "big")
            + P.encode([(P.SESSION_EXPIRY, 10)]) + b"\x00\x04wd-a"
            + P.encode([(P.WILL_DELAY, 1), (P.USER_PROPERTY, ("k", "v"))]) + b"\x00\x06wd/one\x00\x01w"
            + b"\x00\x01u\x00\x01p")
    raw.send(b"\x10" + codec.encode_varint(len(body)) + body)
    assert raw.read()[0] == codec.CONNACK
    raw.close()                                                    # lost: the will is delayed 1 s
    lost_at = time.monotonic()
    m = watcher.messages.get(timeout=5)
    assert m.topic == "wd/one" and m.properties.UserProperty == [("k", "v")]
    assert time.monotonic() - lost_at >= 0.9
    watcher.close()


def test_shared_subscription_round_robin_and_redelivery(b):
    v5 = Paho5(b.port, "sh-a")
    assert v5.sub("$share/grp/sh/t", 1) == [1]
    v3 = RawClient(b.port)
    v3.connect("sh-b")                                            # an MQTT 3.1.1 member
    assert v3.subscribe("$share/grp/sh/t", 1) == [1]
    pub = Raw5(b.port)
    pub.connect5("sh-pub")
    for i in range(4):
        pub.pub5("sh/t", f"m{i}".encode(), 1, pid=i + 1)
    got_v3 = [v3.read_publish()[1] for _ in range(2)]             # not acknowledged
    got_v5 = [v5.messages.get(timeout=5).payload for _ in range(2)]
    assert sorted(got_v3 + got_v5) == [b"m0", b"m1", b"m2", b"m3"]
    v3.close()                                                    # leaves with 2 unacknowledged
    again = sorted(v5.messages.get(timeout=5).payload for _ in range(2))
    assert again == sorted(got_v3)
    v5.close()
    pub.close()


def test_server_disconnect_on_shutdown_has_a_reason():
    broker = InProcRoost().start()
    c = Paho5(broker.port, "sd")
    threading.Thread(target=broker.stop, daemon=True).start()
    assert c.disconnects.get(timeout=10) == codec5.SERVER_SHUTTING_DOWN
    c.c.loop_stop()


def test_mqtt5_over_websocket():
    broker = InProcRoost(config={"listeners": {"ws": {"type": "ws", "bind": "127.0.0.1:0"}}}).start()
    try:
        got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        subacks: queue.Queue[object] = queue.Queue()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ws5", protocol=mqtt.MQTTv5,
                        transport="websockets")
        c.ws_set_options(path="/mqtt")
        c.username_pw_set("u", "p")
        c.on_message = lambda cl, u, m: got.put(m)
        c.on_subscribe = lambda cl, u, mid, rcs, p: subacks.put(rcs)
        c.connect("127.0.0.1", broker.ports["ws"])
        c.loop_start()
        c.subscribe("ws5/t", qos=1)
        assert [r.value for r in subacks.get(timeout=5)] == [1]
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("over", "ws")]
        c.publish("ws5/t", "hi", qos=1, properties=props)
        m = got.get(timeout=5)
        assert (m.payload, m.properties.UserProperty) == (b"hi", [("over", "ws")])
        c.disconnect()
        c.loop_stop()
    finally:
        broker.stop()


def test_invalid_topic_name_disconnects_with_0x90(b):
    raw = Raw5(b.port)
    raw.connect5("badtopic")
    raw.pub5("bad/+", b"x", 1, pid=1)
    ptype, _f, body = raw.read()
    assert (ptype, body[0]) == (codec.DISCONNECT, codec5.TOPIC_NAME_INVALID)
    assert raw.closed()
