"""PostgreSQL implementation of MessagingStore: conversations, messages, mailboxes, cursors.

Several nodes write at once, so every number is allocated inside the
transaction that inserts the rows it numbers, under a row lock held until
COMMIT: a conversation's `seq` from its `conversations.last_seq` (the row is
locked with `SELECT ... FOR UPDATE` and updated), a mailbox's `n` from its
`mailbox_state.last_n` (locked likewise). A transaction that rolls back gives
its numbers back with it, so there is never a gap; one that waits for a lock
reads the committed value afterwards (READ COMMITTED re-reads a locked row), so
there is never a duplicate; and numbers of one conversation or mailbox commit
in the order they were allocated, so a reader that sees n never sees n-1 later.

Locks are taken in one order everywhere: conversations (sorted by id), then
mailboxes (sorted by principal, in one `... ORDER BY principal FOR UPDATE`),
then the other rows. Concurrent sends to overlapping members wait for each
other instead of deadlocking; a deadlock that still happens (a mailbox created
on first use, a purge) rolls back and PgDatabase.write runs the job again.

A principal's unread counters (conv_members.unread) only change while its
mailbox row is locked, so the `total` of each `unread` event is the sum at that
point of the mailbox's order. A send is exactly-once: the (sender, cmid) unique
index decides between nodes; a retry finds the first message and answers `dup`.

A `msg` mailbox event stores only (conv, seq); its content is joined from
`messages` when read, so a group message is stored once, not once per member.

A send, the hot path, is one statement: the server-side function `roost_send`
(schema migration 8, broker/store/postgres_messaging_schema.py) takes the same
locks in the same order and writes the same rows as the other writes here do
with `Boxes`, inside the database, so it costs one round trip and no BEGIN or
COMMIT (a single statement is its own transaction) instead of seven.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from asyncpg import Connection

from broker.store.base import (
    ConvSummary,
    GroupInfo,
    MailboxEvent,
    NotMember,
    ReadOutcome,
    SendOutcome,
    StoreBusy,
    StoredMessage,
)
from broker.store.jsonutil import compact_json
from broker.store.postgres_db import PgDatabase

_MSG_COLUMNS = "conv, seq, sender, cmid, ts, body"
_SELECT_SENT = f"SELECT {_MSG_COLUMNS} FROM messages WHERE sender=$1 AND cmid=$2 AND NOT retired"
_CMID_INDEX = "messages_sender_cmid"
# A send: the whole of it in the database's roost_send (migration 8,
# broker/store/postgres_messaging_schema.py), one statement and one round trip.
_SEND = ("SELECT status, m_conv, m_seq, m_ts, m_body, receivers, first_n, counts, totals "
         "FROM roost_send($1, $2, $3::text[], $4, $5, $6, $7::text[])")


def _message(row: Any) -> StoredMessage:
    return StoredMessage(row[0], int(row[1]), row[2], row[3], float(row[4]), row[5])


def _send_outcome(row: Any, conv: str, sender: str, cmid: str, body: str, wire_body: Any) -> SendOutcome:
    """roost_send's row as the outcome: the events in the order and shape Boxes.add_msg
    and Boxes.add give them (each receiver's `msg`, then a recipient's `unread`)."""
    status = row[0]
    if status == "not_member":
        raise NotMember(conv)
    if status == "dup":   # the first message of (sender, cmid), maybe in another conversation
        return SendOutcome(message=StoredMessage(row[1], int(row[2]), sender, cmid, float(row[3]), row[4]),
                           dup=True, events=[])
    message = StoredMessage(conv, int(row[2]), sender, cmid, float(row[3]), body)
    ts = message.ts
    wire = {"conv": conv, "seq": message.seq, "from": sender, "cmid": cmid, "ts": ts, "body": wire_body}
    events: list[MailboxEvent] = []
    for p, n, count, total in zip(row[5], row[6], row[7], row[8], strict=True):
        n = int(n)
        events.append(MailboxEvent(principal=p, n=n, doc={"n": n, "kind": "msg", "ts": ts, **wire}))
        if p != sender:
            data = {"conv": conv, "count": int(count), "total": int(total)}
            events.append(MailboxEvent(principal=p, n=n + 1, doc={"n": n + 1, "kind": "unread", "ts": ts, **data}))
    return SendOutcome(message=message, dup=False, events=events)


# ---- mailboxes: locked, numbered in memory, written back (also used by postgres_social) ----

_LOCK_BOXES = ("SELECT principal, last_n, first_n, delivered_n FROM mailbox_state "
               "WHERE principal = ANY($1::text[]) ORDER BY principal FOR UPDATE")
_CREATE_BOXES = ("INSERT INTO mailbox_state(principal) SELECT p FROM unnest($1::text[]) AS u(p) ORDER BY p "
                 "ON CONFLICT DO NOTHING")
# The events and the mailboxes' new counters, in one statement (one round trip).
_FLUSH = ("WITH events AS (INSERT INTO mailbox(principal, n, ts, kind, conv, seq, data) SELECT * FROM "
          "unnest($1::text[], $2::bigint[], $3::float8[], $4::text[], $5::text[], $6::bigint[], $7::text[])) "
          "UPDATE mailbox_state s SET last_n = v.last_n, first_n = v.first_n, delivered_n = v.delivered_n "
          "FROM unnest($8::text[], $9::bigint[], $10::bigint[], $11::bigint[]) AS v(principal, last_n, first_n, "
          "delivered_n) WHERE s.principal = v.principal")


class Box:
    __slots__ = ("delivered_n", "dirty", "first_n", "last_n")

    def __init__(self, last_n: int, first_n: int, delivered_n: int) -> None:
        self.last_n = last_n
        self.first_n = first_n
        self.delivered_n = delivered_n
        self.dirty = False


class Boxes:
    """The mailboxes one transaction appends to: each row locked before its first
    number is handed out, the numbers counted here, every event and counter written
    by `flush()` (one statement each) before the transaction commits."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.state: dict[str, Box] = {}
        self._rows: list[tuple[str, int, float, str, str | None, int | None, str | None]] = []

    async def lock(self, principals: Iterable[str]) -> None:
        """Lock these mailboxes (creating those that do not exist yet), in principal order."""
        keys = sorted(set(principals) - self.state.keys())
        if not keys:
            return
        found = await self.conn.fetch(_LOCK_BOXES, keys)
        self._take(found)
        missing = [k for k in keys if k not in self.state]
        if missing:
            await self.conn.execute(_CREATE_BOXES, missing)
            self._take(await self.conn.fetch(_LOCK_BOXES, missing))

    def _take(self, rows: Iterable[Any]) -> None:
        for r in rows:
            self.state[r[0]] = Box(int(r[1]), int(r[2]), int(r[3]))

    def box(self, principal: str) -> Box:
        return self.state[principal]   # KeyError: a mailbox used without lock() first (a bug)

    def allocate(self, principal: str, count: int = 1) -> int:
        """The first of `count` consecutive new numbers of a locked mailbox."""
        b = self.box(principal)
        first = b.last_n + 1
        b.last_n += count
        b.dirty = True
        return first

    def add(self, principal: str, kind: str, ts: float, data: dict[str, Any]) -> MailboxEvent:
        n = self.allocate(principal)
        self._rows.append((principal, n, ts, kind, None, None, compact_json(data)))
        return MailboxEvent(principal=principal, n=n, doc={"n": n, "kind": kind, "ts": ts, **data})

    def add_msg(self, principal: str, ts: float, conv: str, seq: int, wire: dict[str, Any]) -> MailboxEvent:
        n = self.allocate(principal)
        self._rows.append((principal, n, ts, "msg", conv, seq, None))
        return MailboxEvent(principal=principal, n=n, doc={"n": n, "kind": "msg", "ts": ts, **wire})

    async def flush(self) -> None:
        rows, self._rows = self._rows, []
        dirty = [(p, b) for p, b in self.state.items() if b.dirty]
        if not rows and not dirty:
            return
        columns: list[list[Any]] = [list(col) for col in zip(*rows)] if rows else [[] for _ in range(7)]
        await self.conn.execute(_FLUSH, *columns, [p for p, _b in dirty], [b.last_n for _p, b in dirty],
                                [b.first_n for _p, b in dirty], [b.delivered_n for _p, b in dirty])
        for _p, b in dirty:
            b.dirty = False


