"""The IM protocol over MQTT 5 against `roost serve`: a request on
roost/req/<client id> naming a Response Topic and Correlation Data is answered
there, with the Correlation Data; without one the answer goes to roost/resp/."""

from __future__ import annotations

import json
import queue

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def test_request_with_response_topic_is_answered_there(roost):
    pw = roost.add_user("alice")
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subacks: queue.Queue[object] = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alice.v5", protocol=mqtt.MQTTv5)
    c.username_pw_set("alice", pw)
    c.on_message = lambda cl, u, m: got.put(m)
    c.on_subscribe = lambda cl, u, mid, rcs, p: subacks.put(rcs)
    c.connect("127.0.0.1", roost.port)
    c.loop_start()
    try:
        c.subscribe([("app/alice/answers", 1), ("roost/resp/alice.v5", 1)])
        assert [r.value for r in subacks.get(timeout=5)] == [1, 1]
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "app/alice/answers"
        props.CorrelationData = b"corr-1"
        c.publish("roost/req/alice.v5", json.dumps({"id": "r1", "op": "convs"}), qos=1, properties=props)
        m = got.get(timeout=10)
        assert m.topic == "app/alice/answers"
        assert m.properties.CorrelationData == b"corr-1"
        assert json.loads(m.payload)["id"] == "r1"
        c.publish("roost/req/alice.v5", json.dumps({"id": "r2", "op": "convs"}), qos=1)
        m = got.get(timeout=10)
        assert (m.topic, json.loads(m.payload)["id"]) == ("roost/resp/alice.v5", "r2")
    finally:
        c.disconnect()
        c.loop_stop()


def test_cli_speaks_mqtt5(roost, tmp_path):
    from tests.test_cli_e2e import Person

    alice, bob = Person(roost, tmp_path, "alice"), Person(roost, tmp_path, "bob")
    alice.login()
    bob.login()
    alice.ok("contact", "request", "bob", "--mqtt", "5")
    bob.ok("contact", "accept", "alice", "--mqtt", "5")
    alice.ok("send", "bob", "over five", "--mqtt", "5")
    assert "over five" in bob.ok("history", "alice", "--mqtt", "5").stdout


def test_device_sdk_keeps_its_mqtt5_session_while_offline(roost):
    from devices.sdk import Device
    from tests.clients import ImClient
    from tests.test_devices_e2e import command, wait_result

    apw = roost.add_user("alice")
    secret, code = roost.add_device("lamp", "light")
    alice = ImClient("alice", "phone").open(roost, apw)
    alice.call("device.claim", device="lamp", code=code)
    seen: list[int] = []

    def make() -> Device:
        dev = Device("lamp", secret, roost.host, roost.port, min_backoff=1, max_backoff=2, mqtt_version=5)
        dev.command("count")(lambda cmd: seen.append(cmd.args["i"]) or {"i": cmd.args["i"]})
        return dev

    dev = make()
    dev.start(wait=10)            # the session outlives the connection (Session Expiry Interval)
    dev.stop()
    seqs = [command(alice, "lamp", "count", i=i)["seq"] for i in range(3)]
    dev = make()
    dev.start(wait=10)
    try:
        for seq in seqs:
            assert wait_result(alice, "lamp", seq)["status"] == "ok"
        assert seen == [0, 1, 2]
    finally:
        dev.stop()


def test_refused_request_is_acked_with_a_reason_code_and_answered(roost):
    """A v5 QoS 1 request refused before it runs gets PUBACK with the reason code
    (and its error envelope all the same); one that runs gets 0x00; a 3.1.1 client a plain ack."""
    pw = roost.add_user("carol")
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    acks: queue.Queue[tuple[int, int]] = queue.Queue()
    subacks: queue.Queue[object] = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="carol.v5", protocol=mqtt.MQTTv5)
    c.username_pw_set("carol", pw)
    c.on_message = lambda cl, u, m: got.put(m)
    c.on_subscribe = lambda cl, u, mid, rcs, p: subacks.put(rcs)
    c.on_publish = lambda cl, u, mid, rc, p: acks.put((mid, rc.value))
    c.connect("127.0.0.1", roost.port)
    c.loop_start()
    try:
        c.subscribe("roost/resp/carol.v5", 1)
        subacks.get(timeout=5)
        cases = [(b"not json", 0x99, "bad_request"),
                 (json.dumps({"id": "u1", "op": "no.such.op"}).encode(), 0x99, "bad_request"),
                 (json.dumps({"id": "ok1", "op": "convs"}).encode(), 0x00, None)]
        for payload, reason, error in cases:
            mid = c.publish("roost/req/carol.v5", payload, qos=1).mid
            assert acks.get(timeout=5) == (mid, reason)
            answer = json.loads(got.get(timeout=10).payload)
            assert (answer.get("error") or {}).get("code") == error
        mid = c.publish("roost/req/carol.v5", json.dumps({"id": "q2", "op": "nope"}), qos=2).mid
        # PUBREC 0x99 ends the QoS 2 flow; paho sends a PUBREL all the same and reports
        # that PUBCOMP's 0x92 (packet id not found): either way a failure, never 0x00
        got_mid, rc = acks.get(timeout=5)
        assert got_mid == mid and rc >= 0x80
        assert json.loads(got.get(timeout=10).payload)["error"]["code"] == "bad_request"
    finally:
        c.disconnect()
        c.loop_stop()
    c3 = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="carol.v3", protocol=mqtt.MQTTv311)
    c3.username_pw_set("carol", pw)
    c3.on_publish = lambda cl, u, mid, rc, p: acks.put((mid, rc.value))
    c3.connect("127.0.0.1", roost.port)
    c3.loop_start()
    try:
        mid = c3.publish("roost/req/carol.v3", b"not json", qos=1).mid
        assert acks.get(timeout=5) == (mid, 0)
    finally:
        c3.disconnect()
        c3.loop_stop()
