"""Device ownership: claiming with the pairing code, sharing with contacts, and the
`devices` list.

Who may use a device is kept in three places that must agree: the store (the
truth, written first), this service's map (for `devices`), and
`services.relations` (what the ACL and messaging consult on every packet). A
change is committed, then applied to both in-memory views, then the ACL cache
is dropped, so nobody gains access before it is durable.

Pairing codes are stored as argon2 hashes (IdentityService checks them, off the
event loop). Guessing them is slowed down: failed claims are counted per caller and
per device in a sliding window (bounded tables) and answered `rate_limited`
past the limit. Unknown devices count as failures too, so probing for ids costs
the same as probing for codes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.services.base import Caller, Handler, Publisher, bad, param_str
from broker.services.events import DeviceShared, DeviceUnshared, PrincipalRemoved
from broker.store.base import DeviceUser, NotFoundError, Principal
from contract.errors import ErrorCode, ProtocolError
from contract.ids import is_valid_principal_id
from contract.ops import MAX_PAIRING_CODE
from contract.presence import never_seen

if TYPE_CHECKING:
    from broker.services.runtime import Services

log = logging.getLogger("roost.devices")

OWNER = "owner"
SHAREE = "sharee"


@dataclass(frozen=True, slots=True)
class ClaimLimits:
    window: float = 600.0           # seconds a failure is remembered
    per_caller: int = 5             # failed claims per caller per window
    per_device: int = 20            # failed claims on one device per window (many accounts guessing)
    table_size: int = 10000         # callers/devices tracked (LRU)


class FailureWindow:
    """Failures per key in a sliding window; the table is a bounded LRU."""

    def __init__(self, limit: int, window: float, size: int, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._window = window
        self._size = max(1, size)
        self._clock = clock
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float] | None:
        hits = self._hits.get(key)
        if hits is None:
            return None
        horizon = self._clock() - self._window
        while hits and hits[0] < horizon:
            hits.popleft()
        if not hits:
            del self._hits[key]
            return None
        return hits

    def blocked(self, key: str) -> bool:
        hits = self._recent(key)
        return hits is not None and len(hits) >= self._limit

    def retry_after(self, key: str) -> float:
        hits = self._recent(key)
        return max(0.0, hits[0] + self._window - self._clock()) if hits else 0.0

    def fail(self, key: str) -> None:
        hits = self._recent(key) or deque(maxlen=self._limit)
        hits.append(self._clock())
        self._hits[key] = hits
        self._hits.move_to_end(key)
        while len(self._hits) > self._size:
            self._hits.popitem(last=False)


class DeviceService:
    def __init__(self, services: Services, *, limits: ClaimLimits = ClaimLimits(),
                 clock: Callable[[], float] | None = None) -> None:
        clock = clock if clock is not None else services.clock
        self._services = services
        self._bus = services.bus
        self._bus.subscribe(PrincipalRemoved, self._principal_removed)
        # Applied here for shares made on this node and on every other (events.py)
        self._bus.subscribe(DeviceShared, self._apply_share)
        self._bus.subscribe(DeviceUnshared, self._apply_unshare)
        self._store = services.store.devices
        self._identity = services.identity
        self._relations = services.relations
        self._clock = clock
        self._users: dict[str, dict[str, DeviceUser]] = {}   # device -> principal -> row
        self._caller_failures = FailureWindow(limits.per_caller, limits.window, limits.table_size, clock)
        self._device_failures = FailureWindow(limits.per_device, limits.window, limits.table_size, clock)
        self._publisher: Publisher | None = None
        self.claim_failures = 0

    # ---- lifecycle -------------------------------------------------------
    async def load(self) -> None:
        self._users = {}
        for du in await self._store.list_device_users():
            self._users.setdefault(du.device, {})[du.principal] = du
        for device, users in self._users.items():
            self._relations.set_device_users(device, set(users))

    async def start(self, publisher: Publisher) -> None:
        self._publisher = publisher

    async def stop(self) -> None:
        self._publisher = None

    def ops(self) -> dict[str, Handler]:
        return {
            "device.claim": self.claim,
            "device.share": self.share,
            "device.unshare": self.unshare,
            "devices": self.list_devices,
        }

    # ---- queries used by other services ------------------------------------
    def owners(self, device: str) -> list[str]:
        return sorted(p for p, du in self._users.get(device, {}).items() if du.role == OWNER)

    def users(self, device: str) -> list[str]:
        """Owners and sharees: everyone a device's events go to."""
        return sorted(self._users.get(device, {}))

    def role(self, device: str, principal: str) -> str | None:
        du = self._users.get(device, {}).get(principal)
        return du.role if du else None

    async def _principal_removed(self, event: PrincipalRemoved) -> None:
        await self.principal_removed(event.principal)

    async def principal_removed(self, principal: str) -> None:
        """A principal was removed by an admin: the store dropped its rows (foreign
        keys cascade); drop them here too."""
        changed = self._users.pop(principal, None) is not None
        for device, users in self._users.items():
            if users.pop(principal, None) is not None:
                changed = True
                self._relations.set_device_users(device, set(users))
        if changed:
            self._refresh_acl()

    # ---- ops -------------------------------------------------------------------
    async def claim(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        device = _device_param(params, "device")
        code = param_str(params, "code", max_len=MAX_PAIRING_CODE)
        assert code is not None
        if caller.kind == "device":
            raise ProtocolError(ErrorCode.FORBIDDEN, "a device cannot claim a device")
        if self._caller_failures.blocked(caller.principal) or self._device_failures.blocked(device):
            wait = max(self._caller_failures.retry_after(caller.principal), self._device_failures.retry_after(device))
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"too many failed claims; try again in {int(wait) + 1} s")
        p = await self._identity.get(device)
        if p is None or p.kind != "device":
            self._failed(caller.principal, device)
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no device {device!r}")
        # People copy codes as "4832 1907" or "4832-1907": only the digits count.
        typed = "".join(ch for ch in code if ch not in " -")
        if not await self._identity.check_pairing_code(device, typed):
            self._failed(caller.principal, device)
            raise ProtocolError(ErrorCode.FORBIDDEN, "wrong pairing code")
        if self.role(device, caller.principal) != OWNER:
            await self._grant(device, caller.principal, OWNER, None)
            log.info("%s claimed device %s", caller.principal, device)
        return {"device": device, "role": OWNER}

    async def share(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        device = _device_param(params, "device")
        with_ = _device_param(params, "with")
        await self._require_owner(caller, device)
        if with_ == caller.principal:
            raise bad("you already own this device")
        if not self._relations.are_contacts(caller.principal, with_):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"{with_!r} is not one of your contacts")
        if self.role(device, with_) is None:
            await self._grant(device, with_, SHAREE, caller.principal)
            log.info("%s shared device %s with %s", caller.principal, device, with_)
        return {"device": device, "with": with_, "role": self.role(device, with_)}

    async def unshare(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        """Extension: an owner takes a share back (owners cannot be removed this way)."""
        device = _device_param(params, "device")
        with_ = _device_param(params, "with")
        await self._require_owner(caller, device)
        if self.role(device, with_) == SHAREE:
            await self._revoke(device, with_)
        elif self.role(device, with_) == OWNER:
            raise ProtocolError(ErrorCode.FORBIDDEN, f"{with_!r} is an owner of this device")
        return {}

    async def _revoke(self, device: str, sharee: str) -> None:
        await self._store.remove_device_user(device, sharee)
        self._bus.publish_nowait(DeviceUnshared(device, sharee))

    def _apply_unshare(self, event: DeviceUnshared) -> None:
        users = self._users.get(event.device, {})
        users.pop(event.principal, None)
        self._relations.set_device_users(event.device, set(users))
        self._refresh_acl()

    async def contact_ended(self, a: str, b: str) -> int:
        """Shares follow contacts: a share needs one (see `share`), so when two people
        stop being contacts (removed or blocked) each loses what the other owns and
        shared. Without this a blocked ex could still switch the blocker's lights."""
        revoked = 0
        for device in list(self._users):
            for owner, sharee in ((a, b), (b, a)):
                if self.role(device, owner) == OWNER and self.role(device, sharee) == SHAREE:
                    await self._revoke(device, sharee)
                    log.info("share of %s with %s ended with the contact to %s", device, sharee, owner)
                    revoked += 1
        return revoked

    async def list_devices(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        if caller.kind == "device":
            ids = [caller.principal]           # a device sees itself, with its people
        elif caller.principal == self._relations.integration_account:
            ids = [p.id for p in await self._identity.list("device")]
        else:
            ids = sorted(self._relations.devices_of(caller.principal))
        out = []
        for device in ids:
            p = await self._identity.get(device)
            if p is None or p.kind != "device":
                continue
            out.append(await self._describe(p, caller.principal))
        return {"devices": out}

    # ---- helpers -----------------------------------------------------------------
    async def _describe(self, p: Principal, viewer: str) -> dict[str, Any]:
        presence = self._services.presence.current(p.id) if self._services.presence is not None else None
        if presence is None:
            presence = never_seen()
        telemetry = None
        if self._services.telemetry is not None:
            try:
                telemetry = self._services.telemetry.latest(p.id)
            except Exception:  # noqa: BLE001 - a listing must not fail on a telemetry hiccup
                log.exception("telemetry.latest(%s) failed", p.id)
        users = self._users.get(p.id, {})
        return {
            "id": p.id,
            "kind": p.device_kind,
            "name": p.name,
            "room": p.room,
            "presence": presence,
            "last_telemetry": telemetry,
            "role": users[viewer].role if viewer in users else None,
            "owners": self.owners(p.id),
            "sharees": sorted(q for q, du in users.items() if du.role == SHAREE),
        }

    async def _require_owner(self, caller: Caller, device: str) -> None:
        if self.role(device, caller.principal) == OWNER:
            return
        p = await self._identity.get(device)
        # A device the caller may not know of is answered as unknown: `forbidden` would reveal it.
        if p is None or p.kind != "device" or not self._relations.may_know_device(caller.principal, device):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no device {device!r}")
        raise ProtocolError(ErrorCode.FORBIDDEN, "only an owner of the device can do that")

    async def _grant(self, device: str, principal: str, role: str, granted_by: str | None) -> None:
        du = DeviceUser(device, principal, role, granted_by, self._clock())
        try:
            await self._store.put_device_user(du)
        except NotFoundError:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"{principal!r} or {device!r} no longer exists") from None
        self._bus.publish_nowait(DeviceShared(device, principal, role, granted_by, du.created_at))

    def _apply_share(self, event: DeviceShared) -> None:
        users = self._users.setdefault(event.device, {})
        users[event.principal] = DeviceUser(event.device, event.principal, event.role, event.granted_by, event.since)
        self._relations.set_device_users(event.device, set(users))
        self._refresh_acl()

    def _failed(self, caller: str, device: str) -> None:
        self.claim_failures += 1
        self._caller_failures.fail(caller)
        self._device_failures.fail(device)
        log.info("failed device claim by %s on %s", caller, device)

    def _refresh_acl(self) -> None:
        if self._publisher is not None:
            self._publisher.refresh_acl()


def _device_param(params: dict[str, Any], name: str) -> str:
    value = param_str(params, name, max_len=64)
    assert value is not None
    if not is_valid_principal_id(value):
        raise bad(f"'{name}' is not a valid id")
    return value
