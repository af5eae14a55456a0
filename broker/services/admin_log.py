"""Admin changes made while the broker runs, as bus events.

`roost user/device/service ...` may run in another process: it changes the
store and appends to its admin log. `AdminLogWatcher` reads that log every
`interval` seconds (the directory of IdentityService is refreshed for every
principal named) and publishes one event per change on the bus: this poll is
one producer of `PrincipalAdded`, `PrincipalRemoved` and `SecretChanged`
(broker/services/events.py). Consumers (the gateway closes a removed
principal's connections, every service forgets its state) subscribe to them.
"""

from __future__ import annotations

import asyncio
import logging

from broker.services.base import cancel_and_wait
from broker.services.events import Event, EventBus, PrincipalAdded, PrincipalRemoved, SecretChanged
from broker.services.identity import IdentityService

log = logging.getLogger("roost.auth")

ADMIN_POLL_SECONDS = 0.5


def admin_event(principal_id: str, action: str) -> Event | None:
    """The bus event of one admin-log row (None: an action nobody needs to hear of)."""
    if action == "added":
        return PrincipalAdded(principal_id)
    if action == "removed":
        return PrincipalRemoved(principal_id)
    if action == "passwd":
        return SecretChanged(principal_id, "password")
    if action == "pairing":
        return SecretChanged(principal_id, "pairing")
    return None


class AdminLogWatcher:
    def __init__(self, identity: IdentityService, bus: EventBus, *, interval: float = ADMIN_POLL_SECONDS) -> None:
        self._identity = identity
        self._bus = bus
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Changes from now on are published (earlier ones are in what services loaded)."""
        position = await self._identity.admin_log_head()
        self._task = asyncio.get_running_loop().create_task(self._poll(position), name="roost-admin-log")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _poll(self, position: int) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                changes = await self._identity.admin_changes(position)
            except Exception:  # noqa: BLE001 - keep polling; the store may be busy
                log.exception("reading the admin log failed")
                continue
            for seq, principal_id, action in changes:
                position = seq
                event = admin_event(principal_id, action)
                if event is not None:
                    await self._bus.publish(event)   # a failing consumer is logged by the bus
