"""SQLite implementation of SocialStore: contacts, pending requests, blocks.

Each change and the `contact` events announcing it to both sides are written in
one job, so nobody is ever told about a change that did not commit.

Contact requests are the one way a stranger reaches someone's mailbox, so each
new one is logged (`contact_request_log`) and bounded in the same job: one per
(requester, target) per cool-down, and a budget per target per hour.
"""

from __future__ import annotations

import sqlite3

from broker.store.base import ContactRequest, MailboxEvent, RequestLimits, SocialState
from broker.store.sqlite_db import Database, Migration
from broker.store.sqlite_messaging import append_event, recount_from

MIGRATIONS: list[Migration] = [
    ("0110_social", """
        CREATE TABLE contacts (
            a TEXT NOT NULL,
            b TEXT NOT NULL,
            since REAL NOT NULL,
            PRIMARY KEY (a, b),
            CHECK (a < b)
        ) WITHOUT ROWID;
        CREATE INDEX contacts_b ON contacts(b);
        CREATE TABLE contact_requests (
            sender TEXT NOT NULL,
            recipient TEXT NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            ts REAL NOT NULL,
            PRIMARY KEY (sender, recipient)
        ) WITHOUT ROWID;
        CREATE INDEX contact_requests_recipient ON contact_requests(recipient);
        CREATE TABLE blocks (
            blocker TEXT NOT NULL,
            blocked TEXT NOT NULL,
            ts REAL NOT NULL,
            PRIMARY KEY (blocker, blocked)
        ) WITHOUT ROWID;
    """),
    # Per-member unread counter (sqlite_messaging keeps it on send, read and joins),
    # so a send costs O(1) per recipient however much its recipients never read (devices).
    # Here rather than with messaging's migrations: the backfill needs `blocks`.
    ("0111_unread_counter", """
        ALTER TABLE conv_members ADD COLUMN unread INTEGER NOT NULL DEFAULT 0;
        UPDATE conv_members SET unread = (
            SELECT COUNT(*) FROM messages m
            WHERE m.conv = conv_members.conv AND m.seq > conv_members.read_seq
              AND m.sender != conv_members.principal
              AND m.sender NOT IN (SELECT blocked FROM blocks WHERE blocker = conv_members.principal));
    """),
    # One row per new contact request (the ones that made a `request` event), kept
    # for the cool-down and the budget's hour; older rows of a target go when it
    # is asked next. Rows per target stay within its budget.
    ("0112_contact_request_log", """
        CREATE TABLE contact_request_log (
            recipient TEXT NOT NULL,
            sender TEXT NOT NULL,
            ts REAL NOT NULL
        );
        CREATE INDEX contact_request_log_pair ON contact_request_log(recipient, sender, ts);
    """),
]

BUDGET_WINDOW = 3600.0   # seconds: contact_requests_per_hour counts this far back
_NO_LIMITS = RequestLimits()


def _pair(x: str, y: str) -> tuple[str, str]:
    return (x, y) if x < y else (y, x)


def _contact_event(conn: sqlite3.Connection, to: str, event: str, other: str, by: str, now: float,
                   note: str | None = None) -> MailboxEvent:
    return append_event(conn, to, "contact", now, {"event": event, "with": other, "note": note, "by": by})


def _both(conn: sqlite3.Connection, x: str, y: str, event: str, by: str, now: float,
          note: str | None = None) -> list[MailboxEvent]:
    return [_contact_event(conn, x, event, y, by, now, note), _contact_event(conn, y, event, x, by, now, note)]


def _is_contact(conn: sqlite3.Connection, x: str, y: str) -> bool:
    return conn.execute("SELECT 1 FROM contacts WHERE a=? AND b=?", _pair(x, y)).fetchone() is not None


def _take_request(conn: sqlite3.Connection, sender: str, recipient: str) -> bool:
    return conn.execute("DELETE FROM contact_requests WHERE sender=? AND recipient=?",
                        (sender, recipient)).rowcount > 0


