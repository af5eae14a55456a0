"""The session journal: every change of a persistent (clean_session=0) MQTT
session goes to the store as it happens, so a broker that dies (SIGKILL, power
loss) still owes its clients every QoS 1/2 message it acknowledged to a publisher.

Operations queue up in memory in the order they happened and one task writes
whatever is waiting in one store transaction (group commit). `durable()` waits
until everything journaled so far is committed: the engine sends a publisher's
PUBACK/PUBREC only after that, when the publish was kept for a persistent session.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from broker.mqtt.hooks import NotAcknowledged
from broker.services.base import cancel_and_wait
from broker.store.base import JournalOp, StoreUnavailable

log = logging.getLogger("roost.mqtt")


RETRY_FIRST = 0.05     # seconds before the first retry of a batch the store could not take
RETRY_MAX = 2.0        # longest wait between retries while the store stays unavailable


class JournalFailed(NotAcknowledged):
    """The store refused the journal's batch for a reason other than being
    unavailable (a bug, a corrupt file): what was waiting is not durable. The
    engine closes the connection instead of acknowledging, so the client resends."""


class SessionJournal:
    """Operations are written in order, in batches. A batch the store cannot take
    (StoreUnavailable: disk full, read-only) stays at the head and is retried
    until it is written: `durable()` callers, and so the acks they hold, wait for
    it. Any other failure is not retried (it would fail again): its waiters get
    JournalFailed."""

    def __init__(self, store: Any, *, retry_first: float = RETRY_FIRST, retry_max: float = RETRY_MAX) -> None:
        self._store = store
        self._ops: list[JournalOp] = []
        # (target, batches refused when the waiter came, future)
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()     # one writer at a time keeps the order
        self._retry_first = retry_first
        self._retry_max = retry_max
        self.appended = 0      # operations ever appended: a caller compares before/after
        self.written = 0       # of those, how many were written (or given up on)
        self.refused = 0       # batches given up on (not StoreUnavailable)
        self.write_errors = 0  # batches that failed, retried or not
        self.unavailable_since: float | None = None   # loop time the store began refusing

    def append(self, op: JournalOp) -> None:
        self._ops.append(op)
        self.appended += 1
        self._wake.set()

    @property
    def backlog(self) -> int:
        """Operations appended and not yet written."""
        return self.appended - self.written

    async def durable(self) -> None:
        """Returns once every operation appended before the call is committed;
        raises JournalFailed when a batch was refused meanwhile (conservative: the
        caller does not acknowledge, and its client resends)."""
        target = self.appended
        if self.written >= target:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, self.refused, fut))
        self._wake.set()
        await fut

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="session-journal")

    async def stop(self, *, give_up_after: float = 5.0) -> None:
        """Write what is waiting (retrying for at most `give_up_after` seconds
        while the store is unavailable), then stop the writer."""
        try:
            await asyncio.wait_for(self.flush(), give_up_after)
        except TimeoutError:
            log.error("stopping with %d persistent-session changes the store would not take",
                      self.backlog)
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write everything appended so far, retrying while the store is unavailable."""
        async with self._lock:
            delay = self._retry_first
            while self._ops:
                ops, self._ops = self._ops, []
                try:
                    await self._store.apply(ops)
                except asyncio.CancelledError:
                    self._ops[:0] = ops      # not known to be written: keep them
                    raise
                except StoreUnavailable as exc:
                    self.write_errors += 1
                    self._ops[:0] = ops      # still first in line: order is kept
                    self._note_unavailable(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._retry_max)
                    continue
                except Exception:  # noqa: BLE001 - not retried: it would fail the same way
                    self.write_errors += 1
                    log.exception("the store refused %d persistent-session changes; the clients "
                                  "waiting for them are disconnected unacknowledged", len(ops))
                    self.refused += 1
                    self.written += len(ops)
                    self._settle()
                    continue
                delay = self._retry_first
                if self.unavailable_since is not None:
                    log.warning("session journal written again after %.1f s",
                                asyncio.get_running_loop().time() - self.unavailable_since)
                    self.unavailable_since = None
                self.written += len(ops)
                self._settle()

    def _note_unavailable(self, exc: BaseException) -> None:
        if self.unavailable_since is None:
            self.unavailable_since = asyncio.get_running_loop().time()
            log.error("cannot journal persistent sessions (%s): holding the acknowledgements of "
                      "%d waiting publishers/subscribers until the store takes writes again", exc,
                      len(self._waiters))

    def _settle(self) -> None:
        still = []
        for target, refused, fut in self._waiters:
            if target <= self.written:
                if not fut.done():
                    if self.refused != refused:
                        fut.set_exception(JournalFailed("the store refused the session journal"))
                    else:
                        fut.set_result(None)
            else:
                still.append((target, refused, fut))
        self._waiters = still
