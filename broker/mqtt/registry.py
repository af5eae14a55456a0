"""The sessions of the broker by session key (session.py `session_key`): added,
discarded (subscriptions, queue and in-flight window forgotten), expired after
their session expiry (registry.expiry_of) disconnected, and the count of persistent sessions per principal
(limits.max_persistent_sessions_per_principal)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from broker.mqtt.persistence import SESSION_EXPIRY, SessionPersistence

if TYPE_CHECKING:
    from broker.mqtt.budgets import Budgets
    from broker.mqtt.routing import Router
    from broker.mqtt.session import ClientInfo, SessionState

log = logging.getLogger("roost.mqtt")


class SessionRegistry:
    def __init__(self, sessions: dict[str, SessionState], *, limits: Any, stats: dict[str, int],
                 budgets: Budgets, router: Router, persistence: SessionPersistence) -> None:
        self.sessions = sessions       # shared with the router, which delivers to one by key
        self._limits = limits
        self._stats = stats
        self._budgets = budgets
        self._router = router
        self._persistence = persistence
        self.persistent_of: dict[str | None, int] = {}   # persistent sessions per principal

    def add(self, st: SessionState) -> None:
        self.sessions[st.client_id] = st
        if not st.clean:
            self._count_persistent(st.info.principal, 1)

    def discard(self, st: SessionState) -> None:
        """Forget a session: subscriptions, queue, inflight."""
        router = self._router
        st.discarded = True
        self._persistence.dropped(st)
        if st.blocked is not None:
            router.release(st)
        router.unsubscribe_all(st)
        if st.bytes:
            self._budgets.uncharge(st, st.bytes)
        st.queue.clear()
        st.inflight.clear()
        st.incoming_qos2.clear()
        st.wake()
        if self.sessions.get(st.client_id) is st:
            del self.sessions[st.client_id]
            if not st.clean:
                self._count_persistent(st.info.principal, -1)

    def discard_principal(self, principal: str) -> None:
        for st in [s for s in self.sessions.values() if s.info.principal == principal]:
            self.discard(st)

    def too_many(self, info: ClientInfo) -> bool:
        """A new persistent session for a principal that already has
        limits.max_persistent_sessions_per_principal: refused (each one holds a
        copy of everything routed to it, in memory and on disk)."""
        principal = info.principal
        cap = self._limits.max_persistent_sessions_per_principal
        if principal is None or not cap:
            return False
        n = self.persistent_of.get(principal, 0)
        if n < cap:
            return False
        self._stats["sessions_refused"] += 1
        log.warning("refusing %s: %s already has %d persistent sessions "
                    "(limits.max_persistent_sessions_per_principal); connect with clean_session=1 "
                    "under an old client id to end one", info.client_id, principal, n)
        return True

    def expiry_of(self, st: SessionState) -> float:
        """Seconds `st` is kept once disconnected: its MQTT 5 Session Expiry
        Interval (0xFFFFFFFF: for ever), else limits.session_expiry."""
        return self.keep_for(st.expiry)

    def keep_for(self, expiry: float | None) -> float:
        """Seconds a disconnected session with this Session Expiry Interval (None:
        not given, a 3.1.1 session) is kept; also for a saved one at start."""
        if expiry is None:
            return float(getattr(self._limits, "session_expiry", SESSION_EXPIRY))
        return float("inf") if expiry >= 0xFFFFFFFF else expiry

    def expired(self, st: SessionState, now: float) -> bool:
        return st.conn is None and not st.clean and now - st.disconnected_at > self.expiry_of(st)

    def expire(self, now: float) -> int:
        """Discard the sessions disconnected for longer than they are kept, at `now` (epoch s)."""
        old = [st for st in self.sessions.values() if self.expired(st, now)]
        for st in old:
            self.discard(st)
        if old:
            self._stats["sessions_expired"] += len(old)
            log.info("expired %d persistent sessions", len(old))
        return len(old)

    def _count_persistent(self, principal: str | None, n: int) -> None:
        left = self.persistent_of.get(principal, 0) + n
        if left > 0:
            self.persistent_of[principal] = left
        else:
            self.persistent_of.pop(principal, None)
