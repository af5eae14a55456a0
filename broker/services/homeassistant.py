"""Home Assistant integration: discovery, availability, state and commands.

With `homeassistant.enabled`, every registered device appears in Home Assistant
without hand configuration, with entities from its kind in the catalogue
(contract/catalog.py; a kind it does not describe gets a generic one)
(PROTOCOL.md, "Home Assistant"; payloads in homeassistant_discovery.py):

- discovery: retained `<prefix>/device/<id>/config`, published after broker
  start, again whenever Home Assistant announces `online` on `<prefix>/status`,
  and whenever a periodic check (`resync_interval`) finds a device added,
  changed or removed by an admin command (those run in another process). A
  removed device's discovery, availability and state are cleared (empty retained
  payloads), so no ghost entities remain; at start, retained discovery left by
  Roost for devices that no longer exist is cleared too.
- availability: retained `online`/`offline` on `roost/ha/<id>/availability`,
  mirrored from presence (`PresenceChanged` on the bus).
- state: retained JSON on `roost/ha/<id>/state` with the newest value of every
  field, updated from telemetry and from the data of the device's `result`
  answers to the integration's commands. Coalesced per device: a chatty device
  costs one publish per round of the publisher task, never a growing queue; and
  a document identical to the one last published is not sent again, so a
  command costs one publish although both the device's telemetry and its
  `result` carry the change.
- commands: what the integration's service account publishes on
  `roost/ha/<id>/set` is translated to a catalogue command and sent to the device
  as a `command` message from that account, through the messaging service's
  `send` (so it is stored, delivered and answered like any other command).
  Commands wait in a bounded queue; overflow is counted and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from broker.services.base import Caller, Publisher, cancel_and_wait
from broker.services.events import (
    MailboxAppended,
    PresenceChanged,
    PrincipalAdded,
    PrincipalRemoved,
    TelemetryReceived,
)
from broker.services.homeassistant_discovery import (
    BadSetPayload,
    HaCommand,
    Origin,
    command_from_set,
    discovery_payload,
    discovery_topic,
    encode,
    is_ours,
    read_origin,
    status_topic,
)
from broker.services.telemetry_influx import RateLimitedLog
from contract import topics
from contract.catalog import DeviceKind, kind_or_generic
from contract.errors import ProtocolError
from contract.presence import OFFLINE, ONLINE

if TYPE_CHECKING:
    from broker.services.runtime import Services

log = logging.getLogger("roost.homeassistant")
_MISSING = object()   # a field the state does not have yet (None is a value)


@dataclass
class HaStats:
    discovery_published: int = 0
    discovery_removed: int = 0
    availability_published: int = 0
    state_published: int = 0
    commands_sent: int = 0
    commands_refused: int = 0     # bad payload, not the integration account, unknown device, send refused
    commands_dropped: int = 0     # command queue full
    results_applied: int = 0
    publish_errors: int = 0


class HomeAssistantService:
    def __init__(self, services: Services, *, command_queue: int = 1000) -> None:
        cfg = services.config.homeassistant
        self._services = services
        # Heard only between start and stop (every handler checks `_stopped`).
        bus = services.bus
        bus.subscribe(TelemetryReceived, lambda event: self._on_telemetry(event.device, event.latest))
        bus.subscribe(PresenceChanged, lambda event: self._on_presence(event.principal, event.state))
        bus.subscribe(MailboxAppended, lambda event: self._on_events(event.events))
        bus.subscribe(PrincipalAdded, lambda event: self.principal_added(event.principal))
        bus.subscribe(PrincipalRemoved, lambda event: self.principal_removed(event.principal))
        self.account: str = cfg.service_account
        self.prefix: str = cfg.discovery_prefix
        self.status_topic = status_topic(self.prefix)
        self._resync_interval = max(0.1, cfg.resync_interval)
        self._publisher: Publisher | None = None
        self._discovered: dict[str, bytes] = {}          # device -> discovery payload retained now
        self._kinds: dict[str, DeviceKind] = {}
        self._availability: dict[str, str] = {}
        self._state: dict[str, dict[str, Any]] = {}
        self._state_dirty: dict[str, None] = {}          # ordered set of devices whose state must go out
        self._state_sent: dict[str, bytes] = {}          # device -> state document retained now
        self._origin = Origin()                          # read_origin() at start
        self._state_wake = asyncio.Event()
        self._commands: asyncio.Queue[tuple[str, str, HaCommand]] = asyncio.Queue(command_queue)
        self._sync_lock = asyncio.Lock()
        self._birth_pending = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = True
        self._stats = HaStats()
        self._refused_log = RateLimitedLog(log)

    # ---- lifecycle -------------------------------------------------------------
    async def load(self) -> None:
        pass

    async def start(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._stopped = False
        self._origin = await asyncio.to_thread(read_origin)   # reads package metadata / pyproject.toml
        s = self._services
        account = await s.identity.get(self.account)
        if account is None or account.kind != "service":
            log.warning("Home Assistant integration account %r is not a registered service: "
                        "create it with `roost service add %s`", self.account, self.account)
        await self._clear_stale_retained()
        await self.sync(force=True)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._state_loop(), name="ha-state"),
                       loop.create_task(self._command_loop(), name="ha-commands"),
                       loop.create_task(self._resync_loop(), name="ha-resync")]
        log.info("Home Assistant discovery on %s/device/+/config for %d device(s); commands from %r",
                 self.prefix, len(self._discovered), self.account)

    async def stop(self) -> None:
        if self._stopped:
            return
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        # The broker is going away and every device with it: say so while we still can.
        for device in list(self._discovered):
            await self._set_availability(device, OFFLINE)
        self._stopped = True

    def ops(self) -> dict[str, Any]:
        return {}

    def stats(self) -> dict[str, int]:
        return asdict(self._stats)

    # ---- discovery ---------------------------------------------------------------
    async def sync(self, *, force: bool = False) -> None:
        """Make the retained discovery match the registered devices. `force`
        republishes everything (Home Assistant came online, broker start)."""
        async with self._sync_lock:
            devices = await self._services.identity.list("device")
            wanted = {p.id: p for p in devices}
            for device in [d for d in self._discovered if d not in wanted]:
                await self._remove(device)
            for device, p in wanted.items():
                kind = kind_or_generic(p.device_kind)
                payload = encode(discovery_payload(device=device, name=p.name, room=p.room, kind=kind,
                                                   origin=self._origin))
                if not force and self._discovered.get(device) == payload:
                    continue
                fresh = device not in self._discovered
                self._kinds[device] = kind
                if await self._publish(discovery_topic(self.prefix, device), payload):
                    self._discovered[device] = payload
                    self._stats.discovery_published += 1
                online = self._services.presence is not None and self._services.presence.is_online(device)
                await self._set_availability(device, ONLINE if online else OFFLINE, always=force or fresh)
                if fresh and self._services.telemetry is not None:
                    latest = self._services.telemetry.latest(device)
                    if latest:
                        self._state.setdefault(device, {}).update(latest)
                if force:
                    self._state_sent.pop(device, None)   # republished in full, like the discovery
                if self._state.get(device):
                    self._mark_state(device)

    async def _remove(self, device: str) -> None:
        self._discovered.pop(device, None)
        self._kinds.pop(device, None)
        self._availability.pop(device, None)
        self._state.pop(device, None)
        self._state_dirty.pop(device, None)
        self._state_sent.pop(device, None)
        for topic in (discovery_topic(self.prefix, device), topics.ha_availability(device), topics.ha_state(device)):
            await self._publish(topic, b"")
        self._stats.discovery_removed += 1
        log.info("Home Assistant discovery removed for %s (device no longer registered)", device)

    async def _clear_stale_retained(self) -> None:
        """Discovery Roost retained for devices removed while the broker was down."""
        head = f"{self.prefix}/device/"
        registered = {p.id for p in await self._services.identity.list("device")}
        for msg in await self._services.store.retained.load_all():
            if not (msg.topic.startswith(head) and msg.topic.endswith("/config")):
                continue
            device = msg.topic[len(head):-len("/config")]
            if "/" in device or device in registered or not msg.payload or not is_ours(msg.payload):
                continue
            await self._remove(device)

    def home_assistant_status(self, principal: str | None, payload: bytes) -> None:
        """Home Assistant's birth/will on `<prefix>/status`: republish on `online`
        (from the integration account only: anyone else's is ignored)."""
        if payload.strip().lower() != b"online" or self._stopped or principal != self.account:
            return
        if self._birth_pending:
            return   # one republish is already queued; it will see every device
        self._birth_pending = True

        async def republish() -> None:
            try:
                await self.sync(force=True)
            finally:
                self._birth_pending = False

        task = asyncio.get_running_loop().create_task(republish(), name="ha-birth")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def principal_added(self, principal: str) -> None:
        await self.device_changed(principal)

    async def principal_removed(self, principal: str) -> None:
        await self.device_changed(principal)

    async def device_changed(self, device: str) -> None:
        """An admin added, changed or removed `device` (called by whoever notices first)."""
        await self.sync()

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self._resync_interval)
            try:
                await self.sync()
            except Exception:  # try again next round
                log.exception("Home Assistant resync failed")

    # ---- availability (presence listener) -------------------------------------------
    async def _on_presence(self, principal: str, wire: dict[str, Any]) -> None:
        if self._stopped or principal not in self._discovered:
            return
        await self._set_availability(principal, ONLINE if wire.get("state") == ONLINE else OFFLINE)

    async def _set_availability(self, device: str, state: str, *, always: bool = False) -> None:
        if not always and self._availability.get(device) == state:
            return
        self._availability[device] = state
        if await self._publish(topics.ha_availability(device), state.encode()):
            self._stats.availability_published += 1

    # ---- state ----------------------------------------------------------------------
    def _on_telemetry(self, device: str, latest: dict[str, Any]) -> None:
        if self._stopped or device not in self._kinds:
            return
        self._state.setdefault(device, {}).update(latest)
        self._mark_state(device)

    def _on_events(self, events: Iterable[Any]) -> None:
        """Mailbox events just committed; results of the devices to the integration update state."""
        if self._stopped:
            return
        for e in events:
            if e.principal != self.account:
                continue
            doc = e.doc
            if doc.get("kind") != "msg":
                continue
            device = doc.get("from")
            kind = self._kinds.get(device)
            body = doc.get("body")
            if isinstance(body, str):
                try:
                    body = json.loads(body)
                except ValueError:
                    continue
            if kind is None or not isinstance(body, dict) or body.get("type") != "result":
                continue
            data = body.get("data")
            if body.get("status") != "ok" or not isinstance(data, dict):
                continue
            # a generic kind has no field list: any flat value is state
            update = {k: v for k, v in data.items() if kind.field(k) is not None
                      or (kind.open_commands and isinstance(v, (bool, int, float, str)))}
            if not update:
                continue
            self._stats.results_applied += 1
            state = self._state.setdefault(device, {})
            # Usually the device's telemetry brought the change already: no second publish.
            if any(state.get(k, _MISSING) != v for k, v in update.items()):
                state.update(update)
                self._mark_state(device)

    def _mark_state(self, device: str) -> None:
        self._state_dirty[device] = None
        self._state_wake.set()

    def _state_doc(self, device: str, state: dict[str, Any]) -> dict[str, Any]:
        """The state document; a light also gets `state: ON|OFF`, the form Home
        Assistant's JSON-schema lights and Zigbee2MQTT-style tools read."""
        kind = self._kinds.get(device)
        if kind is not None and kind.ha_component == "light" and isinstance(state.get("on"), bool):
            return {**state, "state": "ON" if state["on"] else "OFF"}
        return state

    async def _state_loop(self) -> None:
        while True:
            await self._state_wake.wait()
            self._state_wake.clear()
            while self._state_dirty:
                device = next(iter(self._state_dirty))
                del self._state_dirty[device]
                state = self._state.get(device)
                if state is None:
                    continue
                payload = encode(self._state_doc(device, state))
                if self._state_sent.get(device) == payload:
                    continue   # nothing changed since the last publish
                if await self._publish(topics.ha_state(device), payload):
                    self._state_sent[device] = payload
                    self._stats.state_published += 1

    # ---- commands ------------------------------------------------------------------
    def command(self, principal: str | None, client_id: str, device: str, payload: bytes) -> None:
        """A publish on roost/ha/<device>/set (plugin, event loop, must not block)."""
        if principal != self.account:
            self._refuse(device, f"from {principal!r}, not the integration account")
            return
        kind = self._kinds.get(device)
        if kind is None:
            self._refuse(device, "no such device in Home Assistant discovery")
            return
        try:
            cmd = command_from_set(kind, payload)
        except BadSetPayload as exc:
            self._refuse(device, str(exc))
            return
        try:
            self._commands.put_nowait((client_id, device, cmd))
        except asyncio.QueueFull:
            self._stats.commands_dropped += 1
            self._refused_log.warning("Home Assistant command queue full: %s for %s dropped (%d so far)",
                                      cmd.name, device, self._stats.commands_dropped)

    def _refuse(self, device: str, reason: str) -> None:
        self._stats.commands_refused += 1
        self._refused_log.warning("Home Assistant command for %s refused: %s", device, reason)

    async def _command_loop(self) -> None:
        while True:
            client_id, device, cmd = await self._commands.get()
            caller = Caller(principal=self.account, kind="service", client_id=client_id)
            params = {"to": device, "cmid": f"ha-{secrets.token_hex(8)}",
                      "body": {"type": "command", "name": cmd.name, "args": cmd.args}}
            try:
                messaging = self._services.messaging
                if messaging is None:
                    raise RuntimeError("no messaging service to send commands through")
                await messaging.op_send(caller, params)
                self._stats.commands_sent += 1
            except ProtocolError as exc:
                self._refuse(device, f"send failed: {exc.code}: {exc.message}")
            except Exception:  # one failed command must not stop the loop
                self._stats.commands_refused += 1
                log.exception("Home Assistant command %s for %s failed", cmd.name, device)

    # ---- publishing ------------------------------------------------------------------
    async def _publish(self, topic: str, payload: bytes) -> bool:
        if self._publisher is None:
            return False
        try:
            await self._publisher.publish(topic, payload, qos=1, retain=True)
            return True
        except Exception:  # a failed publish is retried by the next sync/update
            self._stats.publish_errors += 1
            log.exception("publishing %s failed", topic)
            return False
