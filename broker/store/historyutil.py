"""Reading telemetry history rows into points: the same for every engine."""

from __future__ import annotations

import json

from broker.store.base import HistoryPoint


def select_history(device: str, newest_first: list[tuple[float, str]], metric: str | None,
                   limit: int) -> list[HistoryPoint]:
    """Rows (ts, fields JSON), newest first -> at most `limit` points, oldest first."""
    out: list[HistoryPoint] = []
    for ts, text in newest_first:
        if len(out) >= limit:
            break
        try:
            doc = json.loads(text)
        except ValueError:
            continue   # a damaged row is a missing point
        if not isinstance(doc, dict):
            continue
        if metric is not None:
            if metric not in doc:
                continue
            doc = {metric: doc[metric]}
        out.append(HistoryPoint(device, float(ts), doc))
    out.reverse()
    return out
