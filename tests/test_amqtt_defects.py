"""Each amqtt 0.12.1 defect from AMQTT_NOTES.md (items 1-7, 9, 10), probed over
TCP with paho clients against RoostBroker AND stock amqtt. The stock case is an
xfail(strict=True): the suite proves each test fails on stock amqtt and passes
on Roost."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from broker.mqtt import codec
from tests.test_mqtt_helpers import HELPERS, Client, InProcRoost, InProcStock, RawClient

STOCK_PLUGINS = {f"{HELPERS}.AllowAuth": {}}


def both(defect: int) -> Any:
    return pytest.mark.parametrize("kind", [
        "roost",
        pytest.param("stock", marks=pytest.mark.xfail(strict=True, reason=f"amqtt defect {defect}")),
    ])


@pytest.fixture
def make(tmp_path):
    started: list[Any] = []

    def start(kind: str, config: dict | None = None) -> Any:
        if kind == "roost":
            b = InProcRoost(config=config or {}, plugins={f"{HELPERS}.AllowAuth": {}}).start()
        else:
            b = InProcStock(plugins=STOCK_PLUGINS).start()
        b.kind = kind
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


@both(1)
def test_1_no_retained_leak_to_clients_that_did_not_subscribe(make, kind):
    b = make(kind)
    owner = Client(b.port, "owner", clean=False)
    owner.sub("leak/#", 0)
    pub = Client(b.port, "pub")
    pub.pub("leak/1", b"private", qos=1, retain=True)
    owner.get()  # routed normally
    other = Client(b.port, "other")  # never subscribes
    other.none(1.0)
    # and subscribing to an unrelated filter replays only that filter's retained messages
    other.sub("unrelated/#", 0)
    other.none(0.5)


@both(2)
def test_2_failed_connect_does_not_touch_the_existing_session(make, kind):
    b = make(kind)
    victim = Client(b.port, "victim")
    victim.sub("d2/t", 1)
    attacker = Client(b.port, "victim", password="wrong", connect=False)
    rc = attacker.connect(expect=None)
    assert rc != 0
    pub = Client(b.port, "pub")
    pub.pub("d2/t", b"still here", qos=1)
    assert victim.get(3).payload == b"still here"
    assert not victim.disconnected.is_set()


@both(3)
def test_3_take_over_keeps_delivering_and_publishes_no_will(make, kind):
    b = make(kind)
    watcher = Client(b.port, "watcher")
    watcher.sub("d3/will", 0)
    first = Client(b.port, "t", clean=False, will=("d3/will", b"gone", 0, False))
    first.sub("d3/t", 1)
    second = Client(b.port, "t", clean=False)
    assert first.disconnected.wait(3), "old connection not closed on take-over"
    pub = Client(b.port, "pub")
    pub.pub("d3/t", b"to the new one", qos=1)
    assert second.get(3).payload == b"to the new one"
    watcher.none(0.5)
    # the new connection's clean_session wins: clean=1 discards the subscription
    third = Client(b.port, "t", clean=True)
    assert second.disconnected.wait(3)
    pub.pub("d3/t", b"nobody", qos=1)
    third.none(0.7)
    watcher.none(0.1)


@both(4)
def test_4_keepalive_enforced_and_will_published(make, kind):
    b = make(kind)
    watcher = Client(b.port, "watcher")
    watcher.sub("d4/will", 1)
    s = socket.create_connection(("127.0.0.1", b.port))
    s.sendall(codec.encode_connect("silent", keep_alive=1, username="u", password="p",
                                   will=("d4/will", b"offline", 1, False)))
    assert s.recv(4) == b"\x20\x02\x00\x00"
    t0 = time.monotonic()
    s.settimeout(4)
    try:
        closed = s.recv(10) == b""
    except TimeoutError:
        closed = False
    elapsed = time.monotonic() - t0
    s.close()
    assert closed, "silent client was not disconnected"
    assert 1.4 <= elapsed <= 3.5, elapsed
    assert watcher.get(3).payload == b"offline"


@both(5)
def test_5_unacked_qos1_and_qos2_resent_in_order_on_reconnect(make, kind):
    b = make(kind)
    sub = RawClient(b.port)  # never acknowledges anything
    sub.connect("r", clean=False)
    assert sub.subscribe("d5/one/#", 1) == [1]
    assert sub.subscribe("d5/two/#", 2, pid=2) == [2]
    pub = Client(b.port, "pub")
    for i, q in ((1, 1), (2, 2), (3, 1)):
        pub.pub(f"d5/{'one' if q == 1 else 'two'}/{i}", f"m{i}".encode(), qos=q)
    first = [sub.read_publish() for _ in range(3)]
    assert [(m[1], m[2], m[4]) for m in first] == [(b"m1", 1, False), (b"m2", 2, False), (b"m3", 1, False)]
    time.sleep(0.5)
    sub.close()  # lost without acks
    again = RawClient(b.port)
    again.connect("r", clean=False)
    resent = [again.read_publish() for _ in range(3)]
    assert [(m[1], m[2], m[4]) for m in resent] == [(b"m1", 1, True), (b"m2", 2, True), (b"m3", 1, True)]
    again.close()


@both(6)
def test_6_delivered_qos_is_min_of_publish_and_subscription(make, kind):
    b = make(kind)
    sub = Client(b.port, "s")
    sub.sub("d6/high", 2)
    sub.sub("d6/low", 1)
    pub = Client(b.port, "pub")
    pub.pub("d6/high", b"a", qos=0)
    m = sub.get(3)
    assert (m.payload, m.qos) == (b"a", 0)
    pub.pub("d6/low", b"b", qos=2)
    m = sub.get(3)
    assert (m.payload, m.qos) == (b"b", 1)
    pub.pub("d6/high", b"c", qos=1)
    m = sub.get(3)
    assert (m.payload, m.qos) == (b"c", 1)


@both(7)
def test_7_offline_queue_bounded_and_replayed_without_retain(make, kind):
    b = make(kind, {"limits": {"max_queued": 5}})
    sub = Client(b.port, "q", clean=False)
    sub.sub("d7/#", 1)
    sub.disconnect()
    pub = Client(b.port, "pub")
    for i in range(8):
        pub.pub(f"d7/{i}", f"m{i}".encode(), qos=1)
    back = Client(b.port, "q", clean=False)
    got = back.drain(1.0)
    # the newest messages were dropped once 5 were queued
    assert [m.payload for m in got] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert not any(m.retain for m in got)


def _sessions_left(b: Any, prefix: str) -> int:
    if b.kind == "roost":
        return b.sync(lambda: sum(1 for st in b.broker.engine.sessions.values() if st.info.client_id.startswith(prefix))
                      + sum(1 for c in b.broker.engine.conns if c.info and c.info.client_id.startswith(prefix)))
    return b.sync(lambda: sum(1 for cid in b.broker._sessions if cid.startswith(prefix)))


@both(9)
def test_9_refused_connects_leave_nothing(make, kind):
    b = make(kind)
    for i in range(20):
        c = Client(b.port, f"bad{i}", password="wrong", connect=False)
        assert c.connect(expect=None) != 0
        c.c.loop_stop()
    time.sleep(0.5)
    assert _sessions_left(b, "bad") == 0


def _fan_time(b: Any, n: int) -> float:
    sub = Client(b.port, "fan")
    sub.sub("d10/target", 0)
    many = Client(b.port, "many")
    if n:
        filters = [(f"d10/other/{i}", 0) for i in range(n)]
        for start in range(0, n, 500):
            many.c.subscribe(filters[start:start + 500])
            many.subacks.get(timeout=20)
    pub = Client(b.port, "pub10")
    count = 300
    t0 = time.monotonic()
    for _ in range(count):
        pub.pub("d10/target", b"x", qos=0)
    for _ in range(count):
        sub.get(20)
    elapsed = time.monotonic() - t0
    for c in (sub, many, pub):
        c.disconnect()
    return elapsed


@both(10)
def test_10_exact_topic_publish_does_not_scan_every_subscription(make, kind):
    b = make(kind, {"limits": {"max_subscriptions": 20000}})
    few = _fan_time(b, 0)
    lots = _fan_time(b, 15000)
    # with 15000 unrelated filters the cost per publish must stay about the same
    assert lots < few * 3 + 0.5, (few, lots)
