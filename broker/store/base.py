"""The storage interface: small, typed, engine-neutral.

Services depend on these Protocols only. `broker/store/sqlite.py` implements them
on SQLite; another engine (PostgreSQL) implements the same Protocols. Each domain
(identity, retained, messaging, social, devices) is a separate repository
object on the `Store`, so the domains can grow independently.

Every method is async; writes return only after their transaction committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    kind: str              # user | device | service
    name: str
    status: str
    secret_hash: str
    created_at: float
    device_kind: str | None = None   # devices: thermostat, light, door_sensor, ...
    room: str | None = None          # devices: where it is
    pairing_code: str | None = None  # devices: code shown once at registration


@dataclass(frozen=True, slots=True)
class RetainedMessage:
    topic: str
    payload: bytes
    qos: int


class IdentityStore(Protocol):
    async def add_principal(self, p: Principal) -> None:
        """Raises `AlreadyExists` when the id is taken (by any kind)."""

    async def get_principal(self, principal_id: str) -> Principal | None: ...

    async def list_principals(self, kind: str | None = None) -> list[Principal]: ...

    async def remove_principal(self, principal_id: str) -> bool: ...

    async def set_secret(self, principal_id: str, secret_hash: str) -> bool: ...

    async def set_profile(self, principal_id: str, *, name: str | None, status: str | None) -> Principal | None: ...

    async def search_users(self, query: str, limit: int) -> list[Principal]:
        """Users (kind user) whose id equals `query` or whose name starts with it."""

    async def log_admin(self, principal_id: str, action: str) -> None:
        """Record an admin change (added/removed/passwd) for a running broker to apply."""

    async def admin_log_after(self, seq: int) -> list[tuple[int, str, str]]:
        """(seq, principal, action) rows after `seq`, oldest first."""

    async def admin_log_head(self) -> int: ...


class RetainedStore(Protocol):
    async def load_all(self) -> list[RetainedMessage]: ...

    async def put(self, msg: RetainedMessage) -> None: ...

    async def delete(self, topic: str) -> None: ...


class AlreadyExists(Exception):
    """A unique key is already taken."""


# ---- devices and presence (issue 5 ownership, issue 4 presence) -------------

DEVICE_ROLES = ("owner", "sharee")


@dataclass(frozen=True, slots=True)
class DeviceUser:
    """One person (or integration) allowed to use a device."""

    device: str
    principal: str
    role: str                # owner | sharee
    granted_by: str | None   # who shared it; None for a claim
    created_at: float


class DeviceStore(Protocol):
    async def list_device_users(self) -> list[DeviceUser]: ...

    async def put_device_user(self, du: DeviceUser) -> None:
        """Insert, or change the role of an existing (device, principal) row.
        Raises `NotFoundError` when the device or the principal does not exist."""

    async def remove_device_user(self, device: str, principal: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class PresenceRecord:
    principal: str
    state: str               # online | offline
    since: float
    last_seen: float


class PresenceStore(Protocol):
    async def load_presence(self) -> list[PresenceRecord]: ...

    async def save_presence(self, records: list[PresenceRecord]) -> int:
        """Upsert in one transaction; rows of principals that no longer exist
        are skipped. Returns how many were written."""


class NotFoundError(Exception):
    """A referenced row does not exist."""


# ---- telemetry (issue 5 item 4) ------------------------------------------------

@dataclass(frozen=True, slots=True)
class LatestReading:
    """The newest value of each field a device reported, and when (unix seconds)."""

    device: str
    ts: float
    fields: dict[str, float | int | bool | str]


class TelemetryStore(Protocol):
    async def load_latest(self) -> list[LatestReading]: ...

    async def get_latest(self, device: str) -> LatestReading | None: ...

    async def put_latest(self, readings: list[LatestReading]) -> int:
        """Upsert in one transaction; readings of devices that no longer exist are
        skipped. Returns how many were written."""

    async def delete_latest(self, device: str) -> None: ...
