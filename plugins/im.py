"""IM plugin: requests on `roost/req/<client_id>` in, exactly one response on
`roost/resp/<client_id>` out; inbox pushers driven by the client lifecycle.

`on_client_publish` never blocks the connection: it checks the cheap things
(identity, size, JSON envelope, rate, pending bound), then hands the request to
a task. Whatever the handler does, the task answers exactly once: a
ProtocolError becomes its code, a store that cannot write (full, read-only,
failing disk, saturated writer, closing) `unavailable` with one log line at a
limited rate, anything else `internal` (logged with its traceback). Nothing a
client sends can crash the broker or disturb another client.

Request rates are limited per principal, not per client id: one person with
twenty clients gets the same budget as with one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from amqtt.plugins.base import BasePlugin

from broker.services.base import Caller, Handler
from broker.services.inbox import compact_json
from broker.services.telemetry_influx import RateLimitedLog
from broker.store.base import StoreUnavailable
from broker.store.sqlite_db import StoreClosed, as_unavailable
from contract import topics
from contract.envelopes import error_response, parse_request
from contract.errors import ErrorCode, ProtocolError
from plugins.base import broker_of, services_of

log = logging.getLogger("roost.im")

# Room for the envelope and JSON escaping around a body of limits.max_body bytes
# (ensure_ascii clients write up to 6 bytes per character).
ENVELOPE_SLACK = 64 * 1024
STOP_GRACE = 5.0
# Principals whose token buckets are remembered; the least recently active go
# first. A forgotten bucket had the longest to refill, so forgetting is nearly free.
MAX_BUCKETS = 20000


_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*"([A-Za-z0-9_.:-]{1,64})"')


def _leading_id(payload: bytes) -> str | None:
    """The request id of a payload too large to parse, when `id` is its first member."""
    m = _LEADING_ID.match(payload[:200])
    return m.group(1).decode() if m else None


def store_unavailable(exc: BaseException) -> StoreUnavailable | StoreClosed | None:
    """`exc` as the store's "cannot write now" (or closed) error, else None. Raw
    sqlite3 errors (e.g. an I/O error on the reader) are mapped as the writer does."""
    mapped = as_unavailable(exc)
    return mapped if isinstance(mapped, (StoreUnavailable, StoreClosed)) else None


def one_line(exc: BaseException) -> str:
    """The first line of an exception's text (error messages are one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float = field(default_factory=time.monotonic)

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RoostIMPlugin(BasePlugin):  # type: ignore[type-arg]
    publish_prefixes = (topics.REQ,)

    @dataclass
    class Config:
        pass

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._ops: dict[str, Handler] | None = None
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()   # by principal, LRU
        self._pending: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.rejected_rate = 0
        self.failed_internal = 0
        self.answered_unavailable = 0
        self._unavailable_log = RateLimitedLog(log)

    # ---- wiring ------------------------------------------------------------------
    def _services(self) -> Any:
        return services_of(self)

    def _op_table(self) -> dict[str, Handler]:
        if self._ops is None:

            table: dict[str, Handler] = {}
            for svc in self._services().all():
                for name, handler in svc.ops().items():
                    if name in table:
                        log.warning("operation %s is served twice; %s wins", name, type(svc).__name__)
                    table[name] = handler
            self._ops = table
        return self._ops

    def _messaging(self) -> Any:
        return self._services().messaging

    # ---- requests ----------------------------------------------------------------
    async def on_client_publish(self, session: Any, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        return self.on_client_publish_nowait(session, topic, payload, qos, retain)

    def on_client_publish_nowait(self, session: Any, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        """The engine calls this one directly (no task per request): accepting a
        request never waits; its processing runs in a task of its own."""
        client_id = getattr(session, "client_id", None) or ""
        try:
            self._accept(session, client_id, topic, bytes(payload))
        except Exception:  # noqa: BLE001 - never let a request escape into the engine
            log.exception("request from %s could not be handled", client_id)
            self.failed_internal += 1
            self._answer_later(client_id, error_response(None, ErrorCode.INTERNAL, "internal error (logged)"))
        return True

    def _accept(self, session: Any, client_id: str, topic: str, payload: bytes) -> None:
        limits = self._services().config.limits
        if topic != topics.req(client_id):
            # The ACL makes this impossible; answer on the sender's own topic all the same.
            self._answer_later(client_id, error_response(None, ErrorCode.FORBIDDEN,
                                                         "requests go to roost/req/<your client id>"))
            return
        principal = getattr(session, "principal", None)
        if len(payload) > limits.max_body * 6 + ENVELOPE_SLACK:
            # Refused before parsing: decoding up to max_payload of JSON only to refuse
            # it would hold the event loop. The id is read when it comes first.
            self._answer_later(client_id, error_response(_leading_id(payload), ErrorCode.TOO_LARGE,
                                                         "request is too large"))
            return
        try:
            request = parse_request(payload)
        except ProtocolError as err:
            self._answer_later(client_id, error_response(getattr(err, "request_id", None), err.code, err.message))
            return
        except RecursionError:  # JSON nested deeper than the parser goes
            self._answer_later(client_id, error_response(None, ErrorCode.BAD_REQUEST, "payload is nested too deeply"))
            return
        if not principal:
            self._answer_later(client_id, error_response(request.id, ErrorCode.UNAUTHORIZED, "not authenticated"))
            return
        if not self._bucket(principal).take():
            self.rejected_rate += 1
            self._answer_later(client_id, error_response(
                request.id, ErrorCode.RATE_LIMITED,
                f"more than {limits.request_rate:g} requests per second from {principal!r} (all its clients)"))
            return
        if self._pending.get(client_id, 0) >= max(1, limits.max_pending_requests):
            self.rejected_rate += 1
            self._answer_later(client_id, error_response(
                request.id, ErrorCode.RATE_LIMITED,
                f"more than {limits.max_pending_requests} requests in progress; wait for answers"))
            return
        handler = self._op_table().get(request.op)
        if handler is None:
            self._answer_later(client_id, error_response(request.id, ErrorCode.BAD_REQUEST,
                                                         f"unknown op {request.op!r}"))
            return
        caller = Caller(principal=principal, kind=getattr(session, "kind", None) or "user", client_id=client_id)
        self._pending[client_id] = self._pending.get(client_id, 0) + 1
        self._spawn(self._process(caller, request.id, request.op, handler, request.params))

    def _bucket(self, principal: str) -> TokenBucket:
        """The principal's token bucket, shared by all its clients; it outlives their
        connections, so reconnecting does not refill it."""
        bucket = self._buckets.get(principal)
        if bucket is not None:
            self._buckets.move_to_end(principal)
            return bucket
        limits = self._services().config.limits
        burst = float(max(1, limits.request_burst))
        bucket = self._buckets[principal] = TokenBucket(rate=limits.request_rate, burst=burst, tokens=burst)
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return bucket

    def _unavailable(self, rid: str, op: str, caller: Caller, exc: BaseException) -> bytes:
        """`unavailable`, one line to the client and (rate-limited) to the log: a
        full disk must not write a traceback per request into the log it fills."""
        self.answered_unavailable += 1
        reason = one_line(exc)
        self._unavailable_log.warning("op %s from %s answered `unavailable`: %s (%d so far)",
                                      op, caller.client_id, reason, self.answered_unavailable)
        return error_response(rid, ErrorCode.UNAVAILABLE, f"storage cannot take writes now, retry later ({reason})")

    async def _process(self, caller: Caller, rid: str, op: str, handler: Handler, params: dict[str, Any]) -> None:
        started = time.perf_counter()
        outcome = "internal"    # what the client is answered, for the request figures
        try:
            try:
                result = await handler(caller, params)
                # ok_response's bytes, through the encoder built once (this is per request)
                response = compact_json({"id": rid, "ok": True, "result": result}).encode()
                outcome = "ok"
            except ProtocolError as err:
                response = error_response(rid, err.code, err.message)
                outcome = str(err.code)
            except asyncio.CancelledError:
                outcome = "cancelled"   # at shutdown, after STOP_GRACE
                raise
            except Exception as exc:  # noqa: BLE001 - the client gets `internal`, the log the traceback
                unavailable = store_unavailable(exc)
                if unavailable is not None:
                    response = self._unavailable(rid, op, caller, unavailable)
                    outcome = "unavailable"
                else:
                    self.failed_internal += 1
                    log.exception("op %s from %s failed", op, caller.client_id)
                    response = error_response(rid, ErrorCode.INTERNAL, "internal error (logged)")
        finally:
            self._services().request_stats.observe(op, outcome, time.perf_counter() - started)
            left = self._pending.get(caller.client_id, 1) - 1
            if left > 0:
                self._pending[caller.client_id] = left
            else:
                self._pending.pop(caller.client_id, None)
        await self._answer(caller.client_id, response)

    async def _answer(self, client_id: str, payload: bytes) -> None:
        try:
            await broker_of(self).publish(topics.resp(client_id), payload, 1, False)
        except Exception:  # noqa: BLE001 - a client that went away cannot be answered
            log.warning("response to %s could not be published", client_id, exc_info=True)

    def _answer_later(self, client_id: str, payload: bytes) -> None:
        self._spawn(self._answer(client_id, payload))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- client lifecycle: inbox pushers ----------------------------------------
    async def on_client_connected(self, session: Any) -> None:
        principal = getattr(session, "principal", None)
        messaging = self._messaging()
        if not principal or messaging is None:
            return
        try:
            await messaging.inboxes.client_connected(session.client_id, principal, bool(session.clean_session))
        except Exception as exc:  # noqa: BLE001
            self._hook_failed("inbox set-up for %s failed", session.client_id, exc)

    async def on_client_subscribed(self, session: Any, topic_filter: str, qos: int) -> None:
        principal = getattr(session, "principal", None)
        messaging = self._messaging()
        if not principal or messaging is None:
            return
        try:
            await messaging.inboxes.client_subscribed(session.client_id, principal, bool(session.clean_session),
                                                      topic_filter)
        except Exception as exc:  # noqa: BLE001
            self._hook_failed("inbox subscription of %s failed", session.client_id, exc)

    async def on_client_unsubscribed(self, session: Any, topic_filter: str) -> None:
        principal = getattr(session, "principal", None)
        messaging = self._messaging()
        if not principal or messaging is None:
            return
        try:
            await messaging.inboxes.client_unsubscribed(session.client_id, principal, bool(session.clean_session),
                                                        topic_filter)
        except Exception as exc:  # noqa: BLE001
            self._hook_failed("inbox unsubscription of %s failed", session.client_id, exc)

    async def on_client_disconnected(self, session: Any, reason: str) -> None:
        client_id = getattr(session, "client_id", None) or ""
        principal = getattr(session, "principal", None)
        messaging = self._messaging()
        if not principal or messaging is None:
            return
        try:
            await messaging.inboxes.client_disconnected(client_id, principal, str(reason))
        except Exception as exc:  # noqa: BLE001
            self._hook_failed("inbox tear-down for %s failed", client_id, exc)

    def _hook_failed(self, what: str, client_id: str, exc: BaseException) -> None:
        unavailable = store_unavailable(exc)
        if unavailable is not None:
            self._unavailable_log.warning(what + ": %s", client_id, one_line(unavailable))
        else:
            log.error(what, client_id, exc_info=exc)

    async def on_roost_stop(self) -> None:
        """Let requests in progress finish (their writes are committing), then give up."""
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
