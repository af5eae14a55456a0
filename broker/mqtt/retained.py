"""Retained messages: a topic trie in memory with a byte budget (`RetainedIndex`),
and its copy in the store (`RetainedMessages`: loads it at start, writes changes).

A wildcard SUBSCRIBE walks only the branches its filter can match (never every
retained topic), and the walk is a generator the engine consumes in chunks,
yielding to the event loop between them, so one SUBSCRIBE with many filters over
many retained topics cannot hold everyone else up.

Every entry is charged `cost()` bytes (payload, topic and a fixed overhead for
the dict and trie nodes) against a total budget and against the budget of the
principal that published it. A change that would go over is refused (counted
and logged; the message is still routed); deleting or shrinking always succeeds.

Changes reach the store through one writer task; repeated changes of a topic
coalesce. A QoS 1/2 retained publish is acknowledged after `flush()` (its
commit); while the store cannot write, the writes are retried and those acks
wait. `$` topics (the broker's $SYS) are never stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from broker.mqtt.journal import RETRY_FIRST, RETRY_MAX
from broker.mqtt.persistence import props_of_stored
from broker.mqtt.properties import stored_props
from broker.services.telemetry_influx import RateLimitedLog
from broker.store.base import RetainedMessage, StoreUnavailable

log = logging.getLogger("roost.mqtt")

ENTRY_OVERHEAD = 240   # bytes of bookkeeping per retained topic (dict entries, tuple, trie node)
MAX_RETAINED = 100_000           # retained topics kept; beyond, new topics are routed but not retained


def cost(topic: str, payload: bytes) -> int:
    return len(payload) + len(topic) + ENTRY_OVERHEAD


@dataclass(slots=True)
class Retained:
    payload: bytes
    qos: int
    owner: str | None     # the principal charged for it (None: anonymous, the broker, loaded at start)
    props: Any = None     # MQTT 5 properties.MsgProps it was published with (stored: forwarded ones, expiry)


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    entry: Retained | None = None


class Refused(Exception):
    """The change would exceed a budget; nothing was changed."""


class RetainedIndex:
    def __init__(self, *, max_bytes: int, max_bytes_per_principal: int, max_topics: int) -> None:
        self.max_bytes = max_bytes
        self.max_bytes_per_principal = max_bytes_per_principal
        self.max_topics = max_topics
        self._by_topic: dict[str, Retained] = {}
        self._root = _Node()
        self.bytes = 0
        self._bytes_of: dict[str | None, int] = {}

    def __len__(self) -> int:
        return len(self._by_topic)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._by_topic))

    def __contains__(self, topic: str) -> bool:
        return topic in self._by_topic

    def get(self, topic: str) -> Retained | None:
        return self._by_topic.get(topic)

    def bytes_of(self, principal: str | None) -> int:
        return self._bytes_of.get(principal, 0)

    def items(self) -> Iterator[tuple[str, Retained]]:
        return iter(list(self._by_topic.items()))

    def put(self, topic: str, payload: bytes, qos: int, owner: str | None, props: Any = None) -> None:
        """Store or replace; raises Refused (and changes nothing) over a budget."""
        old = self._by_topic.get(topic)
        new_cost = cost(topic, payload)
        old_cost = cost(topic, old.payload) if old is not None else 0
        if old is None and len(self._by_topic) >= self.max_topics:
            raise Refused(f"{self.max_topics} retained topics (the most kept)")
        if new_cost > old_cost and self.bytes - old_cost + new_cost > self.max_bytes:
            raise Refused(f"limits.max_retained_bytes ({self.max_bytes}) reached")
        if owner is not None:
            mine = self._bytes_of.get(owner, 0) - (old_cost if old is not None and old.owner == owner else 0)
            if mine + new_cost > self.max_bytes_per_principal and new_cost > old_cost:
                raise Refused(f"{owner} holds {mine} bytes of retained messages "
                              f"(limits.max_retained_bytes_per_principal {self.max_bytes_per_principal})")
        if old is not None:
            self._charge(old.owner, -old_cost)
            old.payload, old.qos, old.owner, old.props = payload, qos, owner, props
        else:
            entry = Retained(payload, qos, owner, props)
            self._by_topic[topic] = entry
            node = self._root
            for level in topic.split("/"):
                nxt = node.children.get(level)
                if nxt is None:
                    nxt = node.children[level] = _Node()
                node = nxt
            node.entry = entry
        self._charge(owner, new_cost)

    def delete(self, topic: str) -> bool:
        old = self._by_topic.pop(topic, None)
        if old is None:
            return False
        self._charge(old.owner, -cost(topic, old.payload))
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic.split("/"):
            path.append((node, level))
            node = node.children[level]
        node.entry = None
        while path and node.entry is None and not node.children:   # prune empty branches
            parent, level = path.pop()
            del parent.children[level]
            node = parent
        return True

    def _charge(self, owner: str | None, n: int) -> None:
        self.bytes += n
        left = self._bytes_of.get(owner, 0) + n
        if left:
            self._bytes_of[owner] = left
        else:
            self._bytes_of.pop(owner, None)

    def match(self, topic_filter: str) -> Iterator[tuple[str, Retained] | None]:
        """Retained messages matching `topic_filter`, walking only the branches it
        can match. Yields None every so often while it walks without finding
        anything, so the consumer can yield to the event loop in between. Safe to
        suspend between items while the index changes (children are copied as
        they are visited; an entry removed meanwhile is skipped)."""
        if "+" not in topic_filter and "#" not in topic_filter:
            entry = self._by_topic.get(topic_filter)
            if entry is not None:
                yield topic_filter, entry
            return
        levels = topic_filter.split("/")
        n = len(levels)
        stack: list[tuple[_Node, int, str]] = [(self._root, 0, "")]
        visited = 0
        while stack:
            node, i, prefix = stack.pop()
            visited += 1
            if visited % 256 == 0:
                yield None
            if i < 0:       # below a "#": everything here matches
                if node.entry is not None and self._by_topic.get(prefix) is node.entry:
                    yield prefix, node.entry
                for name, child in list(node.children.items()):
                    stack.append((child, -1, f"{prefix}/{name}"))
                continue
            if i == n:
                if node.entry is not None and self._by_topic.get(prefix) is node.entry:
                    yield prefix, node.entry
                continue
            level = levels[i]
            if level == "#":
                # "a/#" matches "a" itself too; at the root it never matches "$..." topics
                if i and node.entry is not None and self._by_topic.get(prefix) is node.entry:
                    yield prefix, node.entry
                for name, child in list(node.children.items()):
                    if i == 0 and name.startswith("$"):
                        continue
                    stack.append((child, -1, _join(prefix, name, i)))
                continue
            if level == "+":
                for name, child in list(node.children.items()):
                    if i == 0 and name.startswith("$"):
                        continue
                    stack.append((child, i + 1, _join(prefix, name, i)))
            else:
                exact = node.children.get(level)
                if exact is not None:
                    stack.append((exact, i + 1, _join(prefix, level, i)))


def _join(prefix: str, name: str, depth: int) -> str:
    return name if depth == 0 else f"{prefix}/{name}"


class RetainedMessages:
    """The retained messages of the broker and their persistence (`store`: a
    RetainedStore, or None to keep them in memory only)."""

    def __init__(self, *, limits: Any, store: Any, stats: dict[str, int],
                 on_stored: Callable[[str, bytes], None] | None = None) -> None:
        self.index = RetainedIndex(max_bytes=limits.max_retained_bytes,
                                   max_bytes_per_principal=limits.max_retained_bytes_per_principal,
                                   max_topics=MAX_RETAINED)
        self._store = store
        self._stats = stats
        # Told of each change once its write committed, if it is still the topic's
        # current value then (topic, payload; b"" when cleared): the composition
        # root publishes it on the event bus.
        self._on_stored = on_stored
        self.persisted = store is not None
        self._refused_log = RateLimitedLog(log)
        self._dirty: dict[str, tuple[bytes, int, Any] | None] = {}   # topic -> (payload, qos, props)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._unavailable_since: float | None = None

    def set(self, topic: str, payload: bytes, qos: int, owner: str | None = None, props: Any = None) -> bool:
        """Retain (or, with an empty payload, clear) `topic`; False when a budget
        refuses it (counted, logged; the message is still routed)."""
        if not payload:
            if not self.index.delete(topic):
                return True
            self._dirty[topic] = None
        else:
            payload = bytes(payload)
            try:
                self.index.put(topic, payload, qos, owner, props)
            except Refused as exc:
                self._stats["retained_refused"] += 1
                self._refused_log.warning("not retaining %s: %s (%d refused so far)", topic, exc,
                                          self._stats["retained_refused"])
                return False
            self._dirty[topic] = (payload, qos, props)
        if topic[0] == "$":
            # the broker's own ($SYS): published again every sys_interval, never stored
            self._dirty.pop(topic, None)
            return True
        if self._store is not None:
            self._wake.set()
        return True

    async def load(self) -> None:
        """The retained messages of the last run, as far as today's budgets allow."""
        if self._store is None:
            return
        refused = 0
        loop_now = asyncio.get_running_loop().time()
        for m in await self._store.load_all():
            try:
                self.index.put(m.topic, bytes(m.payload), m.qos, None,
                               props_of_stored(m.properties, m.expires_at, loop_now))
            except Refused:
                refused += 1
        log.info("loaded %d retained messages (%d bytes)", len(self.index), self.index.bytes)
        if refused:
            log.warning("%d stored retained messages are over limits.max_retained_bytes and were not loaded",
                        refused)

    async def run_writer(self) -> None:
        """Writes retained changes to the store; repeated changes of one topic
        coalesce, so the backlog is bounded by the number of retained topics."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self, *, give_up_after: float | None = None) -> bool:
        """Write pending retained changes; True once all are written. An entry
        leaves the dirty map only after its write committed (and only if it did
        not change meanwhile), so a cancelled flush loses nothing. While the store
        is unavailable (disk full, read-only) the writes are retried, and callers
        holding a PUBACK wait: nothing is acknowledged that is not stored. Only at
        shutdown (`give_up_after`) does it stop trying."""
        if self._store is None:
            return True
        loop = asyncio.get_running_loop()
        async with self._lock:
            dirty = self._dirty
            delay = RETRY_FIRST
            started = loop.time()
            while dirty:
                topic, v = next(iter(dirty.items()))
                try:
                    if v is None:
                        await self._store.delete(topic)
                    else:
                        await self._store.put(RetainedMessage(topic, v[0], v[1], *stored_props(v[2], loop.time())))
                except StoreUnavailable as exc:
                    self._stats["retained_write_errors"] += 1
                    if self._unavailable_since is None:
                        self._unavailable_since = loop.time()
                        log.error("cannot store retained messages (%s): holding the acknowledgements of "
                                  "%d pending retained change(s) until the store takes writes again",
                                  exc, len(dirty))
                    if give_up_after is not None and loop.time() - started > give_up_after:
                        log.error("stopping with %d retained change(s) not stored", len(dirty))
                        return False
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                except Exception:  # noqa: BLE001 - not retried: it would fail the same way
                    self._stats["retained_write_errors"] += 1
                    self._stats["retained_refused"] += 1
                    log.exception("the store refused the retained message on %s; it is kept in memory only", topic)
                delay = RETRY_FIRST
                if self._unavailable_since is not None:
                    log.warning("retained messages stored again after %.1f s",
                                loop.time() - self._unavailable_since)
                    self._unavailable_since = None
                if dirty.get(topic, 0) is v:
                    del dirty[topic]
                    if self._on_stored is not None:
                        self._on_stored(topic, b"" if v is None else v[0])
                # else changed meanwhile: not told, the newer value is written (and told) next;
                # told now, a cluster node would send its peers a value already replaced here
            return True
