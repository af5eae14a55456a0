"""Presence: who is online, retained on `roost/presence/<principal>`.

Driven by the engine's lifecycle hooks through plugins/presence.py. A principal is
online while it has at least one connection. Connections are *counted* (not keyed
by client id): on a take-over the engine reports the new connection before the
old one's `taken_over` disconnect, so the count goes 1 -> 2 -> 1 and never
touches zero, hence no offline flicker. Transient clients (label `cli-...`,
one-shot CLI commands) are never reported here: plugins/presence.py leaves them
out on connect and disconnect alike.

Ordering: the count changes synchronously inside the hook, and the resulting
payload joins one FIFO that a single task publishes from, so states go out in
the order they happened (across all principals). The FIFO is bounded; when it
overflows the transition is counted and logged, and the principal is marked so
its *current* state is published once the backlog drains: the final retained
state is always right.

Cluster (broker/cluster/): every node counts every node's connections, but
one node speaks for each principal: its owner (rendezvous hashing over the
nodes alive, the same answer on each node once they have heard each other).
The owner publishes a principal's state whenever its count changes there, so
one publisher's in-order view decides the retained state even when clients
come and go on two nodes within one NATS hop. When the owners move (a node
joined, left, died, or the nodes resynchronised after a NATS outage), each
node goes over the principals it now owns and publishes the state of those
whose retained presence (held here) says otherwise.

Persistence: the last known state is written behind (batched, at most every
`flush_interval`) through the store's writer, and every `heartbeat` seconds the
store records that the broker is still alive (one row). After a restart (clean
or SIGKILL) everyone the store still lists as online is published `offline`
with `last_seen` = the last moment the old broker was known to be running
(they were connected until then), before any new state of theirs.
While the store cannot write (disk full, read-only) presence goes on in memory
and on the wire; the records stay dirty and are written once it can again, with
one log line for the outage rather than a traceback per flush.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.services.base import Handler, Publisher, cancel_and_wait
from broker.services.events import PresenceChanged, PrincipalRemoved
from broker.services.inbox import describe_failure
from broker.services.telemetry_influx import RateLimitedLog
from broker.store.base import PresenceRecord
from contract import topics
from contract.presence import OFFLINE, ONLINE

if TYPE_CHECKING:
    from broker.services.runtime import Services

log = logging.getLogger("roost.presence")


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What presence needs of a cluster node (broker/cluster/node.py)."""
    owns: Callable[[str], bool]               # this node publishes the principal's presence now
    retained: Callable[[str], bytes | None]   # the principal's retained presence payload held here


SWEEP_CHUNK = 1000   # principals looked at per loop turn when the owners moved


def presence_doc(payload: bytes | None) -> dict[str, Any] | None:
    """A retained presence payload's document, None if absent or unreadable."""
    if not payload:
        return None
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def said_of(payload: bytes | None) -> tuple[str, int] | None:
    """(state, clients) of a retained presence payload, None if absent or unreadable."""
    doc = presence_doc(payload)
    if doc is None:
        return None
    state, clients = doc.get("state"), doc.get("clients")
    if not isinstance(state, str) or not isinstance(clients, int):
        return None
    return state, clients


