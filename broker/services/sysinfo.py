"""The broker's figures as one typed snapshot, and what `$SYS` and `roost status`
make of it. Pure: nothing here reads the engine (broker/monitor.py builds the
snapshot), so the topic names and formats are testable on their own.

`$SYS` follows Mosquitto's names and meanings (mosquitto(8), "BROKER STATUS"):
`messages/...` count MQTT packets of every type, `publish/messages/...` PUBLISH
packets only, `clients/disconnected` persistent sessions whose client is away,
`load/.../1min|5min|15min` per-minute rates smoothed as Mosquitto does. Roost's
own figures are under `$SYS/broker/roost/`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

SYS = "$SYS/broker/"
ROOST = SYS + "roost/"
LOAD_WINDOWS = (("1min", 60.0), ("5min", 300.0), ("15min", 900.0))

# CONNACK return codes of refused logins, as metric labels
LOGIN_REFUSALS = {1: "unacceptable_protocol", 2: "identifier_rejected", 3: "server_unavailable",
                  4: "bad_credentials", 5: "not_authorized"}


@dataclass(frozen=True, slots=True)
class ListenerFigures:
    name: str
    transport: str          # tcp, ws, http
    tls: bool
    bind: str
    bound: bool             # serving on its sockets now
    connections: int        # MQTT connections past CONNACK (0 for http)


@dataclass(frozen=True, slots=True)
class StoreFigures:
    location: str           # the SQLite file; the PostgreSQL dsn without its password
    bytes: int | None       # SQLite: file + WAL; PostgreSQL: pg_database_size; as last measured (None: unknown)
    writable: bool          # False while commits fail (disk full, read-only, I/O errors)
    unavailable_since: float | None
    commits: int
    write_failures: int     # batches whose commit failed
    pending_writes: int     # jobs queued for the writer thread
    engine: str = "sqlite"  # or postgres


@dataclass(frozen=True, slots=True)
class ClusterFigures:
    """This node of a cluster (broker/cluster/node.py `ClusterNode.figures`)."""
    node: str                   # cluster.node
    peers: tuple[str, ...]      # the other nodes alive, by name
    nats_connected: bool
    nats_outages: int           # NATS connection lost (each followed by reconnecting)
    sent: int                   # NATS messages sent
    received: int               # NATS messages received
    queued_bytes: int           # waiting in the outgoing queue (cluster.max_pending_bytes)
    dropped: int                # outgoing messages dropped (queue full, or NATS refused them)
    dropped_bytes: int
    slow_consumer: int          # incoming backlog over its bound: NATS dropped messages for us
    forwarded: int              # MQTT publishes sent to interested nodes
    from_peers: int             # MQTT publishes routed here from other nodes
    nodes_dead: int             # other nodes found dead (no heartbeat for cluster.node_timeout)
    nodes_left: int             # other nodes that left cleanly
    resyncs: int                # snapshots asked after a gap in a node's changes
    wills_published: int        # wills of dead nodes' clients published here
    taken_over: int             # connections here closed by the same client id on another node
    sessions_handed: int        # persistent sessions handed to another node
    sessions_adopted: int       # persistent sessions taken from another node (hand-over or dead node)
    mailbox_sent: int = 0       # mailbox events sent to other nodes (only those with the principal's pushers)
    mailbox_received: int = 0   # mailbox events received from other nodes
    resend_window_bytes: int = 0    # publishes sent to other nodes and not yet acked (cluster.resend_buffer_bytes)
    resend_dropped: int = 0     # of those, given up unacked: a node's window was full (cluster_resend_full)
    resent: int = 0             # publishes sent to a node again (NATS lost them or their ack)
    duplicates: int = 0         # publishes received twice from a node (dropped here)
    unconfirmed: int = 0        # QoS 1/2 publishes acknowledged without every node's ack (NATS down, a silent node)


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str
    now: float                              # wall clock of the snapshot
    uptime: float                           # seconds since the engine started
    listeners: tuple[ListenerFigures, ...]
    clients_connected: int
    clients_maximum: int                    # most connected at once since start
    connections_accepted: int               # CONNACK 0 since start
    sessions: int                           # MQTT sessions held (clean ones are connected)
    sessions_disconnected: int              # persistent sessions without their client
    subscriptions: int
    publish_received: tuple[int, int, int]  # PUBLISH from clients, by QoS
    publish_sent: tuple[int, int, int]      # PUBLISH to clients (re-sends included), by QoS
    packets_received: int
    packets_sent: int
    bytes_received: int
    bytes_sent: int
    inflight: int                           # QoS 1/2 sent, not yet acknowledged
    queued: int                             # messages waiting in session queues
    queued_bytes: int                       # payload bytes held in queues and in flight
    stored_messages: int                    # retained + kept for persistent sessions
    stored_bytes: int
    retained: int
    retained_bytes: int
    dropped: Mapping[str, int]              # messages dropped since start, by reason
    refused: Mapping[str, int]              # refusals since start, by reason
    logins_refused: Mapping[str, int]       # refused CONNECTs since start, by reason
    requests: Mapping[str, Mapping[str, int]]   # IM requests handled: op -> outcome -> count
    mailbox_events: Mapping[str, int]       # mailbox events committed since start, by kind
    mailbox_pruned: int                     # events discarded by mailbox.max_events / ttl
    telemetry: Mapping[str, int]            # TelemetryService.stats()
    store: StoreFigures
    sessions_expired: int = 0               # persistent sessions discarded after 7 days unused
    limits: Mapping[str, float] = field(default_factory=dict)
    cluster: ClusterFigures | None = None   # None: not in a cluster

    @property
    def publish_dropped(self) -> int:
        return self.dropped.get("queue_full", 0)


class LoadAverages:
    """Mosquitto's `$SYS/broker/load/...`: every update turns the growth of each
    total into a per-minute rate and folds it into exponentially smoothed 1, 5
    and 15 minute averages (as the Unix load average does)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._at: float | None = None
        self.values: dict[str, dict[str, float]] = {}

    def update(self, totals: Mapping[str, int], now: float) -> None:
        if self._at is None or now <= self._at:
            self._at = now
            self._last = dict(totals)
            for name in totals:
                self.values.setdefault(name, {w: 0.0 for w, _ in LOAD_WINDOWS})
            return
        dt = now - self._at
        for name, total in totals.items():
            rate = (total - self._last.get(name, total)) * 60.0 / dt
            avg = self.values.setdefault(name, {w: 0.0 for w, _ in LOAD_WINDOWS})
            for window, seconds in LOAD_WINDOWS:
                avg[window] = rate + math.exp(-dt / seconds) * (avg[window] - rate)
        self._at = now
        self._last = dict(totals)


