"""Server-side sign-in sessions: the browser holds only a random token in an
HttpOnly cookie; its principal, CSRF token and times are in the store
(broker.store.base.WebSessionStore), so a cookie made through one node works on
every node that shares the store, and a restart signs no one out. Tokens are
kept as their SHA-256, so the table alone does not let anyone act as a
signed-in person.

Every HTTP request reads its session from the store (one indexed row); the
"used" time is written at most once per `touch_every` (not on every request).
An open page's WebSocket re-reads its session at most once per `recheck`, and
the hub asks the store every `recheck` which of its open pages' sessions still
exist (one read for all of them, `ended`), so a sign-out through another node
closes this node's pages of that session within about `recheck` seconds. The
table is bounded: beyond `max_sessions` the least recently used go first
(counted in `evicted`); idle, too old and past-exp sessions are deleted when
met and by a sweep every `sweep_every` seconds. A session made before its
principal's secret was last set (`roost user passwd`, even while no broker ran)
is void, and so is one whose principal is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from broker.store.base import StoreClosed, StoreUnavailable, WebSessionRecord, WebSessionStore

MAX_SESSIONS = 10000          # signed-in browsers remembered; the least recently used go first
IDLE_TTL = 7 * 24 * 3600.0    # a session unused this long ends
MAX_AGE = 30 * 24 * 3600.0    # and every session ends this long after sign-in
TOUCH_EVERY = 60.0            # seconds between writes of a session's "used" time
RECHECK = 2.0                 # seconds an open page's session is trusted before it is read again
SWEEP_EVERY = 600.0           # seconds between deletions of every expired session


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def same_token(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(slots=True)
class WebSession:
    key: str                  # the token's SHA-256 (the table's key)
    principal: str
    kind: str
    csrf: str                 # sent by the page in X-CSRF-Token / the WebSocket URL
    created: float
    used: float
    expires_at: float | None = None   # wall-clock end of a sign-in by token (a JWT's exp)
    checked: float = 0.0      # when this node last read it from the store (not stored)


def _session(rec: WebSessionRecord, now: float) -> WebSession:
    return WebSession(rec.key, rec.principal, rec.kind, rec.csrf, rec.created, rec.used, rec.expires_at, now)


class WebSessions:
    def __init__(self, store: WebSessionStore, *, clock: Callable[[], float] = time.time,
                 max_sessions: int = MAX_SESSIONS, idle_ttl: float = IDLE_TTL, max_age: float = MAX_AGE,
                 touch_every: float = TOUCH_EVERY, recheck: float = RECHECK,
                 sweep_every: float = SWEEP_EVERY,
                 secret_set_at: Callable[[str], Awaitable[float | None]] | None = None) -> None:
        """`secret_set_at(principal)`: when its secret was last set, None when it does not exist."""
        self._store = store
        self._secret_set_at = secret_set_at
        self._clock = clock
        self._max = max(1, max_sessions)
        self._idle_ttl = idle_ttl
        self._max_age = max_age
        self._touch_every = touch_every
        self._recheck = recheck
        self._sweep_every = sweep_every
        self._swept = clock()
        self._count = 0           # sessions in the store, as of this node's last sign-in or sweep
        self.evicted = 0          # sessions this node evicted to make room (least recently used)

    def __len__(self) -> int:
        return self._count

    def _expired(self, s: WebSession | WebSessionRecord, now: float) -> bool:
        return (now - s.used > self._idle_ttl or now - s.created > self._max_age
                or (s.expires_at is not None and now >= s.expires_at))

    async def create(self, principal: str, kind: str, *, expires_at: float | None = None) -> tuple[str, WebSession]:
        """A new session; returns (cookie token, session). NotFoundError when the
        principal was removed meanwhile."""
        token = new_token()
        now = self._clock()
        rec = WebSessionRecord(_digest(token), principal, kind, new_token(), now, now, expires_at)
        if now - self._swept >= self._sweep_every:
            await self._sweep(now)
        self._count, evicted = await self._store.create(rec, max_sessions=self._max)
        self.evicted += evicted
        return token, _session(rec, now)

    async def get(self, token: str | None) -> WebSession | None:
        """The live session of a cookie token (its use noted), or None."""
        if not token or len(token) > 128:
            return None
        now = self._clock()
        if now - self._swept >= self._sweep_every:
            await self._sweep(now)
        rec = await self._store.get(_digest(token))
        if rec is None:
            return None
        session = _session(rec, now)
        return session if await self._still_alive(session, now) else None

    async def alive(self, session: WebSession) -> bool:
        """Still signed in (not ended on any node, not expired); a use that keeps it
        so (an open page's every request counts as one). Read again from the store
        at most once per `recheck`; while the store is unreachable the page stays."""
        now = self._clock()
        if now - session.checked < self._recheck:
            return not self._expired(session, now)
        try:
            rec = await self._store.get(session.key)
        except StoreUnavailable:
            return not self._expired(session, now)
        if rec is None:
            return False
        session.used = max(session.used, rec.used)
        session.checked = now
        return await self._still_alive(session, now)

    async def _void(self, session: WebSession) -> bool:
        if self._secret_set_at is None:
            return False
        set_at = await self._secret_set_at(session.principal)
        return set_at is None or session.created < set_at

    async def _still_alive(self, session: WebSession, now: float) -> bool:
        # The writes here are housekeeping: a store that reads but cannot write now
        # (full, read-only) neither signs anyone in nor out because of them.
        if self._expired(session, now) or await self._void(session):
            with contextlib.suppress(StoreUnavailable):
                await self._store.delete(session.key)
            return False
        if now - session.used >= self._touch_every:
            with contextlib.suppress(StoreUnavailable):
                await self._store.touch(session.key, now)
                session.used = now
        return True

    @property
    def recheck(self) -> float:
        return self._recheck

    async def ended(self, open_sessions: Iterable[WebSession]) -> set[str]:
        """The keys of those of `open_sessions` (the open pages') that ended on any
        node or reached their end of life; one store read for all. None ended
        while the store is unavailable or closing (the pages stay)."""
        now = self._clock()
        sessions = {s.key: s for s in open_sessions}
        if not sessions:
            return set()
        try:
            live = await self._store.existing(list(sessions))
        except (StoreUnavailable, StoreClosed):
            return set()
        # not idleness: this node's `used` does not see other nodes' uses
        return {k for k, s in sessions.items() if k not in live or now - s.created > self._max_age
                or (s.expires_at is not None and now >= s.expires_at)}

    async def end(self, session: WebSession) -> None:
        if await self._store.delete(session.key):
            self._count = max(0, self._count - 1)

    async def end_principal(self, principal: str) -> int:
        """Sign a principal out everywhere (removed, or its password changed)."""
        ended = await self._store.delete_principal(principal)
        self._count = max(0, self._count - ended)
        return ended

    async def _sweep(self, now: float) -> None:
        self._swept = now
        await self._store.expire(used_before=now - self._idle_ttl, created_before=now - self._max_age, now=now)
        self._count = await self._store.count()
