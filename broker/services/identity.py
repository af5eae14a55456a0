"""Principals: registration, secrets, authentication, and the in-memory directory.

Secrets and device pairing codes are hashed with argon2 (pwdlib). Verifying
argon2 costs tens of milliseconds of CPU, so it runs off the event loop, and a
successful check is remembered as a keyed SHA-256 of the secret: reconnects of
the same device cost microseconds, and a wrong secret still goes through argon2.

Guessing is slowed down by `LoginGuard` (per address and per principal, see
there). A password is taken for a JWT only when JWT auth is configured and it
has a JWT's shape and an allowed header; see broker/services/jwt_auth.py for
what a token must carry. A token is also refused when issued (`iat`) before the
principal's secret was last set, and a login by token ends at its `exp`
(`Login.expires_at`, which the engine enforces on the connection).

Admin commands may change the store from another process while the broker runs;
they append to `admin_log`, which the broker reads through `IdentityService.admin_changes`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from broker.store.base import AlreadyExists, IdentityStore, Principal
from contract.ids import PRINCIPAL_KINDS, is_valid_principal_id

if TYPE_CHECKING:   # PyJWT is loaded only when auth.jwt is configured (broker/app.py)
    from broker.services.jwt_auth import JwtVerifier

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
class Login:
    """A successful authentication; `expires_at` (epoch seconds) when it was by a
    token, whose connection must end then."""
    principal: Principal
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Registered:
    id: str
    secret: str | None = None
    pairing_code: str | None = None


# A failure is forgotten after this long without another one from the same key.
FORGIVE_AFTER = 300.0
# A CONNECT waits at most this long for its turn to authenticate (then CONNACK 3,
# nothing checked); the engine gives authentication 60 s in all.
AUTH_WAIT_MAX = 30.0
# CONNECTs of an address with recent failures that may wait for a turn at once;
# more are refused unchecked. An address without failures is not capped, so a
# household or a test rig connecting hundreds of clients at once is unaffected.
MAX_WAITING_FAILING_ADDRESS = 32


@dataclass(slots=True)
class _Failures:
    count: int
    last: float
    target: str | None   # the principal every failure was against; None: several, or none


class FailureThrottle:
    """Failed logins per key (an address or a principal): a delay that grows with
    every failure, counted from the last one, capped; a bounded LRU table."""

    def __init__(self, step: float, cap: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._step = step
        self._cap = cap
        self._size = max(1, size)
        self._clock = clock
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def _entry(self, key: str) -> _Failures | None:
        entry = self._failures.get(key)
        if entry is not None and self._clock() - entry.last > FORGIVE_AFTER:
            del self._failures[key]
            return None
        return entry

    def marked(self, key: str) -> bool:
        """True while `key` has failures that are not forgiven yet."""
        return self._entry(key) is not None

    def delay_for(self, key: str) -> float:
        entry = self._entry(key)
        return 0.0 if entry is None else min(self._cap, self._step * entry.count)

    def remaining(self, key: str) -> float:
        """Seconds until the next attempt of `key` may be checked."""
        entry = self._entry(key)
        if entry is None:
            return 0.0
        return max(0.0, entry.last + min(self._cap, self._step * entry.count) - self._clock())

    def failed(self, key: str, target: str | None = None) -> None:
        entry = self._entry(key)
        if entry is None:
            entry = _Failures(0, 0.0, target)
        elif entry.target != target:
            entry.target = None
        entry.count += 1
        entry.last = self._clock()
        self._failures[key] = entry
        self._failures.move_to_end(key)
        while len(self._failures) > self._size:
            self._failures.popitem(last=False)

    def forgive(self, key: str, principal: str) -> None:
        """`principal` logged in from `key`: forget its failures there if they were
        all against that principal (a typo), not when it also failed elsewhere (an
        attacker must not wash its address clean by logging into its own account)."""
        entry = self._entry(key)
        if entry is not None and entry.target == principal:
            del self._failures[key]


class LoginBusy(Exception):
    """Too many logins in progress or waiting: the CONNECT is refused unchecked."""


@dataclass(slots=True)
class _GateEntry:
    slots: asyncio.Semaphore
    users: int = 0


class KeyedGate:
    """`concurrency` holders per key at once (FIFO). An entry exists only while
    someone holds or waits for it, and at most `size` keys have one."""

    def __init__(self, concurrency: int, size: int) -> None:
        self._concurrency = max(1, concurrency)
        self._size = max(1, size)
        self._entries: dict[str, _GateEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def hold(self, key: str, max_users: int | None = None) -> AsyncIterator[None]:
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._size:
                raise LoginBusy("too many logins in progress")
            entry = self._entries[key] = _GateEntry(asyncio.Semaphore(self._concurrency))
        elif max_users is not None and entry.users >= max_users:
            raise LoginBusy("too many logins waiting from this address")
        entry.users += 1
        try:
            async with entry.slots:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._entries[key]


def address_key(address: str) -> str:
    """The unit one client controls: an IPv4 address, or an IPv6 /64 (anyone with
    one IPv6 address usually has its whole /64)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginAttempt:
    """One CONNECT's turn in the `LoginGuard`; report how it ended."""

    def __init__(self, guard: LoginGuard, address: str, principal: str | None) -> None:
        self._guard = guard
        self.address = address
        self.principal = principal

    def failed(self, *, guessed: bool = True) -> None:
        """`guessed`: a secret was checked against `principal` and was wrong (a
        refusal for another reason, e.g. a foreign client id, slows the address only)."""
        self._guard.addresses.failed(self.address, self.principal)
        if guessed and self.principal is not None:
            self._guard.principals.failed(self.principal)

    def succeeded(self) -> None:
        if self.principal is not None:
            self._guard.addresses.forgive(self.address, self.principal)