def load_totals(s: Snapshot) -> dict[str, int]:
    """The totals whose load averages Mosquitto publishes, by their topic infix."""
    return {
        "messages/received": s.packets_received,
        "messages/sent": s.packets_sent,
        "publish/received": sum(s.publish_received),
        "publish/sent": sum(s.publish_sent),
        "publish/dropped": s.publish_dropped,
        "bytes/received": s.bytes_received,
        "bytes/sent": s.bytes_sent,
        "connections": s.connections_accepted,
    }


def _topic_part(name: str) -> str:
    """A label as one topic level (no wildcards or separators in $SYS names)."""
    return "".join(c if c not in "/+#\0" else "_" for c in name) or "_"


def sys_topics(s: Snapshot, loads: LoadAverages | None = None) -> dict[str, str]:
    """Topic -> payload (text, as Mosquitto publishes them) for one publication."""
    t: dict[str, str] = {
        SYS + "version": f"roost version {s.version}",
        SYS + "uptime": f"{int(s.uptime)} seconds",
        SYS + "clients/connected": str(s.clients_connected),
        SYS + "clients/active": str(s.clients_connected),          # Mosquitto's deprecated name
        SYS + "clients/disconnected": str(s.sessions_disconnected),
        SYS + "clients/inactive": str(s.sessions_disconnected),    # likewise
        SYS + "clients/maximum": str(s.clients_maximum),
        SYS + "clients/total": str(s.clients_connected + s.sessions_disconnected),
        SYS + "clients/expired": str(s.sessions_expired),
        SYS + "messages/received": str(s.packets_received),
        SYS + "messages/sent": str(s.packets_sent),
        SYS + "messages/inflight": str(s.inflight),
        SYS + "messages/stored": str(s.stored_messages),
        SYS + "publish/messages/received": str(sum(s.publish_received)),
        SYS + "publish/messages/sent": str(sum(s.publish_sent)),
        SYS + "publish/messages/dropped": str(s.publish_dropped),
        SYS + "bytes/received": str(s.bytes_received),
        SYS + "bytes/sent": str(s.bytes_sent),
        SYS + "subscriptions/count": str(s.subscriptions),
        SYS + "retained messages/count": str(s.retained),
        SYS + "store/messages/count": str(s.stored_messages),
        SYS + "store/messages/bytes": str(s.stored_bytes),
    }
    if loads is not None:
        for name, avg in loads.values.items():
            for window, _ in LOAD_WINDOWS:
                t[f"{SYS}load/{name}/{window}"] = f"{avg[window]:.2f}"
    r = ROOST
    t[r + "sessions"] = str(s.sessions)
    t[r + "queued/messages"] = str(s.queued)
    t[r + "queued/bytes"] = str(s.queued_bytes)
    t[r + "retained/bytes"] = str(s.retained_bytes)
    for qos in range(3):
        t[f"{r}publish/received/qos{qos}"] = str(s.publish_received[qos])
        t[f"{r}publish/sent/qos{qos}"] = str(s.publish_sent[qos])
    for lst in s.listeners:
        if lst.transport != "http":
            t[f"{r}listeners/{_topic_part(lst.name)}/connections"] = str(lst.connections)
    for reason, n in s.dropped.items():
        t[f"{r}dropped/{_topic_part(reason)}"] = str(n)
    for reason, n in s.refused.items():
        t[f"{r}refused/{_topic_part(reason)}"] = str(n)
    for reason, n in s.logins_refused.items():
        t[f"{r}logins/refused/{_topic_part(reason)}"] = str(n)
    for op, outcomes in s.requests.items():
        for outcome, n in outcomes.items():
            t[f"{r}requests/{_topic_part(op)}/{_topic_part(outcome)}"] = str(n)
    for kind, n in s.mailbox_events.items():
        t[f"{r}mailbox/events/{_topic_part(kind)}"] = str(n)
    t[r + "mailbox/pruned"] = str(s.mailbox_pruned)
    for name, n in s.telemetry.items():
        t[f"{r}telemetry/{_topic_part(name)}"] = str(n)
    if s.store.bytes is not None:
        t[r + "store/bytes"] = str(s.store.bytes)
    t[r + "store/writable"] = "1" if s.store.writable else "0"
    if s.cluster is not None:
        t.update(cluster_topics(s.cluster))
    return t


