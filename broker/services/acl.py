"""Who may publish, subscribe to and receive which topic.

Two regimes:
* `roost/...` follows the wire contract (PROTOCOL.md, Topics) and nothing the
  operator configures can open it further: requests only from their own client,
  responses and inboxes only to their owner, presence to whoever may observe the
  principal, telemetry from the device to its owners/sharees, `roost/ha/...` to
  the Home Assistant integration account. Everything else under `roost/` is refused.
* With the Home Assistant integration on, its discovery prefix (`homeassistant/`)
  is for integrations: no client may publish the discovery documents the broker
  owns (`<prefix>/device/<roost device>/config`), and with no matching operator
  rule only service accounts may use the prefix (so a user or device can neither
  read every device's name and room nor plant a forged config).
* Plain topics follow the operator's ordered rules (`acl:` in the config), first
  match wins, `%u`/`%c` expanded. With no matching rule a plain topic is open to
  every client that got in: authenticated principals, and anonymous clients when
  `auth.allow_anonymous` is on (that switch is what lets them use plain topics;
  off, they cannot connect at all). A trailing `{deny, all, "#", anonymous}`
  rule keeps anonymous clients to what earlier rules open.
* `$SYS/...` (the broker's figures) follows the operator's rules too, but with no
  matching rule only service accounts may subscribe and receive.

RECEIVE is decided as "could this client subscribe to exactly this topic", so a
wildcard subscriber only ever receives what it could have subscribed to by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from broker.config import AclRule
from broker.services.relations import Relations
from contract import topics
from contract.ids import principal_of_client_id

PUBLISH = "publish"
SUBSCRIBE = "subscribe"
RECEIVE = "receive"


@dataclass(frozen=True, slots=True)
class Who:
    principal: str | None      # None: anonymous
    kind: str | None
    client_id: str


def topic_matches(pattern: str, topic: str) -> bool:
    """Rule `pattern` against a concrete topic (or a subscription filter taken literally)."""
    return topics.matches(topic, pattern)


def _has_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


class AccessPolicy:
    def __init__(self, rules: list[AclRule], relations: Relations,
                 kind_of: Callable[[str], str | None], integration_account: str | None,
                 discovery_prefix: str | None = None) -> None:
        self._rules = list(rules)
        self._relations = relations
        self._kind_of = kind_of
        self._integration = integration_account
        # set only while the integration is on
        self._discovery = discovery_prefix + "/" if integration_account and discovery_prefix else None

    def check(self, who: Who, topic: str, action: str) -> bool:
        if topic.startswith(topics.ROOT):
            if who.principal is None:
                return False
            if action == SUBSCRIBE and _has_wildcard(topic):
                return self._roost_wildcard_subscribe(topic)
            return self._roost_exact(who, topic, action)
        # A wildcard filter that reaches into roost/ (e.g. `#`, `+/inbox/+`) is
        # allowed here: each delivery is then checked topic by topic (RECEIVE).
        if action == PUBLISH and self._is_broker_discovery(topic):
            return False
        return self._plain(who, topic, SUBSCRIBE if action == RECEIVE else action)

    def _is_broker_discovery(self, topic: str) -> bool:
        """`<prefix>/device/<id>/config` of a registered Roost device: the broker's own."""
        prefix = self._discovery
        if prefix is None or not topic.startswith(prefix + "device/") or not topic.endswith("/config"):
            return False
        device = topic[len(prefix) + len("device/"):-len("/config")]
        return "/" not in device and self._kind_of(device) == "device"

    # ---- roost/ --------------------------------------------------------------
    def _roost_wildcard_subscribe(self, topic_filter: str) -> bool:
        levels = topic_filter.split("/")
        # `roost/req/...` is never for clients; anything else is filtered per delivery.
        return len(levels) < 2 or levels[1] != "req"

    def _roost_exact(self, who: Who, topic: str, action: str) -> bool:
        principal = who.principal
        assert principal is not None
        # the IM topics are for client ids of the principal's own form only (a
        # free-form id such as "mqttjs_1f" is for plain MQTT)
        if (cid := topics.tail(topic, topics.REQ)) is not None:
            return action == PUBLISH and cid == who.client_id and principal_of_client_id(cid) == principal
        if (cid := topics.tail(topic, topics.RESP)) is not None:
            return action != PUBLISH and cid == who.client_id and principal_of_client_id(cid) == principal
        if (p := topics.tail(topic, topics.INBOX)) is not None:
            return action != PUBLISH and p == principal
        if (p := topics.tail(topic, topics.PRESENCE)) is not None:
            return action != PUBLISH and self._relations.can_observe(principal, p)
        if (d := topics.tail(topic, topics.TELEMETRY)) is not None:
            if action == PUBLISH:
                return d == principal and who.kind == "device"
            return d == principal or self._relations.may_use_device(principal, d)
        if topic.startswith(topics.HA):
            return self._ha(principal, topic, action)
        return False

    def _ha(self, principal: str, topic: str, action: str) -> bool:
        if self._integration is None or principal != self._integration:
            return False
        parts = topic.split("/")
        if len(parts) != 4 or parts[3] not in ("availability", "state", "set"):
            return False
        return action != PUBLISH or parts[3] == "set"

    # ---- plain topics --------------------------------------------------------
    def _plain(self, who: Who, topic: str, access: str) -> bool:
        for rule in self._rules:
            if rule.access != "all" and rule.access != access:
                continue
            if not self._rule_applies(rule.who, who):
                continue
            pattern = rule.topic.replace("%u", who.principal or "").replace("%c", who.client_id)
            if topic_matches(pattern, topic):
                return rule.action == "allow"
        if self._discovery is not None and topic.startswith(self._discovery) and not _has_wildcard(topic):
            return who.kind == "service"
        if topic == "$SYS" or topic.startswith("$SYS/"):
            # the broker's figures: service accounts only unless a rule says otherwise
            # (wildcard filters too: a refused `$SYS/#` is a SUBACK 0x80, not silence)
            return who.kind == "service"
        return True

    @staticmethod
    def _rule_applies(rule_who: str, who: Who) -> bool:
        if rule_who == "*":
            return True
        if rule_who == "anonymous":
            return who.principal is None
        if rule_who.startswith("kind:"):
            return who.kind == rule_who[5:]
        return who.principal == rule_who
