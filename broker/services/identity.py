"""Principals: registration, secrets, authentication, and the in-memory directory.

Secrets are hashed with argon2 (pwdlib). Verifying argon2 costs tens of
milliseconds of CPU, so it runs off the event loop, and a successful check is
remembered as a keyed SHA-256 of the secret: reconnects of the same device cost
microseconds, and a wrong secret still goes through argon2.

Admin commands may change the store from another process while the broker runs;
they append to `admin_log`, which the broker reads through `IdentityService.admin_changes`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from broker.store.base import AlreadyExists, IdentityStore, Principal
from contract.ids import PRINCIPAL_KINDS, is_valid_principal_id

log = logging.getLogger("roost.identity")

# OWASP's argon2id baseline (19 MiB, t=2, p=1): pwdlib's default (64 MiB, t=3)
# would cost ~120 ms and 64 MiB per login on a small home server.
_hasher = PasswordHash((Argon2Hasher(time_cost=2, memory_cost=19456, parallelism=1),))


class IdentityError(ValueError):
    """Bad input to an admin operation (clear message, nothing changed)."""


def hash_secret(secret: str) -> str:
    return _hasher.hash(secret)


def verify_secret(secret: str, secret_hash: str) -> bool:
    try:
        return _hasher.verify(secret, secret_hash)
    except Exception:  # noqa: BLE001 - a malformed hash is a failed login, not a crash
        return False


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def new_pairing_code() -> str:
    return f"{secrets.randbelow(10**8):08d}"


@dataclass(frozen=True, slots=True)
class Registered:
    id: str
    secret: str | None = None
    pairing_code: str | None = None


class FailureThrottle:
    """Delay for repeated failed logins from one address; bounded LRU table."""

    def __init__(self, step: float, cap: float, size: int) -> None:
        self._step = step
        self._cap = cap
        self._size = max(1, size)
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def delay_for(self, address: str) -> float:
        entry = self._failures.get(address)
        if entry is None:
            return 0.0
        count, last = entry
        if time.monotonic() - last > 300:  # forgiven after five quiet minutes
            self._failures.pop(address, None)
            return 0.0
        return min(self._cap, self._step * count)

    def failed(self, address: str) -> None:
        count, _ = self._failures.pop(address, (0, 0.0))
        self._failures[address] = (count + 1, time.monotonic())
        while len(self._failures) > self._size:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


class IdentityService:
    def __init__(self, store: IdentityStore, *, jwt_secret: str | None = None) -> None:
        self._store = store
        self._jwt_secret = jwt_secret.encode() if jwt_secret else None
        self._directory: dict[str, Principal] = {}
        self._verified: dict[str, bytes] = {}   # principal -> keyed digest of the last good secret
        self._pepper = secrets.token_bytes(16)

    # ---- directory -------------------------------------------------------
    async def load(self) -> None:
        self._directory = {p.id: p for p in await self._store.list_principals()}

    def get_cached(self, principal_id: str) -> Principal | None:
        return self._directory.get(principal_id)

    async def get(self, principal_id: str) -> Principal | None:
        p = self._directory.get(principal_id)
        if p is None and is_valid_principal_id(principal_id):
            p = await self._store.get_principal(principal_id)
            if p is not None:
                self._directory[p.id] = p
        return p

    def kind_of(self, principal_id: str) -> str | None:
        p = self._directory.get(principal_id)
        return p.kind if p else None

    async def reload(self, principal_id: str) -> Principal | None:
        """Re-read one principal after an outside change; None if it is gone."""
        p = await self._store.get_principal(principal_id)
        self._verified.pop(principal_id, None)
        if p is None:
            self._directory.pop(principal_id, None)
        else:
            self._directory[p.id] = p
        return p

    async def admin_changes(self, after: int) -> list[tuple[int, str, str]]:
        """Admin changes made (maybe by another process) after log position `after`;
        the directory is refreshed for each principal named."""
        rows = await self._store.admin_log_after(after)
        for _seq, principal_id, _action in rows:
            await self.reload(principal_id)
        return rows

    async def admin_log_head(self) -> int:
        return await self._store.admin_log_head()

    # ---- authentication --------------------------------------------------
    async def authenticate(self, principal_id: str, secret: str) -> Principal | None:
        p = await self.get(principal_id)
        if p is None:
            # Spend the same work as a real check so timing does not reveal ids.
            await asyncio.get_running_loop().run_in_executor(None, verify_secret, secret, _DUMMY_HASH)
            return None
        if self._jwt_secret is not None and secret.count(".") == 2:
            claims = decode_jwt(secret, self._jwt_secret)
            return p if claims is not None and claims.get("sub") == p.id else None
        digest = hmac.new(self._pepper, p.secret_hash.encode() + b"\0" + secret.encode(), hashlib.sha256).digest()
        known = self._verified.get(p.id)
        if known is not None and hmac.compare_digest(known, digest):
            return p
        ok = await asyncio.get_running_loop().run_in_executor(None, verify_secret, secret, p.secret_hash)
        if not ok:
            return None
        self._verified[p.id] = digest
        return p

    # ---- registration (used by admin commands and tests) -----------------
    async def add(self, principal_id: str, kind: str, *, secret: str | None = None, name: str | None = None,
                  device_kind: str | None = None, room: str | None = None) -> Registered:
        if not is_valid_principal_id(principal_id):
            raise IdentityError(
                f"invalid id {principal_id!r}: use 1-32 of a-z 0-9 _ - starting with a letter or digit")
        if kind not in PRINCIPAL_KINDS:
            raise IdentityError(f"invalid kind {kind!r}")
        if kind == "device" and not device_kind:
            raise IdentityError("a device needs a kind (--kind), e.g. thermostat, light, door_sensor")
        if device_kind is not None and not is_valid_principal_id(device_kind):
            raise IdentityError(f"invalid device kind {device_kind!r}: use a-z 0-9 _ -")
        if name is not None and len(name) > 64:
            raise IdentityError("name is longer than 64 characters")
        if secret is not None and not secret:
            raise IdentityError("the password must not be empty")
        generated = secret is None
        secret = secret if secret is not None else new_secret()
        pairing = new_pairing_code() if kind == "device" else None
        loop = asyncio.get_running_loop()
        secret_hash = await loop.run_in_executor(None, hash_secret, secret)
        p = Principal(id=principal_id, kind=kind, name=name or principal_id, status="", secret_hash=secret_hash,
                      created_at=time.time(), device_kind=device_kind, room=room, pairing_code=pairing)
        try:
            await self._store.add_principal(p)
        except AlreadyExists:
            raise IdentityError(f"id {principal_id!r} is already taken") from None
        self._directory[p.id] = p
        await self._store.log_admin(p.id, "added")
        return Registered(id=p.id, secret=secret if generated else None, pairing_code=pairing)

    async def remove(self, principal_id: str) -> bool:
        removed = await self._store.remove_principal(principal_id)
        self._directory.pop(principal_id, None)
        self._verified.pop(principal_id, None)
        if removed:
            await self._store.log_admin(principal_id, "removed")
        return removed

    async def set_secret(self, principal_id: str, secret: str) -> bool:
        if not secret:
            raise IdentityError("the password must not be empty")
        secret_hash = await asyncio.get_running_loop().run_in_executor(None, hash_secret, secret)
        ok = await self._store.set_secret(principal_id, secret_hash)
        if ok:
            await self.reload(principal_id)
            await self._store.log_admin(principal_id, "passwd")
        return ok

    async def new_pairing_code(self, device_id: str) -> str | None:
        """A fresh pairing code for a device (the old one stops working); None if
        there is no such device. Owners keep their ownership."""
        code = new_pairing_code()
        if not await self._store.set_pairing_code(device_id, code):
            return None
        await self.reload(device_id)
        await self._store.log_admin(device_id, "pairing")   # a running broker re-reads it
        return code

    async def set_profile(self, principal_id: str, *, name: str | None, status: str | None) -> Principal | None:
        p = await self._store.set_profile(principal_id, name=name, status=status)
        if p is not None:
            self._directory[p.id] = p
        return p

    async def list(self, kind: str | None = None) -> list[Principal]:
        return await self._store.list_principals(kind)

    async def search_users(self, query: str, limit: int = 50) -> list[Principal]:
        return await self._store.search_users(query, limit)


_DUMMY_HASH = hash_secret("roost-timing-equaliser")


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def decode_jwt(token: str, key: bytes) -> dict | None:
    """HS256 only; returns the claims when the signature and `exp` are good."""
    try:
        header_b64, payload_b64, sig_b64 = token.split(".")
        header = json.loads(_b64url_decode(header_b64))
        if header.get("alg") != "HS256":
            return None
        expected = hmac.new(key, f"{header_b64}.{payload_b64}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _b64url_decode(sig_b64)):
            return None
        claims = json.loads(_b64url_decode(payload_b64))
        if not isinstance(claims, dict):
            return None
        exp = claims.get("exp")
        if exp is not None and (not isinstance(exp, (int, float)) or exp < time.time()):
            return None
        return claims
    except (ValueError, TypeError):
        return None
