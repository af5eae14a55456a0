"""Byte budgets of what sessions hold: payload bytes in session queues and
in-flight windows (per session, per principal, in total) and the estimated
bytes of the subscription index. Retained messages have their own budget
(retained.py), packets waiting on a connection theirs (connection.py)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from broker.mqtt.topics import is_wildcard

if TYPE_CHECKING:
    from broker.mqtt.session import SessionState

log = logging.getLogger("roost.mqtt")


def subscription_cost(f: str) -> int:
    """Estimated bytes one subscription holds in the index: the filter, the
    session's dict entry and, for wildcards, one trie node per level."""
    levels = f.count("/") + 1
    return len(f) + 120 + (levels * 450 if is_wildcard(f) else 0)   # ~430 bytes a trie level, measured


class Budgets:
    def __init__(self, limits: Any, stats: dict[str, int]) -> None:
        self._limits = limits
        self._stats = stats
        self.queued_bytes = 0                              # held by every session together
        self.queued_bytes_of: dict[str | None, int] = {}   # by principal
        self.subscription_bytes = 0
        # Every session's backpressure marks (session.py): (high, low) queued messages
        # and (high, low) payload bytes held, from limits.max_queued and max_queued_bytes
        self.queue_marks = (max(1, limits.max_queued // 2), limits.max_queued // 4,
                            max(1, limits.max_queued_bytes // 2), limits.max_queued_bytes // 4)

    # ---- session queues and in-flight windows --------------------------------------

    def charge(self, st: SessionState, n: int) -> bool:
        """Account `n` payload bytes held for `st`; False (nothing charged, the drop
        counted and logged) when that would exceed a byte budget. A session holding
        nothing may always take one message, so a payload larger than the
        per-session budget still reaches a client that reads."""
        limits = self._limits
        principal = st.info.principal
        why = None
        if st.bytes and st.bytes + n > limits.max_queued_bytes:
            why = f"{st.bytes} bytes held (limits.max_queued_bytes)"
        elif principal is not None and st.bytes and \
                self.queued_bytes_of.get(principal, 0) + n > limits.max_queued_bytes_per_principal:
            why = f"{principal} holds {self.queued_bytes_of.get(principal, 0)} bytes (limits.max_queued_bytes_per_principal)"
        elif self.queued_bytes + n > limits.max_queued_bytes_total:
            why = f"all sessions hold {self.queued_bytes} bytes (limits.max_queued_bytes_total)"
        if why is not None:
            self.count_drop(st, why)
            return False
        self.account(st, n)
        return True

    def account(self, st: SessionState, n: int) -> None:
        """Charge without asking (a message accepted before a restart)."""
        principal = st.info.principal
        st.bytes += n
        self.queued_bytes += n
        self.queued_bytes_of[principal] = self.queued_bytes_of.get(principal, 0) + n

    def uncharge(self, st: SessionState, n: int) -> None:
        st.bytes -= n
        self.queued_bytes -= n
        principal = st.info.principal
        left = self.queued_bytes_of.get(principal, 0) - n
        if left > 0:
            self.queued_bytes_of[principal] = left
        else:
            self.queued_bytes_of.pop(principal, None)

    def count_drop(self, st: SessionState, why: str) -> None:
        st.dropped += 1
        self._stats["dropped"] += 1
        if st.dropped == 1 or st.dropped % 1000 == 0:
            log.warning("session %s is full (%s): dropped the newest message (%d dropped so far)",
                        st.client_id, why, st.dropped)

    # ---- the subscription index ------------------------------------------------------

    def subscription_fits(self, f: str) -> bool:
        return self.subscription_bytes + subscription_cost(f) <= self._limits.max_subscription_bytes_total

    def subscribed(self, f: str) -> None:
        self.subscription_bytes += subscription_cost(f)

    def unsubscribed(self, f: str) -> None:
        self.subscription_bytes -= subscription_cost(f)
