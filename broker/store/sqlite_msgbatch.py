"""One store job for many `send`s and `ack`s: the messaging hot path, grouped.

Every send and ack that arrives while its group is still queued (the writer has
not started it, and no other store job was queued after it) joins that group.
The group is ONE job of the writer's transaction, processed on the writer thread
in arrival order: it reads the state it needs once (a conversation's last seq
and members with their unread counters, a mailbox's head, a client's cursor),
numbers everything in memory, and writes it back with a few statements per table
right before the job ends. So a send costs a handful of statements per group
instead of a dozen per send.

The guarantees are those of one job per request:
* seq and n are allocated in arrival order from the committed state plus the
  group's own earlier operations, and every row is written in the same job: the
  group commits with its batch or not at all, so there is never a gap;
* an operation refused (not a member, n beyond the mailbox) is checked before it
  changes anything, so it changes nothing; a duplicate cmid (stored before, or
  earlier in the group) answers the first message with dup;
* an unexpected error fails the whole group (its savepoint is rolled back, nothing
  of it is written) and every caller of the group gets that error;
* callers are answered only after COMMIT, like every other write.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from broker.store.base import MailboxEvent, NotMember, SendOutcome, StoredMessage
from broker.store.jsonutil import compact_json
from broker.store.sqlite_db import Database

MAX_GROUP = 1000   # operations in one group; more start the next one


@dataclass(slots=True)
class SendOp:
    sender: str
    conv: str
    dm_members: tuple[str, str] | None
    cmid: str
    body: str
    now: float
    skip: frozenset[str]


@dataclass(slots=True)
class AckOp:
    client_id: str
    principal: str
    n: int
    now: float


class _Group:
    """The ops of one store job, and (as the job's ResultSink) their answers: the
    writer's wake-up of the loop answers every caller, no future in between."""
    __slots__ = ("futures", "loop", "mark", "ops", "settled", "started")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ops: list[SendOp | AckOp] = []
        self.futures: list[asyncio.Future[Any]] = []
        self.started = False
        self.settled = False
        self.mark = -1

    def done(self) -> bool:
        return self.settled

    def set_result(self, outcomes: list[tuple[bool, Any]]) -> None:
        """After COMMIT: each op's own answer (a refused op gets its error)."""
        self.settled = True
        for fut, (ok, value) in zip(self.futures, outcomes):
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def set_exception(self, exception: BaseException) -> None:
        """The group failed (or its commit did): every op gets that error."""
        self.settled = True
        for fut in self.futures:
            if not fut.done():
                fut.set_exception(exception)


class OpBatcher:
    """Collects sends and acks into groups and runs each group as one store job."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._lock = threading.Lock()    # `started` and the op list are shared with the writer thread
        self._open: _Group | None = None
        self.groups = 0
        self.ops = 0

    def submit(self, op: SendOp | AckOp) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        g = self._open
        if g is not None and g.loop is loop and g.mark == self._db.submitted and len(g.ops) < MAX_GROUP:
            with self._lock:
                if not g.started:
                    g.ops.append(op)
                    g.futures.append(fut)
                    self.ops += 1
                    return fut
        g = _Group(loop)
        g.ops.append(op)
        g.futures.append(fut)
        self._db.submit_to(lambda conn: self._run(conn, g), g)   # raises StoreBusy/StoreClosed
        g.mark = self._db.submitted
        self._open = g
        self.groups += 1
        self.ops += 1
        return fut

    def _run(self, conn: sqlite3.Connection, g: _Group) -> list[tuple[bool, Any]]:
        with self._lock:
            g.started = True
            ops = list(g.ops)
        return _GroupRun(conn).run(ops)


# ---- the group, on the writer thread --------------------------------------------
#
# Python's sqlite3 releases the GIL around every sqlite3_step(): once per
# statement and once per row fetched. On a busy broker each release hands the GIL
# to the event loop thread and the writer then waits to get it back (measured: a
# group took 8 ms wall for 3 ms of CPU). So the group reads its state up front in
# bulk, one step per query: keys go in as one JSON array (json_each), answers come
# back as one JSON array (json_group_array; integers and text only - SQLite prints
# floats with 15 digits - and keys with a NUL, which json_each cuts, are read
# one by one). Rows are written with bound parameters (floats stay exact), the
# many rows of messages, mailbox events, mailbox heads and cursors as multi-row
# statements: one step per chunk instead of executemany's one per row.

def _json_str(text: str) -> str:
    """compact_json(text), quoting plain ASCII itself (ids, most cmids): nothing to escape."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return compact_json(text)


def _data_event_wire(n: int, kind: str, ts_json: str, data_json: str) -> bytes:
    """compact_json({"n": n, "kind": kind, "ts": ts, **data}) from the JSON of ts and
    of data (already encoded for the row): no second encoding of the same document."""
    rest = data_json[1:] if data_json == "{}" else "," + data_json[1:]
    return f'{{"n":{n},"kind":"{kind}","ts":{ts_json}{rest}'.encode()


def _j(i: int) -> str:
    return f"json_extract(j.value, '$[{i}]')"


_SELECT_SENT = "SELECT conv, seq, sender, cmid, ts, body FROM messages WHERE sender=? AND cmid=? AND retired=0"
_SELECT_CONV = "SELECT last_seq, last_ts FROM conversations WHERE conv=?"
_SELECT_MEMBERS = "SELECT principal, unread FROM conv_members WHERE conv=? ORDER BY principal"
_SELECT_TOTAL = "SELECT COALESCE(SUM(unread), 0) FROM conv_members WHERE principal=?"
_SELECT_BOX = "SELECT last_n, delivered_n FROM mailbox_state WHERE principal=?"
_SELECT_CURSOR = "SELECT principal, n FROM cursors WHERE client_id=?"
_SELECT_ACTIVITY = "SELECT COALESCE(MAX(activity), 0) FROM conversations"
# The `msg` events of others' messages in (lo, hi] of each [principal, lo, hi]: what
# the group's acks may acknowledge for the first time, read once for all of them.
_BULK_UNDELIVERED = (f"SELECT json_group_array(json_array(mb.principal, mb.n, m.conv, m.seq, m.sender)) "
                     f"FROM json_each(?) AS j JOIN mailbox mb ON mb.principal = {_j(0)} AND mb.n > {_j(1)} "
                     f"AND mb.n <= {_j(2)} AND mb.kind = 'msg' JOIN messages m "
                     f"ON m.conv = mb.conv AND m.seq = mb.seq AND m.sender != mb.principal")
_BULK_SENT = (f"SELECT json_group_array(json_array(m.sender, m.cmid)) FROM json_each(?) AS j JOIN messages m "
              f"ON m.sender = {_j(0)} AND m.cmid = {_j(1)} AND m.retired = 0")
_BULK_CONVS = "SELECT conv, last_seq, last_ts FROM conversations WHERE conv IN (SELECT value FROM json_each(?))"
_BULK_MEMBERS = ("SELECT json_group_array(json_array(conv, principal, unread)) FROM conv_members "
                 "WHERE conv IN (SELECT value FROM json_each(?))")
_BULK_BOXES = ("SELECT json_group_array(json_array(principal, last_n, delivered_n)) FROM mailbox_state "
               "WHERE principal IN (SELECT value FROM json_each(?))")
_BULK_TOTALS = ("SELECT json_group_array(json_array(principal, total)) FROM (SELECT principal, SUM(unread) AS total "
                "FROM conv_members WHERE principal IN (SELECT value FROM json_each(?)) GROUP BY principal)")
_BULK_CURSORS = ("SELECT json_group_array(json_array(client_id, principal, n)) FROM cursors "
                 "WHERE client_id IN (SELECT value FROM json_each(?))")

# What a group reads up front, in one statement (one step, one GIL release and
# wait instead of one per query): each part is one of the queries above, its
# JSON put into one array (json() keeps it JSON whatever SQLite does with the
# subtype of a subquery's value). The principals whose mailbox heads and unread
# totals are read: the given ids (acks', direct conversations' members) and the
# members of the conversations sent in.
_PRINCIPALS = ("(SELECT value FROM json_each(?3) UNION SELECT principal FROM conv_members "
               "WHERE conv IN (SELECT value FROM json_each(?2)))")
_BULK_SEND_STATE = (
    "SELECT json_array("
    f"json(({_BULK_SENT.replace('json_each(?)', 'json_each(?1)')})), "
    f"json(({_BULK_MEMBERS.replace('json_each(?)', 'json_each(?2)')})), "
    "json((SELECT json_group_array(json_array(principal, last_n, delivered_n)) FROM mailbox_state "
    f"WHERE principal IN {_PRINCIPALS})), "
    "json((SELECT json_group_array(json_array(principal, total)) FROM (SELECT principal, SUM(unread) AS total "
    f"FROM conv_members WHERE principal IN {_PRINCIPALS} GROUP BY principal))), "
    f"json(({_BULK_CURSORS.replace('json_each(?)', 'json_each(?4)')})), "
    f"({_SELECT_ACTIVITY}))")
# ... and, in the same row, the last seq and ts of each conversation sent in
# (?5 on): columns, so the float is bound back exactly, and no step per row as a
# query of rows takes. The conversations are padded to one of a few counts with
# "" (no conversation has that id), so there are few statement texts; beyond
# the largest count the rest are read as rows (_BULK_CONVS).
_CONV_COUNTS = (1, 2, 4, 8, 16, 32)
_SEND_STATE = {k: _BULK_SEND_STATE + "".join(
    f", (SELECT last_seq FROM conversations WHERE conv=?{i}), (SELECT last_ts FROM conversations WHERE conv=?{i})"
    for i in range(5, 5 + k)) for k in _CONV_COUNTS}
# A group of acks only: mailbox heads of ?1, cursors of ?2.
_BULK_ACK_STATE = (f"SELECT json_array(json(({_BULK_BOXES.replace('json_each(?)', 'json_each(?1)')})), "
                   f"json(({_BULK_CURSORS.replace('json_each(?)', 'json_each(?2)')})))")

_INSERT_CONV = ("INSERT INTO conversations(conv, kind, name, created_by, created_at, last_seq, last_ts, activity) "
                "VALUES (?, 'dm', '', ?, ?, ?, ?, ?)")
_INSERT_MEMBER = ("INSERT INTO conv_members(conv, principal, joined_at, read_seq, since_seq, unread) "
                  "VALUES (?,?,?,?,?,0)")


@dataclass(frozen=True, slots=True)
class _Rows:
    """An INSERT written as one statement per chunk of rows (`VALUES (...),(...)`)."""
    head: str       # up to VALUES
    width: int      # parameters per row
    tail: str = ""  # after the rows (ON CONFLICT ...)
    row: str = ""   # one row's values, when not `width` parameters alone
    texts: dict[int, str] = field(init=False, compare=False, repr=False)   # chunk size -> statement

    def __post_init__(self) -> None:
        row = self.row or "(" + ",".join("?" * self.width) + ")"
        object.__setattr__(self, "texts", {n: self.head + ",".join([row] * n) + self.tail for n in _CHUNKS})


# Chunk sizes: a group's rows go in as few chunks of these sizes (largest first),
# so each table has at most len(_CHUNKS) statement texts (sqlite3 keeps them
# prepared; its cache holds 128). Each chunk is a step, so a release of the GIL
# and a wait for it: powers of two alone took 3.5 chunks for n <= 128 rows on
# average, these 2.45 (1.5 for n <= 16).
_CHUNKS = (256, 128, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1)

_INSERT_MESSAGES = _Rows("INSERT INTO messages(conv, seq, sender, cmid, ts, body) VALUES ", 6)
# Mailbox events in two shapes, their NULL columns written into the statement:
# Python's sqlite3 adapts a None (or bytes) parameter through its adapter
# protocol, two failed attribute lookups each raising and clearing an
# AttributeError (measured: 2.4 % of a durable send's instructions for 1.5 Nones
# per row). An `int`, `float` or `str` is bound as it is.
_INSERT_MSG_EVENTS = _Rows("INSERT INTO mailbox(principal, n, ts, kind, conv, seq, data) VALUES ", 5,
                           row="(?,?,?,'msg',?,?,NULL)")
_INSERT_DATA_EVENTS = _Rows("INSERT INTO mailbox(principal, n, ts, kind, conv, seq, data) VALUES ", 5,
                            row="(?,?,?,?,NULL,NULL,?)")
_UPSERT_BOXES = _Rows("INSERT INTO mailbox_state(principal, last_n, delivered_n) VALUES ", 3,
                      " ON CONFLICT(principal) DO UPDATE SET last_n=excluded.last_n, delivered_n=excluded.delivered_n")
# As a single ack did it: a cursor row left by an earlier owner of the client id starts over.
_UPSERT_CURSORS = _Rows("INSERT INTO cursors(client_id, principal, n) VALUES ", 3,
                        " ON CONFLICT(client_id) DO UPDATE SET n=excluded.n, inbox_sub=CASE WHEN "
                        "cursors.principal=excluded.principal THEN cursors.inbox_sub ELSE 0 END, "
                        "principal=excluded.principal")
# A group changes a row per conversation it sends in and per recipient's unread
# counter: as UPDATE statements (executemany) that was one step, so one release
# and re-acquisition of the GIL, per row. Written as multi-row upserts instead, one
# step per chunk. Every row exists (the group read it, or inserted it above in
# write_all: a conversation is created only by _INSERT_CONV, a member only by
# _INSERT_MEMBER), so the INSERT half never applies: its values for the columns
# not updated only satisfy NOT NULL and CHECK.
_UPDATE_CONVS = _Rows("INSERT INTO conversations(conv, kind, created_by, created_at, last_seq, last_ts, activity) "
                      "VALUES ", 4, " ON CONFLICT(conv) DO UPDATE SET last_seq=excluded.last_seq, "
                      "last_ts=excluded.last_ts, activity=excluded.activity", row="(?,'dm','',0,?,?,?)")
_UPDATE_UNREADS = _Rows("INSERT INTO conv_members(conv, principal, joined_at, unread) VALUES ", 3,
                        " ON CONFLICT(conv, principal) DO UPDATE SET unread=excluded.unread", row="(?,?,0,?)")


class _Conv:
    __slots__ = ("activity", "created_at", "created_by", "dirty", "last_seq", "last_ts", "members", "new")

    def __init__(self, last_seq: int, last_ts: float, members: list[str], *, new: bool = False,
                 created_by: str = "", created_at: float = 0.0) -> None:
        self.last_seq = last_seq
        self.last_ts = last_ts
        self.activity = 0
        self.members = members          # sorted, as `ORDER BY principal`
        self.new = new
        self.created_by = created_by
        self.created_at = created_at
        self.dirty = False


class _GroupRun:
    """The state of one group while it runs: loaded once, changed in memory, written at the end."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.convs: dict[str, _Conv | None] = {}
        self.unread: dict[tuple[str, str], int] = {}
        self.unread_dirty: set[tuple[str, str]] = set()
        self.totals: dict[str, int] = {}
        self.boxes: dict[str, list[Any]] = {}        # principal -> [last_n, delivered_n, dirty]
        self.cursors: dict[str, list[Any]] = {}      # client id -> [principal, n, dirty]
        self.sent: dict[tuple[str, str], StoredMessage] = {}
        self.not_sent: set[tuple[str, str]] = set()  # (sender, cmid) known not to be stored
        self.activity: int | None = None
        self.joins: list[tuple[str, str, float, int, int]] = []
        self.msg_rows: list[tuple[Any, ...]] = []
        self.msg_event_rows: list[tuple[str, int, float, str, int]] = []    # principal, n, ts, conv, seq
        self.data_event_rows: list[tuple[str, int, float, str, str]] = []   # principal, n, ts, kind, data
        # principal (of an ack in the group) -> its not yet delivered `msg` events of
        # others' messages, (n, conv, seq, sender) in n order: read up front, then
        # this group's own appended as they are numbered
        self.undelivered: dict[str, deque[tuple[int, str, int, str]]] = {}

    def run(self, ops: list[SendOp | AckOp]) -> list[tuple[bool, Any]]:
        self.prefetch(ops)
        out: list[tuple[bool, Any]] = []
        for op in ops:
            try:
                out.append((True, self.send(op) if isinstance(op, SendOp) else self.ack(op)))
            except (NotMember, ValueError) as exc:   # refused before anything changed
                out.append((False, exc))
        self.write_all()
        return out

    # ---- state, read in bulk up front and on first use otherwise -----------------
    def _json_rows(self, sql: str, keys: Any) -> list[Any]:
        rows: list[Any] = json.loads(self.conn.execute(sql, (compact_json(keys),)).fetchone()[0])
        return rows

    def prefetch(self, ops: list[SendOp | AckOp]) -> None:
        sends = [op for op in ops if isinstance(op, SendOp)]
        acks = [op for op in ops if isinstance(op, AckOp)]
        principals = {op.principal for op in acks}
        for op in sends:
            principals.update(op.dm_members or ())
        clients = list({op.client_id for op in acks if "\0" not in op.client_id})
        if sends:
            sent_keys = list({(op.sender, op.cmid) for op in sends if "\0" not in op.cmid})
            convs = list({op.conv for op in sends})
            inline = convs[:_CONV_COUNTS[-1]]
            k = next(n for n in _CONV_COUNTS if n >= len(inline))
            state = self.conn.execute(_SEND_STATE[k], (
                compact_json(sent_keys), compact_json(convs), compact_json(list(principals)), compact_json(clients),
                *inline, *[""] * (k - len(inline)))).fetchone()
            sent, member_rows, boxes, totals, cursors, self.activity = json.loads(state[0])
            rows = [(conv, state[1 + 2 * i], state[2 + 2 * i]) for i, conv in enumerate(inline)
                    if state[1 + 2 * i] is not None]
            if len(convs) > len(inline):
                rows += self.conn.execute(_BULK_CONVS, (compact_json(convs[len(inline):]),)).fetchall()
            found = {tuple(k) for k in sent}
            self.not_sent.update(k for k in sent_keys if k not in found)
            members: dict[str, list[str]] = {conv: [] for conv, _s, _t in rows}
            for conv, p, unread in member_rows:
                members[conv].append(p)
                self.unread[(conv, p)] = unread
                principals.add(p)
            for conv, last_seq, last_ts in rows:
                self.convs[conv] = _Conv(last_seq, last_ts, sorted(members[conv]))
            for conv in convs:
                self.convs.setdefault(conv, None)
            self.totals = {p: 0 for p in principals}
            self.totals.update((p, total) for p, total in totals)
        elif principals or clients:
            boxes, cursors = self._json_state(_BULK_ACK_STATE, list(principals), clients)
        else:
            boxes, cursors = [], []
        self._take_boxes(boxes, principals)
        for cid, p, n in cursors:
            self.cursors[cid] = [p, n, False]
        for cid in clients:
            self.cursors.setdefault(cid, [None, 0, False])
        self.prefetch_undelivered(acks)

    def _json_state(self, sql: str, *keys: Any) -> list[Any]:
        """One statement's JSON array, each of its parameters a JSON array of keys."""
        parts: list[Any] = json.loads(self.conn.execute(sql, tuple(compact_json(k) for k in keys)).fetchone()[0])
        return parts

    def prefetch_undelivered(self, acks: list[AckOp]) -> None:
        highest: dict[str, int] = {}
        for op in acks:
            highest[op.principal] = max(op.n, highest.get(op.principal, 0))
        ranges = []
        for p, n in highest.items():
            b = self.box(p)
            self.undelivered[p] = deque()
            if min(n, b[0]) > b[1]:
                ranges.append([p, b[1], min(n, b[0])])
        if ranges:
            senders = set()
            for p, n, conv, seq, sender in sorted(self._json_rows(_BULK_UNDELIVERED, ranges)):
                self.undelivered[p].append((n, conv, seq, sender))
                senders.add(sender)
            # The senders' mailboxes get the `delivered` receipts: read in the same
            # bulk way, not one SELECT each on first use.
            self.load_boxes([p for p in senders if p not in self.boxes])

    def load_boxes(self, keys: list[str]) -> None:
        """Read the mailbox heads of `keys` (none loaded yet) in one query."""
        if not keys:
            return
        self._take_boxes(self._json_rows(_BULK_BOXES, keys), keys)

    def _take_boxes(self, rows: Iterable[Any], keys: Iterable[str]) -> None:
        """Mailbox heads read (principal, last_n, delivered_n); a key without a row has none yet."""
        for p, last_n, delivered_n in rows:
            self.boxes[p] = [last_n, delivered_n, False]
        for p in keys:
            self.boxes.setdefault(p, [0, 0, False])

    def conv(self, conv: str) -> _Conv | None:
        if conv in self.convs:
            return self.convs[conv]
        row = self.conn.execute(_SELECT_CONV, (conv,)).fetchone()
        c = None
        if row is not None:
            members = self.conn.execute(_SELECT_MEMBERS, (conv,)).fetchall()
            c = _Conv(row[0], row[1], [p for p, _u in members])
            for p, u in members:
                self.unread[(conv, p)] = u
        self.convs[conv] = c
        return c

    def box(self, principal: str) -> list[Any]:
        b = self.boxes.get(principal)
        if b is None:
            row = self.conn.execute(_SELECT_BOX, (principal,)).fetchone()
            b = self.boxes[principal] = [row[0], row[1], False] if row is not None else [0, 0, False]
        return b

    def allocate(self, principal: str, count: int) -> int:
        b = self.box(principal)
        first: int = b[0] + 1
        b[0] += count
        b[2] = True
        return first

    def bump_unread(self, conv: str, principal: str) -> tuple[int, int]:
        # A total is read before this group changes any counter of its principal
        # (prefetch, or here on first use), so SUM() over the stored counters is exact.
        total = self.totals.get(principal)
        if total is None:
            total = self.conn.execute(_SELECT_TOTAL, (principal,)).fetchone()[0]
        total += 1
        self.totals[principal] = total
        key = (conv, principal)
        count = self.unread[key] + 1
        self.unread[key] = count
        self.unread_dirty.add(key)
        return count, total

    def next_activity(self) -> int:
        if self.activity is None:
            self.activity = self.conn.execute(_SELECT_ACTIVITY).fetchone()[0]
        self.activity += 1
        return self.activity

    # ---- operations --------------------------------------------------------------
    def send(self, op: SendOp) -> SendOutcome:
        key = (op.sender, op.cmid)
        first = self.sent.get(key)
        if first is None and key not in self.not_sent:
            row = self.conn.execute(_SELECT_SENT, key).fetchone()
            if row is not None:
                first = StoredMessage(*row)
        if first is not None:
            return SendOutcome(message=first, dup=True, events=[])
        c = self.conv(op.conv)
        dm = op.dm_members
        # Every check before any change (a refused op changes nothing).
        if c is None and dm is None:
            raise NotMember(op.conv)
        if op.sender not in (c.members if c is not None else ()) and (dm is None or op.sender not in dm):
            raise NotMember(op.conv)
        op.cmid.encode()                  # a lone surrogate is refused here, not by the whole group's INSERT
        if c is None:
            c = self.convs[op.conv] = _Conv(0, 0.0, [], new=True, created_by=op.sender, created_at=op.now)
        if dm is not None:
            for p in dm:
                if p not in c.members:
                    # New conversation, or a member dropped by purge_principal whose id was
                    # registered again: the new owner's view starts after what is there
                    # (nothing of it is unread).
                    c.members.append(p)
                    c.members.sort()
                    self.unread[(op.conv, p)] = 0
                    self.joins.append((op.conv, p, op.now, c.last_seq, c.last_seq))
        seq = c.last_seq + 1
        ts = max(op.now, c.last_ts)   # commit order and time order agree within a conversation
        c.last_seq, c.last_ts, c.activity, c.dirty = seq, ts, self.next_activity(), True
        msg = StoredMessage(op.conv, seq, op.sender, op.cmid, ts, op.body)
        self.sent[key] = msg
        self.msg_rows.append((op.conv, seq, op.sender, op.cmid, ts, op.body))
        # Every member's `msg` event is the same JSON but for its "n": encoded once
        # here (the body is the sender's compact JSON as given), not once per push.
        ts_json = compact_json(ts)
        conv_json = _json_str(op.conv)
        msg_tail = (f',"kind":"msg","ts":{ts_json},"conv":{conv_json},"seq":{seq},'
                    f'"from":{_json_str(op.sender)},"cmid":{_json_str(op.cmid)},"body":{op.body}}}')
        # Events carry their bytes and kind only (their dicts are decoded if asked
        # for, store/base.py), built positionally: keywords cost a dict per call
        events: list[MailboxEvent] = []
        msg_rows = self.msg_event_rows
        for p in c.members:
            if p == op.sender:
                n = self.allocate(p, 1)
                msg_rows.append((p, n, ts, op.conv, seq))
                events.append(MailboxEvent(p, n, None, f'{{"n":{n}{msg_tail}'.encode(), "msg"))
            elif p not in op.skip:
                # Each recipient's count moves with the message, announced right after it.
                count, total = self.bump_unread(op.conv, p)
                n = self.allocate(p, 2)
                # compact_json({"conv": .., "count": .., "total": ..}), without a dict (ids and integers)
                unread_json = f'{{"conv":{conv_json},"count":{count},"total":{total}}}'
                msg_rows.append((p, n, ts, op.conv, seq))
                self.data_event_rows.append((p, n + 1, ts, "unread", unread_json))
                waiting = self.undelivered.get(p)
                if waiting is not None:   # an ack of p follows in this group
                    waiting.append((n, op.conv, seq, op.sender))
                events.append(MailboxEvent(p, n, None, f'{{"n":{n}{msg_tail}'.encode(), "msg"))
                events.append(MailboxEvent(p, n + 1, None, _data_event_wire(n + 1, "unread", ts_json, unread_json),
                                           "unread"))
        return SendOutcome(msg, False, events)

    def ack(self, op: AckOp) -> tuple[int, list[MailboxEvent]]:
        b = self.box(op.principal)
        if op.n > b[0]:
            raise ValueError(f"n {op.n} is beyond the last event ({b[0]})")
        cur = self.cursors.get(op.client_id)
        if cur is None:
            row = self.conn.execute(_SELECT_CURSOR, (op.client_id,)).fetchone()
            cur = self.cursors[op.client_id] = [row[0], row[1], False] if row is not None else [None, 0, False]
        new_cursor = max(cur[1], op.n) if cur[0] == op.principal else op.n
        cur[0], cur[1], cur[2] = op.principal, new_cursor, True
        events: list[MailboxEvent] = []
        if op.n > b[1]:
            waiting = self.undelivered[op.principal]   # read by prefetch for every ack's principal
            found = []
            while waiting and waiting[0][0] <= op.n:
                event = waiting.popleft()
                if event[0] > b[1]:
                    found.append(event)
            b[1] = op.n
            b[2] = True
            # The first ack of a `msg` event by any client of the principal: a
            # `delivered` receipt to its sender, one numbered block per sender.
            by_sender: dict[str, list[tuple[str, int]]] = {}
            for _n, conv, seq, sender in found:
                by_sender.setdefault(sender, []).append((conv, seq))
            now_json = compact_json(op.now)
            to_json = _json_str(op.principal)
            for sender, receipts in by_sender.items():
                first = self.allocate(sender, len(receipts))
                for i, (conv, seq) in enumerate(receipts):
                    n = first + i
                    # compact_json({"conv": conv, "seq": seq, "to": principal}), without a dict
                    data_json = f'{{"conv":{_json_str(conv)},"seq":{seq},"to":{to_json}}}'
                    self.data_event_rows.append((sender, n, op.now, "delivered", data_json))
                    events.append(MailboxEvent(sender, n, None, _data_event_wire(n, "delivered", now_json, data_json),
                                               "delivered"))
        return new_cursor, events

    # ---- writing back --------------------------------------------------------------
    def _write(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self.conn.executemany(statement, rows)

    def _write_chunks(self, table: _Rows, rows: list[tuple[Any, ...]]) -> None:
        # executemany steps once per row, and sqlite3 releases the GIL around every
        # step: with the event loop busy, each row then waits for the GIL to come
        # back (measured: 1.4 s of 2.1 s in executemany waiting). A multi-row
        # statement steps once per chunk.
        # SQLite before 3.32 allows 999 parameters per statement, later ones 32766
        most = self.conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // table.width
        start, left = 0, len(rows)
        while left:
            size = next(c for c in _CHUNKS if c <= left and c <= most)
            chunk = rows[start:start + size]
            self.conn.execute(table.texts[size], tuple(chain.from_iterable(chunk)))
            start += size
            left -= size

    def write_rows(self) -> None:
        self._write_chunks(_INSERT_MESSAGES, self.msg_rows)
        self.msg_rows = []
        self._write_chunks(_INSERT_MSG_EVENTS, self.msg_event_rows)
        self.msg_event_rows = []
        self._write_chunks(_INSERT_DATA_EVENTS, self.data_event_rows)
        self.data_event_rows = []

    def write_all(self) -> None:
        self._write(_INSERT_CONV, [(conv, c.created_by, c.created_at, c.last_seq, c.last_ts, c.activity)
                                   for conv, c in self.convs.items() if c is not None and c.new])
        self._write(_INSERT_MEMBER, self.joins)
        self._write_chunks(_UPDATE_CONVS, [(conv, c.last_seq, c.last_ts, c.activity)
                                           for conv, c in self.convs.items() if c is not None and c.dirty and not c.new])
        self.write_rows()
        self._write_chunks(_UPSERT_BOXES, [(p, b[0], b[1]) for p, b in self.boxes.items() if b[2]])
        self._write_chunks(_UPDATE_UNREADS, [(k[0], k[1], self.unread[k]) for k in self.unread_dirty])
        self._write_chunks(_UPSERT_CURSORS, [(cid, cur[0], cur[1]) for cid, cur in self.cursors.items() if cur[2]])
