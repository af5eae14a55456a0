"""The services container: built once per broker by the composition root
(broker/app.py) and reached by plugins through `plugins.base.services_of`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.config import RoostConfig
from broker.services.identity import IdentityService
from broker.services.opstats import RequestStats
from broker.services.relations import Relations


@dataclass
class Services:
    config: RoostConfig
    store: Any                       # broker.store.sqlite.SqliteStore (or another engine)
    identity: IdentityService
    relations: Relations = field(default_factory=Relations)
    # IM requests by op (outcomes, latency): filled by plugins/im.py, read by broker/monitor.py
    request_stats: RequestStats = field(default_factory=RequestStats)
    # Filled in by their own modules' builders (see broker/app.py):
    messaging: Any = None            # broker.services.messaging.MessagingService
    social: Any = None               # broker.services.social.SocialService
    presence: Any = None             # broker.services.presence.PresenceService
    devices: Any = None              # broker.services.devices.DeviceService
    telemetry: Any = None            # broker.services.telemetry.TelemetryService
    homeassistant: Any = None        # broker.services.homeassistant.HomeAssistantService

    def all(self) -> list[Any]:
        """The service objects, in start order. Each has load/start/stop/ops and may
        have `async principal_added(id)` / `async principal_removed(id)`, called
        when an admin command adds or removes a principal (docs/ARCHITECTURE.md)."""
        return [s for s in (self.messaging, self.social, self.presence, self.devices,
                            self.telemetry, self.homeassistant) if s is not None]
