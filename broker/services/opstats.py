"""Latency histograms and request counters, cheap enough for every request and
every store commit, read at scrape time by /metrics and `roost status`.

Each object has one writer (the event loop, or the store's writer thread for
commit latencies): an observation is a few int/float updates, no lock. A reader
on another thread may see a bucket bumped before the sum; Prometheus tolerates
that and the next scrape is exact again.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

# Seconds: from a cached SQLite read (sub-millisecond) to a commit stuck behind a
# slow disk; the same bounds for requests and commits so they compare directly.
LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                      0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Fixed buckets (`v <= bound`, Prometheus' `le`), plus one for larger values."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, the last bound +inf."""
        out = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float | None:
        """An upper estimate of the q-quantile (the bound of its bucket); None when empty."""
        if not self.count:
            return None
        rank = q * self.count
        for bound, total in self.cumulative():
            if total >= rank:
                return bound
        return float("inf")  # pragma: no cover - the last cumulative count is self.count


class OpStats:
    __slots__ = ("latency", "outcomes")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.latency = Histogram()


class RequestStats:
    """IM requests that reached their handler, per op: outcome counts ("ok" or
    the error code answered) and handler latency. Ops are the served ones only
    (an unknown op is refused before it gets here), so labels stay bounded."""

    def __init__(self) -> None:
        self.by_op: dict[str, OpStats] = {}

    def observe(self, op: str, outcome: str, seconds: float) -> None:
        stats = self.by_op.get(op)
        if stats is None:
            stats = self.by_op[op] = OpStats()
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        stats.latency.observe(seconds)

    def counts(self) -> dict[str, dict[str, int]]:
        """op -> outcome -> requests, a copy."""
        return {op: dict(s.outcomes) for op, s in self.by_op.items()}
