"""SUBSCRIBE and UNSUBSCRIBE from clients: the limits a filter must pass, the
SUBACK (once the subscription would survive a crash), the lifecycle hooks, and
the retained messages of each filter just granted (never of others: amqtt
defect 1), read from the trie in chunks so one SUBSCRIBE cannot stall the loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from amqtt.contexts import Action
from amqtt.events import BrokerEvents

from broker.mqtt import codec
from broker.mqtt.acl import AccessControl
from broker.mqtt.budgets import Budgets
from broker.mqtt.codec import ProtocolViolation
from broker.mqtt.connection import CLOSED
from broker.mqtt.persistence import SessionPersistence
from broker.mqtt.plugins import PluginHooks
from broker.mqtt.retained import RetainedIndex
from broker.mqtt.routing import Router
from broker.mqtt.session import Message, SessionState
from broker.mqtt.topics import is_wildcard, valid_topic_filter

if TYPE_CHECKING:
    from broker.mqtt.connection import Connection

log = logging.getLogger("roost.mqtt")

MAX_FILTER_LEVELS = 64           # wildcard filters deeper than this are refused (SUBACK 0x80): trie memory
# Filters that look valid but that nothing serves: refused (SUBACK 0x80), not
# granted and left silent. Shared subscriptions come with a later issue; $SYS is
# served when the broker publishes it (sys_interval > 0: Engine(serve_sys=True)).
UNSERVED_PREFIXES = ("$share/", "$SYS/", "$SYS")
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
        self.unserved_prefixes = ("$share/",) if serve_sys else UNSERVED_PREFIXES

    async def subscribe(self, conn: Connection, pkt: codec.Subscribe) -> None:
        for sub in pkt.subscriptions:
            if not valid_topic_filter(sub.topic_filter):
                raise ProtocolViolation(f"invalid topic filter {sub.topic_filter!r}")
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
        for sub in pkt.subscriptions:
            f, q = sub.topic_filter, sub.qos
            if f not in st.subs and len(st.subs) >= limits.max_subscriptions:
                over_limit.append(f)
                codes.append(0x80)
                continue
            if f.startswith(self.unserved_prefixes):
                unserved.append(f)
                codes.append(0x80)
                continue
            if is_wildcard(f) and f.count("/") >= MAX_FILTER_LEVELS:
                too_deep.append(f)
                codes.append(0x80)
                continue
            if f not in st.subs and not self._budgets.subscription_fits(f):
                index_full.append(f)
                codes.append(0x80)
                continue
            if not await self._acl.decide(info, f, Action.SUBSCRIBE):
                codes.append(0x80)
                continue
            if conn.state == CLOSED or st.discarded:
                return
            self._router.subscribe(st, f, q)
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
            log.info("%s: refused %d filter(s) this broker does not serve (shared subscriptions; "
                     "$SYS when sys_interval is 0), e.g. %s", info.client_id, len(unserved), unserved[0])
        if granted and st.journal is not None:
            self._persistence.note(st)
            await st.journal.durable()      # SUBACK once the subscription would survive a crash
            if conn.state == CLOSED:
                return
        conn.write(codec.suback(pkt.packet_id, codes))
        plugins = self._plugins
        for f, q in granted:
            await plugins.call(plugins.subscribed, info, f, q)
            await plugins.fire(BrokerEvents.CLIENT_SUBSCRIBED, client_id=info.client_id, topic=f, qos=q)
            if not st.discarded:
                await self._replay_retained(st, f, q)

    async def _replay_retained(self, st: SessionState, f: str, q: int) -> None:
        """Retained messages for one filter just subscribed. The trie walk yields
        to the loop every REPLAY_CHUNK steps, and a full session queue is waited
        on (as deliver() does) rather than overrun."""
        steps = 0
        skipped = 0
        for item in self._retained.match(f):
            steps += 1
            if steps % REPLAY_CHUNK == 0:
                await asyncio.sleep(0)
                if st.discarded or st.conn is None:
                    return
            if item is None:
                continue
            topic, entry = item
            if not await self._acl.may_receive(st, topic):
                continue
            if st.full() and not await self._router.wait_for_room(st):
                skipped += 1
                continue
            dq = entry.qos if entry.qos < q else q
            st.enqueue(Message(topic, entry.payload, entry.qos, retain=True), dq)
        if skipped:
            log.warning("%s did not read its retained messages for %s: %d not sent", st.client_id, f, skipped)

    async def unsubscribe(self, conn: Connection, pkt: codec.Unsubscribe) -> None:
        st = conn.session
        info = conn.info
        assert st is not None and info is not None
        removed = [f for f in pkt.topic_filters if self._router.unsubscribe(st, f)]
        if removed and st.journal is not None:
            self._persistence.note(st)
        conn.write(codec.ack(codec.UNSUBACK, pkt.packet_id))
        plugins = self._plugins
        for f in removed:
            await plugins.call(plugins.unsubscribed, info, f)
            await plugins.fire(BrokerEvents.CLIENT_UNSUBSCRIBED, client_id=info.client_id, topic=f)
