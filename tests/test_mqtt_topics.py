"""The subscription index against a brute-force matcher, and topic/filter validation."""

from __future__ import annotations

import random

import pytest

from broker.mqtt.topics import SubscriptionIndex, matches, valid_topic_filter, valid_topic_name


@pytest.mark.parametrize("topic,f,expected", [
    ("a/b", "a/b", True), ("a/b", "a/+", True), ("a/b", "#", True), ("a", "a/#", True),
    ("a/b/c", "a/#", True), ("a/b/c", "a/+", False), ("a//c", "a/+/c", True), ("/a", "+/a", True),
    ("$SYS/x", "#", False), ("$SYS/x", "+/x", False), ("$SYS/x", "$SYS/#", True), ("a/$x", "a/+", True),
    ("ab", "a", False), ("a", "a/b", False),
])
def test_matches(topic, f, expected):
    assert matches(topic, f) is expected
    idx: SubscriptionIndex[str] = SubscriptionIndex()
    idx.add(f, "s", 1)
    assert (idx.match(topic) == {"s": 1}) is expected


def test_validation():
    assert valid_topic_name("a/b") and valid_topic_name("/") and not valid_topic_name("")
    assert not valid_topic_name("a/+") and not valid_topic_name("a/#") and not valid_topic_name("a\x00")
    for ok in ("#", "+", "a/#", "+/+/#", "/+", "a//b"):
        assert valid_topic_filter(ok), ok
    for bad in ("", "a/#/b", "a#", "a/b+", "#/a", "a\x00"):
        assert not valid_topic_filter(bad), bad


def test_index_agrees_with_brute_force_and_prunes():
    rng = random.Random(7)
    levels = ["a", "b", "c", "$s", ""]

    def rand_filter() -> str:
        parts = [rng.choice(levels + ["+", "+"]) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.3:
            parts.append("#")
        return "/".join(parts)

    idx: SubscriptionIndex[int] = SubscriptionIndex()
    subs: dict[tuple[str, int], int] = {}
    for _ in range(3000):
        f, key = rand_filter(), rng.randint(0, 30)
        if rng.random() < 0.3 and subs:
            (f, key) = rng.choice(list(subs))
            assert idx.remove(f, key)
            del subs[(f, key)]
        else:
            q = rng.randint(0, 2)
            idx.add(f, key, q)
            subs[(f, key)] = q
        if rng.random() < 0.1:
            topic = "/".join(rng.choice(levels) for _ in range(rng.randint(1, 5)))
            want: dict[int, int] = {}
            for (sf, k), q in subs.items():
                if matches(topic, sf):
                    want[k] = max(q, want.get(k, -1))
            assert idx.match(topic) == want, topic
    assert len(idx) == len(subs)
    for f, key in list(subs):
        assert idx.remove(f, key)
    assert len(idx) == 0 and not idx._root.children and not idx._exact


def test_bare_hash_alone_on_the_root():
    idx: SubscriptionIndex[str] = SubscriptionIndex()
    idx.add("#", "all", 0)
    assert idx.match("a/b") == {"all": 0}
    assert idx.match("$SYS/x") == {}
    idx.add("+", "plus", 1)
    idx.remove("+", "plus")
    assert idx.match("a") == {"all": 0}
