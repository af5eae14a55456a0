"""IM plugin: the MQTT front end of the gateway (broker/services/gateway.py).

A request published on `roost/req/<client_id>` is handed to the gateway (after
checking the topic is the sender's own), which answers exactly once; the answer
is published on `roost/resp/<client_id>`. Size and envelope checks, rate
limits, the op table, error mapping and the inbox pushers are the gateway's:
this adapter only translates between MQTT and it.

`on_client_publish` never blocks the connection: the gateway runs the request
in a task of its own. Nothing a client sends can crash the broker or disturb
another client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amqtt.plugins.base import BasePlugin

from contract import topics
from contract.errors import ErrorCode
from plugins.base import broker_of, services_of

if TYPE_CHECKING:
    from broker.services.gateway import Gateway, Reply

log = logging.getLogger("roost.im")

STOP_GRACE = 5.0

# An IM error code -> the MQTT 5 PUBACK/PUBREC reason code of a request refused
# before it ran (only the codes MQTT 5 allows on PUBACK, 3.4.2.1)
PUBACK_REASONS: dict[str, int] = {
    ErrorCode.UNAUTHORIZED.value: 0x87,     # Not authorized
    ErrorCode.FORBIDDEN.value: 0x87,
    ErrorCode.RATE_LIMITED.value: 0x97,     # Quota exceeded
    ErrorCode.QUOTA_EXCEEDED.value: 0x97,
    ErrorCode.TOO_LARGE.value: 0x97,        # (0x95 Packet too large is not a PUBACK code)
    ErrorCode.BAD_REQUEST.value: 0x99,      # Payload format invalid: not a request envelope
    ErrorCode.NOT_FOUND.value: 0x83,        # Implementation specific error
    ErrorCode.CONFLICT.value: 0x83,
    ErrorCode.UNAVAILABLE.value: 0x80,      # Unspecified error
    ErrorCode.INTERNAL.value: 0x80,
}


def puback_reason(error_envelope: bytes) -> int:
    """The reason code for an error answer (error_response's JSON)."""
    try:
        code = json.loads(error_envelope)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return 0x80
    return PUBACK_REASONS.get(code, 0x80)


class RoostIMPlugin(BasePlugin):  # type: ignore[type-arg]
    publish_prefixes = (topics.REQ,)

    @dataclass
    class Config:
        pass

    def _gateway(self) -> Gateway:
        gateway = services_of(self).gateway
        assert gateway is not None, "broker.app.build_services builds the gateway"
        return gateway

    def _reply_to(self, client_id: str, response_topic: str | None = None,
                  correlation_data: bytes | None = None) -> Reply:
        """Answers go to roost/resp/<client id>; an MQTT 5 request naming a Response
        Topic is answered there instead, with its Correlation Data."""
        async def reply(payload: bytes) -> None:
            broker = broker_of(self)
            try:
                if response_topic is None:
                    await broker.publish(topics.resp(client_id), payload, 1, False)
                else:
                    # the engine's publish (BrokerApi.publish has no MQTT 5 properties)
                    engine = getattr(broker, "engine")  # noqa: B009
                    await engine.publish(response_topic, payload, 1, False, correlation_data=correlation_data)
            except Exception:  # noqa: BLE001 - a client that went away cannot be answered
                log.warning("response to %s could not be published", client_id, exc_info=True)
        return reply

    # ---- requests ----------------------------------------------------------------
    async def on_client_publish(self, session: Any, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        return self.on_client_publish_nowait(session, topic, payload, qos, retain)

    def on_client_publish_nowait(self, session: Any, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        """The engine calls this one directly (no task per request): accepting a
        request never waits; its processing runs in a task of its own."""
        client_id = getattr(session, "client_id", None) or ""
        props = getattr(session, "publish_properties", None)     # an MQTT 5 request's (engine)
        response_topic = getattr(props, "response_topic", None)
        reply = self._reply_to(client_id, response_topic, getattr(props, "correlation_data", None))
        if type(payload) is not bytes:   # (bytes() of bytes costs a lookup of __bytes__ and __index__)
            payload = bytes(payload)
        if not qos or getattr(session, "protocol_level", 4) != 5:
            try:
                self._accept(session, client_id, topic, payload, reply)
            except Exception:  # noqa: BLE001 - never let a request escape into the engine
                self._gateway().failed(reply, "request", client_id)
            return True
        # MQTT 5 QoS 1/2: a request refused before it runs (the gateway's refusals
        # build their answer synchronously) is also acked with a reason code. A
        # request that runs is acked 0x00 at once, whatever its answer.
        refusals: list[bytes] = []
        answer = reply

        def noting_refusal(payload: bytes) -> Coroutine[Any, Any, None]:
            refusals.append(payload)
            return answer(payload)
        try:
            self._accept(session, client_id, topic, payload, noting_refusal)
        except Exception:  # noqa: BLE001 - never let a request escape into the engine
            self._gateway().failed(noting_refusal, "request", client_id)
        if refusals:
            session.publish_refused = puback_reason(refusals[0])
        return True

    def _accept(self, session: Any, client_id: str, topic: str, payload: bytes, reply: Reply) -> None:
        gateway = self._gateway()
        if topic != topics.req(client_id):
            # The ACL makes this impossible; answer on the sender's own topic all the same.
            gateway.refuse(reply, None, ErrorCode.FORBIDDEN, "requests go to roost/req/<your client id>")
            return
        gateway.submit_envelope(getattr(session, "principal", None), getattr(session, "kind", None), client_id,
                                payload, reply)

    # ---- client lifecycle: inbox pushers ----------------------------------------
    async def on_client_connected(self, session: Any) -> None:
        await self._gateway().client_connected(session.client_id, getattr(session, "principal", None),
                                               bool(session.clean_session))

    async def on_client_subscribed(self, session: Any, topic_filter: str, qos: int) -> None:
        await self._gateway().client_subscribed(session.client_id, getattr(session, "principal", None),
                                                bool(session.clean_session), topic_filter)

    async def on_client_unsubscribed(self, session: Any, topic_filter: str) -> None:
        await self._gateway().client_unsubscribed(session.client_id, getattr(session, "principal", None),
                                                  bool(session.clean_session), topic_filter)

    async def on_client_disconnected(self, session: Any, reason: str) -> None:
        await self._gateway().client_disconnected(getattr(session, "client_id", None) or "",
                                                  getattr(session, "principal", None), str(reason))

    async def on_roost_stop(self) -> None:
        """Let requests in progress finish (their writes are committing), then give up."""
        await self._gateway().finish(STOP_GRACE)
