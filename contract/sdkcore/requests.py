"""Request/response correlation (PROTOCOL.md, "Requests"), transport-neutral.

A request is `{"id", "op", ...params}` published on `roost/req/<client id>`; its
one answer comes on `roost/resp/<client id>` with the same `id`. `Requests`
keeps one waiter per id in flight: the network thread hands every response to
`resolve()`, the caller's thread waits on its waiter with a deadline. When the
link comes back (a new `LinkState.epoch`), an answer may have been lost with the
old connection, so a repeatable request is published again with the same id.

`LinkState` is the link's state both SDKs share with this module: their paho
callbacks call `connected()`, `ready()` and `lost()`; requests wait for `ready`
(connected and subscribed to the response topic).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any

from contract.errors import RETRY_LATER
from contract.sdkcore.backoff import Backoff
from contract.sdkcore.errors import ConnectTimeout, RequestError, RequestTimeout

# Codes worth retrying after a pause (the request itself was fine), as the strings on the wire.
RETRYABLE_CODES = frozenset(str(code) for code in RETRY_LATER)
POLL_INTERVAL = 0.2      # how often a waiting request looks at the link (a reconnect means: publish again)


class LinkState:
    """Connected? Ready (subscriptions in place)? How many times did it get ready?"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._ready = threading.Event()
        self._epoch = 0

    def connected(self) -> None:
        """The server accepted the CONNECT."""
        self._connected.set()

    def ready(self) -> bool:
        """Subscriptions are in place; returns True when this is a re-connect."""
        with self._lock:
            self._epoch += 1
            again = self._epoch > 1
        self._connected.set()
        self._ready.set()
        return again

    def lost(self) -> None:
        self._connected.clear()
        self._ready.clear()

    @property
    def epoch(self) -> int:
        """0 before the first `ready`, then +1 at every (re)connect."""
        return self._epoch

    def is_connected(self) -> bool:
        return self._connected.is_set()

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(max(0.0, timeout))


class _Waiter:
    __slots__ = ("done", "response")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: dict[str, Any] | None = None


class Requests:
    """The requests of one client id: correlation, timeouts, re-publishing, retries.

    `publish(payload)` sends one request document (QoS 1, on the request topic);
    `where` names the server in error messages. `repeatable` lists the ops that
    may be published again after a reconnect (None: all of them, for a client
    whose every request is idempotent); `retry` is the pause policy for answers
    with a code in `retry_codes` (None: no retries, the error is raised).
    """

    def __init__(self, link: LinkState, publish: Callable[[bytes], object], *, where: str, timeout: float,
                 repeatable: Collection[str] | None = None, retry: Backoff | None = None,
                 retry_codes: Collection[str] = RETRYABLE_CODES,
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self.timeout = timeout
        self._publish = publish
        self._where = where
        self._repeatable = None if repeatable is None else frozenset(repeatable)
        self._retry = retry
        self._retry_codes = frozenset(retry_codes)
        self._new_id = new_id
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiter] = {}

    def in_flight(self) -> int:
        with self._lock:
            return len(self._waiting)

    # -- the network thread ------------------------------------------------------

    def resolve(self, doc: dict[str, Any]) -> bool:
        """Hand a response to its waiter; False if no request waits for it (late, duplicate, foreign)."""
        rid = doc.get("id")
        if not isinstance(rid, str):
            return False
        with self._lock:
            waiter = self._waiting.pop(rid, None)
        if waiter is None:
            return False
        waiter.response = doc
        waiter.done.set()
        return True

    # -- the caller's thread -------------------------------------------------------

    def request(self, op: str, params: dict[str, Any] | None = None, *, timeout: float | None = None,
                repeat: bool | None = None) -> dict[str, Any]:
        """Send one request and return the whole response document.

        Raises ConnectTimeout when the link is not ready in time (or was lost
        when time ran out), RequestTimeout when connected but unanswered."""
        timeout = self.timeout if timeout is None else timeout
        return self._exchange(op, params, self._clock() + timeout, timeout, repeat)

    def _exchange(self, op: str, params: dict[str, Any] | None, deadline: float, timeout: float,
                  repeat: bool | None) -> dict[str, Any]:
        """One request until `deadline`; `timeout` is the whole time allowed (for messages)."""
        if repeat is None:
            repeat = self._repeatable is None or op in self._repeatable
        rid = self._new_id()
        payload = json.dumps({"id": rid, "op": op, **(params or {})}, separators=(",", ":")).encode()
        if not self.link.wait_ready(deadline - self._clock()):
            raise ConnectTimeout(f"not connected to {self._where} (waited {timeout:g}s)")
        waiter = _Waiter()
        with self._lock:
            self._waiting[rid] = waiter
        epoch = self.link.epoch
        try:
            self._publish(payload)
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    if not self.link.is_connected():
                        raise ConnectTimeout(f"lost the connection to {self._where} waiting for '{op}'")
                    raise RequestTimeout(f"no answer to '{op}' within {timeout:g}s")
                if waiter.done.wait(min(remaining, POLL_INTERVAL)):
                    assert waiter.response is not None
                    return waiter.response
                # The answer of a request published before a reconnect may be lost
                # with the old connection: publish a repeatable one again, same id.
                if repeat and self.link.is_ready() and self.link.epoch != epoch:
                    epoch = self.link.epoch
                    self._publish(payload)
        finally:
            with self._lock:
                self._waiting.pop(rid, None)

    def call(self, op: str, params: dict[str, Any] | None = None, *, timeout: float | None = None,
             repeat: bool | None = None) -> dict[str, Any]:
        """Like request() but returns `result` or raises RequestError; with a
        retry policy, answers with a retryable code are retried until `timeout`."""
        timeout = self.timeout if timeout is None else timeout
        deadline = self._clock() + timeout
        delays = self._retry.delays() if self._retry is not None else None
        while True:
            resp = self._exchange(op, params, deadline, timeout, repeat)
            if resp.get("ok") is True:
                result = resp.get("result")
                return result if isinstance(result, dict) else {}
            error = resp.get("error")
            err: dict[str, Any] = error if isinstance(error, dict) else {}
            code = str(err.get("code", "internal"))
            if delays is not None and code in self._retry_codes:
                delay = next(delays)
                if self._clock() + delay < deadline:
                    self._sleep(delay)
                    continue
            raise RequestError(op, code, str(err.get("message", "no message")))
