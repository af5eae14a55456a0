"""The broker's live figures for `$SYS`, /metrics and `roost status`.

`Monitor` reads the engine, the services and the store when asked (a snapshot
costs one pass over the sessions: fine every few seconds, never per message).
Its one task, every `sys_interval` seconds (10 when $SYS is off), asks the
store its size (StoreHealth.size, never blocking the loop), keeps the samples that "recent refusals" are
computed from, and publishes `$SYS` (broker/sys_publisher.py).

Counters it owns: store commit latency (the writer thread calls
`commit_seconds.observe`) and mailbox events by kind (`MailboxAppended` on the
bus). Request latencies are `services.request_stats`, filled by the gateway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from importlib import metadata
from typing import TYPE_CHECKING, Any

from broker.config import RoostConfig
from broker.services.base import cancel_and_wait
from broker.services.events import MailboxAppended
from broker.services.opstats import Histogram, RequestStats
from broker.services.sysinfo import (
    LOGIN_REFUSALS,
    ClusterFigures,
    ListenerFigures,
    Snapshot,
    StoreFigures,
)

if TYPE_CHECKING:
    from broker.server import RoostBroker
    from broker.services.runtime import Services
    from broker.store.base import StoreHealth
    from broker.sys_publisher import SysPublisher

log = logging.getLogger("roost.monitor")

RECENT_WINDOW = 900.0        # seconds of "recent refusals" in `roost status`
SAMPLE_EVERY = 10.0          # seconds between the samples they are computed from (bounded memory)
IDLE_TICK = 10.0             # refresh period when $SYS is off
MAX_EVENT_KINDS = 64         # distinct mailbox event kinds counted (labels stay bounded)


def roost_version() -> str:
    try:
        return metadata.version("roost")
    except metadata.PackageNotFoundError:
        return "unknown"


class Monitor:
    def __init__(self, config: RoostConfig, services: Services) -> None:
        self._config = config
        self._services = services
        self._broker: RoostBroker | None = None
        self._sys: SysPublisher | None = None
        self.version = roost_version()
        self.commit_seconds = Histogram()
        self.requests: RequestStats = getattr(services, "request_stats", None) or RequestStats()
        self.mailbox_events: dict[str, int] = {}
        self.tick = config.sys_interval if config.sys_interval > 0 else IDLE_TICK
        self._health: StoreHealth = services.store.health
        self._store_bytes: int | None = 0
        self._samples: deque[tuple[float, dict[str, int]]] = deque(maxlen=int(RECENT_WINDOW / SAMPLE_EVERY) + 2)
        self._task: asyncio.Task[None] | None = None
        self.started = False
        self.stopping = False

    # ---- wiring ------------------------------------------------------------------
    def attach(self, broker: RoostBroker, sys_publisher: SysPublisher | None = None) -> None:
        """Hook the counters in (before the broker starts, so nothing is missed)."""
        self._broker = broker
        self._sys = sys_publisher
        self._health.on_commit = self.commit_seconds.observe
        if self._services.messaging is not None:
            self._services.bus.subscribe(MailboxAppended, self._count_events)

    def _count_events(self, appended: MailboxAppended) -> None:
        counts = self.mailbox_events
        for ev in appended.events:
            kind = ev.kind
            if kind not in counts and len(counts) >= MAX_EVENT_KINDS:
                kind = "other"
            counts[kind] = counts.get(kind, 0) + 1

    async def start(self) -> None:
        await self._refresh()
        self.started = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name="roost-monitor")

    async def stop(self) -> None:
        self.stopping = True
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                await self._refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("refreshing the broker's figures failed")

    async def _refresh(self) -> None:
        self._store_bytes = await self._health.size()
        snap = self.snapshot()
        now = time.monotonic()
        if not self._samples or now - self._samples[-1][0] >= SAMPLE_EVERY:
            self._samples.append((now, self._refusal_totals(snap)))
        if self._sys is not None:
            await self._sys.publish(snap, time.monotonic())

    # ---- readiness -------------------------------------------------------------
    def problems(self) -> list[str]:
        """Why the broker is not ready (empty: ready)."""
        out = []
        if not self.started:
            out.append("starting")
        if self.stopping:
            out.append("stopping")
        since = self._health.unavailable_since
        if since is not None:
            out.append(f"store cannot write since {time.strftime('%H:%M:%S', time.localtime(since))}")
        bound = self._broker.bound_ports() if self._broker is not None else {}
        out.extend(f"listener {name} not bound" for name in self._config.listeners if name not in bound)
        return out

    # ---- figures -----------------------------------------------------------------
    @staticmethod
    def _refusal_totals(s: Snapshot) -> dict[str, int]:
        out = {f"dropped/{k}": v for k, v in s.dropped.items()}
        out.update({f"refused/{k}": v for k, v in s.refused.items()})
        out.update({f"login/{k}": v for k, v in s.logins_refused.items()})
        return out

    def recent_refusals(self, now_totals: dict[str, int]) -> dict[str, int]:
        """Growth of each refusal total over the last RECENT_WINDOW seconds
        (since start when younger), only those that grew."""
        horizon = time.monotonic() - RECENT_WINDOW
        base: dict[str, int] = {}
        for at, totals in self._samples:
            if at >= horizon:
                base = totals
                break
        return {k: v - base.get(k, 0) for k, v in now_totals.items() if v - base.get(k, 0) > 0}

    def status(self) -> dict[str, Any]:
        from broker.services.sysinfo import status_document

        snap = self.snapshot()
        doc = status_document(snap, self.recent_refusals(self._refusal_totals(snap)), RECENT_WINDOW)
        problems = self.problems()
        doc["ready"] = not problems
        doc["problems"] = problems
        doc["sys_interval"] = self._config.sys_interval
        return doc

    def snapshot(self) -> Snapshot:
        broker = self._broker
        assert broker is not None, "attach() first"
        eng = broker.engine
        services = self._services
        inflight = queued = disconnected = kept = kept_bytes = 0
        for st in eng.sessions.values():
            inflight += len(st.inflight)
            queued += len(st.queue)
            if not st.clean:
                if st.conn is None:
                    disconnected += 1
                kept += len(st.inflight) + len(st.queue)
                kept_bytes += st.bytes
        stats = eng.stats
        telemetry: dict[str, int] = services.telemetry.stats() if services.telemetry is not None else {}
        ha: dict[str, int] = services.homeassistant.stats() if services.homeassistant is not None else {}
        dropped = {"queue_full": stats["dropped"]}
        if telemetry:
            dropped["telemetry_buffer_full"] = telemetry.get("dropped", 0)
        if ha:
            dropped["ha_command_queue_full"] = ha.get("commands_dropped", 0)
        refused = {"publish_denied": stats["publish_denied"], "retained_budget": stats["retained_refused"],
                   "subscription_budget": stats["subscriptions_refused"],
                   "persistent_sessions": stats["sessions_refused"],
                   "connection_limit": stats.get("connections_refused", 0)}
        if services.gateway is not None:
            refused["request_rate"] = services.gateway.rejected_rate
        if telemetry:
            refused["telemetry_malformed"] = telemetry.get("malformed", 0)
        if ha:
            refused["ha_command"] = ha.get("commands_refused", 0)
        if services.files is not None:   # uploads refused or abandoned (their bytes dropped)
            refused["file_upload"] = services.files.stats.refused
        cluster_node = getattr(broker, "cluster", None)
        cluster: ClusterFigures | None = cluster_node.figures() if cluster_node is not None else None
        if cluster is not None:   # the NATS link's bounded queues: what overflowed
            dropped["cluster_queue_full"] = cluster.dropped
            dropped["cluster_slow_consumer"] = cluster.slow_consumer
            dropped["cluster_resend_full"] = cluster.resend_dropped
        logins = {LOGIN_REFUSALS.get(code, f"code_{code}"): n for code, n in eng.logins_refused.items()}
        bound = broker.bound_ports()
        listeners = tuple(ListenerFigures(name, lst.type, lst.ssl, lst.bind, name in bound,
                                          eng.per_listener.get(name, 0))
                          for name, lst in self._config.listeners.items())
        health = self._health
        store = StoreFigures(
            engine=health.engine, location=health.location, bytes=self._store_bytes, writable=health.unavailable_since is None,
            unavailable_since=health.unavailable_since, commits=health.commits,
            write_failures=health.write_failures, pending_writes=health.pending_writes)
        c = eng.counters
        limits: dict[str, float] = {k: v for k, v in dataclasses.asdict(self._config.limits).items()}
        limits["mailbox.max_events"] = self._config.mailbox.max_events
        limits["mailbox.ttl"] = self._config.mailbox.ttl
        messaging = services.messaging
        now = time.time()
        return Snapshot(
            version=self.version, now=now, uptime=max(0.0, now - eng.started_at), listeners=listeners,
            clients_connected=eng.n_connected, clients_maximum=c.connections_max,
            connections_accepted=c.connections_total, sessions=len(eng.sessions),
            sessions_disconnected=disconnected, subscriptions=len(eng.index),
            publish_received=(c.received_qos[0], c.received_qos[1], c.received_qos[2]),
            publish_sent=(c.sent_qos[0], c.sent_qos[1], c.sent_qos[2]),
            packets_received=c.packets_received, packets_sent=c.packets_sent,
            bytes_received=c.bytes_received, bytes_sent=c.bytes_sent,
            inflight=inflight, queued=queued, queued_bytes=eng.queued_bytes,
            stored_messages=len(eng.retained) + kept, stored_bytes=eng.retained.bytes + kept_bytes,
            retained=len(eng.retained), retained_bytes=eng.retained.bytes,
            dropped=dropped, refused=refused, logins_refused=logins, requests=self.requests.counts(),
            mailbox_events=dict(self.mailbox_events),
            mailbox_pruned=messaging.discarded if messaging is not None else 0,
            telemetry=telemetry, store=store, sessions_expired=stats.get("sessions_expired", 0), limits=limits,
            cluster=cluster)
