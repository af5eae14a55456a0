"""The scenarios of Eclipse Paho's MQTT 3.1.1 interoperability client tests
(basic, retained, offline queueing, will, overlapping subscriptions, keepalive,
redelivery on reconnect, zero-length client id, subscribe failure, $ topics),
replayed byte by byte against `roost serve` configured as a conformance run
would be: anonymous access on and one deny rule, nothing else.

The client here behaves like the suite's own: no automatic pings, acks sent by
hand, and a "paused" mode that ignores incoming PUBLISH packets."""

from __future__ import annotations

import socket
import time

import pytest

from broker.mqtt import codec
from tests.harness import RoostProcess
from tests.test_mqtt_helpers import split_packet

TOPICS = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
WILD = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")

CONFIG = {
    "auth": {"allow_anonymous": True},
    "acl": [
        {"action": "deny", "access": "subscribe", "topic": "nosubscribe"},
    ],
}


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    proc = RoostProcess(tmp_path_factory.mktemp("interop"), CONFIG).start()
    yield proc
    proc.stop()


class Suite:
    """A client like the interoperability suite's (mqtt.client.Client)."""

    def __init__(self, port: int, client_id: str) -> None:
        self.port, self.client_id = port, client_id
        self.s: socket.socket | None = None
        self.buf = b""
        self.messages: list[tuple[str, bytes, int, bool]] = []
        self.subacks: list[list[int]] = []
        self.paused = False
        self.pid = 0
        self.in_qos2: dict[int, tuple[str, bytes, int, bool]] = {}

    def connect(self, clean: bool = True, keepalive: int = 0, will: tuple | None = None,
                name: str = "MQTT") -> int:
        self.s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        self.buf = b""
        self.s.sendall(codec.encode_connect(self.client_id, clean=clean, keep_alive=keepalive, will=will,
                                            name=name))
        pkt = self._read(2.0)
        if pkt is None:
            raise ConnectionError("closed without CONNACK")
        assert pkt[0] == codec.CONNACK
        return pkt[2][1]

    def _next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def subscribe(self, filters: list[str], qoss: list[int]) -> None:
        body = self._next_pid().to_bytes(2, "big")
        for f, q in zip(filters, qoss):
            body += len(f.encode()).to_bytes(2, "big") + f.encode() + bytes((q,))
        self.s.sendall(b"\x82" + codec.encode_varint(len(body)) + body)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        pid = self._next_pid() if qos else 0
        self.s.sendall(codec.encode_publish(topic, payload, qos, retain, pid))

    def disconnect(self) -> None:
        self.pump(0.2)
        self.s.sendall(b"\xe0\x00")
        time.sleep(0.1)
        self.s.close()

    def terminate(self) -> None:
        self.s.shutdown(socket.SHUT_RDWR)
        self.s.close()

    def pump(self, seconds: float) -> None:
        """Read for a while, answering the protocol like the suite's receiver thread."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            pkt = self._read(left)
            if pkt is None:
                return
            ptype, flags, body = pkt
            if ptype == codec.SUBACK:
                self.subacks.append(list(body[2:]))
            elif ptype == codec.PUBREC:
                self.s.sendall(codec.ack(codec.PUBREL, int.from_bytes(body[:2], "big")))
            elif ptype == codec.PUBREL:
                pid = int.from_bytes(body[:2], "big")
                if pid in self.in_qos2:
                    self.messages.append(self.in_qos2.pop(pid))
                self.s.sendall(codec.ack(codec.PUBCOMP, pid))
            elif ptype == codec.PUBLISH and not self.paused:
                pub = codec.decode_publish(flags, body)
                topic, qos, pid, retain, payload = pub.topic, pub.qos, pub.packet_id, pub.retain, pub.payload
                msg = (topic, payload, qos, retain)
                if qos == 0:
                    self.messages.append(msg)
                elif qos == 1:
                    self.messages.append(msg)
                    self.s.sendall(codec.ack(codec.PUBACK, pid))
                else:
                    self.in_qos2[pid] = msg
                    self.s.sendall(codec.ack(codec.PUBREC, pid))

    def _read(self, timeout: float) -> tuple[int, int, bytes] | None:
        self.s.settimeout(max(timeout, 0.01))
        while True:
            packet, self.buf = split_packet(self.buf)
            if packet is not None:
                return packet
            try:
                chunk = self.s.recv(65536)
            except TimeoutError:
                return None
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk


def _clean(port: int) -> None:
    for cid in ("myclientid", "myclientid2"):
        c = Suite(port, cid)
        assert c.connect(clean=True) == 0
        c.disconnect()
    c = Suite(port, "clean retained")
    c.connect()
    c.subscribe(["#"], [0])
    c.pump(0.5)
    for topic, _p, _q, retain in c.messages:
        if retain:
            c.publish(topic, b"", 0, retain=True)
    c.disconnect()


@pytest.fixture
def port(broker):
    _clean(broker.port)
    return broker.port


def test_basic(port):
    a = Suite(port, "myclientid")
    assert a.connect() == 0
    a.disconnect()
    assert a.connect() == 0
    a.subscribe([TOPICS[0]], [2])
    a.publish(TOPICS[0], b"qos 0")
    a.publish(TOPICS[0], b"qos 1", 1)
    a.publish(TOPICS[0], b"qos 2", 2)
    a.pump(0.5)
    a.disconnect()
    assert len(a.messages) == 3
    assert a.connect() == 0
    a.s.sendall(codec.encode_connect("myclientid"))   # second CONNECT on the socket
    assert a._read(2.0) is None
    with pytest.raises(ConnectionError):
        a.connect(name="hj")   # wrong protocol name: closed without CONNACK


def test_retained_messages(port):
    a = Suite(port, "myclientid")
    a.connect()
    a.publish(TOPICS[1], b"qos 0", 0, retain=True)
    a.publish(TOPICS[2], b"qos 1", 1, retain=True)
    a.publish(TOPICS[3], b"qos 2", 2, retain=True)
    a.pump(0.2)
    a.subscribe([WILD[5]], [2])
    a.pump(0.3)
    a.disconnect()
    assert len(a.messages) == 3 and all(m[3] for m in a.messages)
    a = Suite(port, "myclientid")
    a.connect()
    for t, q in ((TOPICS[1], 0), (TOPICS[2], 1), (TOPICS[3], 2)):
        a.publish(t, b"", q, retain=True)
    a.pump(0.2)
    a.subscribe([WILD[5]], [2])
    a.pump(0.3)
    a.disconnect()
    assert a.messages == []


def test_offline_message_queueing(port):
    a = Suite(port, "myclientid")
    a.connect(clean=False)
    a.subscribe([WILD[5]], [2])
    a.disconnect()
    b = Suite(port, "myclientid2")
    b.connect()
    b.publish(TOPICS[1], b"qos 0", 0)
    b.publish(TOPICS[2], b"qos 1", 1)
    b.publish(TOPICS[3], b"qos 2", 2)
    b.disconnect()
    a.connect(clean=False)
    a.pump(0.3)
    a.disconnect()
    assert len(a.messages) in (2, 3)


def test_will_message(port):
    a = Suite(port, "myclientid")
    a.connect(will=(TOPICS[2], b"client not disconnected", 2, False), keepalive=2)
    b = Suite(port, "myclientid2")
    b.connect(clean=False)
    b.subscribe([TOPICS[2]], [2])
    b.pump(0.1)
    a.terminate()
    b.pump(1.0)
    b.disconnect()
    assert [m[1] for m in b.messages] == [b"client not disconnected"]


def test_overlapping_subscriptions(port):
    a = Suite(port, "myclientid")
    a.connect()
    a.subscribe([WILD[6], WILD[0]], [2, 1])
    a.publish(TOPICS[3], b"overlapping topic filters", 2)
    a.pump(0.5)
    a.disconnect()
    assert [m[2] for m in a.messages] == [2]   # one message at the highest QoS


def test_keepalive(port):
    a = Suite(port, "myclientid")
    a.connect(keepalive=2, will=(TOPICS[4], b"keepalive expiry", 2, False))
    b = Suite(port, "myclientid2")
    b.connect(keepalive=0)
    b.subscribe([TOPICS[4]], [2])
    b.pump(4.5)   # 1.5 x 2 s, plus the broker's check period
    b.disconnect()
    assert [m[1] for m in b.messages] == [b"keepalive expiry"]


def test_redelivery_on_reconnect(port):
    b = Suite(port, "myclientid2")
    b.connect(clean=False)
    b.subscribe([WILD[6]], [2])
    b.pump(0.2)
    b.paused = True   # stops answering incoming publishes
    b.publish(TOPICS[1], b"", 1)
    b.publish(TOPICS[3], b"", 2)
    b.pump(1.0)
    b.disconnect()
    assert b.messages == []
    b.paused = False
    b.connect(clean=False)
    b.pump(1.0)
    b.disconnect()
    assert sorted(m[0] for m in b.messages) == [TOPICS[1], TOPICS[3]]


def test_zero_length_clientid(port):
    c = Suite(port, "")
    assert c.connect(clean=False) == 2
    assert c.connect(clean=True) == 0
    c.disconnect()


def test_subscribe_failure(port):
    a = Suite(port, "myclientid")
    a.connect()
    a.subscribe(["nosubscribe"], [2])
    a.pump(0.3)
    a.disconnect()
    assert a.subacks == [[0x80]]


def test_dollar_topics(port):
    b = Suite(port, "myclientid2")
    b.connect(keepalive=0)
    b.subscribe([WILD[5]], [2])
    b.pump(0.5)
    b.messages.clear()
    b.publish("$" + TOPICS[1], b"", 1)
    b.pump(0.3)
    b.disconnect()
    assert b.messages == []
