"""Presence plugin: the engine's online/offline hooks, reported to the gateway
(broker/services/gateway.py, `connection_opened` / `connection_closed`), which
leaves out transient clients and drives the presence service.

It uses the synchronous hooks (called the moment CONNACK is sent or the
connection is closed), not on_client_connected/disconnected: those run after
awaits (inbox set-up, will) and could report two clients' changes out of order.

Transient clients (label `cli-...`, docs/PROTOCOL.md, Presence) are left out on
both hooks: both hooks see the same client id, so a transient connection never
adds or removes a count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BasePlugin

from broker.services.gateway import counted_principal as _counted
from plugins.base import services_of


def counted_principal(session: Any) -> str | None:
    """The principal whose presence this connection counts for, or None."""
    return _counted(getattr(session, "principal", None), getattr(session, "client_id", None))


class PresencePlugin(BasePlugin):  # type: ignore[type-arg]
    @dataclass
    class Config:
        pass

    def on_client_online(self, session: Any) -> None:
        gateway = services_of(self).gateway
        if gateway is not None:
            gateway.connection_opened(getattr(session, "principal", None), getattr(session, "client_id", None))

    def on_client_offline(self, session: Any, reason: str) -> None:
        gateway = services_of(self).gateway
        if gateway is not None:
            gateway.connection_closed(getattr(session, "principal", None), getattr(session, "client_id", None),
                                      str(reason), getattr(session, "last_activity", None))
