"""IM plugin: the MQTT front end of the gateway (broker/services/gateway.py).

Requests on `roost/req/<client_id>` are decoded here (topic, size, JSON
envelope) and handed to the gateway, which answers exactly once; the answer is
published on `roost/resp/<client_id>`. Rate limits, the op table, error
mapping and the inbox pushers are the gateway's: this adapter only translates
between MQTT and it.

`on_client_publish` never blocks the connection: decoding is cheap and the
gateway runs the request in a task of its own. Nothing a client sends can crash
the broker or disturb another client.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amqtt.plugins.base import BasePlugin

from broker.services.gateway import Request
from contract import topics
from contract.envelopes import parse_request
from contract.errors import ErrorCode, ProtocolError
from plugins.base import broker_of, services_of

if TYPE_CHECKING:
    from broker.services.gateway import Gateway, Reply

log = logging.getLogger("roost.im")

# Room for the envelope and JSON escaping around a body of limits.max_body bytes
# (ensure_ascii clients write up to 6 bytes per character).
ENVELOPE_SLACK = 64 * 1024
STOP_GRACE = 5.0

_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*"([A-Za-z0-9_.:-]{1,64})"')


def _leading_id(payload: bytes) -> str | None:
    """The request id of a payload too large to parse, when `id` is its first member."""
    m = _LEADING_ID.match(payload[:200])
    return m.group(1).decode() if m else None


class RoostIMPlugin(BasePlugin):  # type: ignore[type-arg]
    publish_prefixes = (topics.REQ,)

    @dataclass
    class Config:
        pass

    def _gateway(self) -> Gateway:
        gateway = services_of(self).gateway
        assert gateway is not None, "broker.app.build_services builds the gateway"
        return gateway

    def _reply_to(self, client_id: str) -> Reply:
        async def reply(payload: bytes) -> None:
            try:
                await broker_of(self).publish(topics.resp(client_id), payload, 1, False)
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
        reply = self._reply_to(client_id)
        try:
            self._accept(session, client_id, topic, bytes(payload), reply)
        except Exception:  # noqa: BLE001 - never let a request escape into the engine
            self._gateway().failed(reply, "request", client_id)
        return True

    def _accept(self, session: Any, client_id: str, topic: str, payload: bytes, reply: Reply) -> None:
        gateway = self._gateway()
        if topic != topics.req(client_id):
            # The ACL makes this impossible; answer on the sender's own topic all the same.
            gateway.refuse(reply, None, ErrorCode.FORBIDDEN, "requests go to roost/req/<your client id>")
            return
        if len(payload) > services_of(self).config.limits.max_body * 6 + ENVELOPE_SLACK:
            # Refused before parsing: decoding up to max_payload of JSON only to refuse
            # it would hold the event loop. The id is read when it comes first.
            gateway.refuse(reply, _leading_id(payload), ErrorCode.TOO_LARGE, "request is too large")
            return
        try:
            request = parse_request(payload)
        except ProtocolError as err:
            gateway.refuse(reply, getattr(err, "request_id", None), err.code, err.message)
            return
        except RecursionError:  # JSON nested deeper than the parser goes
            gateway.refuse(reply, None, ErrorCode.BAD_REQUEST, "payload is nested too deeply")
            return
        gateway.submit(Request(principal=getattr(session, "principal", None), kind=getattr(session, "kind", None),
                               client_id=client_id, id=request.id, op=request.op, params=request.params), reply)

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
