"""Access-control plugin: the engine calls the synchronous `check` on every
publish, subscribe and delivery; amqtt's async `topic_filtering` is kept for
anything that uses the upstream interface."""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin

from broker.services.acl import AccessPolicy, Who
from plugins.base import services_of


class RoostAclPlugin(BaseTopicPlugin):
    @dataclass
    class Config:
        pass

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        services = services_of(self)
        cfg = services.config
        self._policy = AccessPolicy(
            cfg.acl, services.relations, services.identity.kind_of,
            cfg.homeassistant.service_account if cfg.homeassistant.enabled else None,
            cfg.homeassistant.discovery_prefix)

    def check(self, session, topic: str, action: Action) -> bool:  # type: ignore[no-untyped-def]
        who = Who(getattr(session, "principal", None), getattr(session, "kind", None), session.client_id)
        return self._policy.check(who, topic, str(action))

    async def topic_filtering(self, *, session=None, topic=None, action=None) -> bool:  # type: ignore[no-untyped-def, override]
        if session is None or topic is None or action is None:
            return False
        return self.check(session, topic, action)
