"""What the engine counts for $SYS, /metrics and `roost status` (broker/monitor.py
reads them): traffic totals bumped on the hot path, and refusals by kind."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TrafficCounters:
    """Totals since start; plain ints bumped on the hot path."""
    # PUBLISH packets from / to clients (re-sends included), by QoS: one list item
    # bumped per packet, the totals are summed when read
    received_qos: list[int] = field(default_factory=lambda: [0, 0, 0])
    sent_qos: list[int] = field(default_factory=lambda: [0, 0, 0])
    packets_received: int = 0      # MQTT packets of every type (Mosquitto's $SYS "messages")
    packets_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    connections_total: int = 0     # CONNECTs accepted
    connections_max: int = 0       # most connected at once

    @property
    def messages_received(self) -> int:
        return sum(self.received_qos)

    @property
    def messages_sent(self) -> int:
        return sum(self.sent_qos)


def new_stats() -> dict[str, int]:
    """What was refused or dropped, by kind (the keys monitor.py reads)."""
    return {"dropped": 0, "publish_denied": 0, "retained_write_errors": 0, "retained_refused": 0,
            "subscriptions_refused": 0, "sessions_refused": 0, "connections_refused": 0,
            "sessions_expired": 0}
