"""Publishes `$SYS/broker/...` (retained, QoS 0, as Mosquitto does) from each
snapshot the monitor takes. Only topics whose text changed are published again
(uptime and the load averages every time), so an idle broker routes a handful
of messages per interval; a new subscriber gets every figure from the retained
messages at once. The engine never writes `$` retained messages to the store.

Who may subscribe is the ACL's decision (broker/services/acl.py: service
accounts, unless the operator's rules say otherwise).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from broker.services.sysinfo import LoadAverages, Snapshot, load_totals, sys_topics

Publish = Callable[[str, bytes, int, bool], Awaitable[int]]


class SysPublisher:
    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._loads = LoadAverages()
        self._sent: dict[str, str] = {}

    async def publish(self, snapshot: Snapshot, now: float) -> int:
        """Publish what changed; `now` is a monotonic clock for the load averages.
        Returns how many topics were published."""
        self._loads.update(load_totals(snapshot), now)
        n = 0
        for topic, text in sys_topics(snapshot, self._loads).items():
            if self._sent.get(topic) != text:
                await self._publish(topic, text.encode(), 0, True)
                self._sent[topic] = text
                n += 1
        return n
