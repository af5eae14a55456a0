"""Presence plugin: turns the engine's connect/disconnect hooks into presence
changes. The service does the counting, ordering and publishing; this adapter
only picks the principal off the session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BasePlugin

from plugins.base import services_of


class PresencePlugin(BasePlugin):  # type: ignore[type-arg]
    @dataclass
    class Config:
        pass

    def _presence(self) -> Any:
        return services_of(self).presence

    async def on_client_connected(self, session: Any) -> None:
        principal = getattr(session, "principal", None)
        presence = self._presence()
        if principal and presence is not None:
            presence.client_connected(principal)

    async def on_client_disconnected(self, session: Any, reason: str) -> None:
        principal = getattr(session, "principal", None)
        presence = self._presence()
        if principal and presence is not None:
            presence.client_disconnected(principal, str(reason))
