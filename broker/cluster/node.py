"""ClusterNode: this broker as one node of a cluster.

* Plain MQTT publishes: every message the engine routes here (client publishes,
  wills, the broker's own; not `$` topics, which are each node's) is sent to
  the nodes whose subscription filters match its topic, and only to them: each
  node announces the filters its sessions hold (peers.py) and the wildcards are
  matched here. The receiving node routes it to its own sessions with its own
  ACL, at min(publish QoS, granted QoS), as on one node. An MQTT 5 publish keeps
  its properties, the time left of its Message Expiry Interval and the
  publisher's retain flag (Retain As Published); Subscription Identifiers are
  the receiving node's own.
* Shared subscriptions: each node announces its members of each group; for a
  message, this node picks one node per matching group (peers.ShareGroups,
  weighted by members) and tells each destination which groups it serves, so
  a group spread over nodes gets each message once in the whole cluster.
* Retained messages: a change committed on one node is applied on every other
  (and written to its store; with one shared store that write is the same row).
* Take-over: a client id connecting here closes its connection on any other
  node (no will), after this node's connection was counted (presence never
  drops to zero in between).
* Mailbox events (MailboxAppended, with a shared store) go only to the nodes
  with pushers of one of their principals (bus.py), as each node announces
  them. A principal's first pusher here could miss an event committed
  elsewhere before that node applied the announcement, so once every live node
  has said in a heartbeat that it applied it (a barrier), the principal's
  pushers here read the store once more: what was committed before is read,
  what is committed after is sent here. A node joining, or NATS coming back,
  does the same for every principal watched here.
* Presence: every node counts every node's connections per principal (the
  "up"/"down" changes, in order per node); one node, the principal's owner
  (presence_owner), publishes its state, so the retained state follows one
  in-order view however close together two nodes' clients come and go.
* Wills: every node knows the wills of every other node's connected clients,
  with their MQTT 5 properties and delay (wire.Will). When a node dies (SIGKILL,
  no heartbeat for `cluster.node_timeout`) the first surviving node by name
  publishes them, after it took over the dead node's persistent sessions (their
  subscriptions get them too). A will with a Will Delay Interval is published
  that long after the death was noticed (at the latest when its session would
  expire) by whichever node is the first alive then, unless its client
  connected again somewhere in the cluster meanwhile (its "takeover": as on one
  node, a new connection to the session cancels the will). A client whose
  delayed will is pending on its own node keeps it announced until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from amqtt.contexts import Action

from broker.cluster import wire
from broker.cluster.bus import ClusterBus, mailbox_subject
from broker.cluster.link import NatsLink
from broker.cluster.peers import LocalState, Peer, Peers, ShareGroups
from broker.cluster.reliable import ReliableLinks
from broker.cluster.sessions import NodeSessions
from broker.config import ClusterConfig
from broker.mqtt.hooks import DisconnectReason
from broker.mqtt.properties import MsgProps
from broker.mqtt.session import Message
from broker.services.events import RetainedChanged
from broker.services.sysinfo import ClusterFigures
from contract import topics

log = logging.getLogger("roost.cluster")

MAX_ECHOES = 10000       # retained changes from peers awaiting their own commit here
MAX_STAMPS = 100_000     # topics whose last retained change is remembered (to order concurrent ones)
START_WAIT = 3.0         # seconds a starting node waits for NATS before serving without it
MAX_BARRIERS = 1000      # mailbox barriers pending at once; beyond, they are merged into one
RELEASE_WAIT = 2.0       # seconds a connecting persistent client waits for the other nodes' answers
MAX_ADOPTIONS = 64       # dead nodes' session take-overs remembered (a connecting client may wait for one)
NO_WILL = {DisconnectReason.DISCONNECT, DisconnectReason.TAKEN_OVER, DisconnectReason.SHUTDOWN}


def _will_key(info: Any) -> str:
    """One connection's will (a take-over on this node overlaps two of one session)."""
    return f"{info.session_key}#{id(info):x}"


def presence_owner(principal: str, nodes: Collection[str]) -> str:
    """The node that publishes `principal`'s presence: rendezvous hashing, so
    every node that knows the same nodes alive picks the same one, and a node
    joining or leaving moves only the principals it wins or held."""
    key = b"\0" + principal.encode()
    return max(nodes, key=lambda node: hashlib.blake2b(node.encode() + key, digest_size=8).digest())


