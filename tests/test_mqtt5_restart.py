"""MQTT 5 state across a clean restart of a real broker process (SQLite store),
seen by paho-mqtt v5 clients: a persistent session's Session Expiry Interval
(its deadline keeps counting while the broker is down), its subscriptions'
options (No Local) and identifiers, the properties of queued and retained
messages, and a retained message's Message Expiry Interval (the time left
keeps counting across the restart)."""

from __future__ import annotations

import math
import queue
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class V5Client:
    """paho-mqtt speaking MQTT 5 to a RoostProcess, as a user."""

    def __init__(self, roost: Any, client_id: str, password: str, *, clean_start: bool = True,
                 session_expiry: int | None = None, connect_timeout: float = 5) -> None:
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                             reconnect_on_failure=False)
        self.c.username_pw_set("alice", password)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        connected: queue.Queue[tuple[int, bool]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.acks: queue.Queue[int] = queue.Queue()
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_connect = lambda c, u, f, rc, p: connected.put((rc.value, f.session_present))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.put(rc.value)
        props = None
        if session_expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
        self.c.connect(roost.host, roost.port, clean_start=clean_start, properties=props)
        self.c.loop_start()
        rc, self.session_present = connected.get(timeout=connect_timeout)
        assert rc == 0

    def sub(self, topic_filter: str, *, sub_id: int | None = None, **options: Any) -> list[int]:
        props = None
        if sub_id is not None:
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = sub_id
        self.c.subscribe(topic_filter, options=mqtt.SubscribeOptions(qos=1, **options), properties=props)
        return self.subacks.get(timeout=5)

    def pub(self, topic: str, payload: bytes, *, retain: bool = False, **properties: Any) -> None:
        props = Properties(PacketTypes.PUBLISH)
        for name, value in properties.items():
            setattr(props, name, value)
        self.c.publish(topic, payload, qos=1, retain=retain, properties=props)
        assert self.acks.get(timeout=5) == 0

    def next(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


PROPS = {"ContentType": "text/plain", "PayloadFormatIndicator": 1, "UserProperty": [("k", "v"), ("k", "w")],
         "ResponseTopic": "v5/resp", "CorrelationData": b"\x00\x01corr"}


def assert_props(m: mqtt.MQTTMessage) -> None:
    p: Any = m.properties
    assert (p.ContentType, p.PayloadFormatIndicator, p.UserProperty) == ("text/plain", 1, [("k", "v"), ("k", "w")])
    assert (p.ResponseTopic, p.CorrelationData) == ("v5/resp", b"\x00\x01corr")


def test_v5_session_subscriptions_and_message_properties_survive_a_restart(roost):
    pw = roost.add_user("alice")
    kept = V5Client(roost, "alice.kept", pw, clean_start=False, session_expiry=3600)
    assert kept.sub("v5/s/#", sub_id=42, noLocal=True) == [1]
    kept.close()
    short = V5Client(roost, "alice.short", pw, clean_start=False, session_expiry=2)
    assert short.sub("x/#") == [1]
    short.close()
    short_left = time.monotonic()

    pub = V5Client(roost, "alice.pub", pw)
    retained_at = time.monotonic()
    pub.pub("v5/ret/short", b"r8", retain=True, MessageExpiryInterval=8, **PROPS)
    pub.pub("v5/ret/long", b"r3600", retain=True, MessageExpiryInterval=3600, **PROPS)
    pub.pub("v5/s/q", b"queued", MessageExpiryInterval=3600, **PROPS)     # owed to alice.kept
    pub.close()
    roost.stop()
    # Down for 3 s: the time under test (expiry deadlines keep running while the broker is down)
    time.sleep(max(0.0, 3 - (time.monotonic() - retained_at)))
    roost.start()

    # the queued message, with its properties and the subscription identifier
    kept = V5Client(roost, "alice.kept", pw, clean_start=False, session_expiry=3600)
    assert kept.session_present is True
    m = kept.next()
    assert (m.topic, m.payload, m.properties.SubscriptionIdentifier) == ("v5/s/q", b"queued", [42])
    assert_props(m)
    assert 3500 < m.properties.MessageExpiryInterval <= 3600
    # No Local kept: its own publish is not delivered back; another client's is, with the identifier
    kept.pub("v5/s/own", b"mine")
    pub = V5Client(roost, "alice.pub", pw)
    pub.pub("v5/s/other", b"theirs")
    m = kept.next()
    assert (m.topic, m.properties.SubscriptionIdentifier) == ("v5/s/other", [42])
    assert kept.messages.empty()
    kept.close()

    # retained: properties kept, and the expiry counted on while the broker was down
    fresh = V5Client(roost, "alice.fresh", pw)
    before = time.monotonic() - retained_at
    fresh.sub("v5/ret/#")
    got = {m.topic: m for m in (fresh.next(), fresh.next())}
    assert got["v5/ret/short"].payload == b"r8"
    assert got["v5/ret/short"].properties.MessageExpiryInterval <= math.ceil(8 - before) <= 5   # it counted on
    for m in got.values():
        assert_props(m)
    fresh.close()

    def retained_short_gone() -> None:
        late = V5Client(roost, "alice.late", pw)
        try:
            late.sub("v5/ret/short")
            late.sub("v5/ret/long")
            m = late.next()        # the short one's retained message would have come first
            assert m.topic == "v5/ret/long"
        finally:
            late.close()

    deadline = time.monotonic() + 12
    while True:
        try:
            retained_short_gone()
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    assert time.monotonic() - retained_at > 7    # not before its expiry

    # the 2 s Session Expiry Interval counted from its departure, across the restart
    assert time.monotonic() - short_left > 2
    short = V5Client(roost, "alice.short", pw, clean_start=False, session_expiry=2)
    assert short.session_present is False
    short.close()


def test_a_queued_v5_message_keeps_its_properties_through_a_crash(roost):
    """The journal (what a SIGKILL leaves) carries the properties and the expiry
    too, not only the clean stop's save."""
    pw = roost.add_user("alice")
    kept = V5Client(roost, "alice.kept", pw, clean_start=False, session_expiry=3600)
    assert kept.sub("v5/c/#", sub_id=7) == [1]
    kept.close()
    pub = V5Client(roost, "alice.pub", pw)
    pub.pub("v5/c/q", b"queued", MessageExpiryInterval=3600, **PROPS)   # PUBACK follows the journal's commit
    pub.close()
    roost.kill()
    roost.start()
    kept = V5Client(roost, "alice.kept", pw, clean_start=False, session_expiry=3600)
    assert kept.session_present is True
    m = kept.next()
    assert (m.topic, m.payload, m.properties.SubscriptionIdentifier) == ("v5/c/q", b"queued", [7])
    assert_props(m)
    assert 3500 < m.properties.MessageExpiryInterval <= 3600
    kept.close()


def test_retain_as_published_applies_to_messages_restored_after_a_stop_and_a_crash(roost):
    """A queued message is saved with the RETAIN flag its subscription gives it:
    set for a Retain As Published filter (the publisher set it), clear for another."""
    pw = roost.add_user("alice")
    kept = V5Client(roost, "alice.rap", pw, clean_start=False, session_expiry=3600)
    assert kept.sub("v5/rap/as/#", retainAsPublished=True) == [1]
    assert kept.sub("v5/rap/plain/#") == [1]
    kept.close()

    def queue_and_restart(suffix: str, restart: Any) -> dict[str, int]:
        pub = V5Client(roost, "alice.pub", pw)
        for topic in (f"v5/rap/as/{suffix}", f"v5/rap/plain/{suffix}", f"v5/rap/as/live-{suffix}"):
            pub.pub(topic, b"x", retain=not topic.endswith(f"live-{suffix}"))
        pub.close()
        restart()
        kept = V5Client(roost, "alice.rap", pw, clean_start=False, session_expiry=3600)
        assert kept.session_present is True
        got = {m.topic: m.retain for m in (kept.next(), kept.next(), kept.next())}
        kept.close()
        return got

    def stop_and_start() -> None:
        roost.stop()
        roost.start()

    def kill_and_start() -> None:
        roost.kill()
        roost.start()

    assert queue_and_restart("stop", stop_and_start) == {
        "v5/rap/as/stop": 1, "v5/rap/plain/stop": 0, "v5/rap/as/live-stop": 0}
    assert queue_and_restart("crash", kill_and_start) == {     # the journal's copy (what a SIGKILL leaves)
        "v5/rap/as/crash": 1, "v5/rap/plain/crash": 0, "v5/rap/as/live-crash": 0}
