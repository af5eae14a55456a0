"""Following a mailbox by its numbers (PROTOCOL.md, "Inbox"): in order, once each.

Every mailbox event has a gap-free number `n`. A follower keeps the cursor (the
last n taken) and sorts each pushed event: the next one is taken, an old one
(push and `sync` overlap, or a redelivery) is dropped, and after a gap the
missing numbers are fetched with `sync` from the cursor. The transport is one
callable, `sync(after, limit) -> result` (the `sync` op's result), so this runs
the same in the device SDK, the people's SDK and in unit tests.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from typing import Any

from contract.ops import MAX_SYNC_LIMIT
from contract.sdkcore.errors import RequestError

Sync = Callable[[int, int], dict[str, Any]]

SYNC_PAGE = MAX_SYNC_LIMIT     # the most one `sync` may return (contract/ops.py)


class Place(enum.Enum):
    NEXT = "next"         # take it
    OLD = "old"           # at or before the cursor: already taken
    GAP = "gap"           # numbers are missing before it: fill from the cursor first


def numbered(events: object) -> list[dict[str, Any]]:
    """The well-formed events of a `sync` page (dicts with an int n), in n order."""
    if not isinstance(events, list):
        return []
    good = [e for e in events if isinstance(e, dict) and isinstance(e.get("n"), int) and not isinstance(e["n"], bool)]
    return sorted(good, key=lambda e: e["n"])


class MailboxFollower:
    """The cursor of one mailbox and the `sync` paging that fills its gaps.

    `cursor` None means "not known yet": every pushed event is then taken as the
    next, and there is nothing to fill from. `cursor_ts` is the `ts` of the event
    at the cursor when it passed through here (it tells one mailbox from another
    behind the same address, see client/sdk.py `EventStream.resume`).
    """

    def __init__(self, sync: Sync, *, cursor: int | None = None, page: int = SYNC_PAGE) -> None:
        self._sync = sync
        self._page = page
        self.cursor = cursor
        self.cursor_ts: float | None = None

    def place(self, n: int) -> Place:
        if self.cursor is None or n == self.cursor + 1:
            return Place.NEXT
        return Place.OLD if n <= self.cursor else Place.GAP

    def advance(self, ev: dict[str, Any]) -> None:
        """`ev` is taken: the cursor moves to it."""
        self.cursor = ev["n"]
        ts = ev.get("ts")
        self.cursor_ts = float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None

    def missing(self, until: int | None = None) -> Iterator[dict[str, Any]]:
        """The events after the cursor, fetched page by page with `sync`, in order.

        An event counts as taken (the cursor moves to it) when the consumer comes
        back for the next one, so one that was being handled when the consumer
        raised is fetched again next time. Paging stops at the end of the mailbox,
        or once the cursor reached `until` (the whole page is still handed over).
        """
        while self.cursor is not None and (until is None or self.cursor < until):
            res = self._sync(self.cursor, self._page)
            events = [e for e in numbered(res.get("events")) if e["n"] > self.cursor]
            for ev in events:
                yield ev
                self.advance(ev)
            if not res.get("more") or not events:
                return


PROBE_AFTER = 2 ** 53     # beyond any mailbox


def mailbox_head(sync: Sync, after: int = 0, *, page: int = SYNC_PAGE) -> int:
    """The newest event number in the mailbox (at least `after`).

    Fast path: asked for events after a number beyond any mailbox, a Roost broker
    answers no events and `last` = its newest n. A server that echoes the cursor
    instead (or refuses) gets the slow path: page through `sync`.
    """
    try:
        res = sync(PROBE_AFTER, 1)
        last = res.get("last")
        if not res.get("events") and isinstance(last, int) and 0 <= last < PROBE_AFTER:
            return max(after, last)
    except RequestError:
        pass
    n = after
    while True:
        res = sync(n, page)
        events = numbered(res.get("events"))
        for ev in events:
            n = max(n, ev["n"])
        last = res.get("last")
        if not res.get("more") or not events:
            if isinstance(last, int) and last > n:
                n = last
            return n