def cluster_topics(c: ClusterFigures) -> dict[str, str]:
    """`$SYS/broker/cluster/...`: this node's view of its cluster."""
    p = SYS + "cluster/"
    return {
        p + "node": c.node,
        p + "nodes/alive": str(len(c.peers) + 1),
        p + "nodes/dead": str(c.nodes_dead),
        p + "nodes/left": str(c.nodes_left),
        p + "nats/connected": "1" if c.nats_connected else "0",
        p + "nats/reconnects": str(c.nats_outages),
        p + "nats/messages/sent": str(c.sent),
        p + "nats/messages/received": str(c.received),
        p + "nats/queued/bytes": str(c.queued_bytes),
        p + "nats/dropped/messages": str(c.dropped),
        p + "nats/dropped/bytes": str(c.dropped_bytes),
        p + "nats/slow_consumer": str(c.slow_consumer),
        p + "publish/forwarded": str(c.forwarded),
        p + "publish/from_peers": str(c.from_peers),
        p + "wills/published": str(c.wills_published),
        p + "sessions/adopted": str(c.sessions_adopted),
        p + "sessions/handed": str(c.sessions_handed),
        p + "clients/taken_over": str(c.taken_over),
        p + "mailbox/sent": str(c.mailbox_sent),
        p + "mailbox/received": str(c.mailbox_received),
        p + "publish/resent": str(c.resent),
        p + "publish/resend_dropped": str(c.resend_dropped),
        p + "publish/duplicates": str(c.duplicates),
        p + "publish/unconfirmed": str(c.unconfirmed),
    }


