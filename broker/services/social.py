"""Social layer: contacts, blocking, profiles and search (PROTOCOL.md, issue 4).

Contacts are between people (kind `user`); devices are linked by ownership and
shares (DeviceService). A block is private: the blocked principal's requests and
messages are refused with `forbidden` exactly as a stranger's, and what it sees
of the block is at most an ordinary `removed`.

After every committed change its event (ContactChanged, BlockChanged) goes on
the bus, and this service's handler of it updates the in-memory `Relations`
index and blocks and refreshes the ACL cache, on this node and on every other
node of a cluster: presence visibility follows contacts at once, everywhere.

Contact requests are what a stranger can put into someone's mailbox (groups and
device shares need a contact first), so they are bounded: asking again while a
request is pending adds nothing, a requester may make a new request to the same
person once per `limits.contact_request_cooldown`, and a person receives at most
`limits.contact_requests_per_hour` new requests (`rate_limited` beyond both).

When a contact ends, the device shares between the two end with it. If the
store cannot write at that moment the request is answered `unavailable` (the
contact change itself committed) and the shares are ended in the background as
soon as the store writes again: an ex-contact never keeps someone's devices.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from broker.services.base import (
    Caller,
    Handler,
    Publisher,
    bad,
    cancel_and_wait,
    param_str,
)
from broker.services.events import BlockChanged, ContactChanged, MailboxAppended, PrincipalRemoved, ProfileChanged
from broker.services.inbox import describe_failure
from broker.services.telemetry_influx import RateLimitedLog
from broker.store.base import MailboxEvent, Principal, RequestLimits
from contract.errors import ErrorCode, ProtocolError
from contract.ids import is_valid_principal_id
from contract.ops import MAX_NOTE, MAX_PROFILE_NAME, MAX_QUERY, MAX_STATUS
from contract.presence import never_seen

if TYPE_CHECKING:
    from broker.config import LimitsConfig
    from broker.services.runtime import Services

log = logging.getLogger("roost.social")

SEARCH_LIMIT = 50
SHARES_RETRY = 1.0   # seconds between attempts to end the shares of an ended contact


def forbidden(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, message)


def not_found(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.NOT_FOUND, message)


def _span(seconds: float) -> str:
    """3600 -> '1 h', 600 -> '10 min', 45 -> '45 s' (for one-line messages)."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


def _principal_param(params: dict[str, Any], name: str) -> str:
    value = param_str(params, name, max_len=64)
    if not is_valid_principal_id(value):
        raise bad(f"'{name}' must be a principal id")
    return value  # type: ignore[return-value]


