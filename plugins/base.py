"""How a plugin reaches the broker and the services (no global state: both hang
off the plugin's amqtt context, which amqtt copies from the broker's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.mqtt.hooks import BrokerApi
    from broker.services.runtime import Services


def broker_of(plugin: Any) -> BrokerApi:
    ctx = plugin.context
    # RoostBroker sets `_broker` once amqtt's Broker.__init__ returned; while plugins
    # are being built inside it, amqtt's own `_broker_instance` is the same object.
    broker = getattr(ctx, "_broker", None)
    return broker if broker is not None else ctx._broker_instance


def services_of(plugin: Any) -> Services:
    return broker_of(plugin).services  # type: ignore[attr-defined]
