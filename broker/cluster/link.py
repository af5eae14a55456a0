"""The node's one NATS connection (nats-py).

* It connects in the background and reconnects by itself, forever: a node whose
  NATS is down starts and serves its own clients (local delivery never waits
  for NATS); cross-node traffic resumes once NATS is back.
* Everything sent goes through one outgoing queue, in order, bounded in bytes
  (`cluster.max_pending_bytes`): while NATS is unreachable it holds what was
  sent, beyond the bound the newest is dropped and counted (`dropped`,
  `dropped_bytes`), logged at a limited rate.
* Incoming messages of one subscription are handled one at a time, in order;
  a subscription's own backlog is bounded in bytes too (nats-py's pending
  limits; what it drops is a "slow consumer", counted in `slow_consumer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError

log = logging.getLogger("roost.cluster")

Handler = Callable[[str, bytes], Awaitable[None]]

RECONNECT_WAIT = 0.5          # seconds between attempts to reach NATS


class NatsLink:
    def __init__(self, servers: list[str], *, name: str, max_pending_bytes: int) -> None:
        self._servers = servers
        self._name = name
        self._max_bytes = max_pending_bytes
        self._queue: deque[tuple[str, bytes]] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._handlers: dict[str, Handler] = {}
        self._nc: Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.connected = asyncio.Event()
        self.on_connected: Callable[[], None] | None = None      # (re)connected to NATS
        self.on_disconnected: Callable[[], None] | None = None
        self.sent = 0
        self.received = 0
        self.dropped = 0
        self.dropped_bytes = 0
        self.slow_consumer = 0
        self.outages = 0

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def up(self) -> bool:
        """Connected to NATS now."""
        return self.connected.is_set()

    def subscribe(self, subject: str, handler: Handler) -> None:
        """Before start(): `handler(subject, data)` for each message on `subject`."""
        self._handlers[subject] = handler

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._connect(), name="nats-connect"),
                       loop.create_task(self._sender(), name="nats-sender")]

    async def stop(self) -> None:
        """Send what is queued (briefly), then close."""
        self._stopping = True
        if self._nc is not None and self._nc.is_connected:
            for _ in range(100):
                if not self._queue:
                    break
                await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._nc is not None:
            try:
                await asyncio.wait_for(self._nc.drain(), 2)
            except (TimeoutError, NatsError, OSError):
                pass
            try:
                await self._nc.close()
            except (NatsError, OSError):
                pass

    # ---- sending -----------------------------------------------------------------------

    def send(self, subject: str, data: bytes) -> bool:
        """Queue `data` for `subject`; False (dropped, counted) past the byte bound."""
        n = len(data) + len(subject)
        if self._queued_bytes + n > self._max_bytes:
            self.dropped += 1
            self.dropped_bytes += n
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("cluster: %d bytes wait for NATS (cluster.max_pending_bytes); dropped a message "
                            "for %s (%d so far)", self._queued_bytes, subject, self.dropped)
            return False
        self._queue.append((subject, data))
        self._queued_bytes += n
        self._wake.set()
        return True

    async def _sender(self) -> None:
        queue = self._queue
        while True:
            await self._wake.wait()
            self._wake.clear()
            while queue:
                nc = self._nc
                if nc is None or not nc.is_connected:
                    # nats-py says disconnected before its callback runs: wait for the
                    # reconnect (or a second), never spin on an event still set
                    self.connected.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.connected.wait(), 1.0)
                    continue
                subject, data = queue[0]
                try:
                    await nc.publish(subject, data)
                except (NatsError, OSError) as exc:
                    if nc.is_connected:   # not an outage: this message cannot go (too large...)
                        queue.popleft()
                        self._queued_bytes -= len(data) + len(subject)
                        self.dropped += 1
                        log.warning("cluster: cannot send to %s: %s", subject, exc)
                    else:
                        await asyncio.sleep(0.05)
                    continue
                queue.popleft()
                self._queued_bytes -= len(data) + len(subject)
                self.sent += 1

    # ---- the connection ----------------------------------------------------------------

    async def _connect(self) -> None:
        first = True
        while self._nc is None:
            try:
                self._nc = await nats.connect(
                    self._servers, name=self._name, allow_reconnect=True, max_reconnect_attempts=-1,
                    reconnect_time_wait=RECONNECT_WAIT, connect_timeout=2, ping_interval=5,
                    max_outstanding_pings=2, pending_size=self._max_bytes,
                    no_echo=True,    # never this node's own messages back (a shared event ran here already)
                    disconnected_cb=self._lost, reconnected_cb=self._back, error_cb=self._error)
            except (NatsError, OSError, TimeoutError) as exc:
                if first:
                    log.warning("cluster: NATS %s not reachable (%s); serving local clients, retrying",
                                ", ".join(self._servers), exc or type(exc).__name__)
                    first = False
                await asyncio.sleep(RECONNECT_WAIT)
        for subject, handler in self._handlers.items():
            await self._nc.subscribe(subject, cb=self._dispatcher(handler),
                                     pending_bytes_limit=self._max_bytes)
        with contextlib.suppress(NatsError, OSError, TimeoutError):
            await self._nc.flush(timeout=2)     # the subscriptions are in place on the server
        log.info("cluster: connected to NATS %s", self._nc.connected_url.netloc if self._nc.connected_url else "")
        await self._back()

    def _dispatcher(self, handler: Handler) -> Callable[[Any], Awaitable[None]]:
        async def on_message(msg: Any) -> None:
            self.received += 1
            try:
                await handler(msg.subject, msg.data)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad message must not stop the subscription
                log.exception("cluster: handling a message on %s failed", msg.subject)
        return on_message

    async def _lost(self) -> None:
        if self._stopping:
            return
        self.outages += 1
        self.connected.clear()
        log.warning("cluster: lost NATS; local delivery goes on, cross-node traffic waits (bounded)")
        if self.on_disconnected is not None:
            self.on_disconnected()

    async def _back(self) -> None:
        if self.outages:
            log.info("cluster: NATS is back")
        self.connected.set()
        self._wake.set()
        if self.on_connected is not None:
            self.on_connected()

    async def _error(self, exc: Exception) -> None:
        if "slow consumer" in str(exc).lower():
            self.slow_consumer += 1
            if self.slow_consumer == 1 or self.slow_consumer % 1000 == 0:
                log.warning("cluster: incoming backlog over its byte bound, NATS dropped messages (%d so far)",
                            self.slow_consumer)
            return
        log.info("cluster: NATS: %s", exc or type(exc).__name__)
