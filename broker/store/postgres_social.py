"""PostgreSQL implementation of SocialStore: contacts, pending requests, blocks.

Each change and the `contact` events announcing it to both sides are written in
one transaction, so nobody is ever told about a change that did not commit.
Every change between two principals first locks both mailboxes (in principal
order, as every transaction of the store does): two changes of one pair, on
any nodes, run one after the other (asking each other at the same time is one
request and its acceptance, never two requests), and a target's request budget
is checked by one requester at a time.

Contact requests are the one way a stranger reaches someone's mailbox, so each
new one is logged (`contact_request_log`) and bounded in the same transaction:
one per (requester, target) per cool-down, and a budget per target per hour.
"""

from __future__ import annotations

from typing import Any

from asyncpg import Connection

from broker.store.base import ContactRequest, MailboxEvent, RequestLimits, SocialState
from broker.store.postgres_db import PgDatabase
from broker.store.postgres_messaging import Boxes, lock_recount_candidates, orphans, recount

BUDGET_WINDOW = 3600.0   # seconds: contact_requests_per_hour counts this far back
_NO_LIMITS = RequestLimits()
_REQUEST_COLUMNS = "SELECT sender, recipient, note, ts FROM contact_requests "


def _pair(x: str, y: str) -> tuple[str, str]:
    return (x, y) if x < y else (y, x)


def _contact_event(boxes: Boxes, to: str, event: str, other: str, by: str, now: float,
                   note: str | None = None) -> MailboxEvent:
    return boxes.add(to, "contact", now, {"event": event, "with": other, "note": note, "by": by})


def _both(boxes: Boxes, x: str, y: str, event: str, by: str, now: float, note: str | None = None) -> list[MailboxEvent]:
    return [_contact_event(boxes, x, event, y, by, now, note), _contact_event(boxes, y, event, x, by, now, note)]


async def _locked(conn: Connection, *principals: str) -> Boxes:
    boxes = Boxes(conn)
    await boxes.lock(principals)
    return boxes


async def _is_contact(conn: Connection, x: str, y: str) -> bool:
    return await conn.fetchval("SELECT 1 FROM contacts WHERE a=$1 AND b=$2", *_pair(x, y)) is not None


async def _take_request(conn: Connection, sender: str, recipient: str) -> bool:
    return await conn.fetchval("DELETE FROM contact_requests WHERE sender=$1 AND recipient=$2 RETURNING 1",
                               sender, recipient) is not None


async def _delete_contact(conn: Connection, x: str, y: str) -> bool:
    return await conn.fetchval("DELETE FROM contacts WHERE a=$1 AND b=$2 RETURNING 1", *_pair(x, y)) is not None


def _request(r: Any) -> ContactRequest:
    return ContactRequest(r[0], r[1], r[2], float(r[3]))


async def _request_refusal(conn: Connection, sender: str, to: str, now: float, limits: RequestLimits) -> str | None:
    """'too_soon' / 'too_many' when a new request from sender to `to` is over its
    bounds, else None (and the request is logged: the caller creates it)."""
    keep = max(limits.cooldown, BUDGET_WINDOW)
    await conn.execute("DELETE FROM contact_request_log WHERE recipient=$1 AND ts<$2", to, now - keep)
    if limits.cooldown > 0:
        last = await conn.fetchval("SELECT max(ts) FROM contact_request_log WHERE recipient=$1 AND sender=$2",
                                   to, sender)
        if last is not None and now - float(last) < limits.cooldown:
            return "too_soon"
    if limits.per_target_hour > 0:
        recent = await conn.fetchval("SELECT count(*) FROM contact_request_log WHERE recipient=$1 AND ts>=$2",
                                     to, now - BUDGET_WINDOW)
        if int(recent) >= limits.per_target_hour:
            return "too_many"
    await conn.execute("INSERT INTO contact_request_log(recipient, sender, ts) VALUES ($1,$2,$3)", to, sender, now)
    return None


class PgSocialStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def load(self) -> SocialState:
        async def job(conn: Connection) -> SocialState:
            return SocialState(
                contacts=[(r[0], r[1]) for r in await conn.fetch("SELECT a, b FROM contacts ORDER BY a, b")],
                requests=[_request(r) for r in await conn.fetch(_REQUEST_COLUMNS + "ORDER BY ts, sender, recipient")],
                blocks=[(r[0], r[1]) for r in await conn.fetch(
                    "SELECT blocker, blocked FROM blocks ORDER BY blocker, blocked")],
            )

        return await self._db.read(job, snapshot=True)

    async def pending(self, me: str) -> tuple[list[ContactRequest], list[ContactRequest]]:
        """(requests to me, requests from me), oldest first."""

        async def job(conn: Connection) -> tuple[list[ContactRequest], list[ContactRequest]]:
            return ([_request(r) for r in await conn.fetch(_REQUEST_COLUMNS + "WHERE recipient=$1 ORDER BY ts", me)],
                    [_request(r) for r in await conn.fetch(_REQUEST_COLUMNS + "WHERE sender=$1 ORDER BY ts", me)])

        return await self._db.read(job, snapshot=True)

    async def request(self, sender: str, to: str, note: str, now: float,
                      limits: RequestLimits = _NO_LIMITS) -> tuple[str, list[MailboxEvent]]:
        """Outcome 'requested', 'pending' (asked already: nothing new), 'accepted'
        (they had asked us), 'contact', or refused by `limits`: 'too_soon' (asked
        this person within the cool-down) / 'too_many' (their hour's budget is spent)."""

        async def job(conn: Connection) -> tuple[str, list[MailboxEvent]]:
            boxes = await _locked(conn, sender, to)
            if await _is_contact(conn, sender, to):
                return "contact", []
            if await _take_request(conn, to, sender):
                # They had asked us: asking back is agreeing.
                await conn.execute("INSERT INTO contacts(a, b, since) VALUES ($1,$2,$3)", *_pair(sender, to), now)
                events = _both(boxes, sender, to, "accepted", sender, now)
                await boxes.flush()
                return "accepted", events
            if await conn.fetchval("SELECT 1 FROM contact_requests WHERE sender=$1 AND recipient=$2", sender, to):
                return "pending", []
            refusal = await _request_refusal(conn, sender, to, now, limits)
            if refusal is not None:
                return refusal, []
            await conn.execute("INSERT INTO contact_requests(sender, recipient, note, ts) VALUES ($1,$2,$3,$4)",
                               sender, to, note, now)
            events = _both(boxes, sender, to, "request", sender, now, note)
            await boxes.flush()
            return "requested", events

        return await self._db.write(job)

    async def respond(self, me: str, sender: str, accept: bool, now: float) -> list[MailboxEvent]:
        async def job(conn: Connection) -> list[MailboxEvent]:
            boxes = await _locked(conn, me, sender)
            if not await _take_request(conn, sender, me):
                raise KeyError(sender)
            if accept:
                await conn.execute("INSERT INTO contacts(a, b, since) VALUES ($1,$2,$3) ON CONFLICT DO NOTHING",
                                   *_pair(me, sender), now)
            events = _both(boxes, me, sender, "accepted" if accept else "rejected", me, now)
            await boxes.flush()
            return events

        return await self._db.write(job)

    async def remove(self, me: str, other: str, now: float) -> list[MailboxEvent]:
        async def job(conn: Connection) -> list[MailboxEvent]:
            boxes = await _locked(conn, me, other)
            gone = await _delete_contact(conn, me, other)
            gone = await _take_request(conn, me, other) or gone
            gone = await _take_request(conn, other, me) or gone
            if not gone:
                raise KeyError(other)
            events = _both(boxes, me, other, "removed", me, now)
            await boxes.flush()
            return events

        return await self._db.write(job)

    async def block(self, me: str, other: str, now: float) -> tuple[bool, list[MailboxEvent]]:
        async def job(conn: Connection) -> tuple[bool, list[MailboxEvent]]:
            convs = await lock_recount_candidates(conn, me, other)   # conversations before mailboxes
            boxes = await _locked(conn, me, other)
            was_contact = await _delete_contact(conn, me, other)
            mine_withdrawn = await _take_request(conn, me, other)
            await _take_request(conn, other, me)   # their pending request just never gets an answer
            await conn.execute("INSERT INTO blocks(blocker, blocked, ts) VALUES ($1,$2,$3) ON CONFLICT DO NOTHING",
                               me, other, now)
            events = [_contact_event(boxes, me, "blocked", other, me, now)]
            if was_contact or mine_withdrawn:
                # What the blocked side sees is an ordinary removal, nothing more.
                events.append(_contact_event(boxes, other, "removed", me, me, now))
            # Unread counts leave out the messages of those you block.
            events += await recount(conn, boxes, me, convs, now)
            await boxes.flush()
            return was_contact, events

        return await self._db.write(job)

    async def unblock(self, me: str, other: str, now: float) -> list[MailboxEvent]:
        async def job(conn: Connection) -> list[MailboxEvent]:
            convs = await lock_recount_candidates(conn, me, other)
            boxes = await _locked(conn, me)
            if await conn.fetchval("DELETE FROM blocks WHERE blocker=$1 AND blocked=$2 RETURNING 1", me, other) is None:
                raise KeyError(other)
            events = [_contact_event(boxes, me, "unblocked", other, me, now), *await recount(conn, boxes, me, convs, now)]
            await boxes.flush()
            return events

        return await self._db.write(job)

    async def forget_principal(self, principal: str) -> None:
        """A principal was removed: its contacts, requests and blocks go with it."""
        await self._db.write(lambda conn: purge_principal(conn, principal))

    async def purge_orphans(self, limit: int) -> list[str]:
        """One bounded round: forget up to `limit` ids that have rows here but are no
        longer registered principals (removed while no broker was running)."""

        async def job(conn: Connection) -> list[str]:
            found = await orphans(conn, limit, _PRINCIPAL_COLUMNS)
            for p in found:
                await purge_principal(conn, p)
            return found

        return await self._db.write(job)


async def purge_principal(conn: Connection, principal: str) -> None:
    """Forget `principal`'s contacts, requests and blocks (in the caller's
    transaction). Also run when an id is registered, so a new owner never
    inherits an old one's."""
    await conn.execute("DELETE FROM contacts WHERE a=$1 OR b=$1", principal)
    await conn.execute("DELETE FROM contact_requests WHERE sender=$1 OR recipient=$1", principal)
    await conn.execute("DELETE FROM blocks WHERE blocker=$1 OR blocked=$1", principal)
    await conn.execute("DELETE FROM contact_request_log WHERE recipient=$1 OR sender=$1", principal)


_PRINCIPAL_COLUMNS = (("contacts", "a"), ("contacts", "b"), ("contact_requests", "sender"),
                      ("contact_requests", "recipient"), ("blocks", "blocker"), ("blocks", "blocked"),
                      ("contact_request_log", "recipient"), ("contact_request_log", "sender"))
