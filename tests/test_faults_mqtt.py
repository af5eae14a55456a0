"""MQTT-side promises under hostile-but-legal load (issue 10): pipelined
packets, filters nothing serves, retained scans that must not stall others,
byte budgets."""

from __future__ import annotations

import socket

from broker.mqtt import codec
from tests.clients import ConnectFailed, MqttClient
from tests.test_mqtt_helpers import RawClient


def test_packets_pipelined_behind_connect_are_handled_before_the_close(roost):
    """mosquitto_pub style: CONNECT, PUBLISH x N, DISCONNECT in one write, then
    the socket is closed at once, before any CONNACK is read."""
    pw = roost.add_user("alice")
    sub = MqttClient("alice.sub").connect(roost.host, roost.port, username="alice", password=pw)
    assert sub.subscribe("pipe/#", 0) == [0]
    for round_ in range(5):
        burst = codec.encode_connect(f"alice.pipe{round_}", username="alice", password=pw)
        for i in range(10):
            burst += codec.encode_publish(f"pipe/{round_}", f"m{i}".encode(), 0, False)
        burst += bytes((0xE0, 0))
        with socket.create_connection((roost.host, roost.port)) as s:
            s.sendall(burst)
        got = [sub.wait_message("pipe/#").payload for _ in range(10)]
        assert got == [f"m{i}".encode() for i in range(10)]


def test_sys_is_refused_not_silently_granted(roost):
    pw = roost.add_user("alice")
    raw = RawClient(roost.port)
    raw.connect("alice.share", username="alice", password=pw)
    assert raw.subscribe("$share/g/home/#", 1) == [1]   # served (issue 13): the ACL of home/# applies
    assert raw.subscribe("$SYS/#", 1, pid=2) == [0x80]
    assert raw.subscribe("home/#", 1, pid=3) == [1]
    raw.close()


def rss_mb(roost) -> float:  # noqa: ANN001
    """Resident memory of the broker process, from /proc."""
    for line in open(f"/proc/{roost.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def raw_subscribed(roost, client_id: str, password: str, topic_filter: str, qos: int = 1) -> RawClient:  # noqa: ANN001
    raw = RawClient(roost.port)
    raw.connect(client_id, username=client_id.split(".")[0], password=password)
    assert raw.subscribe(topic_filter, qos) == [qos]
    return raw


RSS_BUDGET_MB = 300    # the target with default limits, whatever one client does


def test_a_never_reading_subscriber_holds_a_bounded_number_of_bytes(roost):
    pw = roost.add_user("alice")
    stuck = raw_subscribed(roost, "alice.stuck", pw, "flood/#")     # never reads a byte
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)
    blob = b"x" * (1024 * 1024)
    for i in range(300):      # 300 MB offered; limits.max_queued_bytes is 8 MiB per session
        pub.publish(f"flood/{i}", blob, qos=1, timeout=30)
        assert roost.running
    assert rss_mb(roost) < RSS_BUDGET_MB
    log = roost.log_path.read_text()
    assert "session alice.stuck is full" in log and "limits.max_queued_bytes" in log
    # others are still served
    other = MqttClient("alice.other").connect(roost.host, roost.port, username="alice", password=pw)
    assert other.subscribe("ping/x", 1) == [1]
    pub.publish("ping/x", b"pong", qos=1)
    assert other.wait_message("ping/x").payload == b"pong"
    stuck.close()


def test_a_retained_flood_is_bounded_in_bytes_and_at_the_next_start(roost):
    pw = roost.add_user("alice")
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)
    blob = b"r" * (1024 * 1024)
    for i in range(60):       # 60 MB; one principal may retain 16 MiB by default
        pub.publish(f"ret/{i}", blob, qos=1, retain=True, timeout=30)
    assert rss_mb(roost) < RSS_BUDGET_MB
    assert "limits.max_retained_bytes_per_principal" in roost.log_path.read_text()
    pub.disconnect()
    roost.restart()
    sub = MqttClient("alice.sub").connect(roost.host, roost.port, username="alice", password=pw)
    sub.subscribe("ret/#", 0)
    got = set()
    while True:       # every kept one is replayed, and no more than the budget allows
        try:
            got.add(sub.messages.get(timeout=2).topic)
        except Exception:  # noqa: BLE001 - queue.Empty: the replay is over
            break
    assert 10 <= len(got) <= 16
    assert rss_mb(roost) < RSS_BUDGET_MB


