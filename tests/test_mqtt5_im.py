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
