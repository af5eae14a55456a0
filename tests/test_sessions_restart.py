"""Persistent MQTT sessions (clean_session=0) survive a broker restart, clean
or SIGKILL: their subscriptions, the QoS 1/2 messages queued while the client
was away and those sent but not yet acknowledged. Nothing the broker
acknowledged to a publisher is lost (issue 2)."""

from __future__ import annotations

import time

import pytest

from broker.mqtt import codec
from tests.clients import ImClient, MqttClient
from tests.test_mqtt_helpers import RawClient


def test_queued_messages_and_subscriptions_survive_a_clean_restart(roost):
    pw = roost.add_user("alice")
    sub = MqttClient("alice.sub", clean_session=False).connect(roost.host, roost.port, username="alice", password=pw)
    assert sub.subscribe("home/+/temp", 1) == [1]
    sub.disconnect()
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)
    for i in range(3):
        pub.publish(f"home/r{i}/temp", f"t{i}".encode(), qos=1)    # PUBACKed: the broker owns them
    pub.disconnect()
    roost.restart()
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)
    pub.publish("home/r3/temp", b"t3", qos=1)         # the subscription is back before its client is
    pub.disconnect()
    sub = MqttClient("alice.sub", clean_session=False).connect(roost.host, roost.port, username="alice", password=pw)
    assert sub.session_present is True
    got = [sub.wait_message("home/+/temp").payload for _ in range(4)]
    assert got == [b"t0", b"t1", b"t2", b"t3"]
    assert sub.no_message("home/#", wait=0.5)
    # and it keeps routing live messages without a new SUBSCRIBE
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)
    pub.publish("home/r9/temp", b"live", qos=1)
    assert sub.wait_message("home/+/temp").payload == b"live"


def persistent_raw_subscriber(roost, client_id: str, topic_filter: str) -> tuple[str, RawClient, MqttClient]:  # noqa: ANN001
    """alice's raw clean_session=0 subscriber at QoS 2, and a publisher: (password, raw, publisher)."""
    pw = roost.add_user("alice")
    raw = RawClient(roost.port)
    raw.connect(client_id, username="alice", password=pw, clean=False)
    assert raw.subscribe(topic_filter, 2) == [2]
    return pw, raw, MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)


def test_unacknowledged_messages_are_resent_with_dup_after_a_restart(roost):
    pw, raw, pub = persistent_raw_subscriber(roost, "alice.raw", "dev/#")
    pub.publish("dev/a", b"one", qos=1)
    pub.publish("dev/b", b"two", qos=2)
    pub.disconnect()
    first = [raw.read_publish() for _ in range(2)]          # received, never acknowledged
    assert [(t, p, q) for t, p, q, _pid, _dup, _r in first] == [("dev/a", b"one", 1), ("dev/b", b"two", 2)]
    raw.s.close()
    roost.restart()
    raw = RawClient(roost.port)
    body = raw.connect("alice.raw", username="alice", password=pw, clean=False)
    assert body[0] == 1                                       # session present
    again = [raw.read_publish() for _ in range(2)]
    assert [(t, p, q, pid, dup) for t, p, q, pid, dup, _r in again] == \
        [(t, p, q, pid, True) for t, p, q, pid, _dup, _r in first]
    raw.send(codec.ack(codec.PUBACK, again[0][3]))
    raw.send(codec.ack(codec.PUBREC, again[1][3]))
    ptype, _flags, pid_bytes = raw.read()
    assert (ptype, int.from_bytes(pid_bytes, "big")) == (6, again[1][3])   # PUBREL for the QoS 2 one


def test_a_clean_session_and_a_removed_principal_leave_nothing_behind(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    a = MqttClient("alice.sub", clean_session=False).connect(roost.host, roost.port, username="alice", password=apw)
    a.subscribe("shared/t", 1)
    a.disconnect()
    b = MqttClient("bob.sub", clean_session=False).connect(roost.host, roost.port, username="bob", password=bpw)
    b.subscribe("shared/t", 1)
    b.disconnect()
    c = MqttClient("alice.clean").connect(roost.host, roost.port, username="alice", password=apw)
    c.subscribe("shared/t", 1)
    c.disconnect()
    roost.stop()
    roost.cli("user", "remove", "bob")
    roost.start()
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=apw)
    pub.publish("shared/t", b"x", qos=1)
    roost.add_user("bob", password=bpw)
    b = MqttClient("bob.sub", clean_session=False).connect(roost.host, roost.port, username="bob", password=bpw)
    assert b.session_present is False and b.no_message("shared/t", wait=0.5)
    c = MqttClient("alice.clean").connect(roost.host, roost.port, username="alice", password=apw)
    assert c.session_present is False and c.no_message("shared/t", wait=0.3)
    a = MqttClient("alice.sub", clean_session=False).connect(roost.host, roost.port, username="alice", password=apw)
    assert a.session_present is True and a.wait_message("shared/t").payload == b"x"


