"""Topic names of the wire contract (PROTOCOL.md, "Topics")."""

from __future__ import annotations

ROOT = "roost/"
REQ = "roost/req/"
RESP = "roost/resp/"
INBOX = "roost/inbox/"
PRESENCE = "roost/presence/"
TELEMETRY = "roost/telemetry/"
HA = "roost/ha/"
HA_DISCOVERY_PREFIX = "homeassistant"
HA_STATUS = "homeassistant/status"


def req(client_id: str) -> str:
    return REQ + client_id


def resp(client_id: str) -> str:
    return RESP + client_id


def inbox(principal: str) -> str:
    return INBOX + principal


def presence(principal: str) -> str:
    return PRESENCE + principal


def telemetry(device: str) -> str:
    return TELEMETRY + device


def ha_availability(device: str) -> str:
    return f"{HA}{device}/availability"


def ha_state(device: str) -> str:
    return f"{HA}{device}/state"


def ha_set(device: str) -> str:
    return f"{HA}{device}/set"


def ha_discovery(device: str) -> str:
    return f"{HA_DISCOVERY_PREFIX}/device/{device}/config"


def matches(topic: str, topic_filter: str) -> bool:
    """Does topic name `topic` match MQTT filter `topic_filter` (`+`, `#`)?

    A filter starting with a wildcard never matches a `$...` topic (MQTT-4.7.2-1).
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic == topic_filter
    t = topic.split("/")
    parts = topic_filter.split("/")
    for i, level in enumerate(parts):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(parts) == len(t)


def is_roost(topic: str) -> bool:
    return topic.startswith(ROOT)


def tail(topic: str, prefix: str) -> str | None:
    """The single level after `prefix`, or None when the topic has more levels."""
    if not topic.startswith(prefix):
        return None
    rest = topic[len(prefix):]
    if not rest or "/" in rest:
        return None
    return rest
