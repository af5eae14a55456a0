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

from broker.store.base import JournalOp

log = logging.getLogger("roost.mqtt")


class SessionJournal:
    def __init__(self, store: Any) -> None:
        self._store = store
        self._ops: list[JournalOp] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()     # one writer at a time keeps the order
        self.appended = 0      # operations ever appended: a caller compares before/after
        self.written = 0       # of those, how many were written (or failed to be)
        self.write_errors = 0

    def append(self, op: JournalOp) -> None:
        self._ops.append(op)
        self.appended += 1
        self._wake.set()

    async def durable(self) -> None:
        """Returns once every operation appended before the call is committed."""
        target = self.appended
        if self.written >= target:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._wake.set()
        await fut

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="session-journal")

    async def stop(self) -> None:
        """Write what is waiting, then stop the writer."""
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            while self._ops:
                ops, self._ops = self._ops, []
                try:
                    await self._store.apply(ops)
                except Exception:  # noqa: BLE001 - keep serving from memory; say what is at risk
                    self.write_errors += 1
                    log.exception("could not journal %d persistent-session changes: a crash now would lose them",
                                  len(ops))
                self.written += len(ops)
                self._settle()

    def _settle(self) -> None:
        still = []
        for target, fut in self._waiters:
            if target <= self.written:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        self._waiters = still
