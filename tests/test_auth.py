"""Authentication and identity binding over real MQTT (issue 2, item 5)."""

from __future__ import annotations

import time

import pytest

from tests.clients import ConnectFailed, ImClient, MqttClient

BAD_CREDENTIALS = 4
NOT_AUTHORIZED = 5
IDENTIFIER_REJECTED = 2


def connect(broker, client_id, username=None, password=None, **kw):
    return MqttClient(client_id, **kw).connect(broker.host, broker.port, username=username, password=password)


def refused(broker, client_id, username=None, password=None) -> int:
    with pytest.raises(ConnectFailed) as err:
        connect(broker, client_id, username, password)
    return err.value.rc


def test_principal_connects_with_own_client_ids(roost):
    pw = roost.add_user("alice")
    for cid in ("alice", "alice.phone", "alice.laptop-2"):
        connect(roost, cid, "alice", pw).disconnect()


def test_integrations_keep_their_default_client_ids_without_colliding(roost):
    """Home Assistant, Zigbee2MQTT, MQTT.js and mosquitto_pub make up their own
    client ids; two principals using the same one get two sessions."""
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    for cid in ("mqttjs_3f2a1b9c", "6VUmlWhr7tNoGOlW5Z2FcK", "mosq-Zq8Hk1", "zigbee2mqtt"):
        connect(roost, cid, "alice", apw).disconnect()
    a = connect(roost, "homeassistant", "alice", apw, clean_session=False)
    assert a.subscribe("alice-home/#", 1) == [1]
    b = connect(roost, "homeassistant", "bob", bpw, clean_session=False)    # no take-over of alice's
    assert b.subscribe("bob-home/#", 1) == [1]
    b.publish("alice-home/x", b"for alice", qos=1)
    assert a.wait_message("alice-home/#").payload == b"for alice"
    assert a.no_message("bob-home/#", wait=0.3)
    a.disconnect()
    b.disconnect()


def test_refusals_carry_the_right_connack_code(roost):
    pw = roost.add_user("alice")
    roost.add_user("bob")
    assert refused(roost, "alice", "alice", "wrong") == BAD_CREDENTIALS
    assert refused(roost, "nobody", "nobody", "x") == BAD_CREDENTIALS
    assert refused(roost, "bob.phone", "alice", pw) == IDENTIFIER_REJECTED     # another principal's form
    assert refused(roost, "bob", "alice", pw) == IDENTIFIER_REJECTED
    assert refused(roost, "alice.bad.label", "alice", pw) == IDENTIFIER_REJECTED
    assert refused(roost, "my sensor", "alice", pw) == IDENTIFIER_REJECTED     # spaces
    assert refused(roost, "x" * 129, "alice", pw) == IDENTIFIER_REJECTED
    assert refused(roost, "anon-1") == NOT_AUTHORIZED       # anonymous is off by default


def test_failed_login_never_disturbs_the_existing_session(roost):
    pw = roost.add_user("alice")
    victim = connect(roost, "alice.phone", "alice", pw)
    victim.subscribe("home/alice/#", 1)
    for clean in (True, False):
        c = MqttClient("alice.phone", clean_session=clean)
        with pytest.raises(ConnectFailed):
            c.connect(roost.host, roost.port, username="alice", password="wrong")
    sender = connect(roost, "alice.laptop", "alice", pw)
    sender.publish("home/alice/lamp", b"on", qos=1)
    assert victim.wait_message("home/alice/lamp").payload == b"on"


def test_anonymous_when_allowed_gets_plain_topics_only(roost_factory):
    broker = roost_factory({"auth": {"allow_anonymous": True}})
    broker.add_user("alice")
    anon = connect(broker, "sensor-17")
    assert anon.subscribe("garden/#", 1) == [1]
    assert anon.subscribe("roost/presence/alice", 1) == [0x80]
    anon.publish("garden/temp", b"12", qos=1)
    assert anon.wait_message("garden/temp").payload == b"12"
    # an anonymous client may not pose as a principal's client
    assert refused(broker, "alice.phone") == IDENTIFIER_REJECTED


def test_repeated_failures_are_slowed_down(roost_factory):
    broker = roost_factory({"auth": {"failure_delay": 0.3, "failure_delay_max": 1.0}})
    pw = broker.add_user("alice")
    times = []
    for _ in range(5):
        t = time.monotonic()
        refused(broker, "alice", "alice", "wrong")
        times.append(time.monotonic() - t)
    assert times[3] >= 0.85 and times[4] >= 0.95   # 3rd and 4th earlier failures: 0.9 s, then the 1.0 s cap
    assert max(times) < 4.0  # capped
    connect(broker, "alice", "alice", pw).disconnect()  # the right password still works


def test_removing_a_principal_disconnects_it(roost):
    pw = roost.add_user("alice")
    c = connect(roost, "alice.phone", "alice", pw)
    roost.cli("user", "remove", "alice")
    assert c.wait_disconnected(5.0)
    assert refused(roost, "alice.phone", "alice", pw) == BAD_CREDENTIALS


def test_password_change_takes_effect_while_running(roost):
    pw = roost.add_user("alice")
    connect(roost, "alice", "alice", pw).disconnect()
    roost.cli("user", "passwd", "alice", "--password-stdin", input="new-secret\n")
    time.sleep(1.0)
    assert refused(roost, "alice", "alice", pw) == BAD_CREDENTIALS
    connect(roost, "alice", "alice", "new-secret").disconnect()


def test_users_added_while_running_can_connect_at_once(roost):
    pw = roost.add_user("late")
    connect(roost, "late.cli", "late", pw).disconnect()


def test_rules_can_keep_anonymous_clients_to_some_plain_topics(roost_factory):
    broker = roost_factory({"auth": {"allow_anonymous": True},
                            "acl": [{"action": "allow", "access": "all", "topic": "garden/#", "who": "anonymous"},
                                    {"action": "deny", "access": "all", "topic": "#", "who": "anonymous"}]})
    pw = broker.add_user("alice")
    anon = connect(broker, "sensor-18")
    assert anon.subscribe("garden/#", 1) == [1]
    assert anon.subscribe("house/#", 1) == [0x80]
    alice = connect(broker, "alice.x", "alice", pw)
    assert alice.subscribe("house/#", 1) == [1]


def test_a_changed_password_works_the_moment_passwd_returns(roost):
    roost.add_user("alice", password="old-pw")
    connect(roost, "alice", "alice", "old-pw").disconnect()     # the broker now knows alice
    for n in range(3):
        roost.cli("user", "passwd", "alice", "--password-stdin", input=f"new-pw-{n}\n")
        connect(roost, "alice", "alice", f"new-pw-{n}").disconnect()


def test_a_new_pairing_code_claims_the_moment_the_command_returns(roost):
    import json

    roost.add_device("lamp", "light")
    alice = ImClient("alice", "phone").open(roost, roost.add_user("alice"))
    code = json.loads(roost.cli("device", "pairing", "lamp", "--json").stdout)["pairing_code"]
    assert alice.call("device.claim", device="lamp", code=code)["role"] == "owner"