async def unread_count(conn: Connection, conv: str, principal: str, read_seq: int) -> int:
    # Others' messages after the read position; those of principals this reader
    # blocked never reached it (see `send`), so they do not count either.
    count = await conn.fetchval(
        "SELECT count(*) FROM messages WHERE conv=$1 AND seq>$2 AND sender<>$3 "
        "AND sender NOT IN (SELECT blocked FROM blocks WHERE blocker=$3)", conv, read_seq, principal)
    return int(count)


async def total_unread(conn: Connection, principal: str) -> int:
    return int(await conn.fetchval("SELECT coalesce(sum(unread), 0) FROM conv_members WHERE principal=$1", principal))


async def unread_event(conn: Connection, boxes: Boxes, principal: str, conv: str, count: int,
                       now: float) -> MailboxEvent:
    return boxes.add(principal, "unread", now,
                     {"conv": conv, "count": count, "total": await total_unread(conn, principal)})


async def lock_recount_candidates(conn: Connection, principal: str, sender: str) -> list[str]:
    """The conversations of `principal` where `sender` has messages after its read
    position, their rows share-locked (sends there wait): before `principal`'s
    mailbox is locked, in the fixed order (conversations first)."""
    rows = await conn.fetch(
        "SELECT c.conv FROM conversations c WHERE c.conv IN (SELECT cm.conv FROM conv_members cm "
        "WHERE cm.principal=$1 AND EXISTS (SELECT 1 FROM messages m WHERE m.conv = cm.conv "
        "AND m.seq > cm.read_seq AND m.sender = $2)) ORDER BY c.conv FOR SHARE", principal, sender)
    return [r[0] for r in rows]


