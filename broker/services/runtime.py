"""The services container: built once per broker by the composition root
(broker/app.py) and reached by plugins through `plugins.base.services_of`.

Services find each other here and react to each other through `bus` (committed
events, broker/services/events.py), never by probing for methods."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from broker.config import RoostConfig
from broker.services.base import Handler, Publisher
from broker.services.events import EventBus, InProcessBus
from broker.services.identity import IdentityService
from broker.services.opstats import RequestStats
from broker.services.relations import Relations
from broker.store.base import Store

if TYPE_CHECKING:
    from broker.services.admin_log import AdminLogWatcher
    from broker.services.devices import DeviceService
    from broker.services.files import FileService
    from broker.services.gateway import Gateway
    from broker.services.homeassistant import HomeAssistantService
    from broker.services.messaging import MessagingService
    from broker.services.presence import PresenceService
    from broker.services.social import SocialService
    from broker.services.telemetry import TelemetryService


class Service(Protocol):
    """What every service object offers (docs/ARCHITECTURE.md, Service objects)."""

    async def load(self) -> None: ...

    async def start(self, publisher: Publisher) -> None: ...

    async def stop(self) -> None: ...

    def ops(self) -> dict[str, Handler]: ...


@dataclass
class Services:
    config: RoostConfig
    store: Store                     # built by broker/store/factory.py (SQLite today)
    identity: IdentityService
    relations: Relations = field(default_factory=Relations)
    bus: EventBus = field(default_factory=InProcessBus)
    # Wall-clock seconds for everything a service stamps or expires (tests inject one).
    clock: Callable[[], float] = time.time
    # IM requests by op (outcomes, latency): filled by the gateway, read by broker/monitor.py
    request_stats: RequestStats = field(default_factory=RequestStats)
    # Filled in by their own modules' builders (see broker/app.py):
    gateway: Gateway | None = None
    admin_log: AdminLogWatcher | None = None
    messaging: MessagingService | None = None
    social: SocialService | None = None
    presence: PresenceService | None = None
    devices: DeviceService | None = None
    telemetry: TelemetryService | None = None
    files: FileService | None = None
    homeassistant: HomeAssistantService | None = None

    def all(self) -> list[Service]:
        """The service objects, in start order."""
        found: list[Service | None] = [self.messaging, self.social, self.presence, self.devices,
                                       self.telemetry, self.files, self.homeassistant]
        return [s for s in found if s is not None]
