"""Pushing mailbox events to `roost/inbox/<principal>`, per client, in order.

Each client subscribed to its inbox gets one `InboxPusher`: a task that owns the
client's push position `next_n` and delivers events strictly in n order. Fresh
events arrive in memory (`offer`, right after their transaction committed); when
the pusher is behind, or an event was not offered to it, it reads them from the
store. So the replay of what a persistent client missed and the live stream that
follows are one sequence: no gap and nothing twice in between.

Where a pusher starts:
* clean session: at the first event committed after it subscribed (the client
  calls `sync` for anything older);
* clean_session = false: right after the client's acked cursor (guarantee 4).
  Such a client's inbox subscription is recorded in the store, so a reconnect that
  relies on its persistent session (no new SUBSCRIBE) is pushed too, even after a
  broker restart.

A store that cannot write (disk full, read-only) stops nothing here: pushers only
read, and an inbox-subscription flag that could not be written is kept in memory
and written again once the store takes writes (one log line per outage, not one
traceback per client).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from broker.services.base import Publisher
from broker.services.telemetry_influx import RateLimitedLog
from broker.store.base import MailboxEvent, MessagingStore, StoreClosed, StoreUnavailable
from broker.store.jsonutil import compact_json
from contract import topics

log = logging.getLogger("roost.inbox")

MAX_TRACKED_CLIENTS = 20000   # clients whose inbox filters are remembered (persistent ones outlive connections)
READ_BATCH = 200          # events read from the store at a time when catching up
BUFFER_MAX = 256          # events a pusher holds in memory before falling back to the store
RETRY_MIN = 0.05          # seconds before re-offering an event a connected client could not take
RETRY_MAX = 2.0
SUB_RETRY = 1.0           # seconds between attempts to write inbox-subscription flags the store refused


def encode_event(doc: dict[str, Any]) -> bytes:
    return compact_json(doc).encode()


def event_payload(event: MailboxEvent) -> bytes:
    """What is pushed for `event`: the store's own encoding when it made one."""
    return event.wire if event.wire is not None else encode_event(event.doc)


