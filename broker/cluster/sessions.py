"""NodeSessions: one node's view of the persistent MQTT sessions in a store the
nodes may share (broker/store/base.py SessionStore).

The engine treats the session store as its own: at start it loads every saved
session, and at a clean stop `save_sessions` *replaces* every saved session. On
a store shared by many nodes that would load the other nodes' live sessions
and wipe them at a stop. Here each node's sessions are kept under its own name
(`<node>/<session key>`): loading returns only this node's, and a clean stop
replaces only this node's, through journal operations in one transaction
(`apply`), never touching another node's rows. `move` hands a session to
another node's name in one transaction (cluster take-over, node.py).

What the journal operations cannot carry of the exact clean-stop state: the
QoS 2 packet ids still awaiting PUBREL from the client and the last packet id
used (a client resending PUBREL gets PUBCOMP anyway; packet ids of messages in
flight are kept with their messages).
"""

from __future__ import annotations

import dataclasses

from broker.store.base import (
    JournalOp,
    MessageKept,
    SavedSession,
    SessionDrop,
    SessionStore,
    SessionUpsert,
)


def _renamed(op: JournalOp, name: str) -> JournalOp:
    return dataclasses.replace(op, client_id=name)


def journal_of(saved: SavedSession, name: str) -> list[JournalOp]:
    """The journal operations that make `saved` exist under `name`."""
    ops: list[JournalOp] = [SessionUpsert(name, saved.principal, saved.kind, dict(saved.subscriptions),
                                          saved.disconnected_at, saved.expiry, dict(saved.subscription_options))]
    ops += [MessageKept(name, m) for m in saved.messages]
    return ops


class NodeSessions:
    def __init__(self, inner: SessionStore, node: str) -> None:
        self._inner = inner
        self._prefix = f"{node}/"

    def name_of(self, key: str, node: str | None = None) -> str:
        return f"{node}/{key}" if node is not None else self._prefix + key

    async def apply(self, ops: list[JournalOp]) -> None:
        await self._inner.apply([_renamed(op, self._prefix + op.client_id) for op in ops])

    async def load_sessions(self) -> list[SavedSession]:
        return await self.load_of(self._prefix[:-1])

    async def load_of(self, node: str) -> list[SavedSession]:
        """Another node's sessions (a dead one's, to take them over)."""
        prefix = f"{node}/"
        return [dataclasses.replace(s, client_id=s.client_id[len(prefix):])
                for s in await self._inner.load_sessions() if s.client_id.startswith(prefix)]

    async def save_sessions(self, sessions: list[SavedSession]) -> None:
        stored = await self.load_sessions()
        ops: list[JournalOp] = [SessionDrop(self._prefix + s.client_id) for s in stored]
        for saved in sessions:
            ops += journal_of(saved, self._prefix + saved.client_id)
        await self._inner.apply(ops)

    async def move(self, saved: SavedSession, from_node: str) -> None:
        """`saved` (another node's session, its exact state) is this node's from now:
        dropped under the other node's name, written under this one's, in one transaction."""
        await self._inner.apply([SessionDrop(self.name_of(saved.client_id, from_node)),
                                 *journal_of(saved, self._prefix + saved.client_id)])

    async def drop(self, key: str) -> None:
        await self.apply([SessionDrop(key)])

    async def drop_of(self, key: str, node: str) -> None:
        await self._inner.apply([SessionDrop(self.name_of(key, node))])
