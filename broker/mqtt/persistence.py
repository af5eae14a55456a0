"""Persistent (clean_session=0) sessions across a restart: what goes into the
session journal (journal.py) and when, the exact state saved at a clean stop,
and the sessions of the last run brought back at start.

The journal holds a session's subscriptions (MQTT 5: with their options and
identifiers, and the session's Session Expiry Interval) and departure time
(`note`), and
every QoS 1/2 message owed to it from the moment it is kept until the client
acknowledges it (SessionState writes those itself). Clean sessions are never
journaled: they end with their connection anyway.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.mqtt import properties as P
from broker.mqtt.codec import encode_varint
from broker.mqtt.journal import SessionJournal
from broker.mqtt.properties import MsgProps, stored_props
from broker.mqtt.session import ClientInfo, Message, SessionHost, SessionState, client_id_of_key
from broker.store.base import SavedMessage, SavedSession, SessionDrop, SessionUpsert

if TYPE_CHECKING:
    from broker.mqtt.budgets import Budgets
    from broker.mqtt.registry import SessionRegistry
    from broker.mqtt.routing import Router

log = logging.getLogger("roost.mqtt")

SESSION_EXPIRY = 7 * 86400.0     # seconds a disconnected persistent session is kept


def props_of_stored(forwarded: bytes | None, expires_at: float | None, loop_now: float) -> MsgProps | None:
    """The MsgProps of a stored message (`stored_props` undone); the publisher
    (for No Local) is not known any more."""
    if forwarded is None and expires_at is None:
        return None
    raw = forwarded or b""
    decoded, _ = P.decode(encode_varint(len(raw)) + raw, 0, P.PUBLISH_PROPS)
    return MsgProps(raw, None if expires_at is None else loop_now + (expires_at - time.time()), None,
                    decoded.get(P.PAYLOAD_FORMAT) == 1, decoded.get(P.RESPONSE_TOPIC),
                    decoded.get(P.CORRELATION_DATA))


class SessionPersistence:
    def __init__(self, session_store: Any, *, unsaved_prefixes: tuple[str, ...] = ()) -> None:
        self._store = session_store
        self.journal = SessionJournal(session_store) if session_store is not None else None
        # Messages on these topics are not saved with a session: another durable
        # path delivers them again after a restart (the mailbox, from its cursor).
        self._unsaved_prefixes = unsaved_prefixes
        self._loaded = False   # nothing is saved over sessions never taken back

    def note(self, st: SessionState) -> None:
        """Start journaling a persistent session, or record its new subscriptions
        or departure time."""
        journal = self.journal
        if journal is None or st.clean or st.discarded:
            return
        st.journal = journal
        st.unjournaled = self._unsaved_prefixes
        info = st.info
        journal.append(SessionUpsert(st.client_id, info.principal, info.kind, dict(st.subs),
                                     st.disconnected_at or time.time(), st.expiry, dict(st.sub_opts)))

    def dropped(self, st: SessionState) -> None:
        """The session was discarded: it is not journaled any more."""
        if st.journal is not None:
            st.journal.append(SessionDrop(st.client_id))
            st.journal = None

    def saved_sessions(self, sessions: dict[str, SessionState]) -> list[SavedSession]:
        """Every persistent session as it stands, packet ids of in-flight messages
        included (called at a clean stop, when their clients are gone)."""
        out = []
        for st in sessions.values():
            if st.clean or st.discarded:
                continue
            now = st.host.loop.time()
            messages = []
            for pid, (msg, qos, stage, seq) in st.inflight.items():
                if msg is None:           # QoS 2 past PUBREC: only the PUBREL is owed
                    messages.append(SavedMessage(seq, "", b"", qos, False, pid, stage))
                elif seq:
                    messages.append(SavedMessage(seq, msg.topic, msg.payload, qos, st.retain_as_kept(msg), pid, stage,
                                                 *stored_props(msg.props, now)))
            for msg, qos, seq in st.queue:
                if seq:
                    messages.append(SavedMessage(seq, msg.topic, msg.payload, qos, st.retain_as_kept(msg), None, 0,
                                                 *stored_props(msg.props, now)))
            info = st.info
            out.append(SavedSession(st.client_id, info.principal, info.kind, dict(st.subs), messages,
                                    sorted(st.incoming_qos2), st._pid, st.disconnected_at or time.time(),
                                    st.expiry, dict(st.sub_opts)))
        return out

    def restore(self, saved: SavedSession, *, host: SessionHost, registry: SessionRegistry, router: Router,
                budgets: Budgets, shared: Callable[[SavedMessage], Message] | None = None) -> SessionState:
        """Make a saved session live again, as if its client had just gone away.
        `shared` turns a saved message into the Message object to hold: the
        loader passes one that hands out one object per distinct message, so a
        message kept for 40 sessions is held once in memory, as before the restart."""
        if shared is None:
            shared = functools.partial(_new_message, loop_now=host.loop.time())
        info = ClientInfo(client_id=client_id_of_key(saved.client_id), username=saved.principal, password=None,
                          remote_address="", remote_port=0, clean_session=False, keep_alive=0,
                          listener_name="")
        info.principal, info.kind, info.is_anonymous = saved.principal, saved.kind, saved.principal is None
        info.session_key = saved.client_id
        st = SessionState(saved.client_id, False, info, host)
        st.disconnected_at = saved.disconnected_at
        st.expiry = saved.expiry
        if saved.subscription_options:
            st.own_sub_opts().update(saved.subscription_options)
        st._pid = saved.last_pid
        if saved.incoming_qos2:
            st.own_incoming_qos2().update(saved.incoming_qos2)
        st.journal = self.journal
        st.unjournaled = self._unsaved_prefixes
        for f, q in saved.subscriptions.items():
            router.subscribe(st, f, q)
        for m in saved.messages:
            st._seq = max(st._seq, m.seq)
            if m.pid is not None and m.pid not in st.inflight:
                msg = None if m.stage else shared(m)
                st.own_inflight()[m.pid] = [msg, m.qos, m.stage, m.seq]
            else:    # after a crash: sent again as new messages (at least once)
                msg = shared(m)
                st.own_queue().append((msg, m.qos, m.seq))
            if msg is not None:
                # already accepted once: accounted, never refused (budgets may have shrunk)
                budgets.account(st, len(msg.payload))
        registry.add(st)
        return st

    async def load(self, keep: Callable[[SavedSession], bool], *, host: SessionHost, registry: SessionRegistry,
                   router: Router, budgets: Budgets) -> None:
        """Bring back the persistent sessions of the last run (clean stop or crash)."""
        if self.journal is None:
            return
        kept = 0
        now = time.time()
        loop_now = host.loop.time()
        seen: dict[tuple[str, bytes, int, bool, bytes | None, float | None], Message] = {}

        def interner(m: SavedMessage) -> Message:
            key = (m.topic, m.payload, m.qos, m.retain, m.properties, m.expires_at)
            msg = seen.get(key)
            if msg is None:
                msg = seen[key] = _new_message(m, loop_now)
            return msg

        for saved in await self._store.load_sessions():
            if now - saved.disconnected_at > registry.keep_for(saved.expiry) or not keep(saved):
                self.journal.append(SessionDrop(saved.client_id))
                continue
            self.restore(saved, host=host, registry=registry, router=router, budgets=budgets, shared=interner)
            kept += 1
        self._loaded = True
        if kept:
            log.info("restored %d persistent sessions (%d messages owed)", kept,
                     sum(len(s.queue) + len(s.inflight) for s in registry.sessions.values()))

    async def save(self, sessions: dict[str, SessionState]) -> None:
        """At a clean stop: the journal's last changes, then the exact state."""
        journal = self.journal
        if journal is None or not self._loaded:
            return
        await journal.stop()
        saved = self.saved_sessions(sessions)
        try:
            await self._store.save_sessions(saved)
        except Exception:  # noqa: BLE001 - keep shutting down; the journal still has them
            log.exception("could not save the exact state of %d persistent sessions", len(saved))
            return
        if saved:
            log.info("saved %d persistent sessions (%d messages)", len(saved), sum(len(s.messages) for s in saved))


def _new_message(m: SavedMessage, loop_now: float) -> Message:
    return Message(m.topic, m.payload, m.qos, m.retain, props_of_stored(m.properties, m.expires_at, loop_now))