class ClusterNode:
    def __init__(self, config: ClusterConfig, *, bus: ClusterBus,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = config.node
        self.inc = secrets.token_hex(6)
        self.timeout = config.node_timeout
        self.heartbeat_interval = max(0.2, min(2.0, config.node_timeout / 5))
        self.link = NatsLink(config.nats.servers, name=f"roost-{self.name}",
                             max_pending_bytes=config.max_pending_bytes)
        # cross-node publishes: numbered, acked, resent (at-least-once, in order, no duplicates)
        self.reliable = ReliableLinks(self.link, name=self.name, inc=self.inc,
                                      window_bytes=config.resend_buffer_bytes,
                                      # past the time a silent node is found dead in: a dead
                                      # node's publishes are refused (forget), never waited out
                                      confirm_within=2 * config.node_timeout)
        self.share_groups = ShareGroups()       # every node's shared subscription members, this one's too
        self.state = LocalState(self.name, self.inc, self._send_state, self.share_groups)
        self.peers = Peers(me=self.name, timeout=config.node_timeout, clock=clock, ask_sync=self._ask_sync,
                           on_dead=self._peer_dead, on_conns=self._peer_conns,
                           on_seen=self._peer_seen, on_mailbox=self._peer_mailbox, on_synced=self._peer_synced,
                           groups=self.share_groups)
        self._bus = bus
        bus.attach(lambda data: self.link.send(wire.EVENT, data))
        # Mailbox targeting (watch_mailboxes): barriers awaiting the peers' heartbeats
        self.on_mailbox_caught_up: Callable[[str], None] | None = None
        self._barriers: list[_Barrier] = []
        self._prompt_heartbeat: asyncio.Handle | None = None
        self._peer_incs: dict[str, str] = {}
        self._always: frozenset[str] = frozenset()
        self._broker: Any = None
        self._engine: Any = None
        self._echoes: dict[str, bytes] = {}
        # topic -> (wall time, node) of its latest retained change known here: of two
        # changes of one topic on two nodes at once, every node keeps the later
        self._stamps: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._sessions: NodeSessions | None = None
        self._releases: dict[str, _Release] = {}
        # (dead node, its incarnation) -> set once a survivor took its sessions over from the store
        self._adoptions: OrderedDict[tuple[str, str], asyncio.Event] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        # dead nodes' wills waiting for their Will Delay Interval, by session key
        self._pending_wills: dict[str, tuple[asyncio.TimerHandle, wire.Will]] = {}
        # this node's own lost clients whose delayed will is pending here: session key -> will key
        self._lingering: dict[str, str] = {}
        self._ticker: asyncio.Task[None] | None = None
        # Presence across nodes (set by the composition root when presence runs):
        # (principal, change in its connections elsewhere), and the owners moved
        self.on_remote_conns: Callable[[str, int], None] | None = None
        self.on_presence_owners: Callable[[], None] | None = None
        self._presence_settled = False       # the owners went over their principals since NATS came up
        # figures
        self.forwarded = 0
        self.from_peers = 0
        self.wills_published = 0
        self.taken_over = 0
        self.sessions_handed = 0
        self.sessions_adopted = 0
        link = self.link
        link.subscribe(wire.STATE, self._on_state)
        link.subscribe(wire.sync_subject(self.name), self._on_sync)
        link.subscribe(wire.snap_subject(self.name), self._on_snapshot)
        link.subscribe(wire.pub_subject(self.name), self.reliable.receiving(self._on_publish))
        link.subscribe(wire.RETAINED, self._on_retained)
        link.subscribe(wire.EVENT, self._on_event)
        link.subscribe(mailbox_subject(self.name), self._on_event)
        link.subscribe(wire.BYE, self._on_bye)
        link.subscribe(wire.RELEASE, self._on_release)
        link.subscribe(wire.released_subject(self.name), self._on_released)
        link.subscribe(wire.ADOPTED, self._on_adopted)
        link.on_connected = self._link_up
        link.on_disconnected = self._link_down

    # ---- wiring and lifecycle ----------------------------------------------------------

    def attach(self, broker: Any, sessions: NodeSessions | None = None) -> None:
        """Before broker.start(): the sessions it loads announce their filters.
        `sessions`: the engine's session store (this node's view), for hand-overs."""
        self._broker = broker
        self._engine = broker.engine
        self._sessions = sessions
        if sessions is not None:
            self._engine.lifecycle.before_establish = self._before_establish
        router = self._engine.router
        router.on_routed = self._routed
        router.on_interest = self._interest
        router.on_unserved = self._unserved
        self._bus.subscribe(RetainedChanged, self._retained_committed)

    async def start(self) -> None:
        """Connect to NATS (waiting at most START_WAIT: without NATS the node serves
        its own clients and joins once NATS answers)."""
        await self.link.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.link.connected.wait(), START_WAIT)
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="cluster-tick")
        self.reliable.start()
        log.info("cluster: node %s (heartbeat every %.1fs, dead after %.0fs)", self.name,
                 self.heartbeat_interval, self.timeout)

    def leave(self) -> None:
        """A clean stop: the others forget this node at once (no wills: its
        clients are closed by the shutdown, which publishes none either)."""
        self.link.send(wire.BYE, wire.encode({"node": self.name, "inc": self.inc}))

    async def stop(self) -> None:
        log.info("cluster: node %s stopping: %s", self.name,
                 ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(self.figures()).items()
                           if k not in ("node", "peers")))
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        for timer, _will in self._pending_wills.values():
            timer.cancel()
        self._pending_wills.clear()
        await self.reliable.stop()
        await self.link.stop()

    async def _tick(self) -> None:
        while True:
            self.state.heartbeat(self.peers.applied())
            self.peers.check()
            self._presence_settle()
            await asyncio.sleep(self.heartbeat_interval)

    def figures(self) -> ClusterFigures:
        """This node's figures for the monitor ($SYS, /metrics, `roost status`)."""
        link, peers = self.link, self.peers
        return ClusterFigures(
            node=self.name, peers=tuple(peers.alive()), nats_connected=link.connected.is_set(),
            nats_outages=link.outages, sent=link.sent, received=link.received, queued_bytes=link.queued_bytes,
            dropped=link.dropped, dropped_bytes=link.dropped_bytes, slow_consumer=link.slow_consumer,
            forwarded=self.forwarded, from_peers=self.from_peers, nodes_dead=peers.crashes,
            nodes_left=peers.deaths - peers.crashes, resyncs=peers.resyncs,
            wills_published=self.wills_published, taken_over=self.taken_over,
            sessions_handed=self.sessions_handed, sessions_adopted=self.sessions_adopted,
            mailbox_sent=self._bus.mailbox_sent, mailbox_received=self._bus.mailbox_received,
            resend_window_bytes=self.reliable.window_bytes, resend_dropped=self.reliable.dropped,
            resent=self.reliable.resent, duplicates=self.reliable.duplicates,
            unconfirmed=self.reliable.unconfirmed)

    # ---- plain MQTT publishes ----------------------------------------------------------

    def _routed(self, msg: Message) -> Collection[str] | None:
        """Send `msg` to the nodes that want it; the keys of the shared
        subscription groups this node serves it to (None: no group anywhere)."""
        topic = msg.topic
        if topic[0] == "$":
            return None
        nodes: Collection[str] = self.peers.interest.match(topic)
        picked = self.share_groups.pick(topic) if self.share_groups.members else None
        here: Collection[str] | None = None
        if picked is not None:
            here = picked.pop(self.name, ())
            if picked:
                nodes = picked.keys() | nodes
        if not nodes:
            return here
        frame = wire.encode_publish(topic, msg.payload, msg.qos, msg.pub_retain) if msg.props is None \
            else self._frame(msg)
        reliable = self.reliable
        send = reliable.send
        if not msg.qos:
            for node in nodes:
                groups = picked.get(node) if picked else None
                send(node, frame if groups is None else self._frame(msg, groups))
        else:   # its publisher's ack waits for these nodes' (publish.py)
            sent = []
            for node in nodes:
                groups = picked.get(node) if picked else None
                sent.append((node, send(node, frame if groups is None else self._frame(msg, groups))))
            msg.remote = reliable.confirmation(sent)
        self.forwarded += 1
        return here

    def _frame(self, msg: Message, groups: list[str] | None = None) -> bytes:
        props = msg.props
        if props is None:
            return wire.encode_publish(msg.topic, msg.payload, msg.qos, msg.pub_retain, groups=groups or ())
        expires_at = props.expires_at
        return wire.encode_publish(msg.topic, msg.payload, msg.qos, msg.pub_retain, props.forwarded,
                                   None if expires_at is None else expires_at - self._engine.loop.time(),
                                   groups or ())

    def _unserved(self, msg: Message, key: str) -> bool:
        """A message of shared group `key` whose member here left with it
        unacknowledged, and no other member here: to a node with members of it."""
        node = None if msg.topic[0] == "$" else self.share_groups.elsewhere(key, self.name)
        if node is None:
            return False
        self.reliable.send(node, self._frame(msg, [key]))
        self.forwarded += 1
        return True

    async def _on_publish(self, subject: str, data: bytes) -> Awaitable[None] | None:
        """Route a publish from another node here; what must commit before its
        frame is acked (what it left for persistent sessions), or None."""
        topic, payload, qos, retain, forwarded, expires_in, groups = wire.decode_publish(data)
        self.from_peers += 1
        if expires_in is not None and expires_in <= 0:
            return None       # its Message Expiry Interval passed on the way
        journal = self._engine.journal
        mark = journal.appended if journal is not None else 0
        await self._engine.route_from_peer(topic, payload, qos, retain, forwarded, expires_in, groups)
        if journal is not None and journal.appended != mark:
            return journal.durable()
        return None

    # ---- retained messages -------------------------------------------------------------

    def _retained_committed(self, event: RetainedChanged) -> None:
        if self._echoes.get(event.topic) == event.payload:
            del self._echoes[event.topic]     # a peer's change, now committed here too
            return
        kept = self._engine.retained.get(event.topic)
        qos = kept.qos if kept is not None else 0
        owner = kept.owner if kept is not None else None
        at = time.time()
        self._stamp(event.topic, (at, self.name))
        doc = {"node": self.name, "topic": event.topic, "qos": qos, "at": at, "owner": owner,
               "payload": wire.b64(event.payload)}
        props = kept.props if kept is not None else None
        if props is not None:          # MQTT 5: forwarded properties, seconds left of its expiry
            if props.forwarded:
                doc["props"] = wire.b64(props.forwarded)
            if props.expires_at is not None:
                doc["left"] = props.expires_at - self._engine.loop.time()
        self.link.send(wire.RETAINED, wire.encode(doc))

    def _stamp(self, topic: str, stamp: tuple[float, str]) -> None:
        self._stamps[topic] = stamp
        self._stamps.move_to_end(topic)
        if len(self._stamps) > MAX_STAMPS:
            self._stamps.popitem(last=False)

    async def _on_retained(self, subject: str, data: bytes) -> None:
        doc = wire.decode(data)
        if doc["node"] == self.name:
            return
        topic, payload = str(doc["topic"]), wire.unb64(doc["payload"])
        stamp = (float(doc.get("at", 0.0)), str(doc["node"]))
        known = self._stamps.get(topic)
        if known is not None and stamp < known:
            return      # a later change of this topic is known here already
        self._stamp(topic, stamp)
        kept = self._engine.retained.get(topic)
        if (kept.payload if kept is not None else b"") == payload:
            return
        if len(self._echoes) >= MAX_ECHOES:
            self._echoes.clear()
        self._echoes[topic] = payload
        forwarded, left = doc.get("props"), doc.get("left")
        props = None
        if forwarded is not None or left is not None:
            props = MsgProps(wire.unb64(forwarded) if forwarded else b"",
                             None if left is None else self._engine.loop.time() + float(left), None)
        if not self._engine.set_retained(topic, payload, int(doc["qos"]), doc.get("owner"), props):
            self._echoes.pop(topic, None)

    # ---- domain events -----------------------------------------------------------------

    async def _on_event(self, subject: str, data: bytes) -> None:
        await self._bus.from_peer(data)

    # ---- node state: interest, wills, connections ----------------------------------------

    def _send_state(self, doc: dict[str, Any]) -> None:
        self.link.send(wire.STATE, wire.encode(doc))

    def _ask_sync(self, node: str) -> None:
        self.link.send(wire.sync_subject(node), wire.encode({"node": self.name}))

    async def _on_state(self, subject: str, data: bytes) -> None:
        doc = wire.decode(data)
        if doc.get("op") == "takeover":
            self._reconnected(str(doc["key"]), str(doc["node"]))
        if doc.get("op") == "takeover" and doc["node"] != self.name:
            self._will_void_here(doc["key"])
            if self._engine.take_over_here(doc["key"]):
                self.taken_over += 1
                log.info("cluster: %s connected on node %s: its connection here is closed",
                         doc["key"], doc["node"])
            st = self._engine.sessions.get(doc["key"])
            if doc.get("clean") and st is not None:
                self._engine.registry.discard(st)    # a clean session there ends the old one here
        self.peers.on_state(doc)
        node = str(doc["node"])
        if node != self.name and self._peer_incs.get(node) != doc.get("inc"):
            peer = self.peers.peers.get(node)
            if peer is not None and peer.inc == doc.get("inc"):
                self._peer_incs[node] = peer.inc
                self._rebarrier()     # a node (or its new incarnation) that did not know this one's pushers

    async def _on_sync(self, subject: str, data: bytes) -> None:
        asker = str(wire.decode(data)["node"])
        for part in self.state.snapshot():
            self.link.send(wire.snap_subject(asker), wire.encode(part))

    async def _on_snapshot(self, subject: str, data: bytes) -> None:
        self.peers.on_snapshot(wire.decode(data))

    async def _on_bye(self, subject: str, data: bytes) -> None:
        self.peers.on_bye(wire.decode(data))

    # ---- clients (plugin.py reports the engine's online/offline hooks) ---------------------

    def _interest(self, f: str, gained: bool) -> None:
        if f.startswith("$share/"):
            self.state.share_changed(f, *self._engine.router.share_counts(f))
        else:
            self.state.filter_changed(f, gained)

    def _members_online(self, info: Any, leaving: bool) -> None:
        """A client connected or is leaving: the connected counts of its
        session's shared subscription groups (the others pick by them)."""
        router = self._engine.router
        st = self._engine.sessions.get(info.session_key) if router.groups else None
        if st is None or (leaving and st.conn is not None and st.conn.info is not info):
            return       # (taken over here: the session stays connected)
        for f in st.subs:
            if f.startswith("$share/"):
                self.state.share_changed(f, *router.share_counts(f, st if leaving else None))

    def client_online(self, info: Any, counted: str | None) -> None:
        self._members_online(info, leaving=False)
        if counted:
            self.state.conn_up(counted)
        # after the connection counted here, so presence sees 1 -> 2 -> 1
        self.state.takeover(info.session_key, bool(info.clean_session))
        self._reconnected(info.session_key, self.name)
        lingering = self._lingering.pop(info.session_key, None)
        if lingering is not None:        # its delayed will here was cancelled by this connection
            self.state.will_cleared(lingering)
        will = self._will_of(info)
        if will is not None:
            self.state.will_set(will)

    def _will_of(self, info: Any) -> wire.Will | None:
        """The will a survivor publishes if this node dies: its MQTT 5
        properties, and its delay (0 for a session that ends with its connection:
        published at once, as here). Not announced when the ACL here denies it."""
        topic = info.will_topic
        if not info.will_flag or not topic or topic[0] == "$":
            return None
        if self._engine.acl.decide_now(info, topic, Action.PUBLISH) is False:
            return None
        props = info.will_props
        delay = 0.0
        st = self._engine.sessions.get(info.session_key)
        if info.will_delay and st is not None and not st.clean:
            delay = min(info.will_delay, self._engine.registry.expiry_of(st))
        forwarded, expiry = (props.forwarded or None, props.expires_at) if props is not None else (None, None)
        return wire.Will(_will_key(info), info.principal, info.client_id, topic, bytes(info.will_message or b""),
                         info.will_qos, bool(info.will_retain), forwarded, expiry, delay)

    def client_offline(self, info: Any, reason: str, counted: str | None) -> None:
        if reason in NO_WILL and not (reason == DisconnectReason.DISCONNECT and info.will_flag):
            # (an MQTT 5 DISCONNECT 0x04 keeps its will: published here, perhaps delayed)
            self.state.will_cleared(_will_key(info))
        # else this node publishes the will itself; the others forget it after that (client_gone)
        self._members_online(info, leaving=True)
        if counted:
            self.state.conn_down(counted)

    def client_gone(self, info: Any) -> None:
        """After the engine published the connection's will (or had none to
        publish). A will waiting here for its Will Delay Interval stays announced
        until then: should this node die meanwhile, a survivor publishes it."""
        key = _will_key(info)
        st = self._engine.sessions.get(info.session_key)
        timer = st.will_timer if st is not None and st.conn is None else None
        if timer is None or key not in self.state.wills:
            self.state.will_cleared(key)
            return
        self._lingering[info.session_key] = key
        log.info("cluster: the will of %s waits here for its delay; announced until then", info.client_id)
        self._engine.loop.call_at(timer.when() + self.heartbeat_interval, self._linger_ended, info.session_key, key)

    def _will_void_here(self, session_key: str) -> None:
        """Its client connects on another node: the will of its lost connection
        here, waiting for its Will Delay Interval, is cancelled (as a new
        connection here would)."""
        st = self._engine.sessions.get(session_key)
        if st is not None and st.will_timer is not None:
            st.will_timer.cancel()
            st.will_timer = None
        lingering = self._lingering.pop(session_key, None)
        if lingering is not None:
            self.state.will_cleared(lingering)

    def _linger_ended(self, session_key: str, key: str) -> None:
        if self._lingering.get(session_key) == key:
            del self._lingering[session_key]
        self.state.will_cleared(key)       # published here by now, or cancelled by a new connection

    # ---- mailbox events: sent only where they are pushed ----------------------------------

    def watch_mailboxes(self, inboxes: Any, always: tuple[str, ...] = ()) -> None:
        """Target mailbox events (with a shared store): `inboxes`
        (broker/services/inbox.py Inboxes) tells which principals have pushers
        here, and re-reads the store for a principal once every node knows.
        `always`: principals whose events a service here hears without a pusher
        (the Home Assistant integration's service account)."""
        self._bus.target(lambda node, data: self.link.send(mailbox_subject(node), data),
                         lambda principal: self.peers.mailbox_nodes.get(principal, ()))
        inboxes.on_watch = self._mailbox_watched
        self.on_mailbox_caught_up = inboxes.catch_up
        self._always = frozenset(always)
        for principal in self._always:
            self.state.mailbox_watched(principal, True)

    def _mailbox_watched(self, principal: str, on: bool) -> None:
        if principal in self._always:
            if on:
                self._barrier({principal}, self.state.seq)   # its new pusher catches up all the same
            return
        seq = self.state.mailbox_watched(principal, on)
        if on:
            self._barrier({principal}, seq)

    def _barrier(self, principals: set[str], seq: int) -> None:
        barrier = _Barrier(seq, principals, set(self.peers.alive()))
        if len(self._barriers) >= MAX_BARRIERS:        # merged: one wait for all
            for old in self._barriers:
                barrier.principals |= old.principals
            self._barriers.clear()
        self._barriers.append(barrier)
        self._barriers_check()

    def _rebarrier(self) -> None:
        if self.on_mailbox_caught_up is not None and self.state.mailboxes:
            self._barrier(set(self.state.mailboxes), self.state.seq)

    def _link_down(self) -> None:
        self.peers.link_down()
        self.reliable.release_all()     # no publisher waits for a node it cannot reach now

    def _link_up(self) -> None:
        self.peers.link_up()
        self.reliable.link_up()     # publishes NATS lost meanwhile are resent
        self._rebarrier()       # what the others sent here while NATS was away is lost

    def _peer_seen(self, peer: Peer) -> None:
        applied = peer.seen.get(self.inc, -1)
        for barrier in self._barriers:
            if applied >= barrier.seq:
                barrier.waiting.discard(peer.name)
        self._barriers_check()

    def _barriers_check(self) -> None:
        alive = set(self.peers.peers)
        done = [b for b in self._barriers if not (b.waiting & alive)]
        if not done:
            return
        self._barriers = [b for b in self._barriers if b.waiting & alive]
        caught_up = self.on_mailbox_caught_up
        if caught_up is not None:
            for principal in set().union(*(b.principals for b in done)):
                caught_up(principal)

    def _peer_mailbox(self, peer: Peer) -> None:
        """A peer's mailbox change applied here: a heartbeat tells it so now
        (its barrier waits for it), one for a burst of changes."""
        if self._prompt_heartbeat is None:
            def beat() -> None:
                self._prompt_heartbeat = None
                self.state.heartbeat(self.peers.applied())
            self._prompt_heartbeat = asyncio.get_running_loop().call_soon(beat)

    # ---- other nodes ---------------------------------------------------------------------

    def _peer_conns(self, peer: Peer, changes: dict[str, int]) -> None:
        if self.on_remote_conns is not None:
            for principal, delta in changes.items():
                self.on_remote_conns(principal, delta)

    def _peer_synced(self, peer: Peer) -> None:
        """A peer's whole state is known here: once every peer's is, this node
        owns its share of the principals' presence again."""
        if self.on_presence_owners is not None and all(p.synced for p in self.peers.peers.values()):
            self.on_presence_owners()

    def _presence_settle(self) -> None:
        """Once NATS has been up for a node timeout every node alive is known:
        the owners go over their principals once (after a whole cluster was
        killed, the retained `online` of those who were connected is corrected)."""
        watching = self.peers.watching()
        if watching and not self._presence_settled and self.on_presence_owners is not None:
            self.on_presence_owners()
        self._presence_settled = watching

    def owns_presence(self, principal: str) -> bool:
        """Whether this node publishes `principal`'s presence: the owner among
        the nodes alive (presence_owner), and only while it knows every peer's
        connections (a sweep catches up once it does: _peer_synced)."""
        peers = self.peers.peers
        if not all(p.synced for p in peers.values()):
            return False
        return presence_owner(principal, [self.name, *peers]) == self.name

    def retained_presence(self, principal: str) -> bytes | None:
        """The retained presence payload of `principal` held on this node."""
        kept = self._engine.retained.get(topics.presence(principal))
        return kept.payload if kept is not None else None

    def _survivor(self) -> bool:
        """Whether this node acts for the dead: the first alive node by name."""
        return min([self.name, *self.peers.alive()]) == self.name

    def _peer_dead(self, peer: Peer, crashed: bool) -> None:
        self.reliable.forget(peer.name, peer.inc)
        self._barriers_check()
        mine = self._survivor()
        if self.on_remote_conns is not None:
            for principal, n in peer.conns.items():
                self.on_remote_conns(principal, -n)
        if self.on_presence_owners is not None:
            self.on_presence_owners()      # its share of the principals has other owners now
        now = [w for w in peer.wills.values() if not w.delay] if crashed else []
        if crashed:
            for will in peer.wills.values():
                if will.delay:     # every node waits: the first alive then publishes it
                    self._will_later(will)
        adopting = peer.timed_out and self._bus.share and self._sessions is not None
        if adopting:
            # (a node restarted under its name loaded them itself)
            self._adoption(peer.name, peer.inc)      # a client waiting for its session waits for this
        if mine and (adopting or now):
            self._background(self._after_death(peer.name, peer.inc, adopting, now))

    async def _after_death(self, node: str, inc: str, adopting: bool, wills: list[wire.Will]) -> None:
        """The survivor's part: the dead node's persistent sessions first, so
        that those subscribed to its clients' wills get them too, then the wills."""
        if adopting:
            await self._adopt_sessions_of(node, inc)
        if wills:
            log.info("cluster: publishing %d will(s) of node %s's clients", len(wills), node)
            await self._publish_wills(wills)

    def _will_later(self, will: wire.Will) -> None:
        key = will.session_key
        old = self._pending_wills.pop(key, None)
        if old is not None:
            old[0].cancel()
        timer = asyncio.get_running_loop().call_later(will.delay, self._will_due, key)
        self._pending_wills[key] = (timer, will)

    def _will_due(self, key: str) -> None:
        _timer, will = self._pending_wills.pop(key)
        if self._survivor():
            log.info("cluster: publishing the delayed will of %s", will.client_id)
            self._background(self._publish_wills([will]))

    def _reconnected(self, key: str, node: str) -> None:
        """A client with session key `key` connected on `node`: wills of its
        earlier connections on other nodes are cancelled, dead nodes' too
        (pending or not yet noticed dead), as a new connection cancels them on one node."""
        pending = self._pending_wills.pop(key, None)
        if pending is not None:
            pending[0].cancel()
            log.info("cluster: %s connected again on node %s: no will", pending[1].client_id, node)
        self.peers.reconnected(key, node)

    def _background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt_sessions_of(self, node: str, inc: str) -> None:
        """A dead node's persistent sessions in the shared store become this
        node's, offline, with what they were owed: their clients resume them on
        any node (a client connecting elsewhere gets it handed over from here).
        Then every node hears that it is done (a client that connected elsewhere
        meanwhile is waiting for it, _before_establish)."""
        try:
            await self._adopt_from_store(node)
        finally:
            self._adoption(node, inc).set()
            self.link.send(wire.ADOPTED, wire.encode({"node": self.name, "from": node, "inc": inc, "all": True}))

    def _adoption(self, node: str, inc: str) -> asyncio.Event:
        done = self._adoptions.get((node, inc))
        if done is None:
            done = self._adoptions[(node, inc)] = asyncio.Event()
            if len(self._adoptions) > MAX_ADOPTIONS:
                self._adoptions.popitem(last=False)
        return done

    async def _adopt_from_store(self, node: str) -> None:
        sessions, engine = self._sessions, self._engine
        assert sessions is not None
        try:
            orphans = await sessions.load_of(node)
            adopted = 0
            for saved in orphans:
                if saved.client_id in engine.sessions:   # its client came back here meanwhile
                    await sessions.drop_of(saved.client_id, node)
                    continue
                await sessions.move(saved, node)
                engine.persistence.restore(saved, host=engine, registry=engine.registry, router=engine.router,
                                           budgets=engine.budgets)
                adopted += 1
        except Exception:  # noqa: BLE001 - the rows stay; a restart of the node takes them back
            log.exception("cluster: taking over the persistent sessions of node %s failed", node)
            return
        self.sessions_adopted += adopted
        if adopted:
            log.info("cluster: took over %d persistent session(s) of node %s", adopted, node)

    async def _publish_wills(self, wills: list[wire.Will]) -> None:
        publish = self._engine.publishing.publish_will_of
        for will in wills:
            if will.topic.startswith(topics.ROOT):
                continue     # Roost's own topics are answered by their services, not routed
            props = None
            if will.props is not None or will.expiry is not None:
                props = MsgProps(will.props or b"", will.expiry, None)
            try:
                await publish(will.principal, will.topic, will.payload, will.qos, will.retain, props)
                self.wills_published += 1
            except Exception:  # noqa: BLE001 - the other wills still go out
                log.exception("cluster: publishing the will of %s failed", will.client_id)

    # ---- persistent sessions moving between nodes ------------------------------------------

    async def _before_establish(self, info: Any, clean_start: bool) -> None:
        """A persistent session's client connects here: a node holding its session
        hands it over (exact state: subscriptions and their MQTT 5 options,
        queued and in-flight QoS 1/2, the Session Expiry Interval). A node that
        does not answer is waited for until it answers or is declared dead (at
        most `node_timeout`: a killed node's client may reconnect here before);
        a dead node's sessions are taken over from the shared store by the
        survivor, which is then asked again (or is this node)."""
        key = info.session_key
        if clean_start or not self.peers.alive() or key in self._engine.sessions or not self.link.connected.is_set():
            return
        release = await self._ask_release(key, wait_for_silent=True)
        if release.saved is None and release.dead:
            await self._adopted(release.dead)
            if key in self._engine.sessions:
                return      # this node was the survivor: it took the session over itself
            release = await self._ask_release(key, wait_for_silent=False)
        if release.saved is None or key in self._engine.sessions or self._sessions is None:
            return
        saved, holder = release.saved, release.holder
        await self._sessions.move(saved, holder)
        engine = self._engine
        engine.persistence.restore(saved, host=engine, registry=engine.registry, router=engine.router,
                                   budgets=engine.budgets)
        self.sessions_adopted += 1
        log.info("cluster: %s resumes here its session from node %s (%d messages owed)", key, holder,
                 len(saved.messages))
        self.link.send(wire.ADOPTED, wire.encode({"node": self.name, "from": holder, "key": key}))

    async def _ask_release(self, key: str, *, wait_for_silent: bool) -> _Release:
        """Ask every node for `key`'s session (RELEASE_WAIT for the answers); with
        `wait_for_silent` and a shared store, then wait for the nodes that did not
        answer, until they do or are declared dead (`release.dead`)."""
        rid = secrets.token_hex(8)
        release = self._releases[rid] = _Release({name: peer.inc for name, peer in self.peers.peers.items()})
        self.link.send(wire.RELEASE, wire.encode({"id": rid, "node": self.name, "key": key}))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.done.wait(), RELEASE_WAIT)
            if release.saved is None and release.waiting and wait_for_silent and self._bus.share:
                await self._wait_for_silent(key, release)
        finally:
            del self._releases[rid]
        if release.saved is None and release.waiting:
            log.warning("cluster: %s: no answer from %s about its session", key, ", ".join(sorted(release.waiting)))
        return release

    async def _wait_for_silent(self, key: str, release: _Release) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout + self.heartbeat_interval
        log.info("cluster: %s: waiting for %s to answer about its session or be declared dead", key,
                 ", ".join(sorted(release.waiting)))
        while release.saved is None and loop.time() < deadline:
            if not any(self._same_peer(name, inc) for name, inc in release.waiting.items()):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.done.wait(), self.heartbeat_interval)   # death is seen per tick
        release.dead = [(name, inc) for name, inc in release.waiting.items() if not self._same_peer(name, inc)]

    def _same_peer(self, name: str, inc: str) -> bool:
        peer = self.peers.peers.get(name)
        return peer is not None and peer.inc == inc

    async def _adopted(self, dead: list[tuple[str, str]]) -> None:
        """Until the survivor took over the sessions of these dead nodes (a node
        that restarted or left cleanly has its sessions back itself: no wait)."""
        waits = [done.wait() for node in dead if (done := self._adoptions.get(node)) is not None]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), self.heartbeat_interval * 2 + RELEASE_WAIT)

    async def _on_release(self, subject: str, data: bytes) -> None:
        doc = wire.decode(data)
        asker = str(doc["node"])
        if asker == self.name:
            return
        key = str(doc["key"])
        engine = self._engine
        st = engine.sessions.get(key)
        answer: dict[str, Any] = {"id": doc["id"], "node": self.name, "held": False}
        if st is None or st.clean or st.discarded:
            self.link.send(wire.released_subject(asker), wire.encode(answer))
            return
        engine.take_over_here(key)
        self._will_void_here(key)
        saved = engine.persistence.saved_sessions({key: st})[0]
        st.journal = None          # its rows stay until the new node took them (adopted)
        engine.registry.discard(st)
        if engine.journal is not None:
            await engine.journal.durable()    # what was journaled for it is in the store
        self.sessions_handed += 1
        parts = wire.session_parts(saved)
        for i, part in enumerate(parts):
            self.link.send(wire.released_subject(asker), wire.encode(
                {**answer, "held": True, "part": i, "last": i == len(parts) - 1, **part}))

    async def _on_released(self, subject: str, data: bytes) -> None:
        doc = wire.decode(data)
        release = self._releases.get(str(doc["id"]))
        if release is None:
            return
        node = str(doc["node"])
        if doc["held"]:
            release.parts.append(doc)
            if not doc["last"]:
                return
            release.saved, release.holder = wire.session_from_parts(release.parts), node
        release.waiting.pop(node, None)
        if not release.waiting or release.saved is not None:
            release.done.set()

    async def _on_adopted(self, subject: str, data: bytes) -> None:
        doc = wire.decode(data)
        if doc.get("all"):        # a survivor took over every session of a dead node
            self._adoption(str(doc["from"]), str(doc["inc"])).set()
            return
        key = str(doc["key"])
        if doc["from"] == self.name and self._sessions is not None and key not in self._engine.sessions:
            await self._sessions.drop(key)      # with one shared store: already moved, a no-op


@dataclasses.dataclass
class _Barrier:
    """Principals whose pushers read the store again once every node in
    `waiting` has applied this node's change `seq`."""
    seq: int
    principals: set[str]
    waiting: set[str]


class _Release:
    """The answers to one hand-over request: `waiting` the nodes (name ->
    incarnation asked) yet to answer, `dead` those of them found dead since."""

    def __init__(self, waiting: dict[str, str]) -> None:
        self.waiting = waiting
        self.done = asyncio.Event()
        self.parts: list[dict[str, Any]] = []
        self.saved: Any = None
        self.holder = ""
        self.dead: list[tuple[str, str]] = []
