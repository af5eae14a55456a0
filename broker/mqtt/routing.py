"""Routing: the subscription index, queueing a message for every matching
session, delivery to one session (BrokerApi.deliver), and backpressure.

Exact filters live in a dict, wildcard filters in a trie (topics.py, amqtt
defect 10); no task is created per message or per subscriber. Delivered QoS is
min(publish QoS, granted QoS), one copy per session at its highest granted QoS
(defect 6).

Backpressure: when a live session's queue reaches half of max_queued, the
connections publishing to it stop being read (parsing stops mid-buffer) until
the queue is down to a quarter, so fast publishers are slowed to the pace of
their subscribers instead of losing QoS 1/2 messages. A client is never held
for its own session, offline sessions never hold anyone, and a session that
makes no progress for STALL_TIMEOUT stops holding publishers (it drops).
broker.publish()/deliver() are never held: deliver() waits for room instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from broker.mqtt.acl import RECEIVE_ALLOWED, RECEIVE_DENIED, AccessControl
from broker.mqtt.budgets import Budgets
from broker.mqtt.connection import CLOSED
from broker.mqtt.lazy import NO_DICT
from broker.mqtt.session import Message, SessionState
from broker.mqtt.topics import SubscriptionIndex, matches, valid_topic_name

if TYPE_CHECKING:
    from broker.mqtt.connection import Connection

log = logging.getLogger("roost.mqtt")

DELIVER_WAIT = 10.0              # seconds deliver() waits for room in a full queue
STALL_TIMEOUT = 3.0              # a congested session without progress stops holding publishers
GRANTS_KEPT = 16                 # topics a session remembers what its filters grant (SessionState.grants)


class Router:
    def __init__(self, *, sessions: dict[str, SessionState], acl: AccessControl, budgets: Budgets,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.index: SubscriptionIndex[SessionState] = SubscriptionIndex()
        # shared subscriptions: `$share/<group>/<filter>` -> its group, indexed by <filter>
        self.groups: dict[str, ShareGroup] = {}
        self.shared_index: SubscriptionIndex[ShareGroup] = SubscriptionIndex()
        self._sessions = sessions
        self._acl = acl
        self._budgets = budgets
        self._loop = loop
        self.congested: set[SessionState] = set()
        # The cluster (broker/cluster/) shares publishes and interest with other nodes:
        # on_routed sees every message routed here (not those from a peer) and answers
        # the keys of the shared subscription groups this node serves it to (the
        # cluster picks one node per group; None: every group here), on_interest a
        # filter gained (True) or lost (False) by one session (a shared subscription
        # as `$share/<group>/<filter>`: the cluster counts each group's members).
        self.on_routed: Callable[[Message], Collection[str] | None] | None = None
        self.on_interest: Callable[[str, bool], None] | None = None
        # on_unserved: a message of shared group `key` that no member here can take
        # any more (its member left with it unacknowledged): the cluster gives it to
        # a member of the group on another node; True if it did.
        self.on_unserved: Callable[[Message, str], bool] | None = None

    # ---- subscriptions ---------------------------------------------------------------

    def subscribe(self, st: SessionState, f: str, qos: int) -> None:
        """`f` may be a shared subscription `$share/<group>/<filter>` (shared_filter)."""
        shared = shared_filter(f)
        new = f not in st.subs
        if new:
            self._budgets.subscribed(f)
        st.own_subs()[f] = qos
        st.grants = NO_DICT
        if shared is None:
            self.index.add(f, st, qos)
        else:
            group = self.groups.get(f)
            if group is None:
                group = self.groups[f] = ShareGroup(f, shared[1])
                self.shared_index.add(shared[1], group, 0)
            group.join(st, qos)
        if new and self.on_interest is not None:
            self.on_interest(f, True)      # after the group counts the member (share_counts)

    def unsubscribe(self, st: SessionState, f: str) -> bool:
        if st.subs.pop(f, None) is None:
            return False
        st.grants = NO_DICT
        st.sub_opts.pop(f, None)
        self._forget(st, f)
        return True

    def unsubscribe_all(self, st: SessionState) -> None:
        for f in st.subs:
            self._forget(st, f)
        st.subs.clear()
        st.grants = NO_DICT
        st.sub_opts.clear()

    def _forget(self, st: SessionState, f: str) -> None:
        group = self.groups.get(f) if f.startswith("$share/") else None
        if group is None:
            self.index.remove(f, st)
        else:
            group.leave(st)
            if not group.members:
                del self.groups[f]
                self.shared_index.remove(group.filter, group)
        self._budgets.unsubscribed(f)
        if self.on_interest is not None:
            self.on_interest(f, False)

    def share_counts(self, key: str, leaving: SessionState | None = None) -> tuple[int, int]:
        """(members, connected members) of shared subscription `key` here;
        `leaving` (a member whose connection is closing) counts as not connected."""
        group = self.groups.get(key)
        if group is None:
            return 0, 0
        online = sum(1 for st in group.members if st.conn is not None and st is not leaving and not st.discarded)
        return len(group.members), online

    # ---- routing ---------------------------------------------------------------------

    def route(self, msg: Message, src: Connection | None = None,
              undecided: list[tuple[SessionState, int]] | None = None, *, share: bool = True,
              served: Collection[str] | None = None) -> int:
        """Queue `msg` for every matching session the ACL lets receive it; the
        number queued. `src`, the publishing connection, is held while a target
        session is congested. Targets whose RECEIVE decision must be awaited (an
        async ACL plugin) go to `undecided` (use route_awaited, which passes it).
        `share` False: a message from another node (not shared again), given to
        the shared subscription groups in `served` only (the keys that node picked
        this one for); None: every matching group here."""
        if share and self.on_routed is not None:
            served = self.on_routed(msg)
        targets = self.index.match(msg.topic)
        if not targets:
            return self._route_shared(msg, src, served) if self.groups else 0
        n = self._route_shared(msg, src, served) if self.groups else 0
        topic = msg.topic
        mq = msg.qos
        check = self._acl.enabled
        for st, q in targets.items():
            if check:
                bits = st.acl_cache.get(topic, 0)
                if not bits & RECEIVE_ALLOWED:
                    if bits & RECEIVE_DENIED:
                        continue
                    ok = self._acl.may_receive_now(st, topic)
                    if ok is None:
                        assert undecided is not None, "an async ACL needs route_awaited"
                        undecided.append((st, q))
                        continue
                    if not ok:
                        continue
            if st.enqueue(msg, q if q < mq else mq):
                n += 1
            if src is not None and st.congested():
                self.hold(st, src)
        return n

    def _route_shared(self, msg: Message, src: Connection | None, served: Collection[str] | None = None) -> int:
        """One member of each shared subscription group matching `msg` (of those
        in `served`, unless None): the next connected one (round-robin) the ACL
        lets receive it, else an offline persistent one. (A member whose RECEIVE
        decision must be awaited is passed over.)"""
        n = 0
        for group in self.shared_index.match(msg.topic):
            if served is not None and group.key not in served:
                continue       # another node serves this group this message (the cluster picked it)
            picked = group.pick(lambda st: self._acl.may_receive_now(st, msg.topic) is True)
            if picked is None:
                continue
            st, q = picked
            if st.enqueue(msg.copy_for(group), q if q < msg.qos else msg.qos):
                n += 1
            if src is not None and st.congested():
                self.hold(st, src)
        return n

    def redeliver_shared(self, st: SessionState) -> int:
        """`st` left: the messages a shared subscription gave it that it has not
        acknowledged (sent, or still queued) go to another connected member of
        their group, here or (the cluster) on another node; with neither, a
        persistent `st` keeps them for its return."""
        moved: list[tuple[Message, int]] = []
        for pid, entry in list(st.inflight.items()):
            msg, qos, stage, seq = entry
            if stage == 0 and msg.group is not None:
                del st.inflight[pid]
                moved.append((msg, qos))
                st.host.uncharge(st, len(msg.payload))
                st._done(seq)
        if any(m.group is not None for m, _q, _s in st.queue):
            kept = []
            for msg, qos, seq in st.queue:
                if msg.group is None:
                    kept.append((msg, qos, seq))
                else:
                    moved.append((msg, qos))
                    st.host.uncharge(st, len(msg.payload))
                    st._done(seq)
            st.queue.clear()
            st.queue.extend(kept)
        n = returned = 0
        persistent = not st.clean and st.expiry != 0
        for msg, qos in moved:
            group = msg.group
            picked = group.pick(lambda other: other is not st and other.conn is not None)
            if picked is not None and picked[0].enqueue(msg.copy_for(group), qos):
                n += 1
            elif self.on_unserved is not None and self.on_unserved(msg, group.key):
                n += 1
            elif persistent and st.enqueue(msg, qos):
                returned += 1
        if moved:
            log.info("%s left with %d unacknowledged shared-subscription messages: %d given to other members, "
                     "%d kept for its return", st.client_id, len(moved), n, returned)
        return n

    async def route_awaited(self, msg: Message, src: Connection | None = None, *, share: bool = True,
                            served: Collection[str] | None = None) -> int:
        """`route`, awaiting the RECEIVE decisions that need it."""
        if not self._acl.is_async:
            return self.route(msg, src, share=share, served=served)
        undecided: list[tuple[SessionState, int]] = []
        n = self.route(msg, src, undecided, share=share, served=served)
        for st, q in undecided:
            if st.discarded or not await self._acl.may_receive(st, msg.topic):
                continue
            if st.enqueue(msg, min(q, msg.qos)):
                n += 1
            if src is not None and st.congested():
                self.hold(st, src)
        return n

    # ---- one session (BrokerApi.deliver) -----------------------------------------------

    def deliver_nowait(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool | None:
        """Queue a message for one session: True or False exactly as deliver()
        would answer; None when deliver() would have to wait (the connected
        session's queue is full, or an async ACL decision is not cached yet).
        Saves a coroutine per message for callers that push a stream (inbox pushers)."""
        st = self._sessions.get(client_id)
        if st is None or st.discarded:
            return False
        grant = st.grants.get(topic)
        if grant is None:
            # Checked once per topic and subscription set, not per message: a pusher
            # sends its whole stream on one topic, past every filter of the session.
            # The topic as PUBLISH carries it is kept too (not encoded per message).
            granted = granted_qos(st, topic) if valid_topic_name(topic) else -1
            t = topic.encode("utf-8") if granted >= 0 else b""
            grant = (granted, len(t).to_bytes(2, "big") + t)
            grants = st.own_grants()
            if len(grants) >= GRANTS_KEPT:
                grants.clear()
            grants[topic] = grant
        granted, topic_header = grant
        if granted < 0:
            return False
        ok = self._acl.may_receive_now(st, topic)
        if not ok:
            return ok
        if st.conn is not None and st.full():
            return None
        # bytes() of a bytes object looks up __bytes__ and __index__ first (~1,500
        # instructions); only another buffer type needs the copy
        if type(payload) is not bytes:
            payload = bytes(payload)
        return st.enqueue(Message(topic, payload, qos, False, None, topic_header), qos if qos < granted else granted)

    async def deliver(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        """deliver_nowait, waiting (at most DELIVER_WAIT) for the ACL or for room."""
        done = self.deliver_nowait(client_id, topic, payload, qos)
        if done is not None:
            return done
        st = self._sessions[client_id]
        granted = granted_qos(st, topic)
        if not await self._acl.may_receive(st, topic):
            return False
        await self.wait_for_room(st)
        if st.discarded:
            return False
        return st.enqueue(Message(topic, bytes(payload), qos), min(qos, granted))

    async def wait_for_room(self, st: SessionState, wait: float = DELIVER_WAIT) -> bool:
        """Wait (at most `wait` seconds) until a connected session has room."""
        loop = self._loop
        deadline = loop.time() + wait
        while st.conn is not None and st.full() and not st.discarded:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            fut = loop.create_future()
            if st.waiters is None:
                st.waiters = []
            st.waiters.append(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                return False
        return not st.discarded

    # ---- backpressure ------------------------------------------------------------------

    def hold(self, st: SessionState, src: Connection) -> None:
        """`st` is behind: hold the publisher `src` until st's queue is down to
        st.low. Never for offline sessions (they just queue, bounded), never a
        client for its own session, and not for a session that made no progress
        for STALL_TIMEOUT (then its queue overflows and drops instead)."""
        if st.conn is None or st.stalled or st.conn is src or src.state == CLOSED:
            return
        blocked = st.blocked
        if blocked is None:
            blocked = st.blocked = set()
            st.progress_at = self._loop.time()
            self.congested.add(st)
        if src not in blocked:
            blocked.add(src)
            src.block()

    def release(self, st: SessionState) -> None:
        blocked = st.blocked
        st.blocked = None
        self.congested.discard(st)
        if blocked:
            for conn in blocked:
                conn.unblock()

    def release_stalled(self, now: float) -> None:
        """Sessions congested without progress for STALL_TIMEOUT stop holding publishers."""
        for st in [s for s in self.congested if now - s.progress_at > STALL_TIMEOUT]:
            log.warning("%s made no progress for %.0fs with %d queued: no longer holding its publishers",
                        st.client_id, now - st.progress_at, len(st.queue))
            st.stalled = True
            self.release(st)


class ShareGroup:
    """The members of one shared subscription `$share/<group>/<filter>`."""

    __slots__ = ("key", "filter", "members", "_next", "_order")

    def __init__(self, key: str, topic_filter: str) -> None:
        self.key = key
        self.filter = topic_filter
        self.members: dict[SessionState, int] = {}    # member -> granted QoS, in joining order (join/leave)
        self._next = 0
        # members' items as a tuple, made at the first pick after a change (not a
        # list of them per message: ~1,500 instructions)
        self._order: tuple[tuple[SessionState, int], ...] | None = None

    def join(self, st: SessionState, qos: int) -> None:
        self.members[st] = qos
        self._order = None

    def leave(self, st: SessionState) -> None:
        self.members.pop(st, None)
        self._order = None

    def pick(self, ok: Callable[[SessionState], bool]) -> tuple[SessionState, int] | None:
        """The next connected member (round-robin) that `ok` accepts; else an
        offline persistent one (it queues); None if there is neither."""
        members = self._order
        if members is None:
            members = self._order = tuple(self.members.items())
        n = len(members)
        start = self._next % n if n else 0
        for i in range(n):
            st, q = members[(start + i) % n]
            if st.conn is not None and not st.discarded and ok(st):
                self._next = start + i + 1
                return st, q
        for st, q in members:
            if st.conn is None and not st.clean and not st.discarded and ok(st):
                return st, q
        return None


def shared_filter(f: str) -> tuple[str, str] | None:
    """(group, filter) of `$share/<group>/<filter>`; None for any other filter."""
    if not f.startswith("$share/"):
        return None
    parts = f.split("/", 2)
    if len(parts) < 3 or not parts[1] or not parts[2] or "+" in parts[1] or "#" in parts[1]:
        return None
    return parts[1], parts[2]


def granted_qos(st: SessionState, topic: str) -> int:
    """The highest QoS of the session's filters matching `topic`; -1 for none."""
    granted = -1
    for f, q in st.subs.items():
        if q > granted and matches(topic, f):
            granted = q
    return granted