async def recount(conn: Connection, boxes: Boxes, principal: str, convs: Sequence[str],
                  now: float) -> list[MailboxEvent]:
    """`principal` blocked or unblocked someone (after the change, its mailbox
    locked): recount these conversations and announce each count that moved."""
    events = []
    for conv in convs:
        row = await conn.fetchrow("SELECT read_seq, unread FROM conv_members WHERE conv=$1 AND principal=$2",
                                  conv, principal)
        if row is None:
            continue
        count = await unread_count(conn, conv, principal, int(row[0]))
        if count != int(row[1]):
            await conn.execute("UPDATE conv_members SET unread=$1 WHERE conv=$2 AND principal=$3",
                               count, conv, principal)
            events.append(await unread_event(conn, boxes, principal, conv, count, now))
    return events


async def purge_principal(conn: Connection, principal: str) -> list[str]:
    """Forget what belongs to `principal` (in the caller's transaction): its mailbox,
    cursors and memberships. The messages it sent stay in their conversations'
    history, under freed cmids. Returns the groups it was a member of.

    Run when a principal is removed and again, in the same transaction, when an id
    is registered, so a new owner of an id never inherits anything of an old one's."""
    # In the store's lock order: the groups it created (changed below), then its
    # mailbox row (its unread counters change only under that lock).
    await conn.execute("SELECT 1 FROM conversations WHERE created_by=$1 AND kind='group' ORDER BY conv FOR UPDATE",
                       principal)
    await conn.execute("SELECT 1 FROM mailbox_state WHERE principal=$1 FOR UPDATE", principal)
    groups = [r[0] for r in await conn.fetch(
        "SELECT cm.conv FROM conv_members cm JOIN conversations c ON c.conv = cm.conv "
        "WHERE cm.principal=$1 AND c.kind='group' ORDER BY cm.conv", principal)]
    await conn.execute("DELETE FROM conv_members WHERE principal=$1", principal)
    await conn.execute("DELETE FROM mailbox WHERE principal=$1", principal)
    await conn.execute("DELETE FROM mailbox_state WHERE principal=$1", principal)
    await conn.execute("DELETE FROM cursors WHERE principal=$1", principal)
    # Its groups' creator rights are not handed to whoever gets the id next.
    await conn.execute("UPDATE conversations SET created_by='' WHERE created_by=$1 AND kind='group'", principal)
    # Free its cmids: a principal registered again under this id (a new device
    # counting cmids from 1) must not have its sends taken for retries.
    await conn.execute("UPDATE messages SET retired=true WHERE sender=$1 AND NOT retired", principal)
    return groups


# Every table here that names a principal, for finding those of principals that no longer exist.
_PRINCIPAL_COLUMNS = (("conv_members", "principal"), ("mailbox_state", "principal"), ("cursors", "principal"))


async def orphans(conn: Connection, limit: int, columns: Sequence[tuple[str, str]] = _PRINCIPAL_COLUMNS) -> list[str]:
    """Up to `limit` ids that have rows in `columns` but are not registered principals."""
    union = " UNION ".join(f"SELECT {col} AS p FROM {table}" for table, col in columns)
    rows = await conn.fetch(f"SELECT p FROM ({union}) AS u WHERE p NOT IN (SELECT id FROM principals) "
                            "ORDER BY p LIMIT $1", limit)
    return [r[0] for r in rows]