def _seconds(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


@dataclass(slots=True)
class _State:
    clients: int = 0
    state: str = OFFLINE
    since: float = 0.0
    last_seen: float = 0.0

    def wire(self) -> dict[str, Any]:
        return {"state": self.state, "clients": self.clients, "since": self.since, "last_seen": self.last_seen}


class PresenceService:
    def __init__(self, services: Services, *, queue_max: int = 10000, flush_interval: float = 1.0,
                 heartbeat: float = 5.0, clock: Callable[[], float] | None = None) -> None:
        self._services = services
        self._store = services.store.presence
        self._clock = clock if clock is not None else services.clock
        self._bus = services.bus
        self._bus.subscribe(PrincipalRemoved, self._principal_removed)
        self._states: dict[str, _State] = {}
        # (principal, wire state); None clears the retained presence of a removed principal
        self._queue: collections.deque[tuple[str, dict[str, Any] | None]] = collections.deque()
        self._queue_max = queue_max
        self._wakeup = asyncio.Event()
        self._drain_lock = asyncio.Lock()        # one drainer at a time keeps the order
        self._overflowed: set[str] = set()       # principals whose latest state must be republished
        self._dirty: set[str] = set()            # principals whose record must be persisted
        self._elsewhere: dict[str, int] = {}     # a cluster's other nodes: their connections by principal
        self._cluster: ClusterView | None = None
        self._said: dict[str, tuple[str, int]] = {}   # cluster: (state, clients) this node last published
        self._sweep: asyncio.Task[None] | None = None
        self._flush_interval = flush_interval
        self._heartbeat = heartbeat
        self._publisher: Publisher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        # counters (exposed for metrics/tests)
        self.published = 0
        self.overflows = 0
        self.publish_errors = 0
        self.persist_errors = 0
        self._failing_since: int | None = None   # persist_errors when the current outage began
        self._persist_log = RateLimitedLog(log, interval=60.0)

    # ---- lifecycle -------------------------------------------------------
    async def load(self) -> None:
        if self._services.config.cluster is not None:
            # One node of a cluster: who was online may still be, on another node, and a
            # dead node's clients are published by their owners (broker/cluster/node.py).
            for rec in await self._store.load_presence():
                self._states[rec.principal] = _State(since=rec.since, last_seen=rec.last_seen)
            for msg in await self._services.store.retained.load_all():
                # retained `online` but no record (both written behind): the owner's
                # sweep looks at it once the nodes know each other (owners_changed)
                principal = topics.tail(msg.topic, topics.PRESENCE)
                doc = presence_doc(msg.payload)
                if principal is not None and principal not in self._states and doc is not None:
                    seen = _seconds(doc.get("last_seen"))
                    self._states[principal] = _State(since=seen, last_seen=seen)
            return
        alive = await self._store.last_alive() or 0.0
        for rec in await self._store.load_presence():
            st = _State(clients=0, state=OFFLINE, since=rec.since, last_seen=rec.last_seen)
            if rec.state == ONLINE:
                # The broker went away while this principal was connected: it was
                # there until the old broker was last known alive.
                st.last_seen = max(rec.last_seen, alive)
                st.since = st.last_seen
                self._dirty.add(rec.principal)
                self._enqueue(rec.principal, st.wire())
            self._states[rec.principal] = st
        await self._reconcile_retained(alive)
        if self._queue:
            log.info("presence: %d principal(s) were online when the broker stopped; now offline", len(self._queue))

    async def _reconcile_retained(self, alive: float) -> None:
        """Both our records and the broker's retained messages are written
        behind, so a SIGKILL can leave a retained `online` that our records do
        not explain (or for a principal removed meanwhile): correct it."""
        for msg in await self._services.store.retained.load_all():
            principal = topics.tail(msg.topic, topics.PRESENCE)
            if principal is None:
                continue
            doc = presence_doc(msg.payload)
            if doc is None or doc.get("state") != ONLINE:
                continue
            if self._services.identity.get_cached(principal) is None:
                self._enqueue(principal, None)          # removed while the broker was down
                continue
            st = self._states.get(principal)
            if st is not None and st.state == OFFLINE and any(p == principal for p, _ in self._queue):
                continue                                 # already being corrected
            if st is None:
                seen = _seconds(doc.get("last_seen"))
                st = self._states[principal] = _State(state=OFFLINE, since=max(seen, alive),
                                                      last_seen=max(seen, alive))
                self._dirty.add(principal)
            self._enqueue(principal, st.wire())

    async def start(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._stopped = False
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._publish_loop(), name="presence-publish"),
                       loop.create_task(self._persist_loop(), name="presence-persist")]

    async def stop(self) -> None:
        """Everyone still connected is about to be disconnected by the shutdown:
        record (and announce) them offline now, while the broker still runs."""
        if self._stopped:
            return
        now = self._clock()
        for principal, st in self._states.items():
            if st.state != ONLINE:
                continue
            st.clients = self._elsewhere.get(principal, 0)   # > 0: still online on other nodes
            st.last_seen = now
            if not st.clients:
                st.state = OFFLINE
                st.since = now
            # (in a cluster the owners of the others hear this node leave and publish them)
            self._changed(principal, st)
        self._stopped = True
        if self._sweep is not None:
            await cancel_and_wait(self._sweep)
            self._sweep = None
        if self._publisher is None:
            await self._persist_once(alive_at=self._clock())
            return
        try:
            await asyncio.wait_for(self._drain(), timeout=5.0)
        except TimeoutError:
            log.warning("presence: %d state(s) not published before shutdown", len(self._queue))
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        await self._persist_once(alive_at=self._clock())

    def ops(self) -> dict[str, Handler]:
        return {}

    # ---- engine events (called by plugins/presence.py) --------------------
    def client_connected(self, principal: str) -> None:
        if self._stopped:
            return
        now = self._clock()
        st = self._states.setdefault(principal, _State())
        st.clients += 1
        st.last_seen = now
        if st.state != ONLINE:
            st.state = ONLINE
            st.since = now
        self._changed(principal, st)

    def client_disconnected(self, principal: str, reason: str = "", last_activity: float | None = None) -> None:
        """`last_activity`: when the client was last heard from, if the engine knows
        (a keepalive expiry is noticed well after it): last_seen is then that moment."""
        if self._stopped:
            return  # stop() already recorded everyone offline
        st = self._states.get(principal)
        if st is None or st.clients <= 0:
            # Normal right after forget() (the removed principal's connections
            # close after it); anything else would be an engine bug.
            log.debug("presence: disconnect of %s (%s) without a matching connect", principal, reason)
            return
        now = self._clock()
        st.clients -= 1
        if st.clients == 0:
            # the latest moment any of its clients was heard from
            st.last_seen = max(st.last_seen, min(last_activity, now)) if last_activity is not None else now
            st.state = OFFLINE
            st.since = st.last_seen
        else:
            st.last_seen = now
        self._changed(principal, st)

    # ---- a cluster (broker/cluster/node.py) ---------------------------------
    def join_cluster(self, view: ClusterView) -> None:
        """From now on this node publishes only the principals it owns."""
        self._cluster = view

    def clients_elsewhere(self, principal: str, delta: int) -> None:
        """`delta` connections of `principal` opened (> 0) or closed (< 0) on
        other nodes (a dead node's all at once): they count like local ones."""
        if self._stopped:
            return
        n = self._elsewhere.get(principal, 0) + delta
        if n > 0:
            self._elsewhere[principal] = n
        else:
            self._elsewhere.pop(principal, None)
        now = self._clock()
        st = self._states.setdefault(principal, _State())
        st.clients = max(0, st.clients + delta)
        st.last_seen = now
        if st.clients and st.state != ONLINE:
            st.state = ONLINE
            st.since = now
        elif not st.clients and st.state == ONLINE:
            st.state = OFFLINE
            st.since = now
        self._changed(principal, st)

    def owners_changed(self) -> None:
        """The nodes alive changed, or they synchronised again: the principals
        this node owns now are published where their retained state differs."""
        if self._stopped or self._cluster is None:
            return
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep = asyncio.get_running_loop().create_task(self._sweep_owned(), name="presence-owners")

    async def _sweep_owned(self) -> None:
        assert self._cluster is not None
        owns = self._cluster.owns
        for i, principal in enumerate(list(self._states)):
            if i % SWEEP_CHUNK == SWEEP_CHUNK - 1:
                await asyncio.sleep(0)      # long work chunked: the loop serves clients meanwhile
            st = self._states.get(principal)
            if st is None:
                continue
            if owns(principal):
                self._announce(principal, st)
            else:
                self._said.pop(principal, None)    # another node speaks for it now
        self._sweep = None

    def _changed(self, principal: str, st: _State) -> None:
        """`st` is the principal's new state: published and persisted, unless in a
        cluster another node owns the principal."""
        if self._cluster is None:
            self._publish_state(principal, st)
        elif self._cluster.owns(principal):
            self._announce(principal, st)

    def _announce(self, principal: str, st: _State) -> None:
        """The owner's part: `st` is published unless it is what was said last
        (by this node, else the retained state held here; nothing said reads as offline)."""
        assert self._cluster is not None
        now = (st.state, st.clients)
        said = self._said.get(principal) or said_of(self._cluster.retained(principal)) or (OFFLINE, 0)
        if said == now:
            return
        self._said[principal] = now
        self._publish_state(principal, st)

    def _publish_state(self, principal: str, st: _State) -> None:
        self._dirty.add(principal)
        self._enqueue(principal, st.wire())

    async def _principal_removed(self, event: PrincipalRemoved) -> None:
        self.forget(event.principal)

    async def principal_removed(self, principal: str) -> None:
        self.forget(principal)

    def forget(self, principal: str) -> None:
        """The principal was removed: clear its retained presence."""
        self._states.pop(principal, None)
        self._said.pop(principal, None)
        self._dirty.discard(principal)
        self._enqueue(principal, None)

    # ---- reading -----------------------------------------------------------
    def current(self, principal_id: str) -> dict[str, Any] | None:
        st = self._states.get(principal_id)
        if st is None:
            return None
        wire = st.wire()
        if st.state == ONLINE:
            wire["last_seen"] = self._clock()
        return wire

    def is_online(self, principal_id: str) -> bool:
        st = self._states.get(principal_id)
        return st is not None and st.state == ONLINE

    # ---- publishing, in order ----------------------------------------------
    def _enqueue(self, principal: str, wire: dict[str, Any] | None) -> None:
        if len(self._queue) >= self._queue_max:
            self.overflows += 1
            if self.overflows == 1 or self.overflows % 1000 == 0:
                log.warning("presence: publish queue full (%d); %d transition(s) coalesced so far",
                            self._queue_max, self.overflows)
            self._overflowed.add(principal)
        else:
            self._queue.append((principal, wire))
        self._wakeup.set()

    async def _publish_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._drain()

    async def _drain(self) -> None:
        async with self._drain_lock:
            await self._drain_locked()

    async def _drain_locked(self) -> None:
        while self._queue or self._overflowed:
            if self._queue:
                principal, wire = self._queue.popleft()
            else:
                # Only after the backlog: the newest state of coalesced principals.
                principal = self._overflowed.pop()
                st = self._states.get(principal)
                wire = st.wire() if st is not None else None
            await self._publish(principal, wire)

    async def _publish(self, principal: str, wire: dict[str, Any] | None) -> None:
        assert self._publisher is not None
        payload = b"" if wire is None else json.dumps(wire, separators=(",", ":")).encode()
        try:
            await self._publisher.publish(topics.presence(principal), payload, qos=1, retain=True)
            self.published += 1
        except Exception:  # noqa: BLE001 - one failed publish must not stop presence
            self.publish_errors += 1
            log.exception("presence: publishing %s failed", principal)
        if wire is not None:
            # Consumers (the Home Assistant bridge mirrors device availability)
            # hear of every published state, in order; a failing one is logged.
            await self._bus.publish(PresenceChanged(principal, wire))

    # ---- persistence ---------------------------------------------------------
    async def _persist_loop(self) -> None:
        await self._persist_once(alive_at=self._clock())
        last_beat = self._clock()
        while True:
            await asyncio.sleep(self._flush_interval)
            now = self._clock()
            if now - last_beat >= self._heartbeat:
                last_beat = now
                await self._persist_once(alive_at=now)
            else:
                await self._persist_once()

    async def _persist_once(self, alive_at: float | None = None) -> None:
        if not self._dirty and alive_at is None:
            return
        batch = self._dirty
        self._dirty = set()
        records = []
        for principal in batch:
            st = self._states.get(principal)
            if st is not None:
                records.append(PresenceRecord(principal, st.state, st.since, st.last_seen))
        try:
            await self._store.save_presence(records, alive_at)
        except Exception as exc:  # noqa: BLE001 - store busy or closed: retry with the next flush
            self.persist_errors += 1
            self._dirty |= batch
            line, trace = describe_failure(exc)
            if trace:
                log.warning("presence: saving %d record(s) failed; will retry", len(records), exc_info=exc)
            else:
                if self._failing_since is None:
                    self._failing_since = self.persist_errors - 1
                self._persist_log.warning("presence: saving %d record(s) failed (%s); retrying every %g s",
                                          len(records), line, self._flush_interval)
            return
        if self._failing_since is not None:
            log.info("presence: records saved again after %d failed attempt(s)",
                     self.persist_errors - self._failing_since)
            self._failing_since = None
