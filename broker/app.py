"""Composition root: config -> store -> services -> RoostBroker with plugins.

`run(config)` serves until SIGINT/SIGTERM, then shuts down cleanly: listeners
close, every acknowledged write is already committed (writes are acknowledged
only after COMMIT), and the store is closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from broker.config import RoostConfig
from broker.services.identity import IdentityService
from broker.services.runtime import Services
from broker.store.sqlite import SqliteStore

log = logging.getLogger("roost")


def plugin_list(config: RoostConfig) -> dict[str, dict[str, Any]]:
    """The amqtt plugins Roost runs, in the order their hooks are called."""
    plugins: dict[str, dict[str, Any]] = {
        "plugins.auth.RoostAuthPlugin": {},
        "plugins.acl.RoostAclPlugin": {},
        "plugins.im.RoostIMPlugin": {},
        "plugins.presence.PresencePlugin": {},
        "plugins.telemetry.TelemetryPlugin": {},
    }
    if config.homeassistant.enabled:
        plugins["plugins.homeassistant.HomeAssistantPlugin"] = {}
    return plugins


async def build_services(config: RoostConfig) -> Services:
    store = SqliteStore(config.resolve(config.storage.path))
    await store.open()
    jwt = config.auth.jwt.secret if config.auth.jwt else None
    identity = IdentityService(store.identity, jwt_secret=jwt)
    await identity.load()
    services = Services(config=config, store=store, identity=identity)
    if config.homeassistant.enabled:
        services.relations.integration_account = config.homeassistant.service_account
    # Each service module builds itself from the container; imported here so a
    # lower layer never imports a higher one.
    from broker.services.messaging import MessagingService
    from broker.services.social import SocialService
    from broker.services.presence import PresenceService
    from broker.services.devices import DeviceService
    from broker.services.telemetry import TelemetryService

    services.messaging = MessagingService(services)
    services.social = SocialService(services)
    services.presence = PresenceService(services)
    services.devices = DeviceService(services)
    services.telemetry = TelemetryService(services)
    if config.homeassistant.enabled:
        from broker.services.homeassistant import HomeAssistantService

        services.homeassistant = HomeAssistantService(services)
    return services



async def start(config: RoostConfig) -> tuple[Any, Services]:
    """Build and start everything; returns (broker, services)."""
    from broker.server import RoostBroker

    services = await build_services(config)
    for svc in services.all():
        await svc.load()
    broker = RoostBroker(config, plugins=plugin_list(config), services=services,
                         retained_store=services.store.retained, session_store=services.store.sessions)
    await broker.start()
    for svc in services.all():
        await svc.start(broker)
    return broker, services


async def stop(broker: Any, services: Services) -> None:
    for svc in reversed(services.all()):
        try:
            await svc.stop()
        except Exception:  # noqa: BLE001 - keep shutting the rest down
            log.exception("stopping %s failed", type(svc).__name__)
    await broker.shutdown()
    await services.store.close()


async def serve(config: RoostConfig, ready: asyncio.Event | None = None) -> None:
    broker, services = await start(config)
    for name, port in broker.bound_ports().items():
        log.info("listener %s on %s (port %d)", name, config.listeners[name].bind, port)
    if not await services.identity.list():
        log.warning("the store is empty: add the first principal with "
                    "`roost user add alice --password-stdin` (see README, 'First steps')")
    log.info("roost is serving")
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_event.set)
    if ready is not None:
        ready.set()
    await stop_event.wait()
    log.info("shutting down")
    await stop(broker, services)
    log.info("stopped")