def describe_failure(exc: BaseException) -> tuple[str, bool]:
    """(one line, whether a traceback helps): the store being unable to write or
    read is an outage to report in a line, anything else a bug worth its traceback."""
    if isinstance(exc, (StoreUnavailable, StoreClosed)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__, False
    return f"{type(exc).__name__}: {exc}", True


class InboxPusher:
    def __init__(self, *, client_id: str, principal: str, persistent: bool, store: MessagingStore,
                 publisher: Publisher, on_exit: Any, start_after: int | None = None) -> None:
        self.client_id = client_id
        # A clean session's start when offers may be missing (a cluster whose other
        # nodes may not know yet of this node's interest): right after the mailbox
        # head read before the pusher was registered, instead of the first offer.
        self._start_after = start_after
        self._refresh = False
        self.principal = principal
        self.persistent = persistent
        self._store = store
        self._publisher = publisher
        self._on_exit = on_exit
        self._topic = topics.inbox(principal)
        self._buf: deque[MailboxEvent] = deque()
        self._first_offered: int | None = None
        self._known_head = 0
        self._next_n: int | None = None
        self._wake = asyncio.Event()
        self._nudge = asyncio.Event()   # the client (re)subscribed: retry a refused push now
        self._task: asyncio.Task[None] | None = None
        # True only while the task waits, caught up, for new events: then `offer`
        # may push the next event itself, in order (see offer).
        self._idle = False
        self.pushed = 0
        self.retries = 0
        self.read_errors = 0
        self._read_log = RateLimitedLog(log, interval=30.0)

    def _read_failed(self, what: str, exc: Exception) -> None:
        self.read_errors += 1
        line, trace = describe_failure(exc)
        if trace:
            log.warning("inbox pusher for %s: %s failed; retrying", self.client_id, what, exc_info=exc)
        else:
            self._read_log.warning("inbox pusher for %s: %s failed (%s); retrying", self.client_id, what, line)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"inbox-push-{self.client_id}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def nudge(self) -> None:
        self._nudge.set()

    def refresh(self) -> None:
        """Read the mailbox head from the store once more: events committed
        elsewhere may not have been offered here (see Inboxes.catch_up)."""
        self._refresh = True
        self._wake.set()

    def offer(self, event: MailboxEvent) -> None:
        """A committed event of this principal (called in commit order)."""
        if self._first_offered is None:
            self._first_offered = event.n
        n = event.n
        if self._idle and n == self._next_n:
            # Caught up and this is the very next event: push it now, without waking
            # the task (no task switch, and it leaves with the response written in
            # this loop iteration). Anything but a plain success goes the task's way,
            # which waits and retries; next_n moves only on success (no gap).
            try:
                done = self._publisher.deliver_nowait(self.client_id, self._topic, event_payload(event), 1)
            except Exception:  # noqa: BLE001 - the task's path retries and logs
                done = None
            if done:
                self._next_n = n + 1
                if n > self._known_head:
                    self._known_head = n
                self.pushed += 1
                return
        if n > self._known_head:
            self._known_head = n
        if len(self._buf) < BUFFER_MAX and (not self._buf or self._buf[-1].n + 1 == event.n):
            self._buf.append(event)
        # Otherwise it is skipped here and read back from the store (known_head says it exists).
        self._wake.set()

    async def _start_position(self) -> tuple[int, int]:
        """(acked cursor, mailbox head), retried until read: a pusher that gave up
        here would leave a connected client without pushes until it resubscribed."""
        while True:
            try:
                cursor, _sub, head = await self._store.client_cursor(self.client_id, self.principal)
                return cursor, head
            except StoreClosed:
                raise
            except Exception as exc:  # noqa: BLE001 - retried; offers made meanwhile are kept
                self._read_failed("reading its cursor", exc)
                await asyncio.sleep(RETRY_MAX)

    async def _run(self) -> None:
        try:
            cursor, head = await self._start_position()
            if self.persistent:
                self._next_n = cursor + 1
            else:
                # Live from subscription: every event committed after this pusher was
                # registered is offered to it, in commit order, so it starts at the
                # first offer. (Not at the store's head + 1: an event committed after
                # registration can be in that head before its offer arrives, and would
                # be skipped.)
                while self._first_offered is None and self._start_after is None:
                    self._wake.clear()
                    await self._wake.wait()
                if self._start_after is not None:
                    self._next_n = self._start_after + 1
                else:
                    assert self._first_offered is not None
                    self._next_n = self._first_offered
            self._known_head = max(self._known_head, head)
            while True:
                self._wake.clear()
                if self._refresh:
                    self._refresh = False
                    self._known_head = max(self._known_head, (await self._start_position())[1])
                if self._next_n > self._known_head:
                    self._idle = True
                    try:
                        await self._wake.wait()
                    finally:
                        self._idle = False
                    continue
                try:
                    batch = await self._next_batch()
                except StoreClosed:
                    raise
                except Exception as exc:  # noqa: BLE001 - a failed read is retried, never skipped (no gap)
                    self._read_failed("reading the mailbox", exc)
                    await asyncio.sleep(RETRY_MAX)
                    continue
                for event in batch:
                    if event.n < self._next_n:
                        continue
                    if not await self._deliver(event):
                        log.debug("inbox push to %s stopped: the client is gone", self.client_id)
                        return
                    self._next_n = event.n + 1
                    self.pushed += 1
        except asyncio.CancelledError:
            raise
        except StoreClosed:
            pass  # shutting down
        except Exception:  # noqa: BLE001 - a pusher failing must not take anything else down
            log.exception("inbox pusher for %s failed", self.client_id)
        finally:
            self._on_exit(self)

    async def _deliver(self, event: MailboxEvent) -> bool:
        """Deliver one event, retrying while the client stays connected.

        A refusal while connected means a full queue (the engine already waited)
        or a subscription not yet (re)made: skipping the event would leave a gap,
        so it is retried with backoff. False once the client is gone."""
        payload = event_payload(event)
        delay = RETRY_MIN
        while True:
            try:
                if await self._publisher.deliver(self.client_id, self._topic, payload, 1):
                    return True
            except Exception:  # noqa: BLE001 - an engine error is a refusal: retried, never a gap or a silent stop
                log.warning("inbox push to %s failed; retrying", self.client_id, exc_info=True)
            if self.client_id not in self._publisher.client_ids_of(self.principal):
                return False
            self.retries += 1
            self._nudge.clear()
            try:
                await asyncio.wait_for(self._nudge.wait(), delay)
                delay = RETRY_MIN
            except TimeoutError:
                delay = min(delay * 2, RETRY_MAX)

    async def _next_batch(self) -> list[MailboxEvent]:
        assert self._next_n is not None
        while self._buf and self._buf[0].n < self._next_n:
            self._buf.popleft()
        if self._buf and self._buf[0].n == self._next_n:
            batch = list(self._buf)
            self._buf.clear()
            return batch
        events, head = await self._store.sync(self.principal, self._next_n - 1, READ_BATCH)
        self._known_head = max(self._known_head, head)
        if not events:
            # Nothing at or after next_n (cannot normally happen): do not spin.
            self._next_n = self._known_head + 1
        return events


class Inboxes:
    """The live pushers, by principal and client id, and the hooks that drive them."""

    def __init__(self, store: MessagingStore) -> None:
        self._store = store
        self._publisher: Publisher | None = None
        self._by_principal: dict[str, dict[str, InboxPusher]] = {}
        # Per client id: the filters of its MQTT session that match its inbox, so that
        # unsubscribing one of two (`roost/inbox/alice` and `roost/inbox/+`) does not
        # stop its pushes. Kept across reconnects of a persistent session (the engine
        # keeps its subscriptions); bounded, oldest forgotten first.
        self._filters: OrderedDict[str, set[str]] = OrderedDict()
        self._clean: set[str] = set()   # client ids in _filters whose session ends with the connection
        self.filters_evicted = 0
        # Inbox-subscription flags the store refused (client id -> (principal, on)),
        # newest wins; written again by `_sub_retry` once the store takes writes.
        self._unsaved: OrderedDict[str, tuple[str, bool]] = OrderedDict()
        self._sub_retry: asyncio.Task[None] | None = None
        self._sub_log = RateLimitedLog(log, interval=30.0)
        # A cluster that sends a principal's mailbox events only to the nodes with its
        # pushers (broker/cluster): told when a principal gains its first pusher here
        # or loses its last; with it, clean pushers start after a head read (their
        # first offer may come late), and catch_up re-reads the store.
        self.on_watch: Callable[[str, bool], None] | None = None

    def watched(self) -> list[str]:
        """The principals with a pusher here."""
        return list(self._by_principal)

    def catch_up(self, principal: str) -> None:
        """Every node now sends this principal's events here: its pushers read
        the store once more for any committed before that."""
        for p in self._by_principal.get(principal, {}).values():
            p.refresh()

    def start(self, publisher: Publisher) -> None:
        self._publisher = publisher

    async def stop(self) -> None:
        retry, self._sub_retry = self._sub_retry, None
        if retry is not None:
            retry.cancel()
            try:
                await retry
            except asyncio.CancelledError:
                pass
        pushers = [p for group in self._by_principal.values() for p in group.values()]
        self._by_principal.clear()
        for p in pushers:
            await p.stop()

    def pusher(self, client_id: str, principal: str) -> InboxPusher | None:
        return self._by_principal.get(principal, {}).get(client_id)

    def clients(self) -> list[tuple[str, str]]:
        """(client id, principal) of every live pusher."""
        return [(c, p) for p, group in self._by_principal.items() for c in group]

    def notify(self, events: Iterable[MailboxEvent]) -> None:
        """Hand freshly committed events to the pushers of their principals."""
        by_principal = self._by_principal
        for event in events:
            group = by_principal.get(event.principal)
            if not group:
                continue
            if len(group) == 1:    # the usual case: one connected client (no list per event, ~1,500 instructions)
                next(iter(group.values())).offer(event)
            else:
                for p in list(group.values()):   # a push may end a pusher (the group changes)
                    p.offer(event)

    # ---- client lifecycle (called by the gateway, broker/services/gateway.py) ----
    async def client_connected(self, client_id: str, principal: str, clean_session: bool) -> None:
        await self._drop(client_id, principal)  # an older connection of this client id
        if clean_session:
            self._forget_filters(client_id)      # a new clean session has no subscriptions
        _cursor, subscribed, _head = await self._store.client_cursor(client_id, principal)
        if clean_session:
            if subscribed or client_id in self._unsaved:
                await self._save_sub(client_id, principal, False)
            return
        if subscribed and self.pusher(client_id, principal) is None:   # a SUBSCRIBE may have started one
            self._start(client_id, principal, persistent=True)

    async def client_subscribed(self, client_id: str, principal: str, clean_session: bool, topic_filter: str,
                                sink: Publisher | None = None) -> None:
        """`sink`: the publisher this client's pushes go through (a front end's own
        connection, e.g. the web app's WebSocket); None: the broker's."""
        if not topics.matches(topics.inbox(principal), topic_filter):
            return
        self._remember_filter(client_id, topic_filter, clean_session)
        existing = self.pusher(client_id, principal)
        if existing is None:
            start_after = None
            if self.on_watch is not None and clean_session:
                _cursor, _subscribed, start_after = await self._store.client_cursor(client_id, principal)
                if self.pusher(client_id, principal) is not None:   # started meanwhile
                    return
            self._start(client_id, principal, persistent=not clean_session, sink=sink, start_after=start_after)
        else:
            existing.nudge()
        if not clean_session:
            # Remembered for reconnects that rely on the persistent session; pushing
            # has already started, whether or not this bookkeeping succeeds.
            try:
                _cursor, subscribed, _head = await self._store.client_cursor(client_id, principal)
            except Exception as exc:  # noqa: BLE001 - recorded anyway below (an upsert)
                log.warning("could not read the inbox subscription of %s (%s)", client_id,
                            describe_failure(exc)[0])
                subscribed = False
            if not subscribed or client_id in self._unsaved:
                await self._save_sub(client_id, principal, True)

    async def client_unsubscribed(self, client_id: str, principal: str, clean_session: bool, topic_filter: str) -> None:
        if not topics.matches(topics.inbox(principal), topic_filter):
            return
        remaining = self._filters.get(client_id)
        if remaining is not None:
            remaining.discard(topic_filter)
            if remaining:
                return   # another of its filters still matches the inbox: keep pushing
            self._forget_filters(client_id)
        await self._drop(client_id, principal)
        if not clean_session:
            await self._save_sub(client_id, principal, False)

    async def client_disconnected(self, client_id: str, principal: str, reason: str) -> None:
        if reason == "taken_over":
            return  # the new connection already replaced this client's pusher
        if client_id in self._clean:
            self._forget_filters(client_id)      # its session ends with the connection
        await self._drop(client_id, principal)

    def forget_principal(self, principal: str) -> None:
        """The principal was removed: its clients' sessions and filters are gone."""
        prefix = principal + "."
        for client_id in [c for c in self._filters if c == principal or c.startswith(prefix)]:
            self._forget_filters(client_id)
        for client_id in [c for c, (p, _on) in self._unsaved.items() if p == principal]:
            del self._unsaved[client_id]     # nothing of it may be written back

    # ---- inbox-subscription flags, kept through store outages ----------------
    async def _save_sub(self, client_id: str, principal: str, on: bool) -> None:
        """Record the flag; when the store refuses, keep it and retry in the
        background (the caller's hook goes on: pushing does not depend on it)."""
        self._unsaved.pop(client_id, None)
        try:
            await self._store.set_inbox_sub(client_id, principal, on)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - kept and retried, never lost silently
            self._keep_unsaved(client_id, principal, on, exc)

    def _keep_unsaved(self, client_id: str, principal: str, on: bool, exc: BaseException) -> None:
        line, trace = describe_failure(exc)
        if trace:
            log.warning("could not record the inbox subscription of %s; retrying", client_id, exc_info=exc)
        else:
            self._sub_log.warning("could not record the inbox subscription of %s (%s); retrying when the "
                                  "store writes again", client_id, line)
        self._unsaved[client_id] = (principal, on)
        self._unsaved.move_to_end(client_id)
        while len(self._unsaved) > MAX_TRACKED_CLIENTS:
            self._unsaved.popitem(last=False)
        if self._sub_retry is None or self._sub_retry.done():
            self._sub_retry = asyncio.get_running_loop().create_task(self._retry_unsaved(),
                                                                     name="inbox-sub-retry")

    async def _retry_unsaved(self) -> None:
        """Write the kept flags, oldest first, until none is left; a refusal waits
        SUB_RETRY before the next attempt (the store recovers by itself)."""
        while self._unsaved:
            await asyncio.sleep(SUB_RETRY)
            while self._unsaved:
                client_id, (principal, on) = next(iter(self._unsaved.items()))
                try:
                    await self._store.set_inbox_sub(client_id, principal, on)
                except StoreClosed:
                    return
                except Exception as exc:  # noqa: BLE001 - still refused: wait and retry
                    self._sub_log.warning("inbox subscription flags of %d client(s) still unsaved (%s)",
                                          len(self._unsaved), describe_failure(exc)[0])
                    break
                if self._unsaved.get(client_id) == (principal, on):   # not changed meanwhile
                    del self._unsaved[client_id]
        log.info("inbox subscription flags saved again")

    # ---- internals -----------------------------------------------------------
    def _forget_filters(self, client_id: str) -> None:
        self._filters.pop(client_id, None)
        self._clean.discard(client_id)

    def _remember_filter(self, client_id: str, topic_filter: str, clean_session: bool) -> None:
        if clean_session:
            self._clean.add(client_id)
        else:
            self._clean.discard(client_id)
        filters = self._filters.get(client_id)
        if filters is None:
            filters = self._filters[client_id] = set()
            while len(self._filters) > MAX_TRACKED_CLIENTS:
                old, _ = self._filters.popitem(last=False)
                self._clean.discard(old)
                self.filters_evicted += 1
                if self.filters_evicted % 1000 == 1:
                    log.warning("inbox filters of %s forgotten (more than %d clients tracked, %d so far)",
                                old, MAX_TRACKED_CLIENTS, self.filters_evicted)
        else:
            self._filters.move_to_end(client_id)
        filters.add(topic_filter)

    def _start(self, client_id: str, principal: str, *, persistent: bool, sink: Publisher | None = None,
               start_after: int | None = None) -> None:
        publisher = sink if sink is not None else self._publisher
        if publisher is None:
            return
        p = InboxPusher(client_id=client_id, principal=principal, persistent=persistent, store=self._store,
                        publisher=publisher, on_exit=self._exited, start_after=start_after)
        first = principal not in self._by_principal
        self._by_principal.setdefault(principal, {})[client_id] = p
        if first and self.on_watch is not None:
            self.on_watch(principal, True)
        p.start()

    def _unwatched(self, principal: str) -> None:
        if self.on_watch is not None:
            self.on_watch(principal, False)

    async def _drop(self, client_id: str, principal: str) -> None:
        group = self._by_principal.get(principal)
        p = group.pop(client_id, None) if group else None
        if group is not None and not group:
            self._by_principal.pop(principal, None)
            self._unwatched(principal)
        if p is not None:
            await p.stop()

    def _exited(self, p: InboxPusher) -> None:
        group = self._by_principal.get(p.principal)
        if group is not None and group.get(p.client_id) is p:
            del group[p.client_id]
            if not group:
                del self._by_principal[p.principal]
                self._unwatched(p.principal)
