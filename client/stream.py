"""The mailbox as an ordered stream for the people's SDK, and its cursor file.

`EventStream` turns a `RoostClient`'s item queue into events in `n` order, once
each (gap filling from the SDK core, contract/sdkcore/mailbox.py), acks them
and saves the cursor; `CursorStore` is that cursor per (server, user, label),
with the lock that keeps two processes off one label.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.config import Server
from client.items import InboxItem, Item, ReconnectedItem
from contract.sdkcore import CursorFile, CursorLocked, MailboxFollower, Place, RoostError

if TYPE_CHECKING:
    from client.sdk import RoostClient

log = logging.getLogger("roost.client")


# ---- cursor persistence -------------------------------------------------------

class CursorStore:
    """The last event n handed out for one (server, user, label), kept across runs
    in a cursor file (contract/sdkcore/cursor.py).

    A lock file keeps two processes from using the same label at once: with the
    same client id they would take each other's connection over, endlessly.
    """

    def __init__(self, directory: Path, server: Server, user: str, label: str) -> None:
        safe_server = f"{server.host}_{server.port}".replace("/", "_").replace(":", "_")
        self.path = directory / "cursors" / safe_server / f"{user}.{label}.json"
        self._file = CursorFile(self.path)
        self._lock_fd: int | None = None

    def lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CursorLocked("another roost process is already using this label; pick another with --label") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> int | None:
        saved = self._file.load()
        return saved.n if saved is not None else None

    def load_ts(self) -> float | None:
        """The `ts` of event n when it was saved: tells this mailbox from another
        one behind the same server address and user (a store that was replaced)."""
        saved = self._file.load()
        return saved.ts if saved is not None else None

    def save(self, n: int, ts: float | None = None) -> None:
        self._file.save(n, ts)


# ---- the ordered event stream -----------------------------------------------------

class EventStream:
    """The mailbox as a gap-free, duplicate-free, in-order stream, plus other items.

    Live events come pushed on the inbox topic; a gap (events lost while away, or
    dropped because the consumer lagged) or a reconnect is filled by `sync` from
    the last event handed out. Events are acked (cumulative) and the cursor saved
    once the consumer comes back for more, i.e. after it handled them.
    """

    def __init__(self, client: RoostClient, *, cursor: int | None = None,
                 store: CursorStore | None = None, ack: bool = True,
                 ack_interval: float = 0.5) -> None:
        self.client = client
        # The cursor (last n handed out; None = not known yet) and the ts of that event.
        self._mailbox = MailboxFollower(client.sync, cursor=cursor)
        self.store = store
        self._ack = ack
        self._ack_interval = ack_interval
        self._acked = cursor
        self._last_ack = 0.0
        self._behind = False              # a catch-up failed: retry before trusting pushes
        self.gaps_filled = 0

    @property
    def cursor(self) -> int | None:
        return self._mailbox.cursor

    @cursor.setter
    def cursor(self, n: int | None) -> None:
        self._mailbox.cursor = n

    @property
    def cursor_ts(self) -> float | None:
        return self._mailbox.cursor_ts

    def start_at_head(self) -> int:
        head = self.client.mailbox_head()
        self.cursor = self._acked = head
        return head

    def resume(self, n: int, ts: float | None) -> str | None:
        """Continue after event `n` saved earlier, unless the server's mailbox is not
        the one it was saved from (the store was replaced: numbers start again),
        in which case the whole mailbox is replayed so nothing is skipped. Returns
        what to tell the user then."""
        head = self.client.mailbox_head()
        if head < n:
            self.cursor = 0
            return f"the server's mailbox ends at #{head}, before the saved position #{n} (a new store?): " \
                   "replaying it from the start"
        if ts is not None and n > 0:
            res = self.client.call("sync", {"after": n - 1, "limit": 1})
            events = [e for e in res.get("events") or [] if isinstance(e, dict)]
            if events and events[0].get("n") == n and events[0].get("ts") != ts:
                self.cursor = 0
                return f"event #{n} on the server is not the one seen before (a new store?): " \
                       "replaying the mailbox from the start"
        self.cursor = n
        return None

    def catch_up(self) -> list[dict[str, Any]]:
        """Events after the cursor, fetched with sync (the cursor must be known).

        A failure part-way (connection lost again, rate limited) keeps what was
        fetched, marks the stream as behind, and the next poll tries again.
        """
        out: list[dict[str, Any]] = []
        try:
            for ev in self._mailbox.missing():
                out.append(ev)
        except RoostError as e:
            log.warning("catching up from #%s failed (%s); will retry", self.cursor, e)
            self._behind = True
            return out
        self._behind = False
        return out

    def poll(self, timeout: float) -> list[Item]:
        """Wait up to `timeout` for items; returns them in order (possibly none)."""
        self.flush_ack()
        out: list[Item] = []
        if self._behind and self.client.connected:
            out.extend(InboxItem(ev) for ev in self.catch_up())
        try:
            first = self.client.items.get(timeout=0.2 if (self._behind or out) else timeout)
        except queue.Empty:
            if not out:
                self.flush_ack(force=True)
            return out
        batch = [first]
        while len(batch) < 500:
            try:
                batch.append(self.client.items.get_nowait())
            except queue.Empty:
                break
        for item in batch:
            if isinstance(item, InboxItem):
                out.extend(InboxItem(ev) for ev in self._accept(item.event))
            elif isinstance(item, ReconnectedItem):
                out.append(item)
                out.extend(InboxItem(ev) for ev in self.catch_up())
            else:
                out.append(item)
        return out

    def _accept(self, ev: dict[str, Any]) -> list[dict[str, Any]]:
        place = self._mailbox.place(ev["n"])
        if place is Place.NEXT and (self.cursor is None or not self._behind):
            self._mailbox.advance(ev)
            return [ev]
        if place is Place.OLD:
            return []                     # already handed out (sync and push overlap)
        # A gap: fill it from the server, which has ev too (it was committed before the push).
        self.gaps_filled += 1
        return self.catch_up()

    def flush_ack(self, force: bool = False) -> None:
        """Ack and save the cursor if it moved (at most every ack_interval unless forced)."""
        if self.cursor is None or self.cursor == self._acked:
            return
        now = time.monotonic()
        if not force and now - self._last_ack < self._ack_interval:
            return
        n = self.cursor
        if self._ack and self.client.connected:
            try:
                self.client.call("ack", {"n": n})
            except RoostError as e:
                log.warning("ack %d failed: %s", n, e)
                return
        if self.store is not None:
            self.store.save(n, self.cursor_ts)
        self._acked = n
        self._last_ack = now
