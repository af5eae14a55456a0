"""Access control over real MQTT: publish, subscribe (SUBACK 0x80) and every
delivery, retained messages included (issue 2, item 6)."""

from __future__ import annotations

from tests.clients import MqttClient


def connect(broker, client_id, username, password):
    return MqttClient(client_id).connect(broker.host, broker.port, username=username, password=password)


def test_roost_topics_follow_the_contract(roost):
    apw = roost.add_user("alice")
    bpw = roost.add_user("bob")
    alice = connect(roost, "alice.phone", "alice", apw)
    bob = connect(roost, "bob", "bob", bpw)
    assert alice.subscribe("roost/inbox/alice") == [1]
    assert alice.subscribe("roost/resp/alice.phone") == [1]
    assert bob.subscribe("roost/inbox/alice") == [0x80]
    assert bob.subscribe("roost/resp/alice.phone") == [0x80]
    assert bob.subscribe("roost/req/alice.phone") == [0x80]
    assert bob.subscribe("roost/presence/alice") == [0x80]
    assert bob.subscribe("roost/whatever") == [0x80]
    # bob cannot inject into alice's inbox or answer in her name
    bob.publish("roost/inbox/alice", b'{"n":1}', qos=1)
    bob.publish("roost/resp/alice.phone", b'{"id":"x"}', qos=1)
    assert alice.no_message("roost/#", wait=0.7)


def test_wildcard_subscriber_only_receives_what_it_may_see(roost_factory):
    broker = roost_factory({"acl": [{"action": "deny", "access": "all", "topic": "private/#", "who": "bob"}]})
    apw = broker.add_user("alice")
    bpw = broker.add_user("bob")
    bob = connect(broker, "bob", "bob", bpw)
    assert bob.subscribe("#") == [1]
    alice = connect(broker, "alice", "alice", apw)
    alice.subscribe("roost/resp/alice")
    alice.publish("private/diary", b"secret", qos=1)
    alice.publish("roost/req/alice", b'{"id":"1","op":"convs"}', qos=1)
    alice.wait_message("roost/resp/alice")  # alice's own response arrived ...
    alice.publish("public/news", b"hello", qos=1)
    assert bob.wait_message("public/news").payload == b"hello"
    seen = set()
    while not bob.messages.empty():
        seen.add(bob.messages.get().topic)
    seen.update(m.topic for m in bob._kept)
    # ... but bob saw neither it, nor her request, nor the denied topic: only his own presence
    assert seen <= {"roost/presence/bob"}


def test_retained_messages_respect_receive_rules(roost_factory):
    broker = roost_factory({"acl": [{"action": "deny", "access": "subscribe", "topic": "vault/#", "who": "bob"}]})
    apw = broker.add_user("alice")
    bpw = broker.add_user("bob")
    alice = connect(broker, "alice", "alice", apw)
    alice.publish("vault/code", b"1234", qos=1, retain=True)
    alice.publish("hall/light", b"on", qos=1, retain=True)
    bob = connect(broker, "bob", "bob", bpw)
    assert bob.subscribe("vault/code") == [0x80]
    assert bob.subscribe("+/+") == [1]
    m = bob.wait_message("#")
    assert (m.topic, m.payload, m.retain) == ("hall/light", b"on", True)
    assert bob.no_message("#", wait=0.5)


def test_deny_publish_rule_drops_the_message(roost_factory):
    broker = roost_factory({"acl": [{"action": "deny", "access": "publish", "topic": "alarm/#",
                                     "who": "kind:user"}]})
    apw = broker.add_user("alice")
    alice = connect(broker, "alice", "alice", apw)
    alice.subscribe("alarm/#")
    alice.publish("alarm/siren", b"on", qos=1)
    assert alice.no_message("alarm/#", wait=0.7)


def test_percent_u_rules_give_each_principal_a_home(roost_factory):
    broker = roost_factory({"acl": [
        {"action": "allow", "access": "all", "topic": "home/%u/#", "who": "*"},
        {"action": "deny", "access": "all", "topic": "home/#", "who": "*"}]})
    apw = broker.add_user("alice")
    broker.add_user("bob")
    alice = connect(broker, "alice", "alice", apw)
    assert alice.subscribe("home/alice/#") == [1]
    assert alice.subscribe("home/bob/#") == [0x80]