def _request_refusal(conn: sqlite3.Connection, sender: str, to: str, now: float,
                     limits: RequestLimits) -> str | None:
    """'too_soon' / 'too_many' when a new request from sender to `to` is over its
    bounds, else None (and the request is logged: the caller creates it)."""
    keep = max(limits.cooldown, BUDGET_WINDOW)
    conn.execute("DELETE FROM contact_request_log WHERE recipient=? AND ts<?", (to, now - keep))
    if limits.cooldown > 0:
        last = conn.execute("SELECT MAX(ts) FROM contact_request_log WHERE recipient=? AND sender=?",
                            (to, sender)).fetchone()[0]
        if last is not None and now - last < limits.cooldown:
            return "too_soon"
    if limits.per_target_hour > 0:
        recent = conn.execute("SELECT COUNT(*) FROM contact_request_log WHERE recipient=? AND ts>=?",
                              (to, now - BUDGET_WINDOW)).fetchone()[0]
        if recent >= limits.per_target_hour:
            return "too_many"
    conn.execute("INSERT INTO contact_request_log(recipient, sender, ts) VALUES (?,?,?)", (to, sender, now))
    return None


class SqliteSocialStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def load(self) -> SocialState:
        def job(conn: sqlite3.Connection) -> SocialState:
            return SocialState(
                contacts=[(a, b) for a, b in conn.execute("SELECT a, b FROM contacts")],
                requests=[ContactRequest(*r) for r in conn.execute(
                    "SELECT sender, recipient, note, ts FROM contact_requests ORDER BY ts")],
                blocks=[(a, b) for a, b in conn.execute("SELECT blocker, blocked FROM blocks")],
            )

        return await self._db.read(job)

    async def pending(self, me: str) -> tuple[list[ContactRequest], list[ContactRequest]]:
        """(requests to me, requests from me), oldest first."""

        def job(conn: sqlite3.Connection) -> tuple[list[ContactRequest], list[ContactRequest]]:
            cols = "SELECT sender, recipient, note, ts FROM contact_requests "
            return ([ContactRequest(*r) for r in conn.execute(cols + "WHERE recipient=? ORDER BY ts", (me,))],
                    [ContactRequest(*r) for r in conn.execute(cols + "WHERE sender=? ORDER BY ts", (me,))])

        return await self._db.read(job)

    async def request(self, sender: str, to: str, note: str, now: float,
                      limits: RequestLimits = _NO_LIMITS) -> tuple[str, list[MailboxEvent]]:
        """Outcome 'requested', 'pending' (asked already: nothing new), 'accepted'
        (they had asked us), 'contact', or refused by `limits`: 'too_soon' (asked
        this person within the cool-down) / 'too_many' (their hour's budget is spent)."""
        def job(conn: sqlite3.Connection) -> tuple[str, list[MailboxEvent]]:
            if _is_contact(conn, sender, to):
                return "contact", []
            if _take_request(conn, to, sender):
                # They had asked us: asking back is agreeing.
                conn.execute("INSERT INTO contacts(a, b, since) VALUES (?,?,?)", (*_pair(sender, to), now))
                return "accepted", _both(conn, sender, to, "accepted", sender, now)
            exists = conn.execute("SELECT 1 FROM contact_requests WHERE sender=? AND recipient=?",
                                  (sender, to)).fetchone()
            if exists:
                return "pending", []
            refusal = _request_refusal(conn, sender, to, now, limits)
            if refusal is not None:
                return refusal, []
            conn.execute("INSERT INTO contact_requests(sender, recipient, note, ts) VALUES (?,?,?,?)",
                         (sender, to, note, now))
            return "requested", _both(conn, sender, to, "request", sender, now, note)

        return await self._db.write(job)

    async def respond(self, me: str, sender: str, accept: bool, now: float) -> list[MailboxEvent]:
        def job(conn: sqlite3.Connection) -> list[MailboxEvent]:
            if not _take_request(conn, sender, me):
                raise KeyError(sender)
            if not accept:
                return _both(conn, me, sender, "rejected", me, now)
            conn.execute("INSERT OR IGNORE INTO contacts(a, b, since) VALUES (?,?,?)", (*_pair(me, sender), now))
            return _both(conn, me, sender, "accepted", me, now)

        return await self._db.write(job)

    async def remove(self, me: str, other: str, now: float) -> list[MailboxEvent]:
        def job(conn: sqlite3.Connection) -> list[MailboxEvent]:
            gone = conn.execute("DELETE FROM contacts WHERE a=? AND b=?", _pair(me, other)).rowcount > 0
            gone = _take_request(conn, me, other) or gone
            gone = _take_request(conn, other, me) or gone
            if not gone:
                raise KeyError(other)
            return _both(conn, me, other, "removed", me, now)

        return await self._db.write(job)

    async def block(self, me: str, other: str, now: float) -> tuple[bool, list[MailboxEvent]]:
        def job(conn: sqlite3.Connection) -> tuple[bool, list[MailboxEvent]]:
            was_contact = conn.execute("DELETE FROM contacts WHERE a=? AND b=?", _pair(me, other)).rowcount > 0
            mine_withdrawn = _take_request(conn, me, other)
            _take_request(conn, other, me)  # their pending request just never gets an answer
            conn.execute("INSERT OR IGNORE INTO blocks(blocker, blocked, ts) VALUES (?,?,?)", (me, other, now))
            events = [_contact_event(conn, me, "blocked", other, me, now)]
            if was_contact or mine_withdrawn:
                # What the blocked side sees is an ordinary removal, nothing more.
                events.append(_contact_event(conn, other, "removed", me, me, now))
            # Unread counts leave out the messages of those you block.
            events += recount_from(conn, me, other, now)
            return was_contact, events

        return await self._db.write(job)

    async def unblock(self, me: str, other: str, now: float) -> list[MailboxEvent]:
        def job(conn: sqlite3.Connection) -> list[MailboxEvent]:
            if conn.execute("DELETE FROM blocks WHERE blocker=? AND blocked=?", (me, other)).rowcount == 0:
                raise KeyError(other)
            return [_contact_event(conn, me, "unblocked", other, me, now), *recount_from(conn, me, other, now)]

        return await self._db.write(job)

    async def forget_principal(self, principal: str) -> None:
        """A principal was removed: its contacts, requests and blocks go with it."""
        await self._db.write(lambda conn: purge_principal(conn, principal))

    async def purge_orphans(self, limit: int) -> list[str]:
        """One bounded round: forget up to `limit` ids that have rows here but are no
        longer registered principals (removed while no broker was running)."""

        def job(conn: sqlite3.Connection) -> list[str]:
            found = orphans(conn, limit)
            for p in found:
                purge_principal(conn, p)
            return found

        return await self._db.write(job)


