"""SUBSCRIBE and UNSUBSCRIBE from clients: the limits a filter must pass, the
SUBACK (once the subscription would survive a crash), the lifecycle hooks, and
the retained messages of each filter just granted (never of others: amqtt
defect 1), read from the trie in chunks so one SUBSCRIBE cannot stall the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from amqtt.contexts import Action
from amqtt.events import BrokerEvents

from broker.mqtt import codec, codec5
from broker.mqtt import properties as P
from broker.mqtt.acl import AccessControl
from broker.mqtt.budgets import Budgets
from broker.mqtt.codec import ProtocolViolation
from broker.mqtt.connection import CLOSED
from broker.mqtt.persistence import SessionPersistence
from broker.mqtt.plugins import PluginHooks
from broker.mqtt.retained import RetainedIndex
from broker.mqtt.routing import Router, shared_filter
from broker.mqtt.session import Message, SessionState
from broker.mqtt.topics import is_wildcard, valid_topic_filter

if TYPE_CHECKING:
    from broker.mqtt.connection import Connection
    from broker.mqtt.session import ClientInfo

log = logging.getLogger("roost.mqtt")

MAX_FILTER_LEVELS = 64           # wildcard filters deeper than this are refused (SUBACK 0x80): trie memory
# Filters that look valid but that nothing serves: refused (SUBACK 0x80), not
# granted and left silent. $SYS is served when the broker publishes it
# (sys_interval > 0: Engine(serve_sys=True)). Shared subscriptions: routing.py.
UNSERVED_PREFIXES = ("$SYS/", "$SYS")
# Why a filter was refused, told to an MQTT 5 client in the SUBACK's reason string
_WHY = {codec5.QUOTA_EXCEEDED: "quota reached (limits.max_subscriptions or the subscription index budget)",
        codec5.TOPIC_FILTER_INVALID: "topic filter not valid or not served here",
        codec5.NOT_AUTHORIZED: "not authorized by the access rules"}
REPLAY_CHUNK = 128               # retained replay yields to the loop every this many trie steps


class Subscriptions:
    def __init__(self, *, limits: Any, stats: dict[str, int], router: Router, budgets: Budgets,
                 acl: AccessControl, plugins: PluginHooks, persistence: SessionPersistence,
                 retained: RetainedIndex, serve_sys: bool) -> None:
        self._limits = limits
        self._stats = stats
        self._router = router
        self._budgets = budgets
        self._acl = acl
        self._plugins = plugins
        self._persistence = persistence
        self._retained = retained
        self._denied_code = getattr(limits, "subscribe_denied_code", codec5.NOT_AUTHORIZED)
        self.unserved_prefixes: tuple[str, ...] = () if serve_sys else UNSERVED_PREFIXES

    def subscribe(self, conn: Connection, pkt: codec.Subscribe) -> Awaitable[None]:
        """The filters are granted at once when the ACL decides synchronously (a
        publish handled right after this SUBSCRIBE, on any connection, sees
        them); the SUBACK, the hooks and the retained replay follow."""
        for sub in pkt.subscriptions:
            if not conn.v5 and not valid_topic_filter(sub.topic_filter):
                raise ProtocolViolation(f"invalid topic filter {sub.topic_filter!r}")
            if sub.options & 0x04 and sub.topic_filter.startswith("$share/"):
                raise ProtocolViolation("No Local on a shared subscription", codec.PROTOCOL_ERROR)
        info = conn.info
        assert info is not None
        decisions: dict[str, bool] = {}
        for sub in pkt.subscriptions:
            shared = shared_filter(sub.topic_filter)
            underlying = sub.topic_filter if shared is None else shared[1]
            ok = self._acl.decide_now(info, underlying, Action.SUBSCRIBE)
            if ok is None:
                return self._subscribe_later(conn, pkt)
            decisions[underlying] = ok
        return self._grant(conn, pkt, decisions)

    async def _subscribe_later(self, conn: Connection, pkt: codec.Subscribe) -> None:
        info = conn.info
        assert info is not None
        decisions: dict[str, bool] = {}
        for sub in pkt.subscriptions:
            shared = shared_filter(sub.topic_filter)
            underlying = sub.topic_filter if shared is None else shared[1]
            decisions[underlying] = await self._acl.decide(info, underlying, Action.SUBSCRIBE)
        if conn.state == CLOSED or conn.session is None or conn.session.discarded:
            return
        await self._grant(conn, pkt, decisions)

    def _grant(self, conn: Connection, pkt: codec.Subscribe, decisions: dict[str, bool]) -> Awaitable[None]:
        v5 = conn.v5
        sub_id = 0
        if pkt.properties:
            sub_id = pkt.properties.get(P.SUBSCRIPTION_ID, [0])[0]
        info = conn.info
        st = conn.session
        assert st is not None and info is not None
        limits = self._limits
        codes: list[int] = []
        granted: list[tuple[str, int]] = []
        over_limit: list[str] = []     # logged once per SUBSCRIBE, not once per filter
        too_deep: list[str] = []
        unserved: list[str] = []
        index_full: list[str] = []
        replay: list[bool] = []
        for sub in pkt.subscriptions:
            f, q = sub.topic_filter, sub.qos
            shared = shared_filter(f)
            underlying = f if shared is None else shared[1]
            if not valid_topic_filter(f) or (shared is None and f.startswith("$share/")) \
                    or not valid_topic_filter(underlying):
                codes.append(codec5.TOPIC_FILTER_INVALID)
                continue
            if f not in st.subs and len(st.subs) >= limits.max_subscriptions:
                over_limit.append(f)
                codes.append(codec5.QUOTA_EXCEEDED)
                continue
            if underlying.startswith(self.unserved_prefixes):
                unserved.append(f)
                codes.append(codec5.TOPIC_FILTER_INVALID)
                continue
            if is_wildcard(f) and f.count("/") >= MAX_FILTER_LEVELS:
                too_deep.append(f)
                codes.append(codec5.TOPIC_FILTER_INVALID)
                continue
            if f not in st.subs and not self._budgets.subscription_fits(f):
                index_full.append(f)
                codes.append(codec5.QUOTA_EXCEEDED)
                continue
            if not decisions.get(underlying, False):
                codes.append(self._denied_code)
                continue
            existed = f in st.subs
            self._router.subscribe(st, f, q)
            if v5:
                if sub.options & 0x0C or sub_id:
                    st.own_sub_opts()[f] = (sub.options, sub_id)
                else:
                    st.sub_opts.pop(f, None)
            handling = (sub.options >> 4) & 0x03
            replay.append(shared is None and (handling == 0 or (handling == 1 and not existed)))
            codes.append(q)
            granted.append((f, q))
        if over_limit:
            log.info("%s: limits.max_subscriptions (%d) reached: refused %d filter(s), e.g. %s", info.client_id,
                     limits.max_subscriptions, len(over_limit), over_limit[0])
        if too_deep:
            log.info("%s: refused %d wildcard filter(s) of more than %d levels", info.client_id, len(too_deep),
                     MAX_FILTER_LEVELS)
        if index_full:
            self._stats["subscriptions_refused"] += len(index_full)
            log.warning("%s: limits.max_subscription_bytes_total (%d) reached: refused %d filter(s), e.g. %s",
                        info.client_id, limits.max_subscription_bytes_total, len(index_full), index_full[0])
        if unserved:
            log.info("%s: refused %d filter(s) this broker does not serve "
                     "($SYS when sys_interval is 0), e.g. %s", info.client_id, len(unserved), unserved[0])
        return self._acknowledge(conn, st, info, pkt, codes, granted, replay)

    async def _acknowledge(self, conn: Connection, st: SessionState, info: ClientInfo, pkt: codec.Subscribe,
                           codes: list[int], granted: list[tuple[str, int]], replay: list[bool]) -> None:
        v5 = conn.v5
        if granted and st.journal is not None:
            self._persistence.note(st)
            await st.journal.durable()      # SUBACK once the subscription would survive a crash
            if conn.state == CLOSED:
                return
        if v5:
            refused = next((c for c in codes if c >= 0x80), None)
            why = _WHY.get(refused) if refused is not None and conn.problem_info else None
            conn.write(codec5.suback(pkt.packet_id, codes, why))
        else:
            conn.write(codec.suback(pkt.packet_id, [c if c < 0x80 else 0x80 for c in codes]))
        plugins = self._plugins
        for (f, q), send_retained in zip(granted, replay, strict=True):
            await plugins.call(plugins.subscribed, info, f, q)
            await plugins.fire(BrokerEvents.CLIENT_SUBSCRIBED, client_id=info.client_id, topic=f, qos=q)
            if not st.discarded and send_retained:
                await self._replay_retained(st, f, q)

    async def _replay_retained(self, st: SessionState, f: str, q: int) -> None:
        """Retained messages for one filter just subscribed. The trie walk yields
        to the loop every REPLAY_CHUNK steps, and a full session queue is waited
        on (as deliver() does) rather than overrun."""
        steps = 0
        skipped = 0
        now = st.host.loop.time
        for item in self._retained.match(f):
            steps += 1
            if steps % REPLAY_CHUNK == 0:
                await asyncio.sleep(0)
                if st.discarded or st.conn is None:
                    return
            if item is None:
                continue
            topic, entry = item
            props = entry.props
            if props is not None and props.expires_at is not None and props.expires_at <= now():
                continue     # its Message Expiry Interval passed
            if not await self._acl.may_receive(st, topic):
                continue
            if st.full() and not await self._router.wait_for_room(st):
                skipped += 1
                continue
            dq = entry.qos if entry.qos < q else q
            st.enqueue(Message(topic, entry.payload, entry.qos, True, props), dq)
        if skipped:
            log.warning("%s did not read its retained messages for %s: %d not sent", st.client_id, f, skipped)

    async def unsubscribe(self, conn: Connection, pkt: codec.Unsubscribe) -> None:
        st = conn.session
        info = conn.info
        assert st is not None and info is not None
        removed = [f for f in pkt.topic_filters if self._router.unsubscribe(st, f)]
        if removed and st.journal is not None:
            self._persistence.note(st)
        if conn.v5:
            codes = [codec5.SUCCESS if f in removed else codec5.NO_SUBSCRIPTION_EXISTED for f in pkt.topic_filters]
            conn.write(codec5.suback(pkt.packet_id, codes, ptype=codec.UNSUBACK))
        else:
            conn.write(codec.ack(codec.UNSUBACK, pkt.packet_id))
        plugins = self._plugins
        for f in removed:
            await plugins.call(plugins.unsubscribed, info, f)
            await plugins.fire(BrokerEvents.CLIENT_UNSUBSCRIBED, client_id=info.client_id, topic=f)
