"""The gateway: the one way a request reaches the services, whatever the transport.

A front end (today the MQTT adapter, plugins/im.py; tomorrow an HTTP or
WebSocket one) hands over each request with a `Reply`, an async callable that
sends bytes back to that client (for MQTT: a publish on `roost/resp/<client id>`),
either as the request envelope's bytes (docs/PROTOCOL.md; for MQTT the payload of
`roost/req/<client id>`):

    gateway.submit_envelope(principal, kind, client_id, payload, reply)

or, when its wire carries requests in another shape, decoded:

    gateway.submit(Request(principal, kind, client_id, request_id, op, params), reply)

The gateway then answers exactly once, with the bytes of a response envelope,
through that `Reply`.

Neither blocks: they check the cheap things (size, envelope, authenticated, the
principal's request rate, requests in progress per client id, a known op) and
runs the handler in a task of its own. Whatever the handler does, the answer is
one of: its result; a ProtocolError's code and message; `unavailable` when the
store cannot write (full, read-only, failing disk, saturated writer, closing),
logged in one line at a limited rate; `internal` for anything else, logged once
with its traceback. A front end that refuses a request itself (the MQTT one:
a request published on another client's topic) answers with `refuse(...)`
(same task bookkeeping, same bytes as the gateway's own refusals).

Request rates are limited per principal, not per client id (nor per front end):
one person with twenty clients gets the same budget as with one.

Sessions: a front end also reports its clients' lifecycle here, so presence and
the inbox pushers work the same for every transport:
- `connection_opened` / `connection_closed` (synchronous, at the very moment a
  connection starts or stops counting, in the order things happened):
  presence; transient clients (label `cli-...`) are left out;
- `client_connected` / `client_subscribed` / `client_unsubscribed` /
  `client_disconnected` (awaited, in order per client id): inbox pushers.
The gateway also closes a removed principal's connections through the front
end's `Publisher.kick_principal` (it handles `PrincipalRemoved` first, before
the services forget the principal's state).

A front end that is not the MQTT engine (the web app's WebSocket adapter,
broker/web/) passes its own `sink` (a `Publisher` for that one connection) to
`client_subscribed`: that client's mailbox events go there instead of through
the engine. Every front end that checks passwords uses `logins`, one
`LoginGuard` per broker, so failed logins slow guessing down across all of them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.services.base import Caller, Handler, Publisher
from broker.services.events import PrincipalRemoved
from broker.services.identity import LoginGuard
from broker.services.inbox import describe_failure
from broker.services.telemetry_influx import RateLimitedLog
from broker.store.jsonutil import compact_json
from contract.envelopes import error_response, parse_request
from contract.errors import ErrorCode, ProtocolError
from contract.ids import is_transient_client_id
from contract.ops import OPS

if TYPE_CHECKING:
    from broker.services.runtime import Services

log = logging.getLogger("roost.im")

# Room for the envelope and JSON escaping around a body of limits.max_body bytes
# (ensure_ascii clients write up to 6 bytes per character).
ENVELOPE_SLACK = 64 * 1024
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*"([A-Za-z0-9_.:-]{1,64})"')

# Principals whose token buckets are remembered; the least recently active go
# first. A forgotten bucket had the longest to refill, so forgetting is nearly free.
MAX_BUCKETS = 20000

# Sends a response's bytes to the client that asked (the front end's transport);
# an `async def` taking the bytes. It should not raise (log instead).
Reply = Callable[[bytes], Coroutine[Any, Any, None]]


@dataclass(slots=True)   # one per request: not frozen (a frozen init sets each field through object.__setattr__)
class Request:
    """One decoded request: who asks (principal None: not authenticated), from
    which client id, its id (echoed in the response), op and params (the request
    object minus `id` and `op`)."""

    principal: str | None
    kind: str | None
    client_id: str
    id: str
    op: str
    params: dict[str, Any]


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float                      # the clock when tokens were last counted
    clock: Callable[[], float]

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _leading_id(payload: bytes) -> str | None:
    """The request id of a payload too large to parse, when `id` is its first member."""
    m = _LEADING_ID.match(payload[:200])
    return m.group(1).decode() if m else None


def counted_principal(principal: str | None, client_id: str | None) -> str | None:
    """The principal whose presence a connection counts for, or None (anonymous,
    or a transient `cli-...` client: a one-shot command's connection lasts a
    moment, and counting it would show its user online and offline again)."""
    if not principal:
        return None
    if isinstance(client_id, str) and is_transient_client_id(client_id):
        return None
    return str(principal)


class Gateway:
    def __init__(self, services: Services, *, clock: Callable[[], float] = time.monotonic,
                 registry: Collection[str] = OPS) -> None:
        self._services = services
        self._registry = registry                 # the op names that may be served (contract/ops.py)
        self._limits = services.config.limits
        self._clock = clock                       # token buckets (monotonic seconds)
        self._ops: dict[str, Handler] | None = None
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()   # by principal, LRU
        self._pending: dict[str, int] = {}        # requests in progress by client id
        self._tasks: set[asyncio.Task[None]] = set()
        self._publisher: Publisher | None = None
        self.rejected_rate = 0
        self.failed_internal = 0
        self.answered_unavailable = 0
        self._unavailable_log = RateLimitedLog(log)
        auth = services.config.auth
        # Failed logins of every front end (MQTT CONNECT, the web app's sign-in) in one set of tables.
        self.logins = LoginGuard(step=auth.failure_delay, cap=auth.failure_delay_max,
                                 table_size=auth.failure_table_size, per_address=auth.max_concurrent_per_address)
        # First among the handlers of a removal (built before the services): the
        # principal loses its access before anything else of it is forgotten.
        services.bus.subscribe(PrincipalRemoved, self._principal_removed)

    # ---- wiring ------------------------------------------------------------------
    async def start(self, publisher: Publisher) -> None:
        self._op_table()   # refuses to start on an op the registry lacks
        self._publisher = publisher

    def ops(self) -> list[str]:
        """The names of the ops served (every service's `ops()`), sorted."""
        return sorted(self._op_table())

    def _op_table(self) -> dict[str, Handler]:
        if self._ops is None:
            table: dict[str, Handler] = {}
            for svc in self._services.all():
                for name, handler in svc.ops().items():
                    # Programming errors, found at start: the contract registry is the
                    # one list of ops, and each op has one handler.
                    if name not in self._registry:
                        raise RuntimeError(f"{type(svc).__name__} serves {name!r}, which contract/ops.py lacks")
                    if name in table:
                        raise RuntimeError(f"operation {name!r} is served twice ({type(svc).__name__})")
                    table[name] = handler
            self._ops = table
        return self._ops

    # ---- requests ----------------------------------------------------------------
    def submit_envelope(self, principal: str | None, kind: str | None, client_id: str, payload: bytes,
                        reply: Reply) -> None:
        """Take one request envelope (JSON bytes); `reply` is awaited exactly once."""
        if len(payload) > self._limits.max_body * 6 + ENVELOPE_SLACK:
            # Refused before parsing: decoding up to max_payload of JSON only to refuse
            # it would hold the event loop. The id is read when it comes first.
            self.refuse(reply, _leading_id(payload), ErrorCode.TOO_LARGE, "request is too large")
            return
        try:
            request = parse_request(payload)
        except ProtocolError as err:
            self.refuse(reply, getattr(err, "request_id", None), err.code, err.message)
            return
        except RecursionError:  # JSON nested deeper than the parser goes
            self.refuse(reply, None, ErrorCode.BAD_REQUEST, "payload is nested too deeply")
            return
        # positional: keywords cost a dict per request (Request's field order)
        self.submit(Request(principal, kind, client_id, request.id, request.op, request.params), reply)

    def submit(self, request: Request, reply: Reply) -> None:
        """Take one request; `reply` is awaited exactly once with the response."""
        if not request.principal:
            self.refuse(reply, request.id, ErrorCode.UNAUTHORIZED, "not authenticated")
            return
        limits = self._limits
        if not self._bucket(request.principal).take():
            self.rejected_rate += 1
            self.refuse(reply, request.id, ErrorCode.RATE_LIMITED,
                        f"more than {limits.request_rate:g} requests per second from {request.principal!r} "
                        "(all its clients)")
            return
        if self._pending.get(request.client_id, 0) >= max(1, limits.max_pending_requests):
            self.rejected_rate += 1
            self.refuse(reply, request.id, ErrorCode.RATE_LIMITED,
                        f"more than {limits.max_pending_requests} requests in progress; wait for answers")
            return
        handler = self._op_table().get(request.op)
        if handler is None:
            self.refuse(reply, request.id, ErrorCode.BAD_REQUEST, f"unknown op {request.op!r}")
            return
        caller = Caller(request.principal, request.kind or "user", request.client_id)   # (principal, kind, client id)
        self._pending[request.client_id] = self._pending.get(request.client_id, 0) + 1
        self._spawn(self._process(caller, request.id, request.op, handler, request.params, reply))

    def refuse(self, reply: Reply, request_id: str | None, code: ErrorCode, message: str) -> None:
        """Answer a request with an error without running anything (in a task:
        the caller never waits)."""
        self._spawn(reply(error_response(request_id, code, message)))

    def failed(self, reply: Reply, what: str, client_id: str) -> None:
        """A front end could not handle a request (a bug): `internal`, logged once.
        Call from inside the `except` block (the traceback is logged)."""
        log.exception("%s from %s could not be handled", what, client_id)
        self.failed_internal += 1
        self.refuse(reply, None, ErrorCode.INTERNAL, "internal error (logged)")

    async def finish(self, grace: float) -> None:
        """Let requests in progress finish (their writes are committing), then give up."""
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()

    def _bucket(self, principal: str) -> TokenBucket:
        """The principal's token bucket, shared by all its clients; it outlives their
        connections, so reconnecting does not refill it."""
        bucket = self._buckets.get(principal)
        if bucket is not None:
            self._buckets.move_to_end(principal)
            return bucket
        limits = self._limits
        burst = float(max(1, limits.request_burst))
        bucket = self._buckets[principal] = TokenBucket(rate=limits.request_rate, burst=burst, tokens=burst,
                                                        stamp=self._clock(), clock=self._clock)
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return bucket

    def _unavailable(self, rid: str, op: str, caller: Caller, reason: str) -> bytes:
        """`unavailable`, one line to the client and (rate-limited) to the log: a
        full disk must not write a traceback per request into the log it fills."""
        self.answered_unavailable += 1
        self._unavailable_log.warning("op %s from %s answered `unavailable`: %s (%d so far)",
                                      op, caller.client_id, reason, self.answered_unavailable)
        return error_response(rid, ErrorCode.UNAVAILABLE, f"storage cannot take writes now, retry later ({reason})")

    async def _process(self, caller: Caller, rid: str, op: str, handler: Handler, params: dict[str, Any],
                       reply: Reply) -> None:
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
                outcome = "cancelled"   # at shutdown, after the grace
                raise
            except Exception as exc:  # noqa: BLE001 - the client gets `internal`, the log the traceback
                line, is_bug = describe_failure(exc)
                if not is_bug:
                    response = self._unavailable(rid, op, caller, line)
                    outcome = "unavailable"
                else:
                    self.failed_internal += 1
                    log.exception("op %s from %s failed", op, caller.client_id)
                    response = error_response(rid, ErrorCode.INTERNAL, "internal error (logged)")
        finally:
            self._services.request_stats.observe(op, outcome, time.perf_counter() - started)
            left = self._pending.get(caller.client_id, 1) - 1
            if left > 0:
                self._pending[caller.client_id] = left
            else:
                self._pending.pop(caller.client_id, None)
        await reply(response)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- sessions: presence (synchronous, in the order things happened) -------------
    def connection_opened(self, principal: str | None, client_id: str | None) -> None:
        counted = counted_principal(principal, client_id)
        presence = self._services.presence
        if counted and presence is not None:
            presence.client_connected(counted)

    def connection_closed(self, principal: str | None, client_id: str | None, reason: str,
                          last_activity: float | None) -> None:
        counted = counted_principal(principal, client_id)
        presence = self._services.presence
        if counted and presence is not None:
            presence.client_disconnected(counted, reason, last_activity)

    # ---- sessions: inbox pushers (awaited, in order per client id) ------------------
    async def client_connected(self, client_id: str, principal: str | None, clean_session: bool) -> None:
        messaging = self._services.messaging
        if not principal or messaging is None:
            return
        try:
            await messaging.inboxes.client_connected(client_id, principal, clean_session)
        except Exception as exc:  # noqa: BLE001
            self._hook_failed("inbox set-up for %s failed", client_id, exc)

    async def client_subscribed(self, client_id: str, principal: str | None, clean_session: bool,
                                topic_filter: str, sink: Publisher | None = None) -> None:
        """`sink`: where this client's mailbox events go (None: the front end's
        broker, as given to `start`)."""
        messaging = self._services.messaging
        if not principal or messaging is None:
            return
        try:
            await messaging.inboxes.client_subscribed(client_id, principal, clean_session, topic_filter, sink)
        except Exception as exc:  # noqa: BLE001
            self._hook_failed("inbox subscription of %s failed", client_id, exc)

    async def client_unsubscribed(self, client_id: str, principal: str | None, clean_session: bool,
                                  topic_filter: str) -> None:
        messaging = self._services.messaging
        if not principal or messaging is None:
            return
        try:
            await messaging.inboxes.client_unsubscribed(client_id, principal, clean_session, topic_filter)
        except Exception as exc:  # noqa: BLE001
            self._hook_failed("inbox unsubscription of %s failed", client_id, exc)

    async def client_disconnected(self, client_id: str, principal: str | None, reason: str) -> None:
        messaging = self._services.messaging
        if not principal or messaging is None:
            return
        try:
            await messaging.inboxes.client_disconnected(client_id, principal, reason)
        except Exception as exc:  # noqa: BLE001
            self._hook_failed("inbox tear-down for %s failed", client_id, exc)

    def _hook_failed(self, what: str, client_id: str, exc: BaseException) -> None:
        line, is_bug = describe_failure(exc)
        if not is_bug:
            self._unavailable_log.warning(what + ": %s", client_id, line)
        else:
            log.error(what, client_id, exc_info=exc)

    # ---- removed principals ----------------------------------------------------------
    async def _principal_removed(self, event: PrincipalRemoved) -> None:
        # Even if the id was registered again since, the old principal's
        # connections and in-memory access must go.
        self._services.relations.forget_principal(event.principal)
        publisher = self._publisher
        if publisher is None:
            return
        publisher.refresh_acl()
        closed = await publisher.kick_principal(event.principal)
        log.info("principal %s removed: closed %d connection(s)", event.principal, closed)
