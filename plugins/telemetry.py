"""Telemetry plugin: device publishes on `roost/telemetry/<device>` go to the
telemetry service (validation, InfluxDB, latest readings).

Accepted telemetry continues to the device's owners and sharees (the ACL decides
who may subscribe); malformed telemetry, or telemetry published under another
device's name, is counted and consumed so nobody receives it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BasePlugin

from contract import topics
from plugins.base import services_of


class TelemetryPlugin(BasePlugin):  # type: ignore[type-arg]
    publish_prefixes = (topics.TELEMETRY,)

    @dataclass
    class Config:
        pass

    async def on_client_publish(self, session: Any, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        telemetry = services_of(self).telemetry
        if telemetry is None:
            return False
        device = topics.tail(topic, topics.TELEMETRY)
        principal = getattr(session, "principal", None)
        if device is None:
            telemetry.refuse(str(principal), f"bad telemetry topic {topic[:80]!r}")
            return True
        if principal != device:
            telemetry.refuse(device, f"published by {principal!r}, not by the device itself")
            return True
        return not telemetry.accept(device, bytes(payload))
