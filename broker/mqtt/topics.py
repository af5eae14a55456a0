"""Topic names, topic filters, and the subscription index.

The index keeps exact filters in a dict (one lookup per publish) and wildcard
filters in a trie walked level by level, so publishing to an exact topic never
scans every subscription (amqtt 0.12.1 defect 10). Matches are cached per topic
until the next subscription change.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from contract import topics

K = TypeVar("K")  # subscriber key (the engine uses its SessionState objects)

MAX_TOPIC_BYTES = 65535


def valid_topic_name(topic: str) -> bool:
    """A PUBLISH topic: non-empty, no wildcards, no NUL (MQTT-4.7.3)."""
    # (at most 4 UTF-8 bytes a character: a topic of up to 16,383 is never encoded to count)
    return bool(topic) and "+" not in topic and "#" not in topic and "\x00" not in topic \
        and (len(topic) <= MAX_TOPIC_BYTES // 4 or len(topic.encode("utf-8")) <= MAX_TOPIC_BYTES)


def valid_topic_filter(f: str) -> bool:
    if not f or "\x00" in f or len(f.encode("utf-8")) > MAX_TOPIC_BYTES:
        return False
    if "+" not in f and "#" not in f:
        return True
    levels = f.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


def is_wildcard(f: str) -> bool:
    return "+" in f or "#" in f


matches = topics.matches  # (topic name, filter) -> bool, shared with the rest of Roost


class _Node:
    __slots__ = ("children", "subs", "hash_subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subs: dict[Any, int] = {}        # filters ending exactly here
        self.hash_subs: dict[Any, int] = {}   # filters ending here + "/#"


class SubscriptionIndex(Generic[K]):
    """filter -> {subscriber: qos}; `match(topic)` -> {subscriber: max qos}."""

    def __init__(self, cache_size: int = 4096) -> None:
        self._exact: dict[str, dict[K, int]] = {}
        self._root = _Node()
        self._count = 0
        self._cache: dict[str, dict[K, int]] = {}
        self._cache_size = cache_size

    def __len__(self) -> int:
        return self._count

    def add(self, f: str, key: K, qos: int) -> None:
        self._cache.clear()
        if not is_wildcard(f):
            d = self._exact.setdefault(f, {})
        else:
            node = self._root
            levels = f.split("/")
            if levels[-1] == "#":
                for level in levels[:-1]:
                    nxt = node.children.get(level)
                    if nxt is None:
                        nxt = node.children[level] = _Node()
                    node = nxt
                d = node.hash_subs
            else:
                for level in levels:
                    nxt = node.children.get(level)
                    if nxt is None:
                        nxt = node.children[level] = _Node()
                    node = nxt
                d = node.subs
        if key not in d:
            self._count += 1
        d[key] = qos

    def remove(self, f: str, key: K) -> bool:
        self._cache.clear()
        if not is_wildcard(f):
            d = self._exact.get(f)
            if d is None or key not in d:
                return False
            del d[key]
            if not d:
                del self._exact[f]
            self._count -= 1
            return True
        levels = f.split("/")
        hashed = levels[-1] == "#"
        if hashed:
            levels = levels[:-1]
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in levels:
            nxt = node.children.get(level)
            if nxt is None:
                return False
            path.append((node, level))
            node = nxt
        d = node.hash_subs if hashed else node.subs
        if key not in d:
            return False
        del d[key]
        self._count -= 1
        # prune empty branches so the trie does not grow with churn
        while path and not node.subs and not node.hash_subs and not node.children:
            parent, level = path.pop()
            del parent.children[level]
            node = parent
        return True

    def match(self, topic: str) -> dict[K, int]:
        """Subscribers whose filters match `topic`, each once with its highest QoS.
        The returned dict is shared (cached): callers must not modify it."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        exact = self._exact.get(topic)
        out: dict[K, int] = dict(exact) if exact else {}
        if self._root.children or self._root.hash_subs:  # a bare "#" lives on the root
            self._walk(topic.split("/"), out, topic.startswith("$"))
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[topic] = out
        return out

    def _walk(self, levels: list[str], out: dict[K, int], dollar: bool) -> None:
        n = len(levels)
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            # "a/#" also matches "a" itself (MQTT-4.7.1-2); at the root "#" never matches "$x"
            if node.hash_subs and not (dollar and i == 0):
                _merge(out, node.hash_subs)
            if i == n:
                if node.subs:
                    _merge(out, node.subs)
                continue
            children = node.children
            nxt = children.get(levels[i])
            if nxt is not None:
                stack.append((nxt, i + 1))
            if not (dollar and i == 0):
                plus = children.get("+")
                if plus is not None:
                    stack.append((plus, i + 1))

    def filters_of_exact(self, f: str) -> dict[K, int]:
        return self._exact.get(f, {})

    def items(self) -> list[tuple[str, K, int]]:
        """Every (filter, subscriber, qos); for diagnostics only (walks everything)."""
        out = [(f, k, q) for f, d in self._exact.items() for k, q in d.items()]

        def rec(node: _Node, prefix: list[str]) -> None:
            for k, q in node.hash_subs.items():
                out.append(("/".join(prefix + ["#"]), k, q))
            for k, q in node.subs.items():
                out.append(("/".join(prefix), k, q))
            for level, child in node.children.items():
                rec(child, prefix + [level])
        rec(self._root, [])
        return out


def _merge(out: dict[Any, int], subs: dict[Any, int]) -> None:
    for k, q in subs.items():
        old = out.get(k)
        if old is None or q > old:
            out[k] = q
