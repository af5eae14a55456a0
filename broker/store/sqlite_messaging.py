"""SQLite implementation of MessagingStore: conversations, messages, mailboxes, cursors.

Every counter (a conversation's `seq`, a mailbox's `n`) is allocated inside the
writer job that uses it, in SQL, so concurrent senders cannot race: the writer
runs one job at a time, and a job that fails rolls back its own savepoint, so a
number is either committed with its row or never handed out (no gaps).

A `msg` mailbox event stores only (conv, seq); its content is joined from
`messages` when read, so a group message is stored once, not once per member.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from broker.store.base import (
    ConvSummary,
    GroupInfo,
    MailboxEvent,
    NotMember,
    ReadOutcome,
    SendOutcome,
    StoredMessage,
)
from broker.store.jsonutil import compact_json
from broker.store.sqlite_db import Database, Migration
from broker.store.sqlite_msgbatch import AckOp, OpBatcher, SendOp

MIGRATIONS: list[Migration] = [
    ("0100_messaging", """
        CREATE TABLE conversations (
            conv TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('dm','group')),
            name TEXT NOT NULL DEFAULT '',
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_seq INTEGER NOT NULL DEFAULT 0,
            last_ts REAL NOT NULL DEFAULT 0,
            activity INTEGER NOT NULL DEFAULT 0   -- global order of last change, for `convs`
        );
        CREATE INDEX conversations_activity ON conversations(activity);
        CREATE TABLE conv_members (
            conv TEXT NOT NULL REFERENCES conversations(conv) ON DELETE CASCADE,
            principal TEXT NOT NULL,
            read_seq INTEGER NOT NULL DEFAULT 0,
            joined_at REAL NOT NULL,
            PRIMARY KEY (conv, principal)
        ) WITHOUT ROWID;
        CREATE INDEX conv_members_principal ON conv_members(principal, conv);
        CREATE TABLE messages (
            conv TEXT NOT NULL,
            seq INTEGER NOT NULL,
            sender TEXT NOT NULL,
            cmid TEXT NOT NULL,
            ts REAL NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (conv, seq)
        ) WITHOUT ROWID;
        CREATE UNIQUE INDEX messages_sender_cmid ON messages(sender, cmid);
        CREATE TABLE mailbox_state (
            principal TEXT PRIMARY KEY,
            last_n INTEGER NOT NULL DEFAULT 0,
            first_n INTEGER NOT NULL DEFAULT 1,
            delivered_n INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID;
        CREATE TABLE mailbox (
            principal TEXT NOT NULL,
            n INTEGER NOT NULL,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            conv TEXT,
            seq INTEGER,
            data TEXT,
            PRIMARY KEY (principal, n)
        ) WITHOUT ROWID;
        CREATE TABLE cursors (
            client_id TEXT PRIMARY KEY,
            principal TEXT NOT NULL,
            n INTEGER NOT NULL DEFAULT 0,
            inbox_sub INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID;
    """),
    # A member's view of a conversation starts at since_seq: a direct conversation
    # whose other side was removed and whose id was registered again must show the
    # new owner nothing of the old one's messages.
    ("0101_member_since", """
        ALTER TABLE conv_members ADD COLUMN since_seq INTEGER NOT NULL DEFAULT 0;
    """),
    # A removed principal's messages stay in history under their cmids, but retired:
    # they no longer count for duplicate detection, so a new owner of the id may
    # use the same cmids (the old way renamed the cmids, which every reader saw).
    ("0102_retired_messages", """
        ALTER TABLE messages ADD COLUMN retired INTEGER NOT NULL DEFAULT 0;
        DROP INDEX messages_sender_cmid;
        CREATE UNIQUE INDEX messages_sender_cmid ON messages(sender, cmid) WHERE retired = 0;
    """),
    # (conv_members.unread, the per-member unread counter, is added by sqlite_social's
    # 0111 migration: its backfill needs the `blocks` table.)
]


# ---- mailbox primitives (also used by sqlite_social inside its own jobs) -------

def _state(conn: sqlite3.Connection, principal: str) -> tuple[int, int, int]:
    row = conn.execute(
        "SELECT last_n, first_n, delivered_n FROM mailbox_state WHERE principal=?", (principal,)
    ).fetchone()
    if row is None:
        conn.execute("INSERT INTO mailbox_state(principal) VALUES (?)", (principal,))
        return 0, 1, 0
    state: tuple[int, int, int] = row
    return state


# Numbers `count` new events of a principal in one statement (creating its mailbox
# on first use) and returns the last one: the block is last-count+1 .. last. The
# statement text never changes, so sqlite3 keeps it prepared.
_ALLOCATE = ("INSERT INTO mailbox_state(principal, last_n) VALUES (?, ?) ON CONFLICT(principal) "
             "DO UPDATE SET last_n = last_n + excluded.last_n RETURNING last_n")
_INSERT_MSG = "INSERT INTO mailbox(principal, n, ts, kind, conv, seq, data) VALUES (?,?,?,?,?,?,NULL)"
_INSERT_DATA = "INSERT INTO mailbox(principal, n, ts, kind, conv, seq, data) VALUES (?,?,?,?,NULL,NULL,?)"


def _allocate(conn: sqlite3.Connection, principal: str, count: int) -> int:
    """The first of `count` consecutive new event numbers of `principal`'s mailbox."""
    last: int = conn.execute(_ALLOCATE, (principal, count)).fetchone()[0]
    return last - count + 1


def append_event(conn: sqlite3.Connection, principal: str, kind: str, ts: float,
                 data: dict[str, Any] | None = None, *, msg: StoredMessage | None = None) -> MailboxEvent:
    """Append one event to a principal's mailbox, numbering it in SQL (writer thread only)."""
    n = _allocate(conn, principal, 1)
    if msg is not None:
        conn.execute(_INSERT_MSG, (principal, n, ts, kind, msg.conv, msg.seq))
        doc = {"n": n, "kind": kind, "ts": ts, **msg.to_wire()}
    else:
        data = data or {}
        conn.execute(_INSERT_DATA, (principal, n, ts, kind, compact_json(data)))
        doc = {"n": n, "kind": kind, "ts": ts, **data}
    return MailboxEvent(principal=principal, n=n, doc=doc)


def append_data_events(conn: sqlite3.Connection, principal: str, kind: str, ts: float,
                       datas: Sequence[dict[str, Any]]) -> list[MailboxEvent]:
    """Append several events of one kind to one mailbox: one numbering statement
    and one executemany, in the order given (writer thread only)."""
    if not datas:
        return []
    first = _allocate(conn, principal, len(datas))
    conn.executemany(_INSERT_DATA, [(principal, first + i, ts, kind, compact_json(d)) for i, d in enumerate(datas)])
    return [MailboxEvent(principal=principal, n=first + i, doc={"n": first + i, "kind": kind, "ts": ts, **d})
            for i, d in enumerate(datas)]


def mailbox_size(conn: sqlite3.Connection, principal: str) -> int:
    last_n, first_n, _ = _state(conn, principal)
    return max(0, last_n - first_n + 1)


_EVENT_SELECT = (
    "SELECT mb.n, mb.ts, mb.kind, mb.data, m.conv, m.seq, m.sender, m.cmid, m.ts, m.body "
    "FROM mailbox mb LEFT JOIN messages m ON m.conv = mb.conv AND m.seq = mb.seq "
)


def _render(principal: str, row: tuple[Any, ...]) -> MailboxEvent:
    n, ts, kind, data, conv, seq, sender, cmid, mts, body = row
    if kind == "msg":
        doc: dict[str, Any] = {"n": n, "kind": kind, "ts": ts}
        doc.update(StoredMessage(conv, seq, sender, cmid, mts, body).to_wire())
    else:
        doc = {"n": n, "kind": kind, "ts": ts, **(json.loads(data) if data else {})}
    return MailboxEvent(principal=principal, n=n, doc=doc)


def _unread(conn: sqlite3.Connection, conv: str, principal: str, read_seq: int) -> int:
    # Others' messages after the read position; those of principals this reader
    # blocked never reached it (see `send`), so they do not count either.
    count: int = conn.execute(
        "SELECT COUNT(*) FROM messages WHERE conv=? AND seq>? AND sender!=? "
        "AND sender NOT IN (SELECT blocked FROM blocks WHERE blocker=?)", (conv, read_seq, principal, principal)
    ).fetchone()[0]
    return count


def _total_unread(conn: sqlite3.Connection, principal: str) -> int:
    # The per-member counters (kept by send/read/join): O(conversations), not O(messages).
    total: int = conn.execute("SELECT COALESCE(SUM(unread), 0) FROM conv_members WHERE principal=?",
                              (principal,)).fetchone()[0]
    return total


def _unread_event(conn: sqlite3.Connection, principal: str, conv: str, count: int, now: float) -> MailboxEvent:
    return append_event(conn, principal, "unread", now,
                        {"conv": conv, "count": count, "total": _total_unread(conn, principal)})


def recount_from(conn: sqlite3.Connection, principal: str, sender: str, now: float) -> list[MailboxEvent]:
    """`principal` blocked or unblocked `sender` (writer thread, after the change):
    recount its conversations where `sender` has messages after the read position,
    and announce each count that moved."""
    rows = conn.execute(
        "SELECT cm.conv, cm.read_seq, cm.unread FROM conv_members cm WHERE cm.principal=? AND EXISTS "
        "(SELECT 1 FROM messages m WHERE m.conv = cm.conv AND m.seq > cm.read_seq AND m.sender = ?)",
        (principal, sender)).fetchall()
    events = []
    for conv, read_seq, old in rows:
        count = _unread(conn, conv, principal, read_seq)
        if count != old:
            conn.execute("UPDATE conv_members SET unread=? WHERE conv=? AND principal=?", (count, conv, principal))
            events.append(_unread_event(conn, principal, conv, count, now))
    return events


def _join(conn: sqlite3.Connection, conv: str, principal: str, now: float, *, since_seq: int = 0) -> int:
    """Add a member (reading from since_seq on); returns its unread count."""
    unread = _unread(conn, conv, principal, since_seq)
    conn.execute("INSERT INTO conv_members(conv, principal, joined_at, read_seq, since_seq, unread) "
                 "VALUES (?,?,?,?,?,?)", (conv, principal, now, since_seq, since_seq, unread))
    return unread


def purge_principal(conn: sqlite3.Connection, principal: str) -> list[str]:
    """Forget what belongs to `principal` (writer thread): its mailbox, cursors and
    memberships. The messages it sent stay in their conversations' history, under
    freed cmids. Returns the groups it was a member of.

    Run when a principal is removed and again, in the same transaction, when an id
    is registered, so a new owner of an id never inherits anything of an old one's
    (whether or not a broker was running when the old one was removed)."""
    groups = [r[0] for r in conn.execute(
        "SELECT cm.conv FROM conv_members cm JOIN conversations c ON c.conv = cm.conv "
        "WHERE cm.principal=? AND c.kind='group'", (principal,))]
    conn.execute("DELETE FROM conv_members WHERE principal=?", (principal,))
    conn.execute("DELETE FROM mailbox WHERE principal=?", (principal,))
    conn.execute("DELETE FROM mailbox_state WHERE principal=?", (principal,))
    conn.execute("DELETE FROM cursors WHERE principal=?", (principal,))
    # Its groups' creator rights are not handed to whoever gets the id next.
    conn.execute("UPDATE conversations SET created_by='' WHERE created_by=? AND kind='group'", (principal,))
    # Free its cmids: a principal registered again under this id (a new device
    # counting cmids from 1) must not have its sends taken for retries.
    conn.execute("UPDATE messages SET retired=1 WHERE sender=? AND retired=0", (principal,))
    return groups


# Every table here that names a principal, for finding those of principals that no longer exist.
_PRINCIPAL_COLUMNS = (("conv_members", "principal"), ("mailbox_state", "principal"), ("cursors", "principal"))


def orphans(conn: sqlite3.Connection, limit: int) -> list[str]:
    """Up to `limit` ids that have rows here but are not registered principals."""
    union = " UNION ".join(f"SELECT {col} AS p FROM {table}" for table, col in _PRINCIPAL_COLUMNS)
    return [r[0] for r in conn.execute(
        f"SELECT p FROM ({union}) WHERE p NOT IN (SELECT id FROM principals) LIMIT ?", (limit,))]


def _members(conn: sqlite3.Connection, conv: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT principal FROM conv_members WHERE conv=? ORDER BY principal", (conv,))]


def _next_activity(conn: sqlite3.Connection) -> int:
    activity: int = conn.execute("SELECT COALESCE(MAX(activity), 0) + 1 FROM conversations").fetchone()[0]
    return activity


def _message_row(row: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(*row)


_MSG_COLUMNS = "conv, seq, sender, cmid, ts, body"
_SELECT_SENT = f"SELECT {_MSG_COLUMNS} FROM messages WHERE sender=? AND cmid=? AND retired=0"


class SqliteMessagingStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._batcher = OpBatcher(db)

    # ---- send --------------------------------------------------------------
    async def send(self, *, sender: str, conv: str, dm_members: tuple[str, str] | None, cmid: str,
                   body: str, now: float, skip: frozenset[str] = frozenset()) -> SendOutcome:
        """Store one message and its `msg` events in every member's mailbox, atomically.

        `dm_members` is given for a direct conversation (created on first use);
        for a group the sender must be a member (else NotMember). Members in
        `skip` (they blocked the sender) get no event. Runs in a group with the
        other sends and acks queued meanwhile (sqlite_msgbatch.py).
        """
        outcome: SendOutcome = await self._batcher.submit(SendOp(sender, conv, dm_members, cmid, body, now, skip))
        return outcome

    async def find_sent(self, sender: str, cmid: str) -> StoredMessage | None:
        """The message `sender` already sent with this cmid, if any."""
        row = await self._db.read(lambda conn: conn.execute(
            _SELECT_SENT, (sender, cmid)).fetchone())
        return _message_row(row) if row else None

    # ---- mailbox reads -----------------------------------------------------
    async def sync(self, principal: str, after: int, limit: int) -> tuple[list[MailboxEvent], int]:
        """Events with n > after (oldest first, at most `limit`) and the mailbox's last n."""

        def job(conn: sqlite3.Connection) -> tuple[list[MailboxEvent], int]:
            head = conn.execute("SELECT last_n FROM mailbox_state WHERE principal=?", (principal,)).fetchone()
            rows = conn.execute(_EVENT_SELECT + "WHERE mb.principal=? AND mb.n>? ORDER BY mb.n LIMIT ?",
                                (principal, after, limit)).fetchall()
            return [_render(principal, r) for r in rows], (head[0] if head else 0)

        return await self._db.read(job)

    async def head(self, principal: str) -> int:
        row = await self._db.read(lambda conn: conn.execute(
            "SELECT last_n FROM mailbox_state WHERE principal=?", (principal,)).fetchone())
        return row[0] if row else 0

    async def client_cursor(self, client_id: str, principal: str) -> tuple[int, bool, int]:
        """(acked n, persistent inbox subscription recorded, mailbox last n)."""

        def job(conn: sqlite3.Connection) -> tuple[int, bool, int]:
            cur = conn.execute("SELECT n, inbox_sub FROM cursors WHERE client_id=? AND principal=?",
                               (client_id, principal)).fetchone()
            head = conn.execute("SELECT last_n FROM mailbox_state WHERE principal=?", (principal,)).fetchone()
            return (cur[0] if cur else 0), bool(cur and cur[1]), (head[0] if head else 0)

        return await self._db.read(job)

    async def set_inbox_sub(self, client_id: str, principal: str, on: bool) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO cursors(client_id, principal, n, inbox_sub) VALUES (?,?,0,?) "
                "ON CONFLICT(client_id) DO UPDATE SET inbox_sub=excluded.inbox_sub, "
                "n=CASE WHEN cursors.principal=excluded.principal THEN cursors.n ELSE 0 END, "
                "principal=excluded.principal",
                (client_id, principal, int(on)))

        await self._db.write(job)

    # ---- ack and delivered receipts ----------------------------------------
    async def ack(self, client_id: str, principal: str, n: int, now: float) -> tuple[int, list[MailboxEvent]]:
        """Advance the client's cursor to n (never back); the first ack of a `msg`
        event by any client of the principal sends its sender a `delivered` event.
        Raises ValueError when n is beyond the mailbox's last event. Grouped like send."""
        acked: tuple[int, list[MailboxEvent]] = await self._batcher.submit(AckOp(client_id, principal, n, now))
        return acked

    # ---- read receipts and unread counts -----------------------------------
    async def read(self, principal: str, conv: str, seq: int, now: float) -> ReadOutcome:
        def job(conn: sqlite3.Connection) -> ReadOutcome:
            row = conn.execute(
                "SELECT cm.read_seq, c.last_seq FROM conv_members cm JOIN conversations c ON c.conv = cm.conv "
                "WHERE cm.conv=? AND cm.principal=?", (conv, principal)).fetchone()
            if row is None:
                raise NotMember(conv)
            read_seq, last_seq = row
            if seq > last_seq:
                raise ValueError(f"seq {seq} is beyond the last message ({last_seq})")
            events: list[MailboxEvent] = []
            if seq > read_seq:
                read_seq = seq
                unread = _unread(conn, conv, principal, read_seq)
                conn.execute("UPDATE conv_members SET read_seq=?, unread=? WHERE conv=? AND principal=?",
                             (seq, unread, conv, principal))
                for p in _members(conn, conv):
                    if p != principal:
                        events.append(append_event(conn, p, "read", now, {"conv": conv, "seq": seq, "by": principal}))
                events.append(_unread_event(conn, principal, conv, unread, now))
            else:
                unread = conn.execute("SELECT unread FROM conv_members WHERE conv=? AND principal=?",
                                      (conv, principal)).fetchone()[0]
            total = _total_unread(conn, principal)
            return ReadOutcome(conv=conv, seq=read_seq, unread=unread, total_unread=total, events=events)

        return await self._db.write(job)

    async def convs(self, principal: str) -> tuple[list[ConvSummary], int]:
        def job(conn: sqlite3.Connection) -> tuple[list[ConvSummary], int]:
            rows = conn.execute(
                "SELECT c.conv, c.kind, c.name, c.last_seq, cm.since_seq, cm.read_seq, cm.unread "
                "FROM conv_members cm JOIN conversations c ON c.conv = cm.conv WHERE cm.principal=? "
                "ORDER BY c.activity DESC", (principal,)).fetchall()
            out = []
            total = 0
            for conv, kind, name, last_seq, since_seq, read_seq, unread in rows:
                last = None
                if last_seq > since_seq:
                    r = conn.execute(f"SELECT {_MSG_COLUMNS} FROM messages WHERE conv=? AND seq=?",
                                     (conv, last_seq)).fetchone()
                    last = _message_row(r) if r else None
                peer = None
                if kind == "dm":
                    a, b = conv.split(":")[1:]
                    peer = b if a == principal else a
                total += unread
                out.append(ConvSummary(conv=conv, kind=kind, name=name, peer=peer, last_seq=last_seq,
                                       last=last, read_seq=read_seq, unread=unread))
            return out, total

        return await self._db.read(job)

    async def history(self, conv: str, before: int | None, limit: int,
                      viewer: str | None = None) -> tuple[list[StoredMessage], bool]:
        """Up to `limit` messages with seq < before (all when None), oldest first, and
        whether older ones exist. With `viewer`: only what that member may see (from
        its since_seq on; nothing when it is not a member)."""

        def job(conn: sqlite3.Connection) -> tuple[list[StoredMessage], bool]:
            since = 0
            if viewer is not None:
                row = conn.execute("SELECT since_seq FROM conv_members WHERE conv=? AND principal=?",
                                   (conv, viewer)).fetchone()
                if row is None:
                    return [], False
                since = row[0]
            upper = before if before is not None else (1 << 62)
            rows = conn.execute(f"SELECT {_MSG_COLUMNS} FROM messages WHERE conv=? AND seq<? AND seq>? "
                                "ORDER BY seq DESC LIMIT ?", (conv, upper, since, limit + 1)).fetchall()
            more = len(rows) > limit
            return [_message_row(r) for r in reversed(rows[:limit])], more

        return await self._db.read(job)

    async def is_member(self, conv: str, principal: str) -> bool:
        row = await self._db.read(lambda conn: conn.execute(
            "SELECT 1 FROM conv_members WHERE conv=? AND principal=?", (conv, principal)).fetchone())
        return row is not None

    # ---- groups ------------------------------------------------------------
    async def create_group(self, conv: str, name: str, creator: str, members: Sequence[str],
                           now: float) -> list[MailboxEvent]:
        def job(conn: sqlite3.Connection) -> list[MailboxEvent]:
            conn.execute("INSERT INTO conversations(conv, kind, name, created_by, created_at, activity) "
                         "VALUES (?, 'group', ?, ?, ?, ?)", (conv, name, creator, now, _next_activity(conn)))
            everyone = sorted({creator, *members})
            for p in everyone:
                _join(conn, conv, p, now)
            data = {"event": "created", "conv": conv, "by": creator, "name": name, "members": everyone}
            return [append_event(conn, p, "group", now, data) for p in everyone]

        return await self._db.write(job)

    async def group_info(self, conv: str) -> GroupInfo | None:
        def job(conn: sqlite3.Connection) -> GroupInfo | None:
            row = conn.execute("SELECT name, created_by FROM conversations WHERE conv=? AND kind='group'",
                               (conv,)).fetchone()
            if row is None:
                return None
            return GroupInfo(conv=conv, name=row[0], created_by=row[1], members=_members(conn, conv))

        return await self._db.read(job)

    async def change_group(self, conv: str, by: str, *, add: Iterable[str] = (), remove: Iterable[str] = (),
                           event: str, now: float) -> tuple[list[MailboxEvent], list[str]]:
        """Add and/or remove members (the caller must be a member); `event` is
        added|removed|left. Returns the events and the members afterwards. Adding
        a member already there changes nothing; removing one not there raises
        KeyError(those not there, sorted) and changes nothing at all (checked in
        the same transaction, so a concurrent change cannot slip in between)."""

        def job(conn: sqlite3.Connection) -> tuple[list[MailboxEvent], list[str]]:
            before = _members(conn, conv)
            if by not in before:
                raise NotMember(conv)
            missing = sorted(set(remove) - set(before))
            if missing:
                raise KeyError(missing)
            added = sorted(set(add) - set(before))
            removed = sorted(set(remove) & set(before))
            unread: dict[str, int] = {}
            for p in added:
                unread[p] = _join(conn, conv, p, now)
            for p in removed:
                unread[p] = conn.execute("DELETE FROM conv_members WHERE conv=? AND principal=? RETURNING unread",
                                         (conv, p)).fetchall()[0][0]
            after = _members(conn, conv)
            changed = added or removed
            if not changed:
                return [], after
            data = {"event": event, "conv": conv, "by": by, "members": added or removed}
            # Everyone concerned hears of it: current members and those who just left;
            # a member whose total moved (history to read, or unread ones gone) also
            # gets its new counts, right after.
            events = []
            for p in sorted(set(after) | set(removed)):
                events.append(append_event(conn, p, "group", now, data))
                if unread.get(p):
                    count = unread[p] if p in added else 0
                    events.append(_unread_event(conn, p, conv, count, now))
            return events, after

        return await self._db.write(job)

    async def load_groups(self) -> dict[str, list[str]]:
        def job(conn: sqlite3.Connection) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for (conv,) in conn.execute("SELECT conv FROM conversations WHERE kind='group'"):
                out[conv] = []
            for conv, p in conn.execute("SELECT cm.conv, cm.principal FROM conv_members cm JOIN conversations c "
                                        "ON c.conv = cm.conv WHERE c.kind='group' ORDER BY cm.conv, cm.principal"):
                out[conv].append(p)
            return out

        return await self._db.read(job)

    async def forget_principal(self, principal: str) -> list[str]:
        """A principal was removed: drop its mailbox, cursors and memberships (the
        messages it sent stay in their conversations' history). Returns the groups
        it was a member of."""
        return await self._db.write(lambda conn: purge_principal(conn, principal))

    async def purge_orphans(self, limit: int) -> dict[str, list[str]]:
        """One bounded round: forget up to `limit` principals that have rows here but
        are no longer registered (removed while no broker was running). Returns
        {principal: groups it was in}; empty when there is nothing left to do."""

        def job(conn: sqlite3.Connection) -> dict[str, list[str]]:
            return {p: purge_principal(conn, p) for p in orphans(conn, limit)}

        return await self._db.write(job)

    # ---- bounds --------------------------------------------------------------
    async def needs_prune(self, *, now: float, max_events: int, ttl: float) -> bool:
        """Cheap read: is any mailbox over its bound or holding an expired event?"""

        def job(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM mailbox_state WHERE last_n - first_n + 1 > ? LIMIT 1",
                            (max_events,)).fetchone():
                return True
            return conn.execute(_EXPIRED_HEADS + " LIMIT 1", (now - ttl,)).fetchone() is not None

        return await self._db.read(job)

    async def prune(self, *, now: float, max_events: int, ttl: float, max_mailboxes: int,
                    max_rows: int) -> tuple[list[MailboxEvent], int]:
        """One bounded round of enforcing mailbox.max_events and mailbox.ttl.

        Discards the oldest events of at most `max_mailboxes` mailboxes (at most
        `max_rows` each) and announces each discard with a `dropped` event. An
        expired `dropped` event is not itself announced (that would never end).
        Returns the new events and how many events were discarded.
        """

        def job(conn: sqlite3.Connection) -> tuple[list[MailboxEvent], int]:
            events: list[MailboxEvent] = []
            discarded = 0
            # Full mailboxes: keep the newest max_events including the announcement.
            full = conn.execute(
                "SELECT principal, last_n, first_n FROM mailbox_state WHERE last_n - first_n + 1 > ? LIMIT ?",
                (max_events, max_mailboxes)).fetchall()
            for principal, last_n, first_n in full:
                excess = min(last_n - first_n + 1 - max_events + 1, max_rows)
                new_first = first_n + excess
                count = _discard(conn, principal, new_first)
                discarded += count
                events.append(append_event(conn, principal, "dropped", now,
                                           {"count": count, "reason": "queue_full"}))
            cutoff = now - ttl
            old = conn.execute(_EXPIRED_HEADS + " LIMIT ?", (cutoff, max_mailboxes)).fetchall()
            for principal, first_n, _last_n in old:
                rows = conn.execute(
                    "SELECT n, kind FROM mailbox WHERE principal=? AND n>=? AND ts<? ORDER BY n LIMIT ?",
                    (principal, first_n, cutoff, max_rows)).fetchall()
                if not rows:
                    continue
                new_first = rows[-1][0] + 1
                announced = sum(1 for _n, kind in rows if kind != "dropped")
                discarded += _discard(conn, principal, new_first)
                if announced:
                    events.append(append_event(conn, principal, "dropped", now,
                                               {"count": announced, "reason": "expired"}))
            return events, discarded

        return await self._db.write(job)


# The mailboxes whose oldest event is older than ?: one primary-key lookup of
# `mailbox` per mailbox_state row. CROSS JOIN keeps mailbox_state the outer loop:
# with a plain JOIN (and no ANALYZE statistics) SQLite chose to scan the whole of
# `mailbox` and look each row's principal up, which on a store with a history
# (160k events: 9-10 ms, growing with every event kept) ran every second in the
# prune job, inside the writer's transaction, holding back the sends' commits.
_EXPIRED_HEADS = ("SELECT s.principal, s.first_n, s.last_n FROM mailbox_state s CROSS JOIN mailbox mb "
                  "ON mb.principal = s.principal AND mb.n = s.first_n WHERE mb.ts < ?")


def _discard(conn: sqlite3.Connection, principal: str, new_first: int) -> int:
    count = conn.execute("DELETE FROM mailbox WHERE principal=? AND n<?", (principal, new_first)).rowcount
    conn.execute("UPDATE mailbox_state SET first_n=?, delivered_n=MAX(delivered_n, ?) WHERE principal=?",
                 (new_first, new_first - 1, principal))
    return count