async def _members(conn: Connection, conv: str) -> list[str]:
    return [r[0] for r in await conn.fetch("SELECT principal FROM conv_members WHERE conv=$1 ORDER BY principal", conv)]


_EVENT_SELECT = (
    "SELECT mb.n, mb.ts, mb.kind, mb.data, m.conv, m.seq, m.sender, m.cmid, m.ts, m.body "
    "FROM mailbox mb LEFT JOIN messages m ON m.conv = mb.conv AND m.seq = mb.seq "
)


# The head and the page in one statement (one snapshot): at least one row, the head
# in its first column and no event in it when the page is empty.
_SYNC = ("SELECT h.last_n, e.* FROM (SELECT coalesce((SELECT last_n FROM mailbox_state WHERE principal=$1), 0) "
         "AS last_n) AS h LEFT JOIN LATERAL (" + _EVENT_SELECT +
         "WHERE mb.principal=$1 AND mb.n>$2 ORDER BY mb.n LIMIT $3) AS e ON true")


def _render(principal: str, row: Any) -> MailboxEvent:
    n, ts, kind, data, conv, seq, sender, cmid, mts, body = row
    doc: dict[str, Any] = {"n": int(n), "kind": kind, "ts": float(ts)}
    if kind == "msg":
        doc.update(StoredMessage(conv, int(seq), sender, cmid, float(mts), body).to_wire())
    else:
        doc.update(json.loads(data) if data else {})
    return MailboxEvent(principal=principal, n=int(n), doc=doc)


# A read position moved (the reader's mailbox locked): the new count, stored, and the
# reader's new total, in one statement. Its parts see the state before it, so the
# total is the other conversations' counts plus the new one.
_MARK_READ = (
    "WITH counted AS (SELECT count(*) AS unread FROM messages WHERE conv=$1 AND seq>$3 AND sender<>$2 "
    "AND sender NOT IN (SELECT blocked FROM blocks WHERE blocker=$2)), "
    "stored AS (UPDATE conv_members SET read_seq=$3, unread=(SELECT unread FROM counted) "
    "WHERE conv=$1 AND principal=$2) "
    "SELECT c.unread, c.unread + (SELECT coalesce(sum(unread), 0) FROM conv_members "
    "WHERE principal=$2 AND conv<>$1) FROM counted c")


class _Duplicate(Exception):
    """The (sender, cmid) index refused the message: another transaction stored it first."""


