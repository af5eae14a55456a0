"""Committed domain events and the bus they travel on.

Every state change that another service, another front end or another node
must learn about is published here as a typed, frozen event, *after* the
store committed it. Consumers subscribe by event type instead of calling each
other, so a service never needs a reference to the one that reacts to it.

The bus is the seam of the cluster: `EventBus` is the Protocol services see;
`InProcessBus` is the single-process implementation, and broker/cluster/bus.py
also sends the relation events and mailbox events to the other nodes. Events
are plain dataclasses of strings, numbers and tuples, so they serialise as they
are. A relation event (contacts, blocks, groups, device shares) is applied to the
in-memory indexes (relations.py, the blocks, the device users) by a handler of
the service that owns them, the same on the node that made the change and on
every other one: one path, so the nodes' indexes agree.

Delivery rules (both implementations keep them):
- handlers of one event type run in the order they subscribed (the composition
  root, broker/app.py, builds services in a fixed order, so this order is fixed);
- `await bus.publish(event)` runs every handler before it returns: a synchronous
  handler is called, an asynchronous one awaited. When no handler suspends, the
  publisher does not yield to the loop either (the inbox pushers are offered a
  message before its `send` is answered);
- `bus.publish_nowait(event)` is for synchronous producers (a lifecycle hook, a
  telemetry publish on the hot path): synchronous handlers run at once,
  coroutines are scheduled as tasks, at most `max_pending` at a time (beyond
  that they are dropped, counted and logged: the bus never grows without bound);
- a failing handler is logged (with its traceback) and counted; it never fails
  the publisher nor keeps the other handlers from running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from broker.store.base import LatestReading, MailboxEvent

log = logging.getLogger("roost.events")


# ---- the events -------------------------------------------------------------------

@dataclass(slots=True)   # published per message: not frozen, like the MailboxEvents it carries (store/base.py)
class MailboxAppended:
    """Events were committed to mailboxes (a message, a receipt, a contact
    request, a `dropped` announcement...), in commit order."""
    events: tuple[MailboxEvent, ...]


@dataclass(frozen=True, slots=True)
class ContactChanged:
    """Two people became contacts (`accepted`) or stopped being ones."""
    a: str
    b: str
    accepted: bool


@dataclass(frozen=True, slots=True)
class BlockChanged:
    """`blocker` blocked (`blocked` True) or unblocked `target`."""
    blocker: str
    target: str
    blocked: bool


@dataclass(frozen=True, slots=True)
class GroupChanged:
    """A group's members are now `members` (empty: the group is gone)."""
    group_id: str
    members: frozenset[str]


@dataclass(frozen=True, slots=True)
class DeviceShared:
    """`principal` may now use `device` as `role` (owner or sharee), shared by
    `granted_by` (None: claimed with the pairing code) at `since`."""
    device: str
    principal: str
    role: str
    granted_by: str | None = None
    since: float = 0.0


@dataclass(frozen=True, slots=True)
class DeviceUnshared:
    device: str
    principal: str


@dataclass(frozen=True, slots=True)
class ProfileChanged:
    """`principal` set its profile: its `name` and `status` are now these."""
    principal: str
    name: str
    status: str


@dataclass(frozen=True, slots=True)
class PrincipalAdded:
    """A principal was registered (an admin command, maybe in another process)."""
    principal: str


@dataclass(frozen=True, slots=True)
class PrincipalRemoved:
    """A principal was removed: its connections, sessions and state must go."""
    principal: str


@dataclass(frozen=True, slots=True)
class SecretChanged:
    """A principal's password (`what` = "password") or a device's pairing code
    (`what` = "pairing") was replaced; the identity directory has the new one."""
    principal: str
    what: str


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    """A principal's presence as published on roost/presence/<principal>
    (`state` is the wire document; do not change it)."""
    principal: str
    state: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RetainedChanged:
    """A retained message was set (`payload` non-empty) or cleared on `topic`,
    published once its store write committed (broker/mqtt/retained.py owns
    retained messages; broker/server.py puts its commits on the bus). Changes
    of one topic coalesce before the write, and one replaced while its write was
    under way is not told: a consumer hears only what was the current value."""
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class TelemetryReceived:
    """A device's telemetry was accepted; `latest` is its newest reading of every
    field, `{"ts": ..., field: value}` (do not change it). Not stored when
    published: latest readings are written behind."""
    device: str
    latest: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TelemetrySaved:
    """Devices' newest readings were written to the store (the write-behind
    flush of telemetry.py, about once a second): the other nodes' copies, which
    answer `devices` there, follow."""
    readings: tuple[LatestReading, ...]


Event = (MailboxAppended | ContactChanged | BlockChanged | GroupChanged | DeviceShared | DeviceUnshared
         | ProfileChanged | PrincipalAdded | PrincipalRemoved | SecretChanged | PresenceChanged | RetainedChanged
         | TelemetryReceived | TelemetrySaved)

E = TypeVar("E")
Handler = Callable[[E], Awaitable[None] | None]


class EventBus(Protocol):
    """Where committed events are published and consumed (see the module docstring)."""

    def subscribe(self, event_type: type[E], handler: Handler[E]) -> None: ...

    async def publish(self, event: Event) -> None: ...

    def publish_nowait(self, event: Event) -> None: ...


class InProcessBus:
    """The bus of one broker process: handlers are called on the event loop."""

    def __init__(self, *, max_pending: int = 10000) -> None:
        self._handlers: dict[type[Any], list[Callable[[Any], Awaitable[None] | None]]] = {}
        self._max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()
        self.failures = 0          # handler calls that raised
        self.dropped = 0           # publish_nowait coroutines refused past max_pending

    def subscribe(self, event_type: type[E], handler: Handler[E]) -> None:
        self._handlers.setdefault(event_type, []).append(handler)

    def subscribers(self, event_type: type[Any]) -> int:
        return len(self._handlers.get(event_type, ()))

    async def publish(self, event: Event) -> None:
        for handler in self._handlers.get(type(event), ()):
            try:
                result = handler(event)
                if result is not None:
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one consumer's bug must not fail a committed change
                self._failed(handler, event)

    def publish_nowait(self, event: Event) -> None:
        for handler in self._handlers.get(type(event), ()):
            try:
                result = handler(event)
            except Exception:  # noqa: BLE001 - as in publish
                self._failed(handler, event)
                continue
            if result is not None:
                self._schedule(handler, event, result)

    async def drain(self) -> None:
        """Wait for the handlers publish_nowait scheduled (at shutdown, in tests)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _schedule(self, handler: Any, event: Event, result: Awaitable[None]) -> None:
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            if asyncio.iscoroutine(result):
                result.close()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("event bus: %d handler(s) still running; %s for %s dropped (%d so far)",
                            len(self._pending), type(event).__name__, _name(handler), self.dropped)
            return

        async def run() -> None:
            try:
                await result
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged like a synchronous failure
                self._failed(handler, event)

        task = asyncio.get_running_loop().create_task(run(), name=f"event-{type(event).__name__}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _failed(self, handler: Any, event: Event) -> None:
        self.failures += 1
        log.exception("event handler %s failed on %s", _name(handler), type(event).__name__)


def _name(handler: Any) -> str:
    return str(getattr(handler, "__qualname__", handler))
