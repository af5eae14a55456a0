"""A retained message acknowledged with PUBACK/PUBREC survives SIGKILL right after."""

from __future__ import annotations

from tests.clients import MqttClient


def test_acknowledged_retained_messages_survive_sigkill(roost):
    pw = roost.add_user("alice")
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)
    for i in range(30):
        pub.publish(f"house/room{i}/state", f"v{i}".encode(), qos=1 + i % 2, retain=True)
    pub.publish("house/room0/state", b"", qos=1, retain=True)   # cleared: must stay cleared
    roost.kill()   # the last PUBACK was received: everything above was acknowledged
    roost.start()
    sub = MqttClient("alice.sub").connect(roost.host, roost.port, username="alice", password=pw)
    sub.subscribe("house/#", 1)
    got = {}
    while True:
        try:
            m = sub.wait_message("house/#", timeout=1.5)
        except TimeoutError:
            break
        got[m.topic] = m.payload
    assert got == {f"house/room{i}/state": f"v{i}".encode() for i in range(1, 30)}
