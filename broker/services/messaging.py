"""Messaging: send, sync, ack, read, history, convs and groups (PROTOCOL.md).

Everything a request changes is written by one store job (the message, every
member's mailbox event, receipts), and the response is produced only after that
job committed. Right after the commit the new events are handed to the inbox
pushers (broker/services/inbox.py); a periodic task keeps mailboxes within
mailbox.max_events and mailbox.ttl, announcing every discard with `dropped`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any

from broker.services.base import Caller, Handler, Publisher, bad, param_int, param_str
from broker.services.events import GroupChanged, MailboxAppended, PrincipalRemoved
from broker.services.inbox import Inboxes, describe_failure
from broker.services.telemetry_influx import RateLimitedLog
from broker.store.base import MailboxEvent, NotMember, Principal, StoredMessage
from broker.store.jsonutil import compact_json
from contract.bodies import validate_body
from contract.envelopes import MAX_HISTORY_LIMIT, MAX_SYNC_LIMIT
from contract.errors import ErrorCode, ProtocolError
from contract.ids import dm_conv, group_conv, is_valid_principal_id, parse_conv
from contract.ops import DEFAULT_HISTORY_LIMIT, DEFAULT_SYNC_LIMIT, MAX_CMID_LEN, MAX_GROUP_MEMBERS, MAX_GROUP_NAME, MAX_NUMBER

if TYPE_CHECKING:
    from broker.services.runtime import Services

log = logging.getLogger("roost.messaging")


def forbidden(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, message)


def not_found(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.NOT_FOUND, message)


def _members_param(params: dict[str, Any], *, allow_empty: bool) -> list[str]:
    members = params.get("members", [] if allow_empty else None)
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise bad("'members' must be a list of principal ids")
    if not members and not allow_empty:
        raise bad("'members' must not be empty")
    if len(members) > MAX_GROUP_MEMBERS:
        raise bad(f"at most {MAX_GROUP_MEMBERS} members")
    for m in members:
        if not is_valid_principal_id(m):
            raise bad(f"invalid principal id {m!r}")
    return list(dict.fromkeys(members))


class MessagingService:
    # Seconds between rounds of mailbox bound enforcement; the bounds below keep one round small.
    prune_interval = 1.0
    prune_max_mailboxes = 50
    prune_max_rows = 5000

    def __init__(self, services: Services) -> None:
        self._services = services
        self._config = services.config
        self._clock = services.clock      # message times and mailbox.ttl (tests inject one)
        self._store = services.store.messaging
        self.inboxes = Inboxes(self._store)
        self._publisher: Publisher | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self.discarded = 0
        self._bus = services.bus
        # The pushers are the first to hear of committed mailbox events.
        self._bus.subscribe(MailboxAppended, lambda event: self.inboxes.notify(event.events))
        self._bus.subscribe(PrincipalRemoved, self._principal_removed)
        self._bus.subscribe(GroupChanged, self._apply_group)

    def _now(self) -> float:
        return round(self._clock(), 3)

    # ---- lifecycle -------------------------------------------------------------
    # Principals whose leftovers one load() round forgets (one write job each round).
    purge_batch = 50

    async def load(self) -> None:
        # Principals removed while no broker ran still have mailboxes, cursors and
        # memberships here: forget them now, a bounded batch per transaction.
        while purged := await self._store.purge_orphans(self.purge_batch):
            log.info("forgot the messaging state of %d removed principal(s)", len(purged))
        known = self._services.identity.get_cached
        for conv, members in (await self._store.load_groups()).items():
            # Members removed while the broker was down are not let back into the ACL.
            self._services.relations.set_group(conv[len("grp:"):], {m for m in members if known(m) is not None})

    async def start(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self.inboxes.start(publisher)
        self._prune_task = asyncio.create_task(self._prune_loop(), name="mailbox-prune")

    async def stop(self) -> None:
        if self._prune_task is not None:
            self._prune_task.cancel()
            try:
                await self._prune_task
            except asyncio.CancelledError:
                pass
            self._prune_task = None
        await self.inboxes.stop()

    def ops(self) -> dict[str, Handler]:
        return {
            "send": self.op_send,
            "sync": self.op_sync,
            "ack": self.op_ack,
            "read": self.op_read,
            "history": self.op_history,
            "convs": self.op_convs,
            "group.create": self.op_group_create,
            "group.add": self.op_group_add,
            "group.remove": self.op_group_remove,
            "group.leave": self.op_group_leave,
            "group.info": self.op_group_info,
        }

    async def announce(self, events: list[MailboxEvent]) -> None:
        """Committed events go on the bus (call right after the commit): the inbox
        pushers are offered them before the request that made them is answered."""
        if events:
            await self._bus.publish(MailboxAppended(tuple(events)))

    async def _principal_removed(self, event: PrincipalRemoved) -> None:
        await self.principal_removed(event.principal)

    async def principal_removed(self, principal: str) -> None:
        """An admin removed `principal`: drop its mailbox, cursors and memberships,
        stop its pushers, and update the groups it was in."""
        for client_id in [c for c, p in self.inboxes.clients() if p == principal]:
            await self.inboxes.client_disconnected(client_id, principal, "kicked")
        self.inboxes.forget_principal(principal)
        groups = await self._store.forget_principal(principal)
        for conv in groups:
            info = await self._store.group_info(conv)
            self._groups_changed(conv, info.members if info is not None else [])

    # ---- who may talk to whom --------------------------------------------------
    def _blocked(self, blocker: str, blocked: str) -> bool:
        social = self._services.social
        return bool(social is not None and social.is_blocked(blocker, blocked))

    async def dm_allowed(self, a: str, b: str) -> bool:
        """May principals a and b exchange direct messages (PROTOCOL.md, Conversation ids)."""
        if self._blocked(a, b) or self._blocked(b, a):
            return False
        if self._config.messaging.allow_dm_without_contact:
            return True   # what every way below ends in: the relation lookups need not run (one per send)
        rel = self._services.relations
        if rel.are_contacts(a, b) or rel.share_group(a, b):
            return True
        if rel.may_use_device(a, b) or rel.may_use_device(b, a):
            return True
        integration = rel.integration_account
        if integration is not None and integration in (a, b):
            other = b if a == integration else a
            target = await self._services.identity.get(other)
            if target is not None and target.kind == "device":
                return True
        return False

    def _unknown_to(self, viewer: str, target: Principal | None) -> bool:
        """True when `viewer` must be told `target` does not exist: it does not, or
        it is a device or service `viewer` may not know of (people can be found by
        `user.search`, so a person who exists is never hidden)."""
        if target is None:
            return True
        return target.kind != "user" and not self._services.relations.may_know_device(viewer, target.id)

    async def _dm_target(self, caller: Caller, other: str) -> tuple[str, tuple[str, str]]:
        if other == caller.principal:
            raise bad("you cannot message yourself")
        target = await self._services.identity.get(other)
        if target is None:
            raise not_found(f"no principal {other!r}")
        if not await self.dm_allowed(caller.principal, other):
            if self._unknown_to(caller.principal, target):
                # same code and text as an unknown id: `forbidden` would say it exists
                raise not_found(f"no principal {other!r}")
            raise forbidden(f"you may not message {other!r} (contact, group or device share needed)")
        conv = dm_conv(caller.principal, other)
        a, b = sorted((caller.principal, other))
        return conv, (a, b)

    async def _group_member_check(self, conv: str, principal: str) -> None:
        # The in-memory index answers the common case; the store decides the rest
        # (and the writer job checks membership again when it commits a send).
        if principal in self._services.relations.group_members(conv[len("grp:"):]):
            return
        if await self._store.is_member(conv, principal):
            return
        if await self._store.group_info(conv) is None:
            raise not_found(f"no conversation {conv!r}")
        raise forbidden(f"you are not a member of {conv!r}")

    async def _readable_conv(self, caller: Caller, conv_param: Any) -> str:
        """A conversation the caller may read (history, read): its own DMs, its groups."""
        kind, parts = _own_conv(caller, conv_param)   # so a string
        conv = str(conv_param)
        if kind == "dm":
            return conv
        await self._group_member_check(conv, caller.principal)
        return conv

    # ---- send --------------------------------------------------------------------
    async def op_send(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        cmid = param_str(params, "cmid", max_len=MAX_CMID_LEN)
        if not cmid:
            raise bad("'cmid' must not be empty")
        body = validate_body(params.get("body"), self._config.limits.max_body, encode=compact_json)
        to = params.get("to")
        conv_param = params.get("conv")
        if (to is None) == (conv_param is None):
            raise bad("give exactly one of 'to' or 'conv'")
        try:
            conv, dm_members = await self._resolve_send_target(caller, to, conv_param)
        except ProtocolError as err:
            if err.code in (ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND):
                # A retry of a send that was accepted before things changed is still a dup.
                first = await self._store.find_sent(caller.principal, cmid)
                if first is not None:
                    return self._send_result(first, dup=True)
            raise
        if params["body"].get("type") == "file":
            await self._check_file(caller, conv, params["body"])
        try:
            social = self._services.social
            skip = frozenset(social.blockers_of(caller.principal)) if social is not None else frozenset()
            outcome = await self._store.send(sender=caller.principal, conv=conv, dm_members=dm_members,
                                             cmid=cmid, body=body, now=self._now(), skip=skip)
        except NotMember:
            raise forbidden(f"you are not a member of {conv!r}") from None
        await self.announce(outcome.events)
        return self._send_result(outcome.message, dup=outcome.dup)

    async def _check_file(self, caller: Caller, conv: str, body: dict[str, Any]) -> None:
        """A file body names content its sender may send here (broker/services/files.py)."""
        files = self._services.files
        if files is None:
            raise bad("files are not served by this broker")
        await files.check_send(caller.principal, conv, body)

    @staticmethod
    def _send_result(msg: StoredMessage, *, dup: bool) -> dict[str, Any]:
        return {"conv": msg.conv, "seq": msg.seq, "ts": msg.ts, "dup": dup}

    async def _resolve_send_target(self, caller: Caller, to: Any,
                                   conv_param: Any) -> tuple[str, tuple[str, str] | None]:
        if to is not None:
            if not is_valid_principal_id(to):
                raise bad("'to' must be a principal id")
            return await self._dm_target(caller, to)
        kind, parts = _own_conv(caller, conv_param)
        if kind == "dm":
            other = parts[1] if parts[0] == caller.principal else parts[0]
            return await self._dm_target(caller, other)
        await self._group_member_check(conv_param, caller.principal)
        return conv_param, None

    # ---- mailbox -----------------------------------------------------------------
    async def op_sync(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        after = param_int(params, "after", required=False, default=0, maximum=MAX_NUMBER)
        limit = param_int(params, "limit", required=False, default=DEFAULT_SYNC_LIMIT, minimum=1,
                          maximum=MAX_SYNC_LIMIT)
        events, head = await self._store.sync(caller.principal, after, limit)
        last = events[-1].n if events else max(head, 0)
        more = bool(events) and last < head
        return {"events": [e.doc for e in events], "last": last, "more": more}

    async def op_ack(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        n = param_int(params, "n", maximum=MAX_NUMBER)
        try:
            cursor, events = await self._store.ack(caller.client_id, caller.principal, n, self._now())
        except ValueError as exc:
            raise bad(str(exc)) from None
        await self.announce(events)
        return {"n": cursor}

    # ---- read receipts and unread counts ------------------------------------------
    async def op_read(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        conv = await self._readable_conv(caller, params.get("conv"))
        seq = param_int(params, "seq", maximum=MAX_NUMBER)
        try:
            outcome = await self._store.read(caller.principal, conv, seq, self._now())
        except NotMember:
            if seq == 0:  # a DM with no message yet: nothing to read, nothing unread
                return {"conv": conv, "seq": 0, "unread": 0,
                        "total_unread": (await self._store.convs(caller.principal))[1]}
            raise bad(f"seq {seq} is beyond the last message (0)") from None
        except ValueError as exc:
            raise bad(str(exc)) from None
        await self.announce(outcome.events)
        return {"conv": outcome.conv, "seq": outcome.seq, "unread": outcome.unread,
                "total_unread": outcome.total_unread}

    async def op_history(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        conv = await self._readable_conv(caller, params.get("conv"))
        before = param_int(params, "before", required=False, minimum=1, maximum=MAX_NUMBER)
        limit = param_int(params, "limit", required=False, default=DEFAULT_HISTORY_LIMIT, minimum=1,
                          maximum=MAX_HISTORY_LIMIT)
        # Only what the caller may see as a member: nothing of a direct conversation
        # its id's previous owner had (a new owner's view starts when it joined).
        messages, more = await self._store.history(conv, before, limit, viewer=caller.principal)
        return {"messages": [m.to_wire() for m in messages], "more": more}

    async def op_convs(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        summaries, total = await self._store.convs(caller.principal)
        out = []
        for s in summaries:
            item: dict[str, Any] = {"conv": s.conv, "kind": s.kind}
            if s.kind == "dm":
                item["peer"] = s.peer
            else:
                item["name"] = s.name
            item.update({"last": s.last.to_wire() if s.last else None, "last_seq": s.last_seq,
                         "read": s.read_seq, "unread": s.unread})
            out.append(item)
        return {"convs": out, "total_unread": total}

    # ---- groups ------------------------------------------------------------------
    async def _check_addable(self, caller: Caller, members: list[str]) -> None:
        rel = self._services.relations
        for m in members:
            if m == caller.principal:
                continue
            p = await self._services.identity.get(m)
            if self._unknown_to(caller.principal, p):
                raise not_found(f"no principal {m!r}")
            if self._blocked(m, caller.principal) or self._blocked(caller.principal, m):
                raise forbidden(f"you may not add {m!r}")
            if not (rel.are_contacts(caller.principal, m) or rel.may_use_device(caller.principal, m)
                    or self._config.messaging.allow_dm_without_contact):
                raise forbidden(f"you may add only your contacts and your devices ({m!r} is neither)")

    def _groups_changed(self, conv: str, members: list[str]) -> None:
        self._bus.publish_nowait(GroupChanged(conv[len("grp:"):], frozenset(members)))

    def _apply_group(self, event: GroupChanged) -> None:
        """A group's members changed, on this node or another (events.py)."""
        self._services.relations.set_group(event.group_id, set(event.members))
        if self._publisher is not None:
            self._publisher.refresh_acl()

    async def op_group_create(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        name = param_str(params, "name", max_len=MAX_GROUP_NAME)
        if not name or not name.strip():
            raise bad("'name' must not be empty")
        members = _members_param(params, allow_empty=True)
        if len(set(members) | {caller.principal}) > MAX_GROUP_MEMBERS:
            raise bad(f"a group has at most {MAX_GROUP_MEMBERS} members")
        await self._check_addable(caller, members)
        conv = group_conv(secrets.token_hex(8))
        events = await self._store.create_group(conv, name, caller.principal, members, self._now())
        await self.announce(events)
        self._groups_changed(conv, sorted({caller.principal, *members}))
        return {"conv": conv}

    async def _group_conv_param(self, caller: Caller, params: dict[str, Any]) -> str:
        conv = params.get("conv")
        parsed = parse_conv(conv)
        if not isinstance(conv, str) or parsed is None or parsed[0] != "grp":
            raise bad("'conv' must be a group conversation grp:<id>")
        await self._group_member_check(conv, caller.principal)
        return conv

    async def op_group_add(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        conv = await self._group_conv_param(caller, params)
        members = _members_param(params, allow_empty=False)
        info = await self._store.group_info(conv)
        if info is not None and len(set(info.members) | set(members)) > MAX_GROUP_MEMBERS:
            raise bad(f"a group has at most {MAX_GROUP_MEMBERS} members")
        await self._check_addable(caller, [m for m in members if info is None or m not in info.members])
        events, after = await self._change_group(conv, caller, add=members, event="added")
        await self.announce(events)
        self._groups_changed(conv, after)
        return {}

    async def op_group_remove(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        conv = await self._group_conv_param(caller, params)
        members = _members_param(params, allow_empty=False)
        info = await self._store.group_info(conv)
        others = [m for m in members if m != caller.principal]
        if others and (info is None or info.created_by != caller.principal):
            raise forbidden("only the group's creator removes other members")
        event = "left" if members == [caller.principal] else "removed"
        events, after = await self._change_group(conv, caller, remove=members, event=event)
        await self.announce(events)
        self._groups_changed(conv, after)
        return {}

    async def op_group_leave(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        conv = await self._group_conv_param(caller, params)
        events, after = await self._change_group(conv, caller, remove=[caller.principal], event="left")
        await self.announce(events)
        self._groups_changed(conv, after)
        return {}

    async def _change_group(self, conv: str, caller: Caller, **kw: Any) -> tuple[list[MailboxEvent], list[str]]:
        try:
            return await self._store.change_group(conv, caller.principal, now=self._now(), **kw)
        except NotMember:
            raise forbidden(f"you are not a member of {conv!r}") from None
        except KeyError as exc:   # removing someone not in the group: nothing was changed
            missing = ", ".join(repr(m) for m in exc.args[0])
            raise not_found(f"not a member of {conv!r}: {missing}") from None

    async def op_group_info(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        conv = await self._group_conv_param(caller, params)
        info = await self._store.group_info(conv)
        if info is None:
            raise not_found(f"no conversation {conv!r}")
        return {"conv": info.conv, "name": info.name, "members": info.members, "created_by": info.created_by}

    # ---- mailbox bounds ----------------------------------------------------------
    async def prune_once(self) -> int:
        """One bounded round of mailbox.max_events / mailbox.ttl enforcement."""
        cfg = self._config.mailbox
        if not await self._store.needs_prune(now=self._now(), max_events=cfg.max_events, ttl=cfg.ttl):
            return 0
        events, discarded = await self._store.prune(now=self._now(), max_events=cfg.max_events, ttl=cfg.ttl,
                                                    max_mailboxes=self.prune_max_mailboxes,
                                                    max_rows=self.prune_max_rows)
        if discarded:
            self.discarded += discarded
            log.info("mailboxes: discarded %d events (%d mailboxes announced)", discarded, len(events))
        await self.announce(events)
        return discarded

    async def _prune_loop(self) -> None:
        # A store that cannot write fails every round: one line a minute, not a
        # traceback a second.
        outage_log = RateLimitedLog(log, interval=60.0)
        while True:
            await asyncio.sleep(self.prune_interval)
            try:
                await self.prune_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried next round; store busy or closing
                line, trace = describe_failure(exc)
                if trace:
                    log.warning("mailbox pruning round failed", exc_info=exc)
                else:
                    outage_log.warning("mailbox pruning round failed (%s); retried every %g s",
                                       line, self.prune_interval)


def _own_conv(caller: Caller, conv_param: Any) -> tuple[str, tuple[str, ...]]:
    """Parse `conv`; a DM must be one of the caller's own (group membership is
    checked by the caller, it needs the store)."""
    parsed = parse_conv(conv_param)
    if parsed is None:
        raise bad("'conv' must be dm:<a>:<b> (a < b) or grp:<id>")
    kind, parts = parsed
    if kind == "dm" and caller.principal not in parts:
        raise forbidden("not your conversation")
    return kind, parts
