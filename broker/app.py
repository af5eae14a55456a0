"""Composition root: config -> store -> services -> RoostBroker with plugins.

`serve(config)` first makes sure it can serve, each failure a StartupError
(one line, broker/startup.py): TLS files and listener sockets, then the store's
lock, then the store. It serves until SIGINT/SIGTERM, then shuts down cleanly:
listeners close, every acknowledged write is already committed (writes are
acknowledged only after COMMIT), and the store is closed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from broker.config import RoostConfig
from broker.services.identity import IdentityService
from broker.services.runtime import Services
from broker.startup import StoreLock, open_store, release_free_heap

if TYPE_CHECKING:
    from broker.server import Listening

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
    if config.cluster is not None:
        plugins["broker.cluster.plugin.ClusterPlugin"] = {}
    return plugins


def http_app_of(config: RoostConfig, monitor: Any, services: Services) -> Any:
    """The aiohttp app factory of the http listeners (figures and the web app);
    aiohttp and prometheus-client (~13 MB) are imported only when there is one."""
    if not any(lst.type == "http" for lst in config.listeners.values()):
        return None
    from broker.http.app import HttpApp
    from broker.web.app import WebApp

    return HttpApp(monitor, WebApp(services)).application


async def build_services(config: RoostConfig) -> Services:
    store = await open_store(config.resolve(config.storage.path), config.storage)
    jwt = None
    if config.auth.jwt is not None:
        # PyJWT and cryptography (~9 MB) are loaded only when JWT logins are configured
        from broker.services.jwt_auth import build_verifier, startup_warnings

        jwt = build_verifier(config.auth.jwt, config.resolve)   # load_config checked it already
        for warning in startup_warnings(config.auth.jwt):
            log.warning("%s", warning)
    identity = IdentityService(store.identity, jwt=jwt)
    await identity.load()
    services = Services(config=config, store=store, identity=identity)
    if config.cluster is not None:
        from broker.cluster.bus import ClusterBus

        # domain events are facts about the store: shared only when the nodes share one
        services.bus = ClusterBus(share=getattr(config.storage, "backend", "sqlite") == "postgres")
    if config.homeassistant.enabled:
        services.relations.integration_account = config.homeassistant.service_account
    # Each service module builds itself from the container; imported here so a
    # lower layer never imports a higher one.
    from broker.services.admin_log import AdminLogWatcher
    from broker.services.devices import DeviceService
    from broker.services.files import FileService
    from broker.services.gateway import Gateway
    from broker.services.messaging import MessagingService
    from broker.services.presence import PresenceService
    from broker.services.social import SocialService
    from broker.services.telemetry import TelemetryService
    from broker.store.factory import create_blob_store

    # Built in this order because bus handlers run in the order they subscribed:
    # the gateway (a removed principal loses its access and connections) before
    # the services (which then forget its state), in the order of Services.all().
    services.gateway = Gateway(services)
    services.admin_log = AdminLogWatcher(identity, services.bus)
    services.messaging = MessagingService(services)
    services.social = SocialService(services)
    services.presence = PresenceService(services)
    services.devices = DeviceService(services)
    services.telemetry = TelemetryService(services)
    services.files = FileService(services, create_blob_store(config.storage, store, config.files_dir()))
    if config.homeassistant.enabled:
        from broker.services.homeassistant import HomeAssistantService

        services.homeassistant = HomeAssistantService(services)
    return services


async def start(config: RoostConfig, listening: dict[str, Listening] | None = None) -> tuple[Any, Services]:
    """Build and start everything on the sockets of `listening` (bound at
    broker start when None); returns (broker, services)."""
    from broker.monitor import Monitor
    from broker.server import RoostBroker
    from broker.sys_publisher import SysPublisher

    services = await build_services(config)
    try:
        for svc in services.all():
            await svc.load()
        monitor = Monitor(config, services)
        session_store: Any = services.store.sessions
        if config.cluster is not None:   # the nodes may share one store: each keeps its own sessions
            from broker.cluster.sessions import NodeSessions

            session_store = NodeSessions(session_store, config.cluster.node)
        broker = RoostBroker(config, plugins=plugin_list(config), services=services,
                             retained_store=services.store.retained, session_store=session_store,
                             listening=listening, http_app=http_app_of(config, monitor, services))
        broker.monitor = monitor
        monitor.attach(broker, SysPublisher(broker.publish) if config.sys_interval > 0 else None)
        broker.cluster = None
        if config.cluster is not None:
            from broker.cluster.bus import ClusterBus
            from broker.cluster.node import ClusterNode

            assert isinstance(services.bus, ClusterBus)   # build_services made it
            broker.cluster = ClusterNode(config.cluster, bus=services.bus)
            # before start: loaded sessions announce their filters
            broker.cluster.attach(broker, session_store)
            if services.presence is not None:   # one node publishes each principal's presence
                from broker.services.presence import ClusterView

                node = broker.cluster
                services.presence.join_cluster(ClusterView(owns=node.owns_presence, retained=node.retained_presence))
                node.on_remote_conns = services.presence.clients_elsewhere
                node.on_presence_owners = services.presence.owners_changed
            if services.bus.share and services.messaging is not None:   # mailbox events: only to their pushers
                broker.cluster.watch_mailboxes(services.messaging.inboxes, always=(
                    (config.homeassistant.service_account,) if config.homeassistant.enabled else ()))
            # on NATS before the engine loads retained messages from the store: a change
            # another node commits meanwhile is applied here, none falls in between
            await broker.cluster.start()
        await broker.start()
    except BaseException:
        await services.store.close()   # nothing is served: close the store cleanly
        raise
    assert services.gateway is not None and services.admin_log is not None
    await services.gateway.start(broker)
    await services.admin_log.start()   # admin commands of other processes, as bus events
    for svc in services.all():
        await svc.start(broker)
    await monitor.start()   # ready (/readyz) from here; the first $SYS publication
    return broker, services


async def stop(broker: Any, services: Services) -> None:
    if broker.monitor is not None:
        await broker.monitor.stop()   # not ready from here on
    if services.admin_log is not None:
        await services.admin_log.stop()
    for svc in reversed(services.all()):
        try:
            await svc.stop()
        except Exception:  # noqa: BLE001 - keep shutting the rest down
            log.exception("stopping %s failed", type(svc).__name__)
    await broker.shutdown()
    cluster = getattr(broker, "cluster", None)
    if cluster is not None:
        cluster.leave()   # after its connections closed: the others heard each one go
        await cluster.stop()
    await services.store.close()


EVENT_LOOP_ENV = "ROOST_EVENT_LOOP"   # "asyncio": the standard library's loop even with uvloop installed


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The broker's loop: uvloop when installed (its transports are C objects, about
    half the memory per idle connection of asyncio's, and its loop turn is cheaper;
    bench/RESULTS.md), asyncio's own with ROOST_EVENT_LOOP=asyncio or without uvloop."""
    if os.environ.get(EVENT_LOOP_ENV, "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(config: RoostConfig) -> None:
    """`roost serve`: serve(config) on new_event_loop() until SIGINT/SIGTERM."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(config))


async def serve(config: RoostConfig, ready: asyncio.Event | None = None) -> None:
    from broker.server import bind_listeners

    # Ports and TLS files before anything on disk: a busy port leaves no store
    # behind. (Blocking name lookups here are fine: nothing is served yet.)
    listening = bind_listeners(config)
    try:
        # One `roost serve` per SQLite store; admin commands open it without the lock.
        # A PostgreSQL store is shared by design (a cluster's nodes): no local lock.
        if config.storage.backend != "sqlite":
            await _serve(config, listening, ready)
            return
        with StoreLock(config.resolve(config.storage.path)):
            await _serve(config, listening, ready)
    finally:
        for lst in listening.values():
            lst.close()


async def _serve(config: RoostConfig, listening: dict[str, Listening], ready: asyncio.Event | None) -> None:
    broker, services = await start(config, listening)
    for name, port in broker.bound_ports().items():
        log.info("listener %s on %s (port %d)", name, config.listeners[name].bind, port)
    if not await services.identity.list():
        log.warning("the store is empty: add the first principal with "
                    "`roost user add alice --password-stdin` (see README, 'First steps')")
    log.info("roost is serving")
    release_free_heap()
    # What start-up made (modules, config, services: ~36,000 objects) lives as long as
    # the process: out of the cyclic collector's full passes, which took ~10 ms each
    # (a latency spike for every message in flight then; issue 16)
    gc.freeze()
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
