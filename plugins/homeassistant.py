"""Home Assistant plugin: commands on `roost/ha/<device>/set` and Home Assistant's
birth message on `<prefix>/status` go to the Home Assistant service.

Everything a client publishes under `roost/ha/` is consumed here: `set` becomes a
command (from the integration account only), and availability/state are the
broker's own, so a client can never forge or retain them. `<prefix>/status`
continues to its subscribers after the service saw it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BasePlugin

from contract import topics
from plugins.base import services_of


class HomeAssistantPlugin(BasePlugin):  # type: ignore[type-arg]
    @dataclass
    class Config:
        pass

    @property
    def publish_prefixes(self) -> tuple[str, ...]:
        # Read by the engine once the broker (and so the configured discovery
        # prefix) is reachable from the plugin.
        return (topics.HA, f"{services_of(self).config.homeassistant.discovery_prefix}/status")

    async def on_client_publish(self, session: Any, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        ha = services_of(self).homeassistant
        if ha is None:
            return topic.startswith(topics.HA)
        if topic == ha.status_topic:
            ha.home_assistant_status(getattr(session, "principal", None), bytes(payload))
            return False
        if not topic.startswith(topics.HA):
            return False
        device, _, leaf = topic[len(topics.HA):].partition("/")
        if leaf == "set":
            ha.command(getattr(session, "principal", None), session.client_id, device, bytes(payload))
        return True