def purge_principal(conn: sqlite3.Connection, principal: str) -> None:
    """Forget `principal`'s contacts, requests and blocks (writer thread). Also run
    when an id is registered, so a new owner never inherits an old one's."""
    conn.execute("DELETE FROM contacts WHERE a=? OR b=?", (principal, principal))
    conn.execute("DELETE FROM contact_requests WHERE sender=? OR recipient=?", (principal, principal))
    conn.execute("DELETE FROM blocks WHERE blocker=? OR blocked=?", (principal, principal))
    conn.execute("DELETE FROM contact_request_log WHERE recipient=? OR sender=?", (principal, principal))


_PRINCIPAL_COLUMNS = (("contacts", "a"), ("contacts", "b"), ("contact_requests", "sender"),
                      ("contact_requests", "recipient"), ("blocks", "blocker"), ("blocks", "blocked"),
                      ("contact_request_log", "recipient"), ("contact_request_log", "sender"))


def orphans(conn: sqlite3.Connection, limit: int) -> list[str]:
    """Up to `limit` ids that have rows here but are not registered principals."""
    union = " UNION ".join(f"SELECT {col} AS p FROM {table}" for table, col in _PRINCIPAL_COLUMNS)
    return [r[0] for r in conn.execute(
        f"SELECT p FROM ({union}) WHERE p NOT IN (SELECT id FROM principals) LIMIT ?", (limit,))]