def test_many_wildcard_filters_over_many_retained_topics_do_not_stall_others(roost):
    pw = roost.add_user("alice")
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)
    for i in range(100):
        for j in range(100):
            pub.publish(f"r/{i}/{j}", b"v", qos=0, retain=True, wait=False)
    pub.publish("r/done", b"v", qos=1, retain=True, timeout=60)
    probe = MqttClient("alice.probe").connect(roost.host, roost.port, username="alice", password=pw)
    assert probe.subscribe("rtt/probe", 0) == [0]
    hog = RawClient(roost.port, timeout=60)
    hog.connect("alice.hog", username="alice", password=pw)
    # one SUBSCRIBE of 1000 wildcard filters that match none of the 10,000 topics:
    # scanning them all per filter held the loop for seconds
    body = (7).to_bytes(2, "big")
    for k in range(1000):
        f = f"r/+/none{k}".encode()
        body += len(f).to_bytes(2, "big") + f + b"\x00"
    hog.send(bytes((0x82,)) + codec.encode_varint(len(body)) + body)
    worst = 0.0
    import time
    done_at = time.monotonic() + 30
    hog.s.setblocking(False)
    acked = False
    while not acked and time.monotonic() < done_at:
        t0 = time.monotonic()
        pub.publish("rtt/probe", b"p", qos=0)
        probe.wait_message("rtt/probe", timeout=30)
        worst = max(worst, time.monotonic() - t0)
        try:
            acked = bool(hog.s.recv(1 << 16))
        except BlockingIOError:
            pass
    assert acked, "no SUBACK"
    assert worst < 1.0, f"another client waited {worst:.2f}s for its own message"


def test_persistent_sessions_per_principal_are_capped(roost_factory):
    roost = roost_factory({"limits": {"max_persistent_sessions_per_principal": 2}})
    pw = roost.add_user("alice")
    for n in (1, 2):
        MqttClient(f"alice.p{n}", clean_session=False).connect(roost.host, roost.port, username="alice",
                                                               password=pw).disconnect()
    try:
        MqttClient("alice.p3", clean_session=False).connect(roost.host, roost.port, username="alice", password=pw)
        raise AssertionError("a third persistent session was accepted")
    except ConnectFailed as exc:
        assert exc.rc == 3
    # an existing one resumes, clean sessions are not limited
    MqttClient("alice.p1", clean_session=False).connect(roost.host, roost.port, username="alice",
                                                        password=pw).disconnect()
    MqttClient("alice.c", clean_session=True).connect(roost.host, roost.port, username="alice",
                                                      password=pw).disconnect()
    assert "max_persistent_sessions_per_principal" in roost.log_path.read_text()


def test_a_message_kept_for_many_persistent_sessions_is_stored_once(roost):
    import sqlite3

    pw = roost.add_user("alice")
    for n in range(8):
        sub = MqttClient(f"alice.s{n}", clean_session=False).connect(roost.host, roost.port, username="alice",
                                                                     password=pw)
        assert sub.subscribe("cam/#", 1) == [1]
        sub.disconnect()
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)
    for i in range(5):
        pub.publish(f"cam/{i}", bytes([i]) * 200_000, qos=1)     # PUBACK: journaled for all eight
    db = sqlite3.connect(roost.config["storage"]["path"])
    rows, payloads, stored = db.execute(
        "SELECT (SELECT count(*) FROM mqtt_session_messages), (SELECT count(*) FROM mqtt_payloads), "
        "(SELECT sum(length(payload)) FROM mqtt_payloads)").fetchone()
    db.close()
    assert (rows, payloads, stored) == (40, 5, 1_000_000)
    roost.kill()
    roost.start()
    for n in range(8):
        sub = MqttClient(f"alice.s{n}", clean_session=False).connect(roost.host, roost.port, username="alice",
                                                                     password=pw)
        got = sorted(sub.wait_message("cam/#").topic for _ in range(5))
        assert got == [f"cam/{i}" for i in range(5)]
        sub.disconnect()
    db = sqlite3.connect(roost.config["storage"]["path"])
    try:     # every one acknowledged: the journal removes them (asynchronously)
        wait_until(lambda: db.execute("SELECT count(*) FROM mqtt_payloads").fetchone() == (0,))
    finally:
        db.close()


def wait_until(cond, timeout: float = 10.0) -> None:  # noqa: ANN001
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_a_half_closed_publisher_gets_its_answers(roost):
    """CONNECT + QoS 1 PUBLISH, then shutdown(SHUT_WR): the packets are handled
    and the CONNACK and PUBACK still arrive before the broker closes."""
    pw = roost.add_user("alice")
    sub = MqttClient("alice.sub").connect(roost.host, roost.port, username="alice", password=pw)
    assert sub.subscribe("half/#", 1) == [1]
    with socket.create_connection((roost.host, roost.port), timeout=10) as s:
        s.sendall(codec.encode_connect("alice.half", username="alice", password=pw)
                  + codec.encode_publish("half/x", b"h", 1, False, pid=7))
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    assert got == b"\x20\x02\x00\x00" + b"\x40\x02\x00\x07"
    assert sub.wait_message("half/#").payload == b"h"
