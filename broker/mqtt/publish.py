"""PUBLISH from clients, wills, and publishes of the broker itself (BrokerApi.publish).

A client's publish goes: checks -> ACL (PUBLISH) -> interception by topic prefix
(hooks.py) -> retained -> routing -> the PUBACK/PUBREC. Each step is decided
at once when it can be (a synchronous ACL, an interceptor with a nowait
variant): then the packet is handled inside data_received with no task. The
first step that must be awaited hands the rest of the publish to `_publish_later`,
which the connection awaits in order with the packets behind it.

Nothing is acknowledged that is not stored: a QoS 1/2 publish that changed a
retained message or was kept for a persistent session is acknowledged once the
store committed it (retained.py, journal.py), and one the cluster sent to other
nodes once they have it (`Message.remote`, broker/cluster/reliable.py). Such an
ack waits in the connection's ack queue (`Connection.ack_later`): the client's
later packets are handled meanwhile, and its acks leave in publish order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from amqtt.contexts import Action

from broker.mqtt import codec, codec5
from broker.mqtt import properties as P
from broker.mqtt.acl import PUBLISH_ALLOWED, PUBLISH_DENIED, AccessControl
from broker.mqtt.codec import ProtocolViolation
from broker.mqtt.connection import CLOSED, DONE
from broker.mqtt.figures import TrafficCounters
from broker.mqtt.journal import SessionJournal
from broker.mqtt.plugins import PluginHooks
from broker.mqtt.properties import MsgProps
from broker.mqtt.retained import RetainedMessages
from broker.mqtt.routing import Router
from broker.mqtt.session import Message
from broker.mqtt.topics import valid_topic_name

if TYPE_CHECKING:
    from broker.mqtt.connection import Connection
    from broker.mqtt.session import ClientInfo, SessionState

log = logging.getLogger("roost.mqtt")

# Reason strings of the MQTT 5 negative acks
_REFUSALS = {codec5.NOT_AUTHORIZED: "not authorized by the access rules",
             codec5.TOPIC_NAME_INVALID: "topics starting with $ are the broker's",
             codec5.QUOTA_EXCEEDED: "routed but not retained: retained message budget reached",
             codec5.PAYLOAD_FORMAT_INVALID: "payload is not valid UTF-8 (Payload Format Indicator 1)"}


class Publishing:
    def __init__(self, *, limits: Any, counters: TrafficCounters, stats: dict[str, int], acl: AccessControl,
                 plugins: PluginHooks, retained: RetainedMessages, router: Router,
                 journal: SessionJournal | None) -> None:
        self._max_payload = limits.max_payload
        self._counters = counters
        self._stats = stats
        self._acl = acl
        self._plugins = plugins
        self._retained = retained
        self._router = router
        self._journal = journal

    # ---- from a client -------------------------------------------------------------------

    def publish(self, conn: Connection, pkt: codec.Publish) -> Awaitable[None]:
        topic = pkt.topic
        qos = pkt.qos
        self._counters.received_qos[qos] += 1
        if not valid_topic_name(topic):
            raise ProtocolViolation(f"invalid topic name {topic!r}", codec5.TOPIC_NAME_INVALID)
        if len(pkt.payload) > self._max_payload:
            raise ProtocolViolation(f"payload of {len(pkt.payload)} bytes exceeds limits.max_payload",
                                    codec5.PACKET_TOO_LARGE)
        st = conn.session
        info = conn.info
        assert st is not None and info is not None   # set once CONNECTED
        if qos == 2 and pkt.packet_id in st.incoming_qos2:
            conn.write_ack(codec.ack(codec.PUBREC, pkt.packet_id))  # duplicate: already routed
            return DONE
        if topic[0] == "$":
            # MQTT 3.1.1 has no negative PUBACK: the message is acknowledged and not
            # routed ($ topics are the broker's, MQTT-4.7.2-1); said once per connection
            self._stats["publish_denied"] += 1
            if not conn.dollar_publish_logged:
                conn.dollar_publish_logged = True
                log.info("%s published to %s: topics starting with $ are reserved for the broker; "
                         "not routed (said once per connection)", info.client_id, topic)
            return self._acknowledge(conn, st, pkt, refused=codec5.TOPIC_NAME_INVALID)
        acl = self._acl
        allowed: bool | None = True
        if acl.enabled:   # the cache read inline, as routing does: this runs per message
            bits = st.acl_cache.get(topic, 0)
            if not bits & PUBLISH_ALLOWED:
                allowed = False if bits & PUBLISH_DENIED else acl.may_publish_now(st, topic)
        if allowed is None or acl.is_async:
            # async ACL plugins configured: the RECEIVE checks must be awaited too
            return self._publish_later(conn, st, info, pkt, allowed)
        if not allowed:
            self._stats["publish_denied"] += 1
            log.debug("publish of %s to %s denied", info.client_id, topic)
            return self._acknowledge(conn, st, pkt, refused=codec5.NOT_AUTHORIZED)
        prefixes = self._plugins.prefixes
        if prefixes and topic.startswith(prefixes):
            info.publish_properties = pkt.properties
            consumed = self._plugins.intercept_now(info, topic, pkt.payload, qos, pkt.retain)
            info.publish_properties = None
            if consumed is None:
                return self._publish_later(conn, st, info, pkt, True)
            if consumed:
                refused, info.publish_refused = info.publish_refused, 0
                return self._acknowledge(conn, st, pkt, refused=refused)
        journal = self._journal
        mark = journal.appended if journal is not None else 0    # _journal_mark(), inline
        msg = Message(topic, pkt.payload, qos, False, pkt.properties)
        if pkt.retain:
            msg.pub_retain = True
            if not self._retained.set(topic, pkt.payload, qos, info.principal, pkt.properties) and qos:
                self._router.route(msg, conn)
                return self._acknowledge(conn, st, pkt, mark, refused=codec5.QUOTA_EXCEEDED, remote=msg.remote)
        self._router.route(msg, conn)
        if not qos:
            return DONE
        return self._acknowledge(conn, st, pkt, mark, remote=msg.remote)

    async def _publish_later(self, conn: Connection, st: SessionState, info: ClientInfo, pkt: codec.Publish,
                             allowed: bool | None) -> None:
        """The rest of `publish` from the first step that must be awaited."""
        topic = pkt.topic
        if allowed is None:
            allowed = await self._acl.may_publish(st, topic)
        mark = None
        refused = 0
        remote = None
        if allowed:
            mark = self._journal_mark()
            remote = await self._intercept_and_route(info, topic, pkt.payload, pkt.qos, pkt.retain, conn,
                                                     pkt.properties)
            refused, info.publish_refused = info.publish_refused, 0   # an interceptor's refusal
        else:
            self._stats["publish_denied"] += 1
            refused = codec5.NOT_AUTHORIZED
        if conn.state == CLOSED:    # no ack; a QoS 2 id is still known when the session resumes
            if pkt.qos == 2 and not refused:
                st.own_incoming_qos2().add(pkt.packet_id)
            return
        await self._acknowledge(conn, st, pkt, mark, refused=refused, remote=remote)

    def _journal_mark(self) -> int:
        """Compared after routing: did it keep the message for a persistent session?"""
        journal = self._journal
        return journal.appended if journal is not None else 0

    def _acknowledge(self, conn: Connection, st: SessionState, pkt: codec.Publish,
                     mark: int | None = None, refused: int = 0, remote: Awaitable[None] | None = None
                     ) -> Awaitable[None]:
        """PUBACK/PUBREC, at once or once stored what must survive a SIGKILL right
        after it (see the module docstring). `mark`: _journal_mark() before the
        message was retained and routed; None when it was not (denied, consumed).
        `refused`: the MQTT 5 reason code of a refusal (3.1.1 has no negative ack:
        its client gets a plain ack). `remote`: the routed message's `remote`."""
        qos = pkt.qos
        if not qos:
            return DONE
        if refused and conn.v5:
            log.debug("%s: publish to %s refused: %s", conn.client_id, pkt.topic, _REFUSALS.get(refused))
            conn.write_ack(codec5.ack(codec.PUBACK if qos == 1 else codec.PUBREC, pkt.packet_id, refused))
            return DONE
        if qos == 2:
            st.own_incoming_qos2().add(pkt.packet_id)
        journal = self._journal
        kept = mark is not None and journal is not None and journal.appended != mark
        retained = mark is not None and pkt.retain and self._retained.persisted
        ack = codec.ack(codec.PUBACK if qos == 1 else codec.PUBREC, pkt.packet_id)
        if kept or retained:
            return conn.ack_later(self._stored(retained=retained, kept=kept, remote=remote), ack)
        if remote is not None:      # sent to other nodes only: their acks' future itself
            return conn.ack_later(remote, ack)
        conn.write_ack(ack)
        return DONE

    async def _stored(self, *, retained: bool, kept: bool, remote: Awaitable[None] | None) -> None:
        """Done once what a publish's ack must follow is: its retained change and
        what it left for persistent sessions committed, the other nodes it went to
        having it."""
        if retained:
            await self._retained.flush()
        if kept and self._journal is not None:
            await self._journal.durable()
        if remote is not None:
            await remote

    async def _intercept_and_route(self, info: ClientInfo, topic: str, payload: bytes, qos: int, retain: bool,
                                   src: Connection | None = None, props: MsgProps | None = None
                                   ) -> Awaitable[None] | None:
        """A publish that passed the PUBLISH ACL: interception, then retain + routing;
        the routed message's `remote` (None when intercepted)."""
        prefixes = self._plugins.prefixes
        if prefixes and topic.startswith(prefixes):
            info.publish_properties = props
            try:
                if await self._plugins.intercept(info, topic, payload, qos, retain):
                    return None
            finally:
                info.publish_properties = None
        return await self._retain_and_route(topic, payload, qos, retain, info.principal, props, src)

    async def _retain_and_route(self, topic: str, payload: bytes, qos: int, retain: bool, owner: str | None,
                                props: MsgProps | None, src: Connection | None = None) -> Awaitable[None] | None:
        """The routed message's `remote`."""
        msg = Message(topic, payload, qos, False, props)
        if retain:
            msg.pub_retain = True
            self._retained.set(topic, payload, qos, owner, props)
        await self._router.route_awaited(msg, src)
        return msg.remote

    # ---- wills and the broker's own ---------------------------------------------------------

    async def publish_will(self, info: ClientInfo) -> None:
        topic = info.will_topic
        if not topic or topic[0] == "$":
            return
        if not await self._acl.decide(info, topic, Action.PUBLISH):
            log.info("will of %s on %s denied by ACL", info.client_id, topic)
            return
        await self._intercept_and_route(info, topic, info.will_message or b"", info.will_qos, info.will_retain,
                                        props=_will_started(info.will_props))

    async def publish_will_of(self, owner: str | None, topic: str, payload: bytes, qos: int, retain: bool,
                              props: MsgProps | None) -> None:
        """The will of a client whose node died, published by a surviving node
        (broker/cluster/node.py), as publish_will would have: retained charged to
        `owner`, the retain flag kept for Retain As Published, the Message Expiry
        Interval (relative in `props`) running from now. Its ACL was checked on the
        client's node when it was announced; Roost's own topics are not routed."""
        await self._retain_and_route(topic, payload, qos, retain, owner, _will_started(props))

    async def publish_own(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                          correlation_data: bytes | None = None) -> int:
        """BrokerApi.publish: routed like a client publish (ACL RECEIVE per subscriber).
        `correlation_data`: an answer to an MQTT 5 request, carried to v5 subscribers."""
        if not valid_topic_name(topic):
            raise ValueError(f"invalid topic name {topic!r}")
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {qos!r}")
        if type(payload) is not bytes:   # (bytes() of bytes costs a lookup of __bytes__ and __index__)
            payload = bytes(payload)
        props = None
        if correlation_data is not None:
            props = P.message_props({P.CORRELATION_DATA: bytes(correlation_data)}, 0.0, None)
        if retain:
            self._retained.set(topic, payload, qos, None, props)
        return await self._router.route_awaited(Message(topic, payload, qos, False, props))


def _will_started(props: MsgProps | None) -> MsgProps | None:
    """A will's properties as published now: its Message Expiry Interval (kept
    relative since the CONNECT) runs from its publication."""
    if props is None or props.expires_at is None:
        return props
    return dataclasses.replace(props, expires_at=asyncio.get_running_loop().time() + props.expires_at)
