"""Service-level test environment for messaging and social: a real SqliteStore in a
temporary folder, the real services, and a publisher that records what the
broker would have delivered to each client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.config import RoostConfig, config_from_dict
from broker.services.base import Caller
from broker.services.identity import IdentityService
from broker.services.messaging import MessagingService
from broker.services.runtime import Services
from broker.services.social import SocialService
from broker.store.sqlite import SqliteStore
from contract.errors import ProtocolError


class FakeClock:
    """Wall-clock seconds that move only when a test says so (mailbox.ttl tests)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = start if start is not None else time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class InboxRecorder:
    """Stands in for the broker: `deliver` succeeds for subscribed clients and
    records, per client, the inbox events it would have pushed."""

    def __init__(self) -> None:
        self.subscribed: set[str] = set()
        self.delivered: dict[str, list[dict]] = {}
        self.acl_refreshes = 0

    async def publish(self, topic, payload, qos=0, retain=False):  # noqa: ANN001
        return 0

    async def deliver(self, client_id, topic, payload, qos=1):  # noqa: ANN001
        await asyncio.sleep(0)  # a real deliver yields; ordering must survive that
        if client_id not in self.subscribed:
            return False
        self.delivered.setdefault(client_id, []).append(json.loads(payload))
        return True

    def deliver_nowait(self, client_id, topic, payload, qos=1):  # noqa: ANN001
        return None   # always "would wait": pushes go the pusher task's way

    def client_ids_of(self, principal):  # noqa: ANN001
        return [c for c in self.subscribed if c.split(".")[0] == principal]

    async def kick_principal(self, principal):  # noqa: ANN001
        return 0

    def refresh_acl(self) -> None:
        self.acl_refreshes += 1

    def events(self, client_id: str, kind: str | None = None) -> list[dict]:
        return [e for e in self.delivered.get(client_id, []) if kind is None or e["kind"] == kind]


@dataclass
class Env:
    services: Services
    pub: InboxRecorder
    path: Path
    callers: dict[str, Caller] = field(default_factory=dict)

    @property
    def messaging(self) -> MessagingService:
        return self.services.messaging

    @property
    def social(self) -> SocialService:
        return self.services.social

    def caller(self, principal: str, label: str = "phone") -> Caller:
        p = self.services.identity.get_cached(principal)
        kind = p.kind if p else "user"
        return Caller(principal, kind, f"{principal}.{label}")

    async def call(self, principal: str, op: str, label: str = "phone", **params: Any) -> dict:
        table = {**self.messaging.ops(), **self.social.ops()}
        return await table[op](self.caller(principal, label), params)

    async def error(self, principal: str, op: str, label: str = "phone", **params: Any) -> ProtocolError:
        try:
            result = await self.call(principal, op, label, **params)
        except ProtocolError as err:
            return err
        raise AssertionError(f"{op} succeeded: {result}")

    async def befriend(self, a: str, b: str) -> None:
        await self.call(a, "contact.request", to=b)
        await self.call(b, "contact.accept", **{"from": a})

    async def mailbox(self, principal: str) -> list[dict]:
        events, _ = await self.services.store.messaging.sync(principal, 0, 100000)
        return [e.doc for e in events]

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0.01)


async def open_env(path: Path, config: dict | None = None, users: tuple[str, ...] = ("alice", "bob", "carol"),
                   devices: tuple[str, ...] = (), clock: Callable[[], float] = time.time) -> Env:
    cfg: RoostConfig = config_from_dict(config or {})
    store = SqliteStore(path / "roost.db")
    await store.open()
    identity = IdentityService(store.identity)
    await identity.load()
    for pid in users:
        if await identity.get(pid) is None:
            await identity.add(pid, "user", secret="pw", name=pid.capitalize())
    for pid in devices:
        if await identity.get(pid) is None:
            await identity.add(pid, "device", device_kind="light", name=f"{pid} light")
    services = Services(config=cfg, store=store, identity=identity, clock=clock)
    services.messaging = MessagingService(services)
    services.social = SocialService(services)
    services.messaging.prune_interval = 3600  # tests run pruning rounds themselves
    await services.messaging.load()
    await services.social.load()
    pub = InboxRecorder()
    await services.messaging.start(pub)
    await services.social.start(pub)
    return Env(services=services, pub=pub, path=path)


async def close_env(env: Env) -> None:
    await env.social.stop()
    await env.messaging.stop()
    await env.services.store.close()
