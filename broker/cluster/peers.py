"""This node's state as the others see it, and the other nodes as this one sees them.

`LocalState` numbers every change this node announces (a filter gained or lost,
a will set or cleared, a counted connection up or down) and answers snapshot
requests. `Peers` applies the changes of every other node in order: a gap in a
node's numbers (a message NATS lost, an outage) makes it ask that node for a
snapshot, holding the changes that arrive meanwhile. Heartbeats travel on the
same subject as the changes, so they cannot overtake them.

A node not heard from for `node_timeout` is dead: its interest is dropped and
`on_dead` gets its wills and connections. Failure detection waits while this
node itself has no NATS (then nobody can be heard) and for a full
`node_timeout` after NATS came back, so an outage of NATS kills nobody.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.cluster.wire import Will
from broker.mqtt.routing import shared_filter
from broker.mqtt.topics import SubscriptionIndex

log = logging.getLogger("roost.cluster")

SNAPSHOT_PART_BYTES = 256 * 1024     # a snapshot is sent in parts well under NATS's max_payload
SYNC_RETRY = 2.0                     # seconds before a snapshot request is repeated
MAX_HELD_CHANGES = 100_000           # changes held while a snapshot is awaited; beyond: ask again


class ShareGroups:
    """Shared subscription groups (`$share/<group>/<filter>`) across the cluster:
    how many members each node has in each group, and how many of them are
    connected, this node's own included; and for a message the node that serves
    each group matching it, so that a group gets each message once in the whole
    cluster (the serving node gives it to one of its members, routing.ShareGroup.pick).

    The pick is a weighted round-robin of the publishing node, per group: a node
    is picked in proportion to its connected members (turn `t` goes to the node
    holding member number `t mod total`, nodes in name order), so every
    connected member gets about the same share wherever it is, as on one node;
    only when no member is connected anywhere are the offline (persistent) ones
    counted, and the message queues for one of them. A local member is not
    preferred: with one publisher (a common fan-in) it would take every message.
    A node's groups leave the count when its interest is removed (unsubscribe, or
    the node dead or gone), so its share goes to the others from then on."""

    def __init__(self) -> None:
        self.index: SubscriptionIndex[str] = SubscriptionIndex()       # <filter> -> group keys
        # group key -> {node: (members there, of them connected)}
        self.members: dict[str, dict[str, tuple[int, int]]] = {}
        self._turn: dict[str, int] = {}

    def set(self, key: str, node: str, members: int, online: int) -> None:
        """`node` has `members` members of group `key` now (0: none), `online` of them connected."""
        nodes = self.members.get(key)
        if members > 0:
            if nodes is None:
                shared = shared_filter(key)
                if shared is None:
                    return
                nodes = self.members[key] = {}
                self.index.add(shared[1], key, 0)
            nodes[node] = (members, min(online, members))
        elif nodes is not None and nodes.pop(node, None) is not None and not nodes:
            del self.members[key]
            self._turn.pop(key, None)
            shared = shared_filter(key)
            assert shared is not None
            self.index.remove(shared[1], key)

    def drop_node(self, node: str) -> None:
        for key in [k for k, nodes in self.members.items() if node in nodes]:
            self.set(key, node, 0, 0)

    def pick(self, topic: str) -> dict[str, list[str]] | None:
        """node -> the keys of the groups matching `topic` it serves; None when
        there is no group in the cluster at all."""
        if not self.members:
            return None
        picked: dict[str, list[str]] = {}
        for key in self.index.match(topic):
            nodes = self.members[key]
            node = next(iter(nodes)) if len(nodes) == 1 else self._next(key, nodes)
            picked.setdefault(node, []).append(key)
        return picked

    def elsewhere(self, key: str, me: str) -> str | None:
        """A node other than `me` with members of group `key` (the same weighted
        round-robin); None if there is none."""
        nodes = self.members.get(key)
        others = {name: n for name, n in nodes.items() if name != me} if nodes else None
        return self._next(key, others) if others else None

    def _next(self, key: str, nodes: dict[str, tuple[int, int]]) -> str:
        weights = sorted((name, online) for name, (_members, online) in nodes.items() if online) \
            or sorted((name, members) for name, (members, _online) in nodes.items())
        turn = self._turn.get(key, 0)
        self._turn[key] = turn + 1
        left = turn % sum(w for _name, w in weights)
        for name, weight in weights:
            left -= weight
            if left < 0:
                return name
        return weights[-1][0]


class LocalState:
    def __init__(self, node: str, inc: str, send: Callable[[dict[str, Any]], None],
                 groups: ShareGroups | None = None) -> None:
        self.node = node
        self.inc = inc
        self._send = send
        self._groups = groups
        self.seq = 0
        self.filters: dict[str, int] = {}      # filter -> sessions here holding it
        self.shares: dict[str, tuple[int, int]] = {}   # `$share/<group>/<filter>` -> (members here, connected)
        self.wills: dict[str, Will] = {}       # session key -> will of its connected client
        self.conns: dict[str, int] = {}        # principal -> counted connections here
        self.mailboxes: set[str] = set()       # principals with inbox pushers here (their events come here)

    def _change(self, op: str, **fields: Any) -> None:
        self.seq += 1
        self._send({"op": op, "node": self.node, "inc": self.inc, "seq": self.seq, **fields})

    def heartbeat(self, seen: dict[str, int] | None = None) -> None:
        """`seen`: the change number of every other node applied here (the
        mailbox barrier of node.py waits for them)."""
        self._send({"op": "hb", "node": self.node, "inc": self.inc, "seq": self.seq, "seen": seen or {}})

    def mailbox_watched(self, principal: str, on: bool) -> int:
        """A principal gained its first pusher here (on) or lost its last: the
        others send its mailbox events here from the change numbered the result."""
        if on:
            self.mailboxes.add(principal)
        else:
            self.mailboxes.discard(principal)
        self._change("mbox", principal=principal, on=on)
        return self.seq

    def share_changed(self, key: str, members: int, online: int) -> None:
        """Shared subscription `key` has `members` members here now, `online` of
        them connected: announced when it changes ("share"), for every node's
        weighted pick (ShareGroups)."""
        now = (members, online) if members > 0 else (0, 0)
        if self.shares.get(key, (0, 0)) == now:
            return
        if members > 0:
            self.shares[key] = now
        else:
            self.shares.pop(key, None)
        if self._groups is not None:
            self._groups.set(key, self.node, *now)
        self._change("share", f=key, n=now[0], on=now[1])

    def filter_changed(self, f: str, gained: bool) -> None:
        n = self.filters.get(f, 0) + (1 if gained else -1)
        if n > 0:
            self.filters[f] = n
            if n == 1 and gained:
                self._change("sub", f=f)
        else:
            self.filters.pop(f, None)
            self._change("unsub", f=f)

    def takeover(self, key: str, clean: bool) -> None:
        """A client with session key `key` connected here: any other node closes its
        connection, and with `clean` ends its session (numbered like a change so it
        cannot overtake this node's "up")."""
        self._change("takeover", key=key, clean=clean)

    def will_set(self, will: Will) -> None:
        self.wills[will.key] = will
        self._change("will", will=will.to_doc())

    def will_cleared(self, key: str) -> None:
        if self.wills.pop(key, None) is not None:
            self._change("unwill", key=key)

    def conn_up(self, principal: str) -> None:
        self.conns[principal] = self.conns.get(principal, 0) + 1
        self._change("up", principal=principal)

    def conn_down(self, principal: str) -> None:
        n = self.conns.get(principal, 0) - 1
        if n > 0:
            self.conns[principal] = n
        else:
            self.conns.pop(principal, None)
        self._change("down", principal=principal)

    def snapshot(self) -> list[dict[str, Any]]:
        """The whole state, in parts of at most ~SNAPSHOT_PART_BYTES."""
        parts: list[dict[str, Any]] = []
        part: dict[str, Any] = {"filters": [], "shares": {}, "wills": [], "conns": {}, "mailboxes": []}
        size = 0

        def cut() -> None:
            nonlocal part, size
            parts.append(part)
            part = {"filters": [], "shares": {}, "wills": [], "conns": {}, "mailboxes": []}
            size = 0

        for f in self.filters:
            part["filters"].append(f)
            size += len(f) + 4
            if size > SNAPSHOT_PART_BYTES:
                cut()
        for key, (members, online) in self.shares.items():
            part["shares"][key] = [members, online]
            size += len(key) + 8
            if size > SNAPSHOT_PART_BYTES:
                cut()
        for will in self.wills.values():
            part["wills"].append(will.to_doc())
            size += will.size() * 2
            if size > SNAPSHOT_PART_BYTES:
                cut()
        for principal, n in self.conns.items():
            part["conns"][principal] = n
            size += len(principal) + 8
            if size > SNAPSHOT_PART_BYTES:
                cut()
        for principal in self.mailboxes:
            part["mailboxes"].append(principal)
            size += len(principal) + 4
            if size > SNAPSHOT_PART_BYTES:
                cut()
        parts.append(part)
        for i, p in enumerate(parts):
            p.update(node=self.node, inc=self.inc, seq=self.seq, part=i, last=i == len(parts) - 1)
        return parts


@dataclass
class Peer:
    name: str
    inc: str
    heard_at: float
    seq: int = 0
    synced: bool = False
    sync_asked_at: float = 0.0
    held: list[dict[str, Any]] = field(default_factory=list)
    parts: list[dict[str, Any]] = field(default_factory=list)
    filters: set[str] = field(default_factory=set)
    shares: dict[str, tuple[int, int]] = field(default_factory=dict)   # group key -> (members there, connected)
    wills: dict[str, Will] = field(default_factory=dict)
    will_of: dict[str, str] = field(default_factory=dict)    # session key -> its latest will's key
    conns: dict[str, int] = field(default_factory=dict)
    mailboxes: set[str] = field(default_factory=set)
    seen: dict[str, int] = field(default_factory=dict)   # its last heartbeat: incarnation -> change applied
    timed_out: bool = False          # dead by silence (not restarted, not left)

    def add_will(self, will: Will) -> None:
        self.wills[will.key] = will
        self.will_of[will.session_key] = will.key

    def drop_will(self, key: str) -> None:
        will = self.wills.pop(key, None)
        if will is not None and self.will_of.get(will.session_key) == key:
            del self.will_of[will.session_key]


class Peers:
    def __init__(self, *, me: str, timeout: float, clock: Callable[[], float],
                 ask_sync: Callable[[str], None],
                 on_dead: Callable[[Peer, bool], None],
                 on_conns: Callable[[Peer, dict[str, int]], None],
                 on_seen: Callable[[Peer], None] | None = None,
                 on_mailbox: Callable[[Peer], None] | None = None,
                 on_synced: Callable[[Peer], None] | None = None,
                 groups: ShareGroups | None = None) -> None:
        self._me = me
        self._timeout = timeout
        self._clock = clock
        self._ask_sync = ask_sync
        self._on_dead = on_dead          # (peer, crashed): crashed False for a clean leave
        self._on_conns = on_conns        # (peer, {principal: change}) after its connections changed
        self.peers: dict[str, Peer] = {}
        self.interest: SubscriptionIndex[str] = SubscriptionIndex()
        self.groups = groups if groups is not None else ShareGroups()   # this node's own members too
        self._on_seen = on_seen          # (peer) after a heartbeat told what it applied
        self._on_mailbox = on_mailbox    # (peer) after it applied a mailbox change of that peer
        self._on_synced = on_synced      # (peer) after its snapshot and the changes held for it applied
        self.mailbox_nodes: dict[str, set[str]] = {}     # principal -> other nodes with its pushers
        self._watching_since: float | None = None     # NATS up since; None: down
        self._gone: set[str] = set()          # incarnations that left cleanly: their late messages are ignored
        self.resyncs = 0
        self.deaths = 0          # nodes gone: left cleanly or timed out
        self.crashes = 0         # of those, found dead by silence (or by a restart under a new incarnation)

    # ---- NATS up or down: failure detection only while we can hear ---------------------

    def link_up(self) -> None:
        now = self._clock()
        self._watching_since = now
        for peer in self.peers.values():
            peer.heard_at = max(peer.heard_at, now)
            peer.synced = False          # changes may have been missed meanwhile
            self._ask(peer, now)

    def link_down(self) -> None:
        self._watching_since = None

    def alive(self) -> list[str]:
        return sorted(self.peers)

    def reconnected(self, session_key: str, node: str) -> None:
        """A client of `session_key` connected on `node`: the other nodes' will of
        it is void (one that is alive closes that connection as taken over and
        announces it; one that died before it was noticed cannot)."""
        for peer in self.peers.values():
            if peer.name != node:
                key = peer.will_of.get(session_key)
                if key is not None:
                    peer.drop_will(key)

    # ---- incoming --------------------------------------------------------------------

    def on_state(self, doc: dict[str, Any]) -> None:
        name = str(doc["node"])
        if name == self._me:
            return
        inc = str(doc["inc"])
        if inc in self._gone:
            return
        now = self._clock()
        peer = self.peers.get(name)
        if peer is not None and peer.inc != inc:
            log.info("cluster: node %s restarted", name)
            self._dead(peer, crashed=True)
            peer = None
        if peer is None:
            peer = self.peers[name] = Peer(name, inc, now)
            log.info("cluster: node %s joined", name)
            self._ask(peer, now)
        peer.heard_at = now
        op = doc["op"]
        seq = int(doc["seq"])
        if not peer.synced:
            if op != "hb":
                peer.held.append(doc)
                if len(peer.held) > MAX_HELD_CHANGES:
                    peer.held.clear()
                    self._ask(peer, now)
            return
        if op == "hb":
            peer.seen = {str(k): int(v) for k, v in doc.get("seen", {}).items()}
            if seq != peer.seq:
                self._gap(peer, now)
            if self._on_seen is not None:
                self._on_seen(peer)
            return
        if seq <= peer.seq:
            return
        if seq != peer.seq + 1:
            peer.held.append(doc)
            self._gap(peer, now)
            return
        self._apply(peer, doc)

    def on_snapshot(self, doc: dict[str, Any]) -> None:
        name = str(doc["node"])
        peer = self.peers.get(name)
        if peer is None or peer.inc != doc["inc"] or peer.synced:
            return
        if int(doc["part"]) != len(peer.parts):
            peer.parts.clear()      # a part lost or an old snapshot: wait for the next request
            return
        peer.parts.append(doc)
        if not doc["last"]:
            return
        parts, peer.parts = peer.parts, []
        for f in peer.filters:
            self.interest.remove(f, name)
        self.groups.drop_node(name)
        old_conns = peer.conns
        self._unindex_mailboxes(peer)
        peer.filters, peer.shares, peer.wills, peer.will_of, peer.conns = set(), {}, {}, {}, {}
        for part in parts:
            for f in part["filters"]:
                peer.filters.add(f)
                self.interest.add(f, name, 0)
            for key, (members, online) in part.get("shares", {}).items():
                peer.shares[key] = (int(members), int(online))
                self.groups.set(key, name, int(members), int(online))
            for w in part["wills"]:
                peer.add_will(Will.from_doc(w))
            for principal, n in part["conns"].items():
                peer.conns[principal] = int(n)
            for principal in part.get("mailboxes", ()):
                peer.mailboxes.add(principal)
                self.mailbox_nodes.setdefault(principal, set()).add(name)
        peer.seq = int(doc["seq"])
        peer.synced = True
        changed = {p: peer.conns.get(p, 0) - old_conns.get(p, 0)
                   for p in set(old_conns) | set(peer.conns)}
        changed = {p: d for p, d in changed.items() if d}
        if changed:
            self._on_conns(peer, changed)
        if self._on_mailbox is not None:
            self._on_mailbox(peer)
        held, peer.held = sorted(peer.held, key=lambda d: int(d["seq"])), []
        for change in held:
            if int(change["seq"]) <= peer.seq:
                continue
            if int(change["seq"]) != peer.seq + 1:
                self._gap(peer, self._clock())
                return
            self._apply(peer, change)
        if self._on_synced is not None:
            self._on_synced(peer)

    def on_bye(self, doc: dict[str, Any]) -> None:
        peer = self.peers.get(str(doc["node"]))
        if peer is not None and peer.inc == doc["inc"]:
            log.info("cluster: node %s left", peer.name)
            if len(self._gone) >= 1000:
                self._gone.clear()
            self._gone.add(peer.inc)
            self._dead(peer, crashed=False)

    # ---- the clock -------------------------------------------------------------------

    def watching(self) -> bool:
        """NATS has been up for a node timeout: every node alive has been heard
        from (and a silent one is found dead)."""
        since = self._watching_since
        return since is not None and self._clock() - since >= self._timeout

    def check(self) -> None:
        now = self._clock()
        watching = self.watching()
        for peer in list(self.peers.values()):
            if watching and now - peer.heard_at > self._timeout:
                log.warning("cluster: node %s not heard from for %.1fs: dead", peer.name, now - peer.heard_at)
                peer.timed_out = True
                self._dead(peer, crashed=True)
            elif not peer.synced and now - peer.sync_asked_at > SYNC_RETRY:
                self._ask(peer, now)

    # ---- helpers ---------------------------------------------------------------------

    def _apply(self, peer: Peer, doc: dict[str, Any]) -> None:
        peer.seq = int(doc["seq"])
        op = doc["op"]
        if op == "sub":
            peer.filters.add(doc["f"])
            self.interest.add(doc["f"], peer.name, 0)
        elif op == "unsub":
            peer.filters.discard(doc["f"])
            self.interest.remove(doc["f"], peer.name)
        elif op == "share":
            key, members, online = str(doc["f"]), int(doc["n"]), int(doc.get("on", 0))
            if members > 0:
                peer.shares[key] = (members, online)
            else:
                peer.shares.pop(key, None)
            self.groups.set(key, peer.name, members, online)
        elif op == "will":
            peer.add_will(Will.from_doc(doc["will"]))
        elif op == "unwill":
            peer.drop_will(doc["key"])
        elif op in ("up", "down"):
            principal = doc["principal"]
            n = peer.conns.get(principal, 0) + (1 if op == "up" else -1)
            if n > 0:
                peer.conns[principal] = n
            else:
                peer.conns.pop(principal, None)
            self._on_conns(peer, {principal: 1 if op == "up" else -1})
        elif op == "mbox":
            principal = doc["principal"]
            if doc["on"]:
                peer.mailboxes.add(principal)
                self.mailbox_nodes.setdefault(principal, set()).add(peer.name)
            else:
                peer.mailboxes.discard(principal)
                self._unindex_mailbox(principal, peer.name)
            if self._on_mailbox is not None:
                self._on_mailbox(peer)

    def _unindex_mailbox(self, principal: str, node: str) -> None:
        nodes = self.mailbox_nodes.get(principal)
        if nodes is not None:
            nodes.discard(node)
            if not nodes:
                del self.mailbox_nodes[principal]

    def _unindex_mailboxes(self, peer: Peer) -> None:
        for principal in peer.mailboxes:
            self._unindex_mailbox(principal, peer.name)
        peer.mailboxes = set()

    def applied(self) -> dict[str, int]:
        """The change number applied here of every other node in step, by
        incarnation (a node restarted under its name starts counting anew)."""
        return {p.inc: p.seq for p in self.peers.values() if p.synced}

    def _gap(self, peer: Peer, now: float) -> None:
        self.resyncs += 1
        peer.synced = False
        self._ask(peer, now)

    def _ask(self, peer: Peer, now: float) -> None:
        peer.sync_asked_at = now
        peer.parts.clear()
        self._ask_sync(peer.name)

    def _dead(self, peer: Peer, *, crashed: bool) -> None:
        self.peers.pop(peer.name, None)
        self.deaths += 1
        if crashed:
            self.crashes += 1
        for f in peer.filters:
            self.interest.remove(f, peer.name)
        self.groups.drop_node(peer.name)       # its groups' share goes to the other nodes
        self._unindex_mailboxes(peer)
        self._on_dead(peer, crashed)
