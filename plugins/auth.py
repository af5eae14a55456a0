"""Authentication plugin: CONNECT username/password -> a principal.

Binds identity: the client id must be `<principal>` or `<principal>.<label>`, and
an anonymous client (when allowed) may not use a client id that belongs to a
principal. Failed attempts from one address are slowed down (bounded table).

It also applies admin changes made by `roost user/device/service ...` while the
broker runs (possibly from another process): removed principals are
disconnected.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from amqtt.plugins.base import BaseAuthPlugin

from broker.mqtt.hooks import ConnectRefused
from broker.services.base import cancel_and_wait
from broker.services.identity import FailureThrottle
from contract.ids import is_valid_principal_id, principal_of_client_id
from plugins.base import broker_of, services_of

log = logging.getLogger("roost.auth")

ADMIN_POLL_SECONDS = 0.5


class RoostAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        pass

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        auth = services_of(self).config.auth
        self._throttle = FailureThrottle(auth.failure_delay, auth.failure_delay_max, auth.failure_table_size)
        self._poller: asyncio.Task[None] | None = None

    async def authenticate(self, *, session) -> bool | None:  # type: ignore[no-untyped-def, override]
        services = services_of(self)
        address = getattr(session, "remote_address", None) or "?"
        delay = self._throttle.delay_for(address)
        if delay:
            await asyncio.sleep(delay)
        client_id = session.client_id or ""
        username = session.username
        if not username:
            if not services.config.auth.allow_anonymous:
                self._throttle.failed(address)
                raise ConnectRefused(ConnectRefused.NOT_AUTHORIZED, "anonymous access is disabled")
            owner = principal_of_client_id(client_id)
            if owner is not None and await services.identity.get(owner) is not None:
                self._throttle.failed(address)
                raise ConnectRefused(ConnectRefused.IDENTIFIER_REJECTED,
                                     f"client id {client_id!r} belongs to a principal")
            session.principal = None
            session.kind = None
            session.is_anonymous = True
            return True
        password = session.password or ""
        principal = None
        if is_valid_principal_id(username) and password:
            principal = await services.identity.authenticate(username, password)
        if principal is None:
            self._throttle.failed(address)
            log.info("refused CONNECT from %s: bad credentials for %r", address, username)
            raise ConnectRefused(ConnectRefused.BAD_CREDENTIALS, "bad user name or password")
        if principal_of_client_id(client_id) != principal.id:
            self._throttle.failed(address)
            log.info("refused CONNECT from %s: client id %r is not %s's", address, client_id, principal.id)
            raise ConnectRefused(ConnectRefused.IDENTIFIER_REJECTED,
                                 f"client id must be '{principal.id}' or '{principal.id}.<label>'")
        self._throttle.succeeded(address)
        session.principal = principal.id
        session.kind = principal.kind
        session.is_anonymous = False
        return True

    # ---- admin changes from other processes --------------------------------
    async def on_roost_start(self, broker) -> None:  # type: ignore[no-untyped-def]
        self._poller = asyncio.create_task(self._poll_admin_log(), name="roost-admin-log")

    async def on_roost_stop(self) -> None:
        await cancel_and_wait(self._poller)

    async def _poll_admin_log(self) -> None:
        services = services_of(self)
        position = await services.identity.admin_log_head()
        while True:
            await asyncio.sleep(ADMIN_POLL_SECONDS)
            try:
                changes = await services.identity.admin_changes(position)
            except Exception:  # noqa: BLE001 - keep polling; the store may be busy
                log.exception("reading the admin log failed")
                continue
            for seq, principal_id, action in changes:
                position = seq
                try:
                    if action == "removed":
                        # Even if the id was registered again since (same poll), the
                        # old principal's connections and in-memory state must go.
                        await self._forget(principal_id)
                    elif action == "added":
                        await self._each_service("principal_added", principal_id)
                except Exception:  # noqa: BLE001 - keep polling; logged
                    log.exception("applying admin change %s of %s failed", action, principal_id)

    async def _forget(self, principal_id: str) -> None:
        services = services_of(self)
        broker = broker_of(self)
        services.relations.forget_principal(principal_id)
        broker.refresh_acl()
        closed = await broker.kick_principal(principal_id)
        # its mailbox, memberships, contacts, ownerships, presence and readings
        await self._each_service("principal_removed", principal_id)
        log.info("principal %s removed: closed %d connection(s)", principal_id, closed)

    async def _each_service(self, hook: str, principal_id: str) -> None:
        for svc in services_of(self).all():
            fn = getattr(svc, hook, None)
            if fn is None:
                continue
            try:
                await fn(principal_id)
            except Exception:  # noqa: BLE001 - one service failing must not stop the others
                log.exception("%s(%s) in %s failed", hook, principal_id, type(svc).__name__)
