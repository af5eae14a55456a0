"""The access policy on its own (the broker applies it on publish, subscribe and
every delivery; tests/test_access_control.py checks that over MQTT)."""

from __future__ import annotations

from broker.config import AclRule
from broker.services.acl import AccessPolicy, Who, topic_matches
from broker.services.relations import Relations

KINDS = {"alice": "user", "bob": "user", "carol": "user", "therm": "device", "ha": "service"}


def policy(rules=(), integration=None, relations=None):
    return AccessPolicy(list(rules), relations or Relations(), KINDS.get, integration, "homeassistant")


ALICE = Who("alice", "user", "alice.phone")
BOB = Who("bob", "user", "bob")
THERM = Who("therm", "device", "therm")
ANON = Who(None, None, "anon1")


def test_topic_matching():
    assert topic_matches("a/+/c", "a/b/c")
    assert topic_matches("a/#", "a")
    assert topic_matches("#", "a/b")
    assert not topic_matches("#", "$SYS/x")
    assert not topic_matches("+/x", "$SYS/x")
    assert not topic_matches("a/+", "a/b/c")


def test_requests_responses_and_inbox_belong_to_their_owner():
    p = policy()
    assert p.check(ALICE, "roost/req/alice.phone", "publish")
    assert not p.check(ALICE, "roost/req/alice.laptop", "publish")
    assert not p.check(ALICE, "roost/req/alice.phone", "subscribe")
    assert p.check(ALICE, "roost/resp/alice.phone", "subscribe")
    assert not p.check(ALICE, "roost/resp/alice.phone", "publish")
    assert not p.check(BOB, "roost/resp/alice.phone", "subscribe")
    assert p.check(ALICE, "roost/inbox/alice", "subscribe")
    assert p.check(ALICE, "roost/inbox/alice", "receive")
    assert not p.check(BOB, "roost/inbox/alice", "receive")
    assert not p.check(ALICE, "roost/inbox/alice", "publish")
    assert not p.check(ALICE, "roost/unknown/x", "subscribe")
    assert not p.check(ALICE, "roost/req/+", "subscribe")


def test_presence_follows_relationships():
    rel = Relations()
    p = policy(relations=rel)
    assert p.check(ALICE, "roost/presence/alice", "subscribe")
    assert not p.check(ALICE, "roost/presence/bob", "subscribe")
    rel.set_contact("alice", "bob", True)
    assert p.check(ALICE, "roost/presence/bob", "receive")
    assert not p.check(ALICE, "roost/presence/carol", "receive")
    rel.set_group("g1", {"alice", "carol"})
    assert p.check(ALICE, "roost/presence/carol", "receive")
    assert not p.check(BOB, "roost/presence/carol", "receive")
    # wildcards are accepted, every delivery is then filtered
    assert p.check(BOB, "roost/presence/+", "subscribe")
    assert not p.check(ALICE, "roost/presence/alice", "publish")


def test_telemetry_from_the_device_to_its_users():
    rel = Relations()
    p = policy(relations=rel, integration="ha")
    assert p.check(THERM, "roost/telemetry/therm", "publish")
    assert not p.check(ALICE, "roost/telemetry/therm", "publish")
    assert not p.check(ALICE, "roost/telemetry/therm", "receive")
    rel.set_device_users("therm", {"alice"})
    assert p.check(ALICE, "roost/telemetry/therm", "receive")
    assert p.check(ALICE, "roost/presence/therm", "receive")
    assert not p.check(BOB, "roost/telemetry/therm", "receive")
    # the Home Assistant account gets state on roost/ha/..., never raw telemetry (contract)
    assert not policy(integration="ha").check(Who("ha", "service", "ha"), "roost/telemetry/therm", "receive")


def test_home_assistant_topics_only_for_the_integration():
    p = policy(integration="ha")
    ha = Who("ha", "service", "ha.bridge")
    assert p.check(ha, "roost/ha/therm/state", "subscribe")
    assert p.check(ha, "roost/ha/therm/set", "publish")
    assert not p.check(ha, "roost/ha/therm/state", "publish")
    assert not p.check(ALICE, "roost/ha/therm/state", "subscribe")
    assert not policy().check(ha, "roost/ha/therm/state", "subscribe")


def test_anonymous_never_gets_roost_and_plain_topics_as_the_rules_say():
    p = policy()
    assert not p.check(ANON, "roost/presence/alice", "subscribe")
    assert not p.check(ANON, "roost/ha/therm/state", "subscribe")
    assert p.check(ANON, "lights/kitchen", "publish")        # let in by allow_anonymous
    assert p.check(ALICE, "lights/kitchen", "publish")
    p = policy([AclRule("allow", "all", "public/#", "anonymous"), AclRule("deny", "all", "#", "anonymous")])
    assert p.check(ANON, "public/x", "publish")
    assert not p.check(ANON, "private/x", "publish")
    assert p.check(ALICE, "private/x", "publish")
    p = policy([AclRule("allow", "all", "%u/#", "*")])
    assert p.check(ANON, "public/x", "publish")            # "%u" of an anonymous client is empty
    assert not p.check(ANON, "roost/x", "publish")


def test_operator_rules_first_match_wins_with_substitution():
    rules = [
        AclRule("allow", "all", "home/%u/#", "*"),
        AclRule("deny", "all", "home/#", "*"),
        AclRule("deny", "publish", "sensors/#", "kind:user"),
        AclRule("allow", "subscribe", "clients/%c", "*"),
        AclRule("deny", "subscribe", "clients/#", "*"),
    ]
    p = policy(rules)
    assert p.check(ALICE, "home/alice/lamp", "publish")
    assert not p.check(ALICE, "home/bob/lamp", "publish")
    assert not p.check(ALICE, "home/bob/lamp", "receive")     # receive = could subscribe
    assert not p.check(ALICE, "sensors/t", "publish")
    assert p.check(THERM, "sensors/t", "publish")
    assert p.check(ALICE, "sensors/t", "subscribe")
    assert p.check(ALICE, "clients/alice.phone", "subscribe")
    assert not p.check(ALICE, "clients/bob", "subscribe")
    # a broad wildcard may be subscribed, but denied topics are never delivered
    assert p.check(ALICE, "#", "subscribe")
    assert not p.check(ALICE, "home/bob/lamp", "receive")


def test_home_assistant_discovery_prefix_is_for_integrations():
    p = policy(integration="ha", rules=[AclRule("allow", "all", "homeassistant/light/#", "bob")])
    ha, z2m = Who("ha", "service", "ha"), Who("z2m", "service", "z2m")
    doc = "homeassistant/device/therm/config"
    assert p.check(ha, doc, "subscribe") and p.check(ha, doc, "receive")
    assert not p.check(ALICE, doc, "receive") and not p.check(THERM, doc, "receive")
    assert not p.check(ANON, "homeassistant/status", "publish")
    assert p.check(ALICE, "homeassistant/#", "subscribe")      # granted; each delivery is checked
    # nobody publishes the broker's own documents, not even an operator rule or a service
    for who in (ha, z2m, ALICE, THERM):
        assert not p.check(who, doc, "publish")
    # other integrations publish their own discovery; operator rules still apply first
    assert p.check(z2m, "homeassistant/light/0x01/config", "publish")
    assert p.check(BOB, "homeassistant/light/0x01/config", "publish")
    assert p.check(ha, "homeassistant/status", "publish")
    assert p.check(ALICE, "lights/kitchen", "publish")        # the rest is unchanged
    off = policy()
    assert off.check(ALICE, doc, "receive")                   # integration off: a plain topic
