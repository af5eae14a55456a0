"""Presence plugin: turns the engine's online/offline hooks into presence
changes. The service does the counting, ordering and publishing; this adapter
only picks the principal off the session.

It uses the synchronous hooks (called the moment CONNACK is sent or the
connection is closed), not on_client_connected/disconnected: those run after
awaits (inbox set-up, will) and could report two clients' changes out of order."""

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

    def on_client_online(self, session: Any) -> None:
        principal = getattr(session, "principal", None)
        presence = self._presence()
        if principal and presence is not None:
            presence.client_connected(principal)

    def on_client_offline(self, session: Any, reason: str) -> None:
        principal = getattr(session, "principal", None)
        presence = self._presence()
        if principal and presence is not None:
            presence.client_disconnected(principal, str(reason), getattr(session, "last_activity", None))