class _KeyedLocks:
    """One asyncio.Lock per key while someone holds or waits for it (then dropped),
    so this node runs its sends to one conversation one at a time, in the order
    they were called: a sender's messages keep their order. Across nodes the
    conversation's row lock orders them."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class PgMessagingStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._conv_locks = _KeyedLocks()

    # ---- send --------------------------------------------------------------
    async def send(self, *, sender: str, conv: str, dm_members: tuple[str, str] | None, cmid: str,
                   body: str, now: float, skip: frozenset[str] = frozenset()) -> SendOutcome:
        """Store one message and its `msg` events in every member's mailbox, atomically.

        `dm_members` is given for a direct conversation (created on first use);
        for a group the sender must be a member (else NotMember). Members in
        `skip` (they blocked the sender) get no event. The same (sender, cmid)
        again, on any node, even at the same time, stores nothing and answers the
        first message with `dup`."""
        wire_body = json.loads(body)   # parsed once, for every member's event
        cmid.encode()                  # a lone surrogate is refused before anything changes
        args = (sender, conv, list(dm_members) if dm_members is not None else None, cmid, body, now, sorted(skip))

        async def job(conn: Connection) -> SendOutcome:
            try:
                row = await conn.fetchrow(_SEND, *args)
            except asyncpg.UniqueViolationError as exc:
                if getattr(exc, "constraint_name", None) == _CMID_INDEX:
                    # The same cmid in another conversation, committed meanwhile: the
                    # statement rolled back whole and the first message is the answer.
                    raise _Duplicate() from None
                raise
            return _send_outcome(row, conv, sender, cmid, body, wire_body)

        async with self._conv_locks.hold(conv):
            for _attempt in range(3):
                try:
                    # One statement, atomic by itself: no BEGIN and COMMIT round trips.
                    return await self._db.autocommit(job)
                except _Duplicate:
                    found = await self.find_sent(sender, cmid)
                    if found is not None:
                        return SendOutcome(message=found, dup=True, events=[])
                    # retired meanwhile (its sender removed and registered again): try again
        raise StoreBusy(f"send of {cmid!r} kept conflicting with a concurrent one")

    async def find_sent(self, sender: str, cmid: str) -> StoredMessage | None:
        """The message `sender` already sent with this cmid, if any."""
        row = await self._db.read(lambda conn: conn.fetchrow(_SELECT_SENT, sender, cmid))
        return _message(row) if row is not None else None

    # ---- mailbox reads -----------------------------------------------------
    async def sync(self, principal: str, after: int, limit: int) -> tuple[list[MailboxEvent], int]:
        """Events with n > after (oldest first, at most `limit`) and the mailbox's last n."""

        rows = await self._db.read(lambda conn: conn.fetch(_SYNC, principal, after, limit))
        return [_render(principal, r[1:]) for r in rows if r[1] is not None], int(rows[0][0])

    async def head(self, principal: str) -> int:
        value = await self._db.read(lambda conn: conn.fetchval(
            "SELECT last_n FROM mailbox_state WHERE principal=$1", principal))
        return int(value or 0)

    async def client_cursor(self, client_id: str, principal: str) -> tuple[int, bool, int]:
        """(acked n, persistent inbox subscription recorded, mailbox last n)."""
        row = await self._db.read(lambda conn: conn.fetchrow(
            "SELECT (SELECT n FROM cursors WHERE client_id=$1 AND principal=$2), "
            "(SELECT inbox_sub FROM cursors WHERE client_id=$1 AND principal=$2), "
            "(SELECT last_n FROM mailbox_state WHERE principal=$2)", client_id, principal))
        return int(row[0] or 0), bool(row[1]), int(row[2] or 0)

    async def set_inbox_sub(self, client_id: str, principal: str, on: bool) -> None:
        async def job(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO cursors(client_id, principal, n, inbox_sub) VALUES ($1,$2,0,$3) "
                "ON CONFLICT(client_id) DO UPDATE SET inbox_sub=excluded.inbox_sub, "
                "n=CASE WHEN cursors.principal=excluded.principal THEN cursors.n ELSE 0 END, "
                "principal=excluded.principal", client_id, principal, on)

        await self._db.autocommit(job)

    # ---- ack and delivered receipts ----------------------------------------
    async def ack(self, client_id: str, principal: str, n: int, now: float) -> tuple[int, list[MailboxEvent]]:
        """Advance the client's cursor to n (never back); the first ack of a `msg`
        event by any client of the principal sends its sender a `delivered` event.
        Raises ValueError when n is beyond the mailbox's last event."""

        async def job(conn: Connection) -> tuple[int, list[MailboxEvent]]:
            state = await conn.fetchrow("SELECT last_n, delivered_n FROM mailbox_state WHERE principal=$1", principal)
            last_n, delivered_n = (int(state[0]), int(state[1])) if state is not None else (0, 0)
            if n > last_n:
                raise ValueError(f"n {n} is beyond the last event ({last_n})")
            events: list[MailboxEvent] = []
            if n > delivered_n:
                found = await conn.fetch(
                    "SELECT mb.n, m.conv, m.seq, m.sender FROM mailbox mb JOIN messages m "
                    "ON m.conv = mb.conv AND m.seq = mb.seq WHERE mb.principal=$1 AND mb.n>$2 AND mb.n<=$3 "
                    "AND mb.kind='msg' AND m.sender<>$1 ORDER BY mb.n", principal, delivered_n, n)
                boxes = Boxes(conn)
                await boxes.lock({principal, *(r[3] for r in found)})
                mine = boxes.box(principal)
                if n > mine.delivered_n:
                    # The first ack of a `msg` event by any client of the principal: a
                    # `delivered` receipt to its sender, one numbered block per sender.
                    by_sender: dict[str, list[dict[str, Any]]] = {}
                    for r in found:
                        if int(r[0]) > mine.delivered_n:   # another client's ack may have taken some meanwhile
                            by_sender.setdefault(r[3], []).append({"conv": r[1], "seq": int(r[2]), "to": principal})
                    mine.delivered_n = n
                    mine.dirty = True
                    for sender, datas in by_sender.items():
                        events.extend(boxes.add(sender, "delivered", now, data) for data in datas)
                await boxes.flush()
            # As a single ack does: a cursor row left by an earlier owner of the client id starts over.
            cursor = await conn.fetchval(
                "INSERT INTO cursors(client_id, principal, n) VALUES ($1,$2,$3) ON CONFLICT(client_id) DO UPDATE "
                "SET n=CASE WHEN cursors.principal=excluded.principal THEN GREATEST(cursors.n, excluded.n) "
                "ELSE excluded.n END, inbox_sub=CASE WHEN cursors.principal=excluded.principal "
                "THEN cursors.inbox_sub ELSE false END, principal=excluded.principal RETURNING n",
                client_id, principal, n)
            return int(cursor), events

        return await self._db.write(job)

    # ---- read receipts and unread counts -----------------------------------
    async def read(self, principal: str, conv: str, seq: int, now: float) -> ReadOutcome:
        async def job(conn: Connection) -> ReadOutcome:
            # The conversation share-locked (sends there wait, so the count below is
            # exact), the reader's membership locked (its other reads wait).
            row = await conn.fetchrow(
                "SELECT cm.read_seq, c.last_seq, cm.unread FROM conv_members cm JOIN conversations c "
                "ON c.conv = cm.conv WHERE cm.conv=$1 AND cm.principal=$2 FOR SHARE OF c FOR UPDATE OF cm",
                conv, principal)
            if row is None:
                raise NotMember(conv)
            read_seq, last_seq, unread = int(row[0]), int(row[1]), int(row[2])
            if seq > last_seq:
                raise ValueError(f"seq {seq} is beyond the last message ({last_seq})")
            events: list[MailboxEvent] = []
            if seq > read_seq:
                read_seq = seq
                members = await _members(conn, conv)
                boxes = Boxes(conn)
                await boxes.lock({*members, principal})
                counted = await conn.fetchrow(_MARK_READ, conv, principal, seq)
                unread, total = int(counted[0]), int(counted[1])
                for p in members:
                    if p != principal:
                        events.append(boxes.add(p, "read", now, {"conv": conv, "seq": seq, "by": principal}))
                events.append(boxes.add(principal, "unread", now, {"conv": conv, "count": unread, "total": total}))
                await boxes.flush()
            else:
                total = await total_unread(conn, principal)
            return ReadOutcome(conv=conv, seq=read_seq, unread=unread, total_unread=total, events=events)

        return await self._db.write(job)

    async def convs(self, principal: str) -> tuple[list[ConvSummary], int]:
        async def job(conn: Connection) -> list[Any]:
            rows: list[Any] = await conn.fetch(
                "SELECT c.conv, c.kind, c.name, c.last_seq, cm.read_seq, cm.unread, "
                "m.conv, m.seq, m.sender, m.cmid, m.ts, m.body "
                "FROM conv_members cm JOIN conversations c ON c.conv = cm.conv "
                "LEFT JOIN messages m ON m.conv = c.conv AND m.seq = c.last_seq AND c.last_seq > cm.since_seq "
                "WHERE cm.principal=$1 ORDER BY c.activity DESC", principal)
            return rows

        out = []
        total = 0
        for r in await self._db.read(job):
            conv, kind, name, last_seq, read_seq, unread = r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5])
            last = _message(r[6:12]) if r[6] is not None else None
            peer = None
            if kind == "dm":
                a, b = conv.split(":")[1:]
                peer = b if a == principal else a
            total += unread
            out.append(ConvSummary(conv=conv, kind=kind, name=name, peer=peer, last_seq=last_seq,
                                   last=last, read_seq=read_seq, unread=unread))
        return out, total

    async def history(self, conv: str, before: int | None, limit: int,
                      viewer: str | None = None) -> tuple[list[StoredMessage], bool]:
        """Up to `limit` messages with seq < before (all when None), oldest first, and
        whether older ones exist. With `viewer`: only what that member may see (from
        its since_seq on; nothing when it is not a member)."""

        async def job(conn: Connection) -> tuple[list[StoredMessage], bool]:
            since = 0
            if viewer is not None:
                value = await conn.fetchval("SELECT since_seq FROM conv_members WHERE conv=$1 AND principal=$2",
                                            conv, viewer)
                if value is None:
                    return [], False
                since = int(value)
            upper = before if before is not None else (1 << 62)
            rows = await conn.fetch(f"SELECT {_MSG_COLUMNS} FROM messages WHERE conv=$1 AND seq<$2 AND seq>$3 "
                                    "ORDER BY seq DESC LIMIT $4", conv, upper, since, limit + 1)
            more = len(rows) > limit
            return [_message(r) for r in reversed(rows[:limit])], more

        return await self._db.read(job)

    async def is_member(self, conv: str, principal: str) -> bool:
        value = await self._db.read(lambda conn: conn.fetchval(
            "SELECT 1 FROM conv_members WHERE conv=$1 AND principal=$2", conv, principal))
        return value is not None

    # ---- groups ------------------------------------------------------------
    async def create_group(self, conv: str, name: str, creator: str, members: Sequence[str],
                           now: float) -> list[MailboxEvent]:
        everyone = sorted({creator, *members})

        async def job(conn: Connection) -> list[MailboxEvent]:
            await conn.execute("INSERT INTO conversations(conv, kind, name, created_by, created_at, activity) "
                               "VALUES ($1, 'group', $2, $3, $4, nextval('conversation_activity'))",
                               conv, name, creator, now)
            await conn.execute("INSERT INTO conv_members(conv, principal, joined_at, read_seq, since_seq, unread) "
                               "SELECT $1, p, $2, 0, 0, 0 FROM unnest($3::text[]) AS u(p)", conv, now, everyone)
            boxes = Boxes(conn)
            await boxes.lock(everyone)
            data = {"event": "created", "conv": conv, "by": creator, "name": name, "members": everyone}
            events = [boxes.add(p, "group", now, data) for p in everyone]
            await boxes.flush()
            return events

        return await self._db.write(job)

    async def group_info(self, conv: str) -> GroupInfo | None:
        async def job(conn: Connection) -> GroupInfo | None:
            row = await conn.fetchrow("SELECT name, created_by FROM conversations WHERE conv=$1 AND kind='group'", conv)
            if row is None:
                return None
            return GroupInfo(conv=conv, name=row[0], created_by=row[1], members=await _members(conn, conv))

        return await self._db.read(job, snapshot=True)

    async def change_group(self, conv: str, by: str, *, add: Iterable[str] = (), remove: Iterable[str] = (),
                           event: str, now: float) -> tuple[list[MailboxEvent], list[str]]:
        """Add and/or remove members (the caller must be a member); `event` is
        added|removed|left. Returns the events and the members afterwards. Adding
        a member already there changes nothing; removing one not there raises
        KeyError(those not there, sorted) and changes nothing at all (checked under
        the conversation's lock, so a concurrent change cannot slip in between)."""
        to_add, to_remove = set(add), set(remove)

        async def job(conn: Connection) -> tuple[list[MailboxEvent], list[str]]:
            await conn.execute("SELECT 1 FROM conversations WHERE conv=$1 FOR UPDATE", conv)
            before = await _members(conn, conv)
            if by not in before:
                raise NotMember(conv)
            missing = sorted(to_remove - set(before))
            if missing:
                raise KeyError(missing)
            added = sorted(to_add - set(before))
            removed = sorted(to_remove & set(before))
            if not added and not removed:
                return [], before
            after = sorted((set(before) | set(added)) - set(removed))
            boxes = Boxes(conn)
            await boxes.lock({*after, *removed})
            unread: dict[str, int] = {}
            for p in added:
                unread[p] = await unread_count(conn, conv, p, 0)
                await conn.execute("INSERT INTO conv_members(conv, principal, joined_at, read_seq, since_seq, unread) "
                                   "VALUES ($1,$2,$3,0,0,$4)", conv, p, now, unread[p])
            for p in removed:
                unread[p] = int(await conn.fetchval(
                    "DELETE FROM conv_members WHERE conv=$1 AND principal=$2 RETURNING unread", conv, p))
            data = {"event": event, "conv": conv, "by": by, "members": added or removed}
            # Everyone concerned hears of it: current members and those who just left;
            # a member whose total moved (history to read, or unread ones gone) also
            # gets its new counts, right after.
            events = []
            for p in sorted(set(after) | set(removed)):
                events.append(boxes.add(p, "group", now, data))
                if unread.get(p):
                    count = unread[p] if p in added else 0
                    events.append(await unread_event(conn, boxes, p, conv, count, now))
            await boxes.flush()
            return events, after

        return await self._db.write(job)

    async def load_groups(self) -> dict[str, list[str]]:
        async def job(conn: Connection) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {r[0]: [] for r in await conn.fetch(
                "SELECT conv FROM conversations WHERE kind='group' ORDER BY conv")}
            for r in await conn.fetch("SELECT cm.conv, cm.principal FROM conv_members cm JOIN conversations c "
                                      "ON c.conv = cm.conv WHERE c.kind='group' ORDER BY cm.conv, cm.principal"):
                out.setdefault(r[0], []).append(r[1])
            return out

        return await self._db.read(job, snapshot=True)

    async def forget_principal(self, principal: str) -> list[str]:
        """A principal was removed: drop its mailbox, cursors and memberships (the
        messages it sent stay in their conversations' history). Returns the groups
        it was a member of."""
        return await self._db.write(lambda conn: purge_principal(conn, principal))

    async def purge_orphans(self, limit: int) -> dict[str, list[str]]:
        """One bounded round: forget up to `limit` principals that have rows here but
        are no longer registered (removed while no broker was running). Returns
        {principal: groups it was in}; empty when there is nothing left to do."""

        async def job(conn: Connection) -> dict[str, list[str]]:
            return {p: await purge_principal(conn, p) for p in await orphans(conn, limit)}

        return await self._db.write(job)

    # ---- bounds --------------------------------------------------------------
    async def needs_prune(self, *, now: float, max_events: int, ttl: float) -> bool:
        """Cheap read: is any mailbox over its bound or holding an expired event?"""

        async def job(conn: Connection) -> bool:
            if await conn.fetchval("SELECT 1 FROM mailbox_state WHERE last_n - first_n + 1 > $1 LIMIT 1", max_events):
                return True
            return await conn.fetchval(
                "SELECT 1 FROM mailbox_state s JOIN mailbox mb ON mb.principal = s.principal "
                "AND mb.n = s.first_n WHERE mb.ts < $1 LIMIT 1", now - ttl) is not None

        return await self._db.read(job)

    async def prune(self, *, now: float, max_events: int, ttl: float, max_mailboxes: int,
                    max_rows: int) -> tuple[list[MailboxEvent], int]:
        """One bounded round of enforcing mailbox.max_events and mailbox.ttl.

        Discards the oldest events of at most `max_mailboxes` mailboxes (at most
        `max_rows` each) and announces each discard with a `dropped` event. An
        expired `dropped` event is not itself announced (that would never end).
        Returns the new events and how many events were discarded. The mailboxes
        are found without locks and re-checked under their locks."""

        async def job(conn: Connection) -> tuple[list[MailboxEvent], int]:
            events: list[MailboxEvent] = []
            discarded = 0
            # Full mailboxes: keep the newest max_events including the announcement.
            full = [r[0] for r in await conn.fetch(
                "SELECT principal FROM mailbox_state WHERE last_n - first_n + 1 > $1 ORDER BY principal LIMIT $2",
                max_events, max_mailboxes)]
            boxes = Boxes(conn)
            await boxes.lock(full)
            for principal in full:
                b = boxes.box(principal)
                size = b.last_n - b.first_n + 1
                if size <= max_events:
                    continue
                count = await _discard(conn, b, principal, b.first_n + min(size - max_events + 1, max_rows))
                discarded += count
                events.append(boxes.add(principal, "dropped", now, {"count": count, "reason": "queue_full"}))
            await boxes.flush()   # the query below must see the new first events
            cutoff = now - ttl
            old = [r[0] for r in await conn.fetch(
                "SELECT s.principal FROM mailbox_state s JOIN mailbox mb ON mb.principal = s.principal "
                "AND mb.n = s.first_n WHERE mb.ts < $1 ORDER BY s.principal LIMIT $2", cutoff, max_mailboxes)]
            await boxes.lock(old)
            for principal in old:
                b = boxes.box(principal)
                rows = await conn.fetch("SELECT n, kind FROM mailbox WHERE principal=$1 AND n>=$2 AND ts<$3 "
                                        "ORDER BY n LIMIT $4", principal, b.first_n, cutoff, max_rows)
                if not rows:
                    continue
                announced = sum(1 for r in rows if r[1] != "dropped")
                discarded += await _discard(conn, b, principal, int(rows[-1][0]) + 1)
                if announced:
                    events.append(boxes.add(principal, "dropped", now, {"count": announced, "reason": "expired"}))
            await boxes.flush()
            return events, discarded

        return await self._db.write(job)


async def _discard(conn: Connection, box: Box, principal: str, new_first: int) -> int:
    """Delete a locked mailbox's events before `new_first` (its state is written by flush)."""
    status = await conn.execute("DELETE FROM mailbox WHERE principal=$1 AND n<$2", principal, new_first)
    box.first_n = new_first
    box.delivered_n = max(box.delivered_n, new_first - 1)
    box.dirty = True
    return int(status.split()[-1])
