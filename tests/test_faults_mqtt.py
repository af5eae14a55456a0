"""MQTT-side promises under hostile-but-legal load (issue 10): pipelined
packets, filters nothing serves, retained scans that must not stall others,
byte budgets."""

from __future__ import annotations

import socket

from broker.mqtt import codec
from tests.clients import MqttClient
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


def test_shared_subscriptions_and_sys_are_refused_not_silently_granted(roost):
    pw = roost.add_user("alice")
    raw = RawClient(roost.port)
    raw.connect("alice.share", username="alice", password=pw)
    assert raw.subscribe("$share/g/home/#", 1) == [0x80]
    assert raw.subscribe("$SYS/#", 1, pid=2) == [0x80]
    assert raw.subscribe("home/#", 1, pid=3) == [1]
    raw.close()
    assert "does not serve yet" in roost.log_path.read_text()