class SocialService:
    def __init__(self, services: Services) -> None:
        self._services = services
        self._store = services.store.social
        self._clock = services.clock      # request times, cooldowns (tests inject one)
        self._bus = services.bus
        self._bus.subscribe(PrincipalRemoved, self._principal_removed)
        # Applied here for changes made on this node and on every other (events.py)
        self._bus.subscribe(ContactChanged, self._apply_contact)
        self._bus.subscribe(BlockChanged, self._apply_block)
        self._bus.subscribe(ProfileChanged, lambda e: self._services.identity.profile_changed(e.principal, e.name,
                                                                                               e.status))
        self._publisher: Publisher | None = None
        self._blocked: dict[str, set[str]] = {}     # blocker -> blocked
        self._blocked_by: dict[str, set[str]] = {}  # blocked -> blockers
        self._unended: set[tuple[str, str]] = set()  # ended contacts whose shares the store refused to end
        self._unended_task: asyncio.Task[None] | None = None

    def _now(self) -> float:
        return round(self._clock(), 3)

    # ---- lifecycle -------------------------------------------------------------
    purge_batch = 50   # principals whose leftovers one load() round forgets

    async def load(self) -> None:
        # Contacts, requests and blocks of principals removed while no broker ran.
        while purged := await self._store.purge_orphans(self.purge_batch):
            log.info("forgot the contacts and blocks of %d removed principal(s)", len(purged))
        state = await self._store.load()
        rel = self._services.relations
        known = self._services.identity.get_cached
        for a, b in state.contacts:
            if known(a) is not None and known(b) is not None:  # not one removed while we were down
                rel.set_contact(a, b, True)
        self._blocked, self._blocked_by = {}, {}
        for blocker, blocked in state.blocks:
            self._remember_block(blocker, blocked)

    async def start(self, publisher: Publisher) -> None:
        self._publisher = publisher

    async def stop(self) -> None:
        await cancel_and_wait(self._unended_task)
        self._unended_task = None

    def ops(self) -> dict[str, Handler]:
        return {
            "contact.request": self.op_request,
            "contact.accept": self.op_accept,
            "contact.reject": self.op_reject,
            "contact.remove": self.op_remove,
            "contact.block": self.op_block,
            "contact.unblock": self.op_unblock,
            "contacts": self.op_contacts,
            "user.search": self.op_search,
            "profile.get": self.op_profile_get,
            "profile.set": self.op_profile_set,
        }

    # ---- queries other services use ------------------------------------------
    def is_blocked(self, blocker: str, blocked: str) -> bool:
        return blocked in self._blocked.get(blocker, ())

    def blockers_of(self, principal: str) -> set[str]:
        """Who blocked `principal` (their mailboxes get nothing from it, groups included)."""
        return set(self._blocked_by.get(principal, ()))

    def _remember_block(self, blocker: str, blocked: str) -> None:
        self._blocked.setdefault(blocker, set()).add(blocked)
        self._blocked_by.setdefault(blocked, set()).add(blocker)

    def _forget_block(self, blocker: str, blocked: str) -> None:
        for index, key, value in ((self._blocked, blocker, blocked), (self._blocked_by, blocked, blocker)):
            entries = index.get(key)
            if entries is not None:
                entries.discard(value)
                if not entries:
                    del index[key]

    async def _principal_removed(self, event: PrincipalRemoved) -> None:
        await self.principal_removed(event.principal)

    async def principal_removed(self, principal: str) -> None:
        """An admin removed `principal`: forget its contacts, requests and blocks."""
        await self._store.forget_principal(principal)
        for blocked in list(self._blocked.get(principal, ())):
            self._forget_block(principal, blocked)
        for blocker in list(self._blocked_by.get(principal, ())):
            self._forget_block(blocker, principal)
        for other in self._services.relations.contacts_of(principal):
            self._contact_changed(principal, other, False)

    # ---- helpers -----------------------------------------------------------------
    async def _published(self, events: list[MailboxEvent]) -> None:
        """Committed mailbox events (requests, acceptances, removals) go on the bus."""
        if events:
            await self._bus.publish(MailboxAppended(tuple(events)))

    def _contact_changed(self, a: str, b: str, accepted: bool) -> None:
        self._bus.publish_nowait(ContactChanged(a, b, accepted))

    def _apply_contact(self, event: ContactChanged) -> None:
        self._services.relations.set_contact(event.a, event.b, event.accepted)
        if self._publisher is not None:
            self._publisher.refresh_acl()

    def _apply_block(self, event: BlockChanged) -> None:
        if event.blocked:
            self._remember_block(event.blocker, event.target)
        else:
            self._forget_block(event.blocker, event.target)

    @staticmethod
    def _require_person(caller: Caller) -> None:
        if caller.kind != "user":
            raise forbidden("contacts are between people; devices are linked by ownership")

    async def _person(self, principal_id: str) -> Principal:
        """A user by id; devices and services are reported as unknown (nothing leaks)."""
        p = await self._services.identity.get(principal_id)
        if p is None or p.kind != "user":
            raise not_found(f"no user {principal_id!r}")
        return p

    # ---- contacts ----------------------------------------------------------------
    def _limits(self) -> LimitsConfig:
        return self._services.config.limits

    def _request_limits(self) -> RequestLimits:
        limits = self._limits()
        return RequestLimits(cooldown=float(limits.contact_request_cooldown),
                             per_target_hour=int(limits.contact_requests_per_hour))

    async def op_request(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        self._require_person(caller)
        to = _principal_param(params, "to")
        note = param_str(params, "note", required=False, max_len=MAX_NOTE) or ""
        if to == caller.principal:
            raise bad("you cannot add yourself")
        await self._person(to)
        if self.is_blocked(to, caller.principal):
            # Word for word what a stranger gets for something it may not do.
            raise forbidden(f"you may not send a contact request to {to!r}")
        if self.is_blocked(caller.principal, to):
            raise ProtocolError(ErrorCode.CONFLICT, f"you blocked {to!r}: unblock first")
        outcome, events = await self._store.request(caller.principal, to, note, self._now(), self._request_limits())
        if outcome == "contact":
            raise ProtocolError(ErrorCode.CONFLICT, f"{to!r} is already a contact")
        if outcome == "too_soon":
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"you asked {to!r} less than {_span(self._limits().contact_request_cooldown)} ago; "
                                "try again later")
        if outcome == "too_many":
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"{to!r} received too many contact requests in the last hour; try again later")
        await self._published(events)
        if outcome == "accepted":
            self._contact_changed(caller.principal, to, True)
        return {"state": outcome}

    async def _respond(self, caller: Caller, params: dict[str, Any], accept: bool) -> dict[str, Any]:
        self._require_person(caller)
        sender = _principal_param(params, "from")
        try:
            events = await self._store.respond(caller.principal, sender, accept, self._now())
        except KeyError:
            raise not_found(f"no pending request from {sender!r}") from None
        await self._published(events)
        if accept:
            self._contact_changed(caller.principal, sender, True)
        return {}

    async def op_accept(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        return await self._respond(caller, params, True)

    async def op_reject(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        return await self._respond(caller, params, False)

    async def op_remove(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        self._require_person(caller)
        other = _principal_param(params, "user")
        try:
            events = await self._store.remove(caller.principal, other, self._now())
        except KeyError:
            raise not_found(f"{other!r} is not a contact and no request is pending") from None
        await self._published(events)
        self._contact_changed(caller.principal, other, False)
        await self._end_shares(caller.principal, other)
        return {}

    async def _end_shares(self, a: str, b: str) -> None:
        # Called, not left to a bus consumer: a failure must reach this request's
        # answer (`unavailable`) and the retry below.
        devices = self._services.devices
        if devices is None:
            return
        try:
            await devices.contact_ended(a, b)
        except Exception as exc:
            if describe_failure(exc)[1]:
                raise
            # The contact ended (committed); its shares must follow once the store writes.
            self._unended.add((a, b))
            if self._unended_task is None or self._unended_task.done():
                self._unended_task = asyncio.get_running_loop().create_task(self._end_shares_later(),
                                                                            name="social-end-shares")
            raise

    async def _end_shares_later(self) -> None:
        devices = self._services.devices
        assert devices is not None   # only scheduled by _end_shares, which has them
        outage_log = RateLimitedLog(log, interval=60.0)
        while self._unended:
            await asyncio.sleep(SHARES_RETRY)
            for a, b in sorted(self._unended):
                if self._services.relations.are_contacts(a, b):
                    self._unended.discard((a, b))      # contacts again: their shares may stay
                    continue
                try:
                    await devices.contact_ended(a, b)
                except Exception as exc:  # noqa: BLE001 - still refused: next round
                    line, trace = describe_failure(exc)
                    if trace:
                        log.warning("ending the device shares of %s and %s failed; retrying", a, b, exc_info=exc)
                    else:
                        outage_log.warning("ending the device shares of %s and %s failed (%s); retrying",
                                           a, b, line)
                    break
                self._unended.discard((a, b))
                log.info("device shares of %s and %s ended after a store outage", a, b)

    async def op_block(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        self._require_person(caller)
        other = _principal_param(params, "user")
        if other == caller.principal:
            raise bad("you cannot block yourself")
        await self._person(other)     # people only, and a device or service's existence does not leak
        if self.is_blocked(caller.principal, other):
            return {}
        was_contact, events = await self._store.block(caller.principal, other, self._now())
        self._bus.publish_nowait(BlockChanged(caller.principal, other, True))
        await self._published(events)
        if was_contact:
            self._contact_changed(caller.principal, other, False)
        await self._end_shares(caller.principal, other)
        return {}

    async def op_unblock(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        self._require_person(caller)
        other = _principal_param(params, "user")
        try:
            events = await self._store.unblock(caller.principal, other, self._now())
        except KeyError:
            raise not_found(f"{other!r} is not blocked") from None
        self._bus.publish_nowait(BlockChanged(caller.principal, other, False))
        await self._published(events)
        return {}

    async def op_contacts(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        contacts = []
        for pid in sorted(self._services.relations.contacts_of(caller.principal)):
            p = await self._services.identity.get(pid)
            if p is None:
                continue
            contacts.append({"id": p.id, "kind": p.kind, "name": p.name, "presence": self._presence(pid)})
        incoming, outgoing = await self._store.pending(caller.principal)
        return {
            "contacts": contacts,
            "incoming": [{"from": r.sender, "note": r.note, "ts": r.ts} for r in incoming],
            "outgoing": [{"to": r.to, "note": r.note, "ts": r.ts} for r in outgoing],
            "blocked": sorted(self._blocked.get(caller.principal, ())),
        }

    def _presence(self, principal_id: str) -> dict[str, Any]:
        """The contact's presence as on roost/presence/<id>; never seen online: offline."""
        presence = self._services.presence
        state = None
        if presence is not None:
            try:
                state = presence.current(principal_id)
            except Exception:  # noqa: BLE001 - a presence problem must not fail the contact list
                log.warning("presence of %s unavailable", principal_id, exc_info=True)
        return state if state is not None else never_seen()

    # ---- search and profiles -------------------------------------------------------
    async def op_search(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        q = param_str(params, "q", max_len=MAX_QUERY)
        if not q or not q.strip():
            raise bad("'q' must not be empty")
        found: dict[str, Principal] = {p.id: p for p in await self._services.identity.search_users(q, SEARCH_LIMIT)}
        # Devices (and the like) appear only for those who may use them.
        ql = q.lower()
        for pid in self._services.relations.devices_of(caller.principal):
            p = await self._services.identity.get(pid)
            if p is not None and (p.id == q or (len(q) >= 2 and p.name.lower().startswith(ql))):
                found[p.id] = p
        users = [{"id": p.id, "kind": p.kind, "name": p.name} for p in sorted(found.values(), key=lambda p: p.id)]
        return {"users": users[:SEARCH_LIMIT]}

    def _may_see_profile(self, viewer: str, target: Principal) -> bool:
        rel = self._services.relations
        if viewer == target.id or rel.are_contacts(viewer, target.id) or rel.share_group(viewer, target.id):
            return True
        if rel.may_use_device(viewer, target.id) or rel.may_use_device(target.id, viewer):
            return True
        return (rel.integration_account is not None and viewer == rel.integration_account
                and target.kind == "device" and bool(rel.device_users(target.id)))

    @staticmethod
    def _profile(p: Principal) -> dict[str, Any]:
        return {"user": p.id, "kind": p.kind, "name": p.name, "status": p.status}

    async def op_profile_get(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        target_id = params.get("user", caller.principal)
        if not is_valid_principal_id(target_id):
            raise bad("'user' must be a principal id")
        p = await self._services.identity.get(target_id)
        if p is not None and self._may_see_profile(caller.principal, p):
            return self._profile(p)
        if p is not None and p.kind == "user":
            raise forbidden("you may see the profile of contacts, group co-members and your devices only")
        raise not_found(f"no principal {target_id!r}")

    async def op_profile_set(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        name = param_str(params, "name", required=False, max_len=MAX_PROFILE_NAME)
        status = param_str(params, "status", required=False, max_len=MAX_STATUS)
        if name is None and status is None:
            raise bad("give 'name' and/or 'status'")
        if name is not None and not name.strip():
            raise bad("'name' must not be empty")
        p = await self._services.identity.set_profile(caller.principal, name=name, status=status)
        if p is None:
            raise not_found("your principal no longer exists")
        self._bus.publish_nowait(ProfileChanged(p.id, p.name, p.status))
        return self._profile(p)
