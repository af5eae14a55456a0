"""The plugins the engine calls (the contract is in hooks.py): which loaded
plugin implements which hook, found once at start, and how each kind is called.

Authentication, interception and the lifecycle hooks are here; access control
is in acl.py. A plugin's exception is logged and never reaches the connection.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from amqtt.events import BrokerEvents
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from broker.mqtt.hooks import ConnectRefused

if TYPE_CHECKING:
    from broker.mqtt.session import ClientInfo

log = logging.getLogger("roost.mqtt")


class PluginHooks:
    def __init__(self, plugins: list[Any], plugins_manager: Any = None) -> None:
        self._pm = plugins_manager
        self.auth_plugins = [p for p in plugins if isinstance(p, BaseAuthPlugin)]
        self.topic_plugins = [p for p in plugins if isinstance(p, BaseTopicPlugin)]
        # (prefixes, on_client_publish, on_client_publish_nowait or None)
        self.interceptors: list[tuple[tuple[str, ...], Any, Any]] = []
        for p in plugins:
            prefixes = getattr(p, "publish_prefixes", None)
            fn = getattr(p, "on_client_publish", None)
            if prefixes and fn is not None:
                nowait = getattr(p, "on_client_publish_nowait", None)
                self.interceptors.append((tuple(prefixes), fn, nowait if callable(nowait) else None))
        self.prefixes: tuple[str, ...] = tuple(x for pre, _, _ in self.interceptors for x in pre)

        def hooks(name: str) -> list[Callable[..., Any]]:
            return [getattr(p, name) for p in plugins if callable(getattr(p, name, None))]

        # amqtt's EventLoggerPlugin answers every on_* name with a coroutine
        # function: the synchronous hooks take only plain functions.
        self.online = [f for f in hooks("on_client_online") if not inspect.iscoroutinefunction(f)]
        self.offline = [f for f in hooks("on_client_offline") if not inspect.iscoroutinefunction(f)]
        self.connected = hooks("on_client_connected")
        self.disconnected = hooks("on_client_disconnected")
        self.subscribed = hooks("on_client_subscribed")
        self.unsubscribed = hooks("on_client_unsubscribed")
        self.start = hooks("on_roost_start")
        self.stop = hooks("on_roost_stop")

    # ---- lifecycle ---------------------------------------------------------------------

    @staticmethod
    async def call(fns: list[Callable[..., Any]], *args: Any) -> None:
        """Awaited hooks, in order."""
        for fn in fns:
            try:
                await fn(*args)
            except Exception:  # noqa: BLE001 - a plugin bug must not break the connection
                log.exception("plugin hook %s failed", getattr(fn, "__qualname__", fn))

    @staticmethod
    def call_now(fns: list[Callable[..., Any]], *args: Any) -> None:
        """The synchronous hooks: called at the very moment of the change, so their
        order is the order things happened across all connections."""
        for fn in fns:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a plugin bug must not break the connection
                log.exception("plugin hook %s failed", getattr(fn, "__qualname__", fn))

    async def fire(self, event: BrokerEvents, **kwargs: Any) -> None:
        """amqtt-style event for plain amqtt plugins (only when one listens)."""
        pm = self._pm
        if pm is not None and event in pm._event_plugin_callbacks:
            try:
                await pm.fire_event(event, **kwargs)
            except Exception:  # noqa: BLE001
                log.exception("amqtt event %s failed", event)

    # ---- authentication ------------------------------------------------------------------

    async def authenticate(self, info: ClientInfo) -> int:
        """0 to accept, else a CONNACK return code. See hooks.py."""
        accepted = False
        for p in self.auth_plugins:
            try:
                r = await p.authenticate(session=info)
            except ConnectRefused as exc:
                return exc.code
            except Exception:  # noqa: BLE001
                log.exception("auth plugin %s failed", type(p).__name__)
                return ConnectRefused.SERVER_UNAVAILABLE
            if r is None:
                continue
            if not r:
                return ConnectRefused.BAD_CREDENTIALS
            accepted = True
        return 0 if accepted else ConnectRefused.NOT_AUTHORIZED

    # ---- interception ----------------------------------------------------------------------
    # Callers test `topic.startswith(self.prefixes)` first: most publishes match none.

    def intercept_now(self, info: ClientInfo, topic: str, payload: bytes, qos: int, retain: bool) -> bool | None:
        """True: a plugin consumed the publish; False: route it; None when a
        matching interceptor must be awaited (a retained publish, or one without
        on_client_publish_nowait): then call `intercept`."""
        if retain:
            return None
        for prefixes, _fn, nowait in self.interceptors:
            if nowait is None and topic.startswith(prefixes):
                return None
        for prefixes, _fn, nowait in self.interceptors:
            if topic.startswith(prefixes):
                try:
                    if nowait(info, topic, payload, qos, False):
                        return True
                except Exception:  # noqa: BLE001 - logged, consumed
                    log.exception("on_client_publish_nowait of %s failed", getattr(nowait, "__qualname__", nowait))
                    return True
        return False

    async def intercept(self, info: ClientInfo, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        """`intercept_now`, awaiting the interceptors that need it."""
        for prefixes, fn, nowait in self.interceptors:
            if topic.startswith(prefixes):
                try:
                    if nowait is not None and not retain:
                        consumed = nowait(info, topic, payload, qos, False)
                    else:
                        consumed = await fn(info, topic, payload, qos, retain)
                except Exception:  # noqa: BLE001 - logged, consumed
                    log.exception("on_client_publish of %s failed", getattr(fn, "__qualname__", fn))
                    return True
                if consumed:
                    return True
        return False
