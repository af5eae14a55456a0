"""Access-control decisions: which plugins decide, and one cache of what they said.

Every topic plugin decides in order; the first False denies, and a plugin error
denies. A plugin with a synchronous `check` is asked at once; any other is
awaited through amqtt's `topic_filtering` (see hooks.py). When all are
synchronous every decision is made inside data_received; `decide_now` answers
None when one must be awaited, and `decide` is that same decision, awaited.

Decisions on topics (PUBLISH by the session's client, RECEIVE by it) are cached
per session, in one bounded dict `SessionState.acl_cache`: topic -> bits of
what is known. It is emptied when the client connects again (a new login) and
by `forget()` (plugins call refresh_acl when contacts or ownership change).
SUBSCRIBE decisions are not cached: a filter is checked once, when subscribed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from amqtt.contexts import Action

if TYPE_CHECKING:
    from broker.mqtt.session import ClientInfo, SessionState

log = logging.getLogger("roost.mqtt")

ACL_CACHE_SIZE = 1024     # topics per session; the cache is emptied when it is full

# bits of SessionState.acl_cache values
RECEIVE_ALLOWED = 1
RECEIVE_DENIED = 2
PUBLISH_ALLOWED = 4
PUBLISH_DENIED = 8


class AccessControl:
    def __init__(self, topic_plugins: list[Any]) -> None:
        self._plugins = topic_plugins
        self._checks: list[Callable[..., bool]] = []
        self.is_async = False
        for p in topic_plugins:
            check = getattr(p, "check", None)
            if check is not None and callable(check) and not inspect.iscoroutinefunction(check):
                self._checks.append(check)
            else:
                self.is_async = True
        self.enabled = bool(topic_plugins)

    # ---- decisions ------------------------------------------------------------------

    def decide_now(self, info: ClientInfo, topic: str, action: Action) -> bool | None:
        """The decision, or None when an asynchronous plugin must be awaited (`decide`)."""
        if self.is_async:
            return None
        for check in self._checks:
            try:
                if not check(info, topic, action):
                    return False
            except Exception:  # noqa: BLE001 - deny on plugin error
                log.exception("ACL check failed; denying")
                return False
        return True

    async def decide(self, info: ClientInfo, topic: str, action: Action) -> bool:
        ok = self.decide_now(info, topic, action)
        if ok is not None:
            return ok
        for p in self._plugins:
            try:
                check = getattr(p, "check", None)
                if check is not None and not inspect.iscoroutinefunction(check):
                    ok = check(info, topic, action)
                else:
                    ok = await p.topic_filtering(session=info, topic=topic, action=action)
            except Exception:  # noqa: BLE001
                log.exception("ACL plugin %s failed; denying", type(p).__name__)
                return False
            if not ok:
                return False
        return True

    # ---- cached per session ---------------------------------------------------------
    # The hot paths (routing.Router.route) read acl_cache inline and call these on a miss.

    def may_receive_now(self, st: SessionState, topic: str) -> bool | None:
        return self._cached_now(st, topic, Action.RECEIVE, RECEIVE_ALLOWED, RECEIVE_DENIED)

    async def may_receive(self, st: SessionState, topic: str) -> bool:
        return await self._may(st, topic, Action.RECEIVE, RECEIVE_ALLOWED, RECEIVE_DENIED)

    def may_publish_now(self, st: SessionState, topic: str) -> bool | None:
        return self._cached_now(st, topic, Action.PUBLISH, PUBLISH_ALLOWED, PUBLISH_DENIED)

    async def may_publish(self, st: SessionState, topic: str) -> bool:
        return await self._may(st, topic, Action.PUBLISH, PUBLISH_ALLOWED, PUBLISH_DENIED)

    async def _may(self, st: SessionState, topic: str, action: Action, allowed: int, denied: int) -> bool:
        ok = self._cached_now(st, topic, action, allowed, denied)
        if ok is None:
            ok = await self.decide(st.info, topic, action)
            _remember(st.own_acl_cache(), topic, allowed if ok else denied)
        return ok

    def _cached_now(self, st: SessionState, topic: str, action: Action, allowed: int, denied: int) -> bool | None:
        if not self.enabled:
            return True
        bits = st.acl_cache.get(topic, 0)
        if bits & allowed:
            return True
        if bits & denied:
            return False
        ok = self.decide_now(st.info, topic, action)
        if ok is not None:
            _remember(st.own_acl_cache(), topic, allowed if ok else denied)
        return ok

    @staticmethod
    def forget(sessions: Iterable[SessionState]) -> None:
        """Drop every cached decision (refresh_acl)."""
        for st in sessions:
            st.acl_cache.clear()


def _remember(cache: dict[str, int], topic: str, bit: int) -> None:
    bits = cache.get(topic)
    if bits is None:
        if len(cache) >= ACL_CACHE_SIZE:
            cache.clear()
        cache[topic] = bit
    else:
        cache[topic] = bits | bit
