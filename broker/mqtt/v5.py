"""The packets of an MQTT 5 connection after its CONNECT (lifecycle.py): what
engine.handle does for 3.1.1, with MQTT 5's additions. A connection uses this
handler from its CONNECT on (Connection.handle), so 3.1.1 packets never pass
through here.

* PUBLISH: topic aliases set by the client (at most limits.topic_alias_maximum
  per connection; 0x94 beyond), Receive Maximum (QoS 2 publishes not yet
  released, at most limits.max_inflight; DISCONNECT 0x93 beyond), Payload Format
  Indicator 1 with a payload that is not UTF-8 (PUBACK/PUBREC 0x99, a QoS 0 one
  dropped), the properties passed on to subscribers (properties.MsgProps); then
  the publish goes the way every publish goes (publish.py), with negative acks.
* PUBREC with a reason code >= 0x80 ends that QoS 2 delivery; PUBREL of an id
  not known is answered PUBCOMP 0x92.
* AUTH: no enhanced authentication is offered (a CONNECT naming a method gets
  CONNACK 0x8C), so an AUTH packet is a protocol error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from broker.mqtt import codec, codec5
from broker.mqtt import properties as P
from broker.mqtt.codec import MALFORMED, PROTOCOL_ERROR, ProtocolViolation
from broker.mqtt.connection import CLOSED, CONNECTED, DONE

if TYPE_CHECKING:
    import asyncio

    from broker.mqtt.connection import Connection
    from broker.mqtt.lifecycle import ClientLifecycle
    from broker.mqtt.subscriptions import Subscriptions


class V5Packets:
    def __init__(self, *, limits: Any, loop: asyncio.AbstractEventLoop,
                 publish: Callable[[Connection, codec.Publish], Awaitable[None]],
                 subscriptions: Subscriptions, lifecycle: ClientLifecycle) -> None:
        self._alias_max = limits.topic_alias_maximum
        self._receive_max = limits.max_inflight
        self._loop = loop
        self._publish = publish
        self._subscriptions = subscriptions
        self._lifecycle = lifecycle

    def handle(self, conn: Connection, ptype: int, flags: int, body: bytes) -> Awaitable[None]:
        if conn.state != CONNECTED:
            if conn.state == CLOSED:
                return DONE
            raise ProtocolViolation("the first packet must be CONNECT", PROTOCOL_ERROR)
        st = conn.session
        assert st is not None
        if ptype == codec.PUBLISH:
            return self.publish(conn, flags, body)
        if ptype == codec.PUBACK:
            st.on_puback(codec5.decode_ack(ptype, flags, body).packet_id)
        elif ptype == codec.PINGREQ:
            codec.decode_pingreq(flags, body)
            conn.write(codec.PINGRESP_BYTES)
        elif ptype == codec.PUBREC:
            ack = codec5.decode_ack(ptype, flags, body)
            if ack.reason >= 0x80:
                st.on_pubrec_refused(ack.packet_id)  # type: ignore[attr-defined]  # SessionState5
            else:
                st.on_pubrec(ack.packet_id)
        elif ptype == codec.PUBCOMP:
            st.on_pubcomp(codec5.decode_ack(ptype, flags, body).packet_id)
        elif ptype == codec.PUBREL:
            pid = codec5.decode_ack(ptype, flags, body).packet_id
            known = pid in st.incoming_qos2
            st.incoming_qos2.discard(pid)
            conn.write(codec5.ack(codec.PUBCOMP, pid, codec5.SUCCESS if known else codec5.PACKET_ID_NOT_FOUND))
        elif ptype == codec.SUBSCRIBE:
            return self._subscriptions.subscribe(conn, codec5.decode_subscribe(flags, body))
        elif ptype == codec.UNSUBSCRIBE:
            return self._subscriptions.unsubscribe(conn, codec5.decode_unsubscribe(flags, body))
        elif ptype == codec.DISCONNECT:
            self._lifecycle.disconnect5(conn, codec5.decode_disconnect(flags, body))
        elif ptype == codec.AUTH:
            raise ProtocolViolation("AUTH: no enhanced authentication method is offered", PROTOCOL_ERROR)
        elif ptype == codec.CONNECT:
            raise ProtocolViolation("second CONNECT", PROTOCOL_ERROR)
        else:
            raise ProtocolViolation(f"unexpected packet type {ptype}", MALFORMED)
        return DONE

    def publish(self, conn: Connection, flags: int, body: bytes) -> Awaitable[None]:
        pkt, props, alias = codec5.decode_publish(flags, body)
        st = conn.session
        assert st is not None
        if alias is not None:
            if alias == 0 or alias > self._alias_max:
                raise ProtocolViolation(f"topic alias {alias} (the maximum is {self._alias_max})",
                                        codec5.TOPIC_ALIAS_INVALID)
            if pkt.topic:
                conn.alias_in[alias] = pkt.topic
            else:
                topic = conn.alias_in.get(alias)
                if topic is None:
                    raise ProtocolViolation(f"topic alias {alias} was never set", PROTOCOL_ERROR)
                pkt.topic = topic
        elif not pkt.topic:
            raise ProtocolViolation("PUBLISH without topic or topic alias", PROTOCOL_ERROR)
        if pkt.qos == 2 and pkt.packet_id not in st.incoming_qos2 and len(st.incoming_qos2) >= self._receive_max:
            raise ProtocolViolation("more QoS 2 publishes unreleased than Receive Maximum",
                                    codec5.RECEIVE_MAXIMUM_EXCEEDED)
        if props is None:
            # the usual publish (no properties, or a Topic Alias alone): nothing to
            # look up or encode; its origin is kept for No Local, in one MsgProps the
            # connection's plain publishes share (nothing changes a MsgProps once made)
            plain = conn.plain_props
            if plain is None or plain.origin is not st:
                plain = conn.plain_props = P.MsgProps(b"", None, st)
            pkt.properties = plain
            return self._publish(conn, pkt)
        msg_props = P.message_props(props, self._loop.time(), st)
        if msg_props is not None and msg_props.payload_utf8:
            try:
                pkt.payload.decode("utf-8")
            except UnicodeDecodeError:
                if pkt.qos:
                    reason = codec5.PAYLOAD_FORMAT_INVALID
                    conn.write_ack(codec5.ack(codec.PUBACK if pkt.qos == 1 else codec.PUBREC, pkt.packet_id, reason))
                return DONE
        pkt.properties = msg_props
        return self._publish(conn, pkt)
