"""Presence plugin: turns the engine's online/offline hooks into presence
changes. The service does the counting, ordering and publishing; this adapter
only picks the principal off the session.

It uses the synchronous hooks (called the moment CONNACK is sent or the
connection is closed), not on_client_connected/disconnected: those run after
awaits (inbox set-up, will) and could report two clients' changes out of order.

Transient clients (label `cli-...`, docs/PROTOCOL.md, Presence) are left out on
both hooks: a one-shot command's connection lasts a moment, and counting it
would show its user online and offline again to every contact. Both hooks see
the same client id, so a transient connection never adds or removes a count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BasePlugin

from contract.ids import is_transient_client_id
from plugins.base import services_of


def counted_principal(session: Any) -> str | None:
    """The principal whose presence this connection counts for, or None."""
    principal = getattr(session, "principal", None)
    if not principal:
        return None
    client_id = getattr(session, "client_id", None)
    if isinstance(client_id, str) and is_transient_client_id(client_id):
        return None
    return str(principal)


class PresencePlugin(BasePlugin):  # type: ignore[type-arg]
    @dataclass
    class Config:
        pass

    def _presence(self) -> Any:
        return services_of(self).presence

    def on_client_online(self, session: Any) -> None:
        principal = counted_principal(session)
        presence = self._presence()
        if principal and presence is not None:
            presence.client_connected(principal)

    def on_client_offline(self, session: Any, reason: str) -> None:
        principal = counted_principal(session)
        presence = self._presence()
        if principal and presence is not None:
            presence.client_disconnected(principal, str(reason), getattr(session, "last_activity", None))
