"""The engine's online/offline hooks (broker/mqtt/hooks.py), reported to the
cluster node: they are synchronous and come in the order connections start and
stop, so the node's numbered changes (take-over, will, presence counts) do too.
on_client_disconnected comes after the engine published a lost client's will:
only then do the other nodes forget it (a node killed in between has its
survivor publish it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BasePlugin

from broker.services.gateway import counted_principal
from plugins.base import broker_of


class ClusterPlugin(BasePlugin):  # type: ignore[type-arg]
    @dataclass
    class Config:
        pass

    def _node(self) -> Any:
        return getattr(broker_of(self), "cluster", None)

    def on_client_online(self, session: Any) -> None:
        node = self._node()
        if node is not None:
            node.client_online(session, counted_principal(session.principal, session.client_id))

    def on_client_offline(self, session: Any, reason: str) -> None:
        node = self._node()
        if node is not None:
            node.client_offline(session, str(reason), counted_principal(session.principal, session.client_id))

    async def on_client_disconnected(self, session: Any, reason: str) -> None:
        node = self._node()
        if node is not None:
            node.client_gone(session)