class LoginGuard:
    """Keeps password guessing at a few per second whatever the parallelism.

    * An address authenticates `per_address` CONNECTs at a time; each waits, once
      its turn came, the delay the address's earlier failures earned. So 200
      parallel guesses from one address are checked one after another, slower and
      slower, instead of all at once with the delay read when they arrived.
    * A principal's secret is checked for one CONNECT at a time. A CONNECT from an
      address with recent failures also queues (FIFO) for the principal's own
      failure delay, which every wrong guess on it raises, from whatever address:
      guesses from many addresses stay at about one per delay. A CONNECT from an
      address without failures (the owner, on another network) skips that queue
      and waits only for the check in progress, so an attacker cannot lock the
      owner out; each fresh address gets one quick guess, then it is a failing one.
    * A failure slows its address and, when a secret was checked, its principal.
      A success forgives the address only its failures on that same principal;
      a principal's failures are forgotten only with time (`FORGIVE_AFTER`).

    Every table is bounded: failures are LRU tables of `table_size` entries,
    gates have entries only while in use (at most `table_size`; beyond, CONNACK 3).
    """

    def __init__(self, *, step: float, cap: float, table_size: int, per_address: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.addresses = FailureThrottle(step, cap, table_size, clock)
        self.principals = FailureThrottle(step, cap, table_size, clock)
        self._address_gate = KeyedGate(per_address, table_size)
        self._queue_gate = KeyedGate(1, table_size)   # failing addresses, per principal
        self._check_gate = KeyedGate(1, table_size)   # the check itself, per principal

    @contextlib.asynccontextmanager
    async def attempt(self, address: str, principal: str | None) -> AsyncIterator[LoginAttempt]:
        """Wait for this CONNECT's turn; `principal` is the id it claims (None:
        anonymous, or nothing to check). Raises LoginBusy instead of waiting
        too long or with too many others."""
        key = address_key(address)
        async with contextlib.AsyncExitStack() as held:
            try:
                async with asyncio.timeout(AUTH_WAIT_MAX):
                    await self._take_turn(held, key, principal)
            except TimeoutError:
                raise LoginBusy("waited too long for a turn to log in") from None
            yield LoginAttempt(self, key, principal)

    async def _take_turn(self, held: contextlib.AsyncExitStack, key: str, principal: str | None) -> None:
        limit = MAX_WAITING_FAILING_ADDRESS if self.addresses.marked(key) else None
        await held.enter_async_context(self._address_gate.hold(key, limit))
        # read now that it is this CONNECT's turn, not when it arrived
        await _pause(self.addresses.delay_for(key))
        if principal is None:
            return
        if self.addresses.marked(key):
            await held.enter_async_context(self._queue_gate.hold(principal))
            await _pause(self.principals.remaining(principal))
        await held.enter_async_context(self._check_gate.hold(principal))


async def _pause(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


class IdentityService:
    def __init__(self, store: IdentityStore, *, jwt: JwtVerifier | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self.jwt = jwt
        self._clock = clock          # wall-clock seconds: token expiry, when a secret was set
        self._directory: dict[str, Principal] = {}
        self._verified: dict[str, bytes] = {}   # principal -> keyed digest of the last good secret
        self._pepper = secrets.token_bytes(16)
        # A hash to verify against when the principal is unknown, so that timing
        # does not reveal which ids exist; made on first use (argon2 costs tens of
        # milliseconds, too much for every import or admin command).
        self._dummy_hash: str | None = None

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
        login = await self.login(principal_id, secret)
        return login.principal if login is not None else None

    async def login(self, principal_id: str, secret: str) -> Login | None:
        """`secret` (a password, or a token when JWT auth is configured) checked
        against `principal_id`; None when it is wrong."""
        checked = await self.get(principal_id)
        login = await self._check(checked, secret)
        if login is None and is_valid_principal_id(principal_id):
            # An admin command may have just added the principal or changed its
            # secret, and the directory learns of it only at the next admin-log
            # poll: a failure is checked once more against the store itself, so a
            # new password works the moment `roost user passwd` returns. Compared
            # with the record that was checked, not the directory now: the poll may
            # have refreshed the directory while the check ran.
            fresh = await self._store.get_principal(principal_id)
            if fresh is not None and (checked is None or fresh.secret_hash != checked.secret_hash
                                      or fresh.secret_set_at != checked.secret_set_at):
                cached = self._directory.get(principal_id)
                if cached is None or cached.secret_set_at <= fresh.secret_set_at:
                    self._directory[fresh.id] = fresh
                login = await self._check(fresh, secret)
        return login

    async def _check(self, p: Principal | None, secret: str) -> Login | None:
        if p is None:
            # Spend the same work as a real check so timing does not reveal ids.
            await asyncio.get_running_loop().run_in_executor(None, self._verify_dummy, secret)
            return None
        if self.jwt is not None and self.jwt.is_jwt(secret):
            return self._token_login(p, self.jwt, secret)
        digest = hmac.new(self._pepper, p.secret_hash.encode() + b"\0" + secret.encode(), hashlib.sha256).digest()
        known = self._verified.get(p.id)
        if known is not None and hmac.compare_digest(known, digest):
            return Login(p)
        ok = await asyncio.get_running_loop().run_in_executor(None, verify_secret, secret, p.secret_hash)
        if not ok:
            return None
        self._verified[p.id] = digest
        return Login(p)

    def _token_login(self, p: Principal, verifier: JwtVerifier, token: str) -> Login | None:
        # Signature checks take tens of microseconds (RSA, EC, EdDSA): on the loop.
        claims = verifier.decode(token, self._clock())
        if claims is None or claims["sub"] != p.id:
            return None
        if _issued_before(float(claims["iat"]), p.secret_set_at):
            return None
        return Login(p, expires_at=float(claims["exp"]))

    async def check_pairing_code(self, device_id: str, code: str) -> bool:
        """True when `code` is the device's current pairing code (argon2, off the loop)."""
        p = await self._store.get_principal(device_id)   # not the directory: a new code counts at once
        stored = p.pairing_code if p is not None and p.kind == "device" else None
        if stored is None:
            await asyncio.get_running_loop().run_in_executor(None, self._verify_dummy, code)
            return False
        return await asyncio.get_running_loop().run_in_executor(None, verify_secret, code, stored)

    def _verify_dummy(self, secret: str) -> None:
        """The work of a real check, against nothing (runs in the executor: two
        threads may both make the hash the first time, which is harmless)."""
        if self._dummy_hash is None:
            self._dummy_hash = hash_secret("roost-timing-equaliser")
        verify_secret(secret, self._dummy_hash)

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
        # Stored hashed like the secret: the store alone does not give claims away.
        pairing_hash = await loop.run_in_executor(None, hash_secret, pairing) if pairing else None
        now = self._clock()
        p = Principal(id=principal_id, kind=kind, name=name or principal_id, status="", secret_hash=secret_hash,
                      created_at=now, device_kind=device_kind, room=room, pairing_code=pairing_hash,
                      secret_set_at=now)
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
        code_hash = await asyncio.get_running_loop().run_in_executor(None, hash_secret, code)
        if not await self._store.set_pairing_code(device_id, code_hash):
            return None
        await self.reload(device_id)
        await self._store.log_admin(device_id, "pairing")   # a running broker re-reads it
        return code

    async def set_profile(self, principal_id: str, *, name: str | None, status: str | None) -> Principal | None:
        """Stored; the directory learns it from the ProfileChanged event (profile_changed)."""
        return await self._store.set_profile(principal_id, name=name, status=status)

    def profile_changed(self, principal_id: str, name: str, status: str) -> None:
        """A profile set on this node or another: the directory's copy follows."""
        p = self._directory.get(principal_id)
        if p is not None:
            self._directory[principal_id] = replace(p, name=name, status=status)

    async def list(self, kind: str | None = None) -> list[Principal]:
        return await self._store.list_principals(kind)

    async def search_users(self, query: str, limit: int = 50) -> builtins.list[Principal]:
        return await self._store.search_users(query, limit)


def _issued_before(iat: float, secret_set_at: float) -> bool:
    """True when a token issued at `iat` predates the principal's secret (set by
    passwd, or the id removed and added again): it is revoked. A whole-second
    `iat` (what IdPs and PyJWT's datetimes write) only says "during that second",
    so one in the second of the change counts as after it: a user added a moment
    ago can log in with the token fetched right away."""
    if iat.is_integer():
        return iat < math.floor(secret_set_at)
    return iat < secret_set_at

