"""Server-side sign-in sessions: the browser holds only a random token in an
HttpOnly cookie; its principal, CSRF token and times stay here, in memory (a
broker restart signs everyone out). Tokens are kept as their SHA-256, so this
table alone does not let anyone act as a signed-in person."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_SESSIONS = 10000          # signed-in browsers remembered; the least recently used go first
IDLE_TTL = 7 * 24 * 3600.0    # a session unused this long ends
MAX_AGE = 30 * 24 * 3600.0    # and every session ends this long after sign-in


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


class WebSessions:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_sessions: int = MAX_SESSIONS,
                 idle_ttl: float = IDLE_TTL, max_age: float = MAX_AGE) -> None:
        self._clock = clock
        self._max = max(1, max_sessions)
        self._idle_ttl = idle_ttl
        self._max_age = max_age
        self._by_key: OrderedDict[str, WebSession] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def create(self, principal: str, kind: str, *, expires_at: float | None = None) -> tuple[str, WebSession]:
        """A new session; returns (cookie token, session)."""
        token = new_token()
        now = self._clock()
        session = WebSession(key=_digest(token), principal=principal, kind=kind, csrf=new_token(),
                             created=now, used=now, expires_at=expires_at)
        self._by_key[session.key] = session
        while len(self._by_key) > self._max:
            self._by_key.popitem(last=False)
            self.evicted += 1
        return token, session

    def get(self, token: str | None) -> WebSession | None:
        """The live session of a cookie token (its use noted), or None."""
        if not token or len(token) > 128:
            return None
        session = self._by_key.get(_digest(token))
        return session if session is not None and self.alive(session) else None

    def alive(self, session: WebSession) -> bool:
        """Still signed in (not ended, not expired); a use that keeps it so (an open
        page's every request counts as one)."""
        if self._by_key.get(session.key) is not session:
            return False
        now = self._clock()
        if (now - session.used > self._idle_ttl or now - session.created > self._max_age
                or (session.expires_at is not None and time.time() >= session.expires_at)):
            del self._by_key[session.key]
            return False
        session.used = now
        self._by_key.move_to_end(session.key)
        return True

    def end(self, session: WebSession) -> None:
        self._by_key.pop(session.key, None)

    def end_principal(self, principal: str) -> int:
        """Sign a principal out everywhere (removed, or its password changed)."""
        keys = [k for k, s in self._by_key.items() if s.principal == principal]
        for k in keys:
            del self._by_key[k]
        return len(keys)
