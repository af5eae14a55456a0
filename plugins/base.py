"""How a plugin reaches the broker and the services (no global state: both hang
off the plugin's amqtt context, which amqtt copies from the broker's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.mqtt.hooks import BrokerApi
    from broker.services.runtime import Services


def broker_of(plugin: Any) -> "BrokerApi":
    return plugin.context._broker  # amqtt's BrokerContext keeps the broker here


def services_of(plugin: Any) -> "Services":
    return plugin.context._broker.services