def test_inbox_events_are_not_delivered_twice_after_a_restart(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob = ImClient("bob", "phone", clean_session=False).open(roost, bpw)
    alice.call("contact.request", to="bob")
    bob.call("contact.accept", **{"from": "alice"})
    bob.disconnect()
    alice.call("send", to="bob", cmid="m1", body={"type": "text", "text": "hi"})
    roost.restart()
    bob = ImClient("bob", "phone", clean_session=False).open(roost, bpw)
    assert bob.wait_event("msg", cmid="m1")["body"]["text"] == "hi"
    with pytest.raises(TimeoutError):
        bob.wait_event("msg", timeout=1.0)


def test_acknowledged_messages_for_an_offline_session_survive_sigkill(roost):
    pw = roost.add_user("alice")
    sub = MqttClient("alice.sub", clean_session=False).connect(roost.host, roost.port, username="alice", password=pw)
    assert sub.subscribe("home/+/temp", 1) == [1]
    sub.subscribe("home/+/humidity", 2)
    roost.kill()                          # right after SUBACK: the subscriptions must be stored
    roost.start()
    sub.disconnect()
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)
    for i in range(20):
        pub.publish(f"home/r{i % 3}/temp" if i % 2 else f"home/r{i % 3}/humidity", f"m{i}".encode(), qos=1 + i % 2)
    roost.kill()                          # the last PUBACK/PUBCOMP was received: all 20 were acknowledged
    roost.start()
    sub = MqttClient("alice.sub", clean_session=False).connect(roost.host, roost.port, username="alice", password=pw)
    assert sub.session_present is True
    got = [sub.wait_message("home/#").payload for _ in range(20)]
    assert got == [f"m{i}".encode() for i in range(20)]
    assert sub.no_message("home/#", wait=0.5)


def test_what_the_client_acknowledged_is_not_delivered_again_after_sigkill(roost):
    pw = roost.add_user("alice")
    sub = MqttClient("alice.sub", clean_session=False).connect(roost.host, roost.port, username="alice", password=pw)
    sub.subscribe("news/#", 1)
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)
    for i in range(5):
        pub.publish("news/x", f"n{i}".encode(), qos=1)
    assert [sub.wait_message("news/#").payload for _ in range(5)] == [f"n{i}".encode() for i in range(5)]
    time.sleep(0.5)                       # paho has sent its PUBACKs; the broker journals them
    sub.disconnect()
    pub.publish("news/x", b"while away", qos=1)
    roost.kill()
    roost.start()
    sub = MqttClient("alice.sub", clean_session=False).connect(roost.host, roost.port, username="alice", password=pw)
    assert sub.wait_message("news/#").payload == b"while away"
    assert sub.no_message("news/#", wait=0.5)


def test_qos2_state_survives_sigkill_no_second_delivery_no_reused_id(roost):
    """MQTT-4.4.0-1 across a crash: the PUBREL still owed is re-sent under its id,
    a QoS 2 message sent but not acknowledged is re-sent with DUP under its id
    (not delivered again as a new message), and neither id is reused meanwhile."""
    pw, raw, pub = persistent_raw_subscriber(roost, "alice.q2", "q2/#")
    pub.publish("q2/a", b"A", qos=2)
    t, p, q, pid_a, dup, _r = raw.read_publish()
    assert (t, p, q) == ("q2/a", b"A", 2)
    raw.send(codec.ack(codec.PUBREC, pid_a))
    ptype, _flags, body = raw.read()
    assert (ptype, int.from_bytes(body, "big")) == (6, pid_a)        # PUBREL; no PUBCOMP from us
    pub.publish("q2/b", b"B", qos=2)
    t, p, q, pid_b, dup, _r = raw.read_publish()                    # received, never acknowledged
    assert (t, p) == ("q2/b", b"B")
    time.sleep(0.5)
    roost.kill()
    roost.start()
    raw = RawClient(roost.port)
    assert raw.connect("alice.q2", username="alice", password=pw, clean=False)[0] == 1
    ptype, _flags, body = raw.read()
    assert (ptype, int.from_bytes(body, "big")) == (6, pid_a)        # the PUBREL, under A's id
    t, p, q, pid, dup, _r = raw.read_publish()
    assert (t, p, q, pid, dup) == ("q2/b", b"B", 2, pid_b, True)     # B again, same id, DUP
    raw.send(codec.ack(codec.PUBCOMP, pid_a))
    raw.send(codec.ack(codec.PUBREC, pid_b))
    ptype, _flags, body = raw.read()
    assert (ptype, int.from_bytes(body, "big")) == (6, pid_b)
    raw.send(codec.ack(codec.PUBCOMP, pid_b))
    pub = MqttClient("alice.pub").connect(roost.host, roost.port, username="alice", password=pw)
    pub.publish("q2/c", b"C", qos=2)
    t, p, q, pid_c, dup, _r = raw.read_publish()
    assert (t, p, dup) == ("q2/c", b"C", False)                      # nothing else came first
