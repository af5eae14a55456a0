"""The cursor file: the last mailbox number handled, kept across program restarts.

One small JSON document, `{"n": <int>, "ts": <float|null>, "saved": <unix time>}`,
replaced atomically (written to a temporary file in the same directory, then
renamed over the old one), so a crash leaves the old cursor or the new one,
never half of one. A missing, unreadable or malformed file reads as "no cursor".
Files written by earlier device SDKs (`{"last_n": <int>}`) are still read.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class SavedCursor:
    n: int
    ts: float | None      # the `ts` of event n, when known


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class CursorFile:
    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock

    def _doc(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def load(self) -> SavedCursor | None:
        doc = self._doc()
        n = _count(doc.get("n"))
        if n is None:
            n = _count(doc.get("last_n"))
        if n is None:
            return None
        ts = doc.get("ts")
        return SavedCursor(n, float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None)

    def save(self, n: int, ts: float | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cursor-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"n": n, "ts": ts, "saved": self._clock()}, f)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
