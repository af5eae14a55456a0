"""Prometheus exposition of the monitor's figures: a custom Collector that takes
a snapshot at scrape time (nothing is copied into prometheus-client's own
metric objects between scrapes), registered in a CollectorRegistry of this
broker only (no module-level registry: two brokers in one process, as in the
tests, never mix their figures)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from broker.monitor import Monitor
from broker.services.opstats import Histogram
from broker.services.sysinfo import ClusterFigures


class HasFigures(Protocol):
    def figures(self) -> dict[str, Any]: ...


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    return [("+Inf" if bound == float("inf") else repr(bound), float(n)) for bound, n in h.cumulative()]


class RoostCollector(Collector):
    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    def describe(self) -> list[Metric]:
        return []   # names are not fixed ahead (ops, reasons): never collected at registration

    def collect(self) -> Iterator[Metric]:
        m = self._monitor
        s = m.snapshot()

        info = GaugeMetricFamily("roost_build_info", "Roost version (always 1)", labels=["version"])
        info.add_metric([s.version], 1)
        yield info
        yield GaugeMetricFamily("roost_uptime_seconds", "Seconds since the broker started", value=s.uptime)
        ready = GaugeMetricFamily("roost_ready", "1 when /readyz answers 200")
        ready.add_metric([], 0 if m.problems() else 1)
        yield ready

        conns = GaugeMetricFamily("roost_connections", "MQTT connections past CONNACK, per listener",
                                  labels=["listener", "transport", "tls"])
        bound = GaugeMetricFamily("roost_listener_bound", "1 while the listener serves its sockets",
                                  labels=["listener", "transport"])
        for lst in s.listeners:
            if lst.transport != "http":
                conns.add_metric([lst.name, lst.transport, str(lst.tls).lower()], lst.connections)
            bound.add_metric([lst.name, lst.transport], 1 if lst.bound else 0)
        yield conns
        yield bound
        yield GaugeMetricFamily("roost_connections_max", "Most MQTT connections at once since start",
                                value=s.clients_maximum)
        yield CounterMetricFamily("roost_connections_accepted", "CONNECTs accepted (CONNACK 0)",
                                  value=s.connections_accepted)
        yield GaugeMetricFamily("roost_sessions", "MQTT sessions held", value=s.sessions)
        yield GaugeMetricFamily("roost_sessions_disconnected", "Persistent sessions whose client is away",
                                value=s.sessions_disconnected)
        yield CounterMetricFamily("roost_sessions_expired", "Persistent sessions discarded after 7 days unused",
                                  value=s.sessions_expired)
        yield GaugeMetricFamily("roost_subscriptions", "Topic filters subscribed, all sessions",
                                value=s.subscriptions)

        received = CounterMetricFamily("roost_messages_received", "PUBLISH packets from clients", labels=["qos"])
        sent = CounterMetricFamily("roost_messages_sent", "PUBLISH packets to clients, re-sends included",
                                   labels=["qos"])
        for qos in range(3):
            received.add_metric([str(qos)], s.publish_received[qos])
            sent.add_metric([str(qos)], s.publish_sent[qos])
        yield received
        yield sent
        yield CounterMetricFamily("roost_packets_received", "MQTT packets of every type from clients",
                                  value=s.packets_received)
        yield CounterMetricFamily("roost_packets_sent", "MQTT packets of every type to clients",
                                  value=s.packets_sent)
        yield CounterMetricFamily("roost_bytes_received", "Bytes read from MQTT clients", value=s.bytes_received)
        yield CounterMetricFamily("roost_bytes_sent", "Bytes written to MQTT clients", value=s.bytes_sent)
        yield GaugeMetricFamily("roost_inflight_messages", "QoS 1/2 messages sent, not yet acknowledged",
                                value=s.inflight)
        yield GaugeMetricFamily("roost_queued_messages", "Messages waiting in session queues", value=s.queued)
        yield GaugeMetricFamily("roost_queued_bytes", "Payload bytes held for sessions (queued and in flight)",
                                value=s.queued_bytes)
        yield GaugeMetricFamily("roost_retained_messages", "Retained messages", value=s.retained)
        yield GaugeMetricFamily("roost_retained_bytes", "Retained bytes (limits.max_retained_bytes counts these)",
                                value=s.retained_bytes)

        dropped = CounterMetricFamily("roost_dropped", "Messages dropped, by reason", labels=["reason"])
        for reason, n in s.dropped.items():
            dropped.add_metric([reason], n)
        yield dropped
        refused = CounterMetricFamily("roost_refused", "Refusals (limits, ACL, budgets), by reason",
                                      labels=["reason"])
        for reason, n in s.refused.items():
            refused.add_metric([reason], n)
        yield refused
        logins = CounterMetricFamily("roost_logins_failed", "Refused CONNECTs (CONNACK code), by reason",
                                     labels=["reason"])
        for reason, n in s.logins_refused.items():
            logins.add_metric([reason], n)
        yield logins

        requests = CounterMetricFamily("roost_im_requests", "IM requests handled, by op and outcome",
                                       labels=["op", "outcome"])
        latency = HistogramMetricFamily("roost_im_request_seconds", "IM request handling time, by op",
                                        labels=["op"])
        for op, stats in sorted(m.requests.by_op.items()):
            for outcome, n in stats.outcomes.items():
                requests.add_metric([op, outcome], n)
            latency.add_metric([op], _buckets(stats.latency), stats.latency.sum)
        yield requests
        yield latency

        events = CounterMetricFamily("roost_mailbox_events", "Mailbox events committed, by kind", labels=["kind"])
        for kind, n in s.mailbox_events.items():
            events.add_metric([kind], n)
        yield events
        yield CounterMetricFamily("roost_mailbox_pruned_events",
                                  "Events discarded by mailbox.max_events and mailbox.ttl", value=s.mailbox_pruned)

        t = s.telemetry
        if t:
            points = CounterMetricFamily("roost_telemetry_points", "Telemetry objects and points, by outcome",
                                         labels=["outcome"])
            for outcome in ("accepted", "malformed", "written", "dropped", "rejected"):
                points.add_metric([outcome], t.get(outcome, 0))
            yield points
            yield GaugeMetricFamily("roost_telemetry_buffered", "Points waiting for InfluxDB",
                                    value=t.get("buffered", 0))
            errors = CounterMetricFamily("roost_influxdb_write_errors", "Failed InfluxDB writes, by kind",
                                         labels=["kind"])
            errors.add_metric(["retried"], t.get("retries", 0))
            errors.add_metric(["rejected"], t.get("rejected", 0))
            yield errors

        st = s.store
        yield GaugeMetricFamily("roost_store_writable", "0 while store commits fail (disk full, read-only)",
                                value=1 if st.writable else 0)
        if st.bytes is not None:
            yield GaugeMetricFamily("roost_store_bytes", "Database size (SQLite: file and WAL), as last measured",
                                    value=st.bytes)
        yield GaugeMetricFamily("roost_store_pending_writes", "Jobs waiting for the store's writer",
                                value=st.pending_writes)
        yield CounterMetricFamily("roost_store_commits", "Group commits", value=st.commits)
        yield CounterMetricFamily("roost_store_write_failures", "Group commits that failed",
                                  value=st.write_failures)
        commit = HistogramMetricFamily("roost_store_commit_seconds",
                                       "One group commit, BEGIN to COMMIT (its jobs and the fsync)")
        commit.add_metric([], _buckets(m.commit_seconds), m.commit_seconds.sum)
        yield commit

        if s.cluster is not None:
            yield from _cluster_metrics(s.cluster)

        limits = GaugeMetricFamily("roost_limit", "Limits in force (config limits.* and mailbox.*)",
                                   labels=["name"])
        for name, value in s.limits.items():
            limits.add_metric([name], float(value))
        yield limits


def _cluster_metrics(c: ClusterFigures) -> Iterator[Metric]:
    """roost_cluster_*: this node of a cluster, its NATS link and its peers."""
    info = GaugeMetricFamily("roost_cluster_node_info", "This node's cluster.node (always 1)", labels=["node"])
    info.add_metric([c.node], 1)
    yield info
    yield GaugeMetricFamily("roost_cluster_nodes_alive", "Nodes alive as this one sees them, itself included",
                            value=len(c.peers) + 1)
    peer = GaugeMetricFamily("roost_cluster_peer_up", "1 for each other node alive", labels=["node"])
    for name in c.peers:
        peer.add_metric([name], 1)
    yield peer
    yield CounterMetricFamily("roost_cluster_nodes_dead", "Other nodes found dead (silent for node_timeout)",
                              value=c.nodes_dead)
    yield CounterMetricFamily("roost_cluster_nodes_left", "Other nodes that left cleanly", value=c.nodes_left)
    yield GaugeMetricFamily("roost_cluster_nats_connected", "1 while connected to NATS",
                            value=1 if c.nats_connected else 0)
    yield CounterMetricFamily("roost_cluster_nats_reconnects", "NATS connection lost (then retried)",
                              value=c.nats_outages)
    yield CounterMetricFamily("roost_cluster_messages_sent", "Messages sent over NATS", value=c.sent)
    yield CounterMetricFamily("roost_cluster_messages_received", "Messages received over NATS",
                              value=c.received)
    yield GaugeMetricFamily("roost_cluster_queued_bytes",
                            "Bytes waiting to go to NATS (bounded by cluster.max_pending_bytes)",
                            value=c.queued_bytes)
    yield CounterMetricFamily("roost_cluster_dropped_messages", "Outgoing NATS messages dropped (queue full)",
                              value=c.dropped)
    yield CounterMetricFamily("roost_cluster_dropped_bytes", "Bytes of outgoing NATS messages dropped",
                              value=c.dropped_bytes)
    yield CounterMetricFamily("roost_cluster_slow_consumer",
                              "Incoming NATS backlog over its bound (NATS dropped messages for this node)",
                              value=c.slow_consumer)
    yield CounterMetricFamily("roost_cluster_publishes_forwarded", "MQTT publishes sent to interested nodes",
                              value=c.forwarded)
    yield CounterMetricFamily("roost_cluster_publishes_from_peers", "MQTT publishes routed here from other nodes",
                              value=c.from_peers)
    yield CounterMetricFamily("roost_cluster_resyncs", "Snapshots asked after a gap in a node's changes",
                              value=c.resyncs)
    yield CounterMetricFamily("roost_cluster_wills_published", "Wills of dead nodes' clients published here",
                              value=c.wills_published)
    yield CounterMetricFamily("roost_cluster_clients_taken_over",
                              "Connections here closed by the same client id on another node", value=c.taken_over)
    yield CounterMetricFamily("roost_cluster_sessions_handed", "Persistent sessions handed to another node",
                              value=c.sessions_handed)
    yield CounterMetricFamily("roost_cluster_sessions_adopted",
                              "Persistent sessions taken over from another node (moved or dead)",
                              value=c.sessions_adopted)
    yield CounterMetricFamily("roost_cluster_mailbox_events_sent",
                              "Mailbox events sent to other nodes (only to those with the principal's pushers)",
                              value=c.mailbox_sent)
    yield CounterMetricFamily("roost_cluster_mailbox_events_received", "Mailbox events received from other nodes",
                              value=c.mailbox_received)
    yield GaugeMetricFamily("roost_cluster_resend_window_bytes",
                            "Publishes sent to other nodes, kept until acked (cluster.resend_buffer_bytes per node)",
                            value=c.resend_window_bytes)
    yield CounterMetricFamily("roost_cluster_publishes_resent",
                              "Publishes sent to a node again (NATS lost them or their ack)", value=c.resent)
    yield CounterMetricFamily("roost_cluster_publishes_duplicates",
                              "Publishes received twice from a node (dropped)", value=c.duplicates)
    yield CounterMetricFamily("roost_cluster_publishes_unconfirmed",
                              "QoS 1/2 publishes acknowledged without every node's ack (NATS down, or a "
                              "live node silent for twice cluster.node_timeout)", value=c.unconfirmed)


class WebCollector(Collector):
    """The web app's figures (broker/web/app.py `WebApp.figures`): signed-in
    sessions, open pages, frames dropped for pages that did not read."""

    def __init__(self, web_app: HasFigures) -> None:
        self._web = web_app

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        f = self._web.figures()
        yield GaugeMetricFamily("roost_web_sessions", "Web app sessions signed in", value=f["sessions"])
        yield GaugeMetricFamily("roost_web_pages", "Web app pages connected (WebSockets)", value=f["pages"])
        yield CounterMetricFamily("roost_web_frames_dropped",
                                  "Presence/telemetry frames dropped for web pages that did not read",
                                  value=f["dropped"])


def registry_for(monitor: Monitor) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RoostCollector(monitor))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