def cluster_document(c: ClusterFigures) -> dict[str, object]:
    return {"node": c.node, "peers": list(c.peers), "nodes_alive": len(c.peers) + 1,
            "nats_connected": c.nats_connected, "nats_reconnects": c.nats_outages,
            "sent": c.sent, "received": c.received, "queued_bytes": c.queued_bytes,
            "dropped": c.dropped, "dropped_bytes": c.dropped_bytes, "slow_consumer": c.slow_consumer,
            "forwarded": c.forwarded, "from_peers": c.from_peers, "nodes_dead": c.nodes_dead,
            "nodes_left": c.nodes_left, "resyncs": c.resyncs, "wills_published": c.wills_published,
            "taken_over": c.taken_over, "sessions_handed": c.sessions_handed,
            "sessions_adopted": c.sessions_adopted, "mailbox_sent": c.mailbox_sent,
            "mailbox_received": c.mailbox_received, "resend_window_bytes": c.resend_window_bytes,
            "resend_dropped": c.resend_dropped, "resent": c.resent, "duplicates": c.duplicates,
            "unconfirmed": c.unconfirmed}


def status_document(s: Snapshot, recent_refusals: Mapping[str, int], recent_window: float) -> dict[str, object]:
    """What `roost status` shows (and /status.json serves): for a person, no
    client ids or principal names."""
    doc: dict[str, object] = {
        "version": s.version,
        "uptime": round(s.uptime, 1),
        "time": s.now,
        "listeners": [{"name": lst.name, "type": lst.transport, "tls": lst.tls, "bind": lst.bind,
                       "bound": lst.bound, "connections": lst.connections} for lst in s.listeners],
        "connections": {"current": s.clients_connected, "maximum": s.clients_maximum,
                        "accepted": s.connections_accepted},
        "sessions": {"total": s.sessions, "disconnected": s.sessions_disconnected,
                     "subscriptions": s.subscriptions},
        "messages": {"received": sum(s.publish_received), "sent": sum(s.publish_sent),
                     "inflight": s.inflight, "queued": s.queued, "queued_bytes": s.queued_bytes},
        "retained": {"count": s.retained, "bytes": s.retained_bytes},
        "store": {"engine": s.store.engine, "location": s.store.location,
                  "path": s.store.location,    # the name before PostgreSQL (kept for readers of it)
                  "bytes": s.store.bytes, "writable": s.store.writable,
                  "unavailable_since": s.store.unavailable_since, "pending_writes": s.store.pending_writes,
                  "write_failures": s.store.write_failures},
        "limits": dict(s.limits),
        "dropped": dict(s.dropped),
        "refused": dict(s.refused),
        "logins_refused": dict(s.logins_refused),
        "recent_refusals": {"window": recent_window, "counts": dict(recent_refusals)},
        "telemetry": dict(s.telemetry),
        "mailbox": {"events": dict(s.mailbox_events), "pruned": s.mailbox_pruned},
    }
    if s.cluster is not None:
        doc["cluster"] = cluster_document(s.cluster)
    return doc
