"""Authentication plugin: CONNECT username/password -> a principal.

Binds identity: a client id of another existing principal's form (`bob`,
`bob.phone`) is refused; any other id is accepted for the principal that logged
in (integrations keep their default, random client ids; the engine keys sessions
by principal and client id, so they never collide). IM requests need the
`<principal>[.<label>]` form (their topics are named by it). An anonymous client
(when allowed) may not use a client id that belongs to a principal. Guessing is
slowed down per address and per principal, whatever the parallelism
(`broker.services.identity.LoginGuard`, bounded tables).

Admin changes made by `roost user/device/service ...` while the broker runs
(possibly from another process) arrive as bus events
(broker/services/admin_log.py); the gateway disconnects removed principals.

A login by JWT sets `session.expires_at` to the token's `exp`; the engine closes
the connection then (as EMQX does), so a token's lifetime bounds its
connection's. A JWKS file (`auth.jwt.jwks_file`) is re-read, off the loop, when
it changes: rotate an identity provider's keys by replacing the file.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amqtt.plugins.base import BaseAuthPlugin

from broker.mqtt.hooks import ConnectRefused
from broker.mqtt.session import loggable
from broker.services.base import cancel_and_wait
from broker.services.identity import LoginAttempt, LoginBusy, LoginGuard
from contract.ids import is_valid_principal_id, principal_of_client_id
from plugins.base import services_of

if TYPE_CHECKING:   # PyJWT is loaded only when auth.jwt is configured (broker/app.py)
    from broker.services.jwt_auth import JwtVerifier

log = logging.getLogger("roost.auth")

JWKS_POLL_SECONDS = 5.0          # how often the JWKS file's mtime and size are compared
MAX_FOREIGN_CLIENT_ID = 128      # characters of a client id not of the principal's own form


class RoostAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        pass

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        services = services_of(self)
        auth = services.config.auth
        # The gateway's guard, shared with the web app's sign-in (one set of failure tables).
        gateway = services.gateway
        self._guard = gateway.logins if gateway is not None else LoginGuard(
            step=auth.failure_delay, cap=auth.failure_delay_max, table_size=auth.failure_table_size,
            per_address=auth.max_concurrent_per_address)
        self._jwks_watcher: asyncio.Task[None] | None = None

    async def authenticate(self, *, session) -> bool | None:  # type: ignore[no-untyped-def, override]
        address = getattr(session, "remote_address", None) or "?"
        username = session.username
        # Only a CONNECT that will check a secret counts against (and waits for) a principal.
        target = username if username and session.password and is_valid_principal_id(username) else None
        try:
            async with self._guard.attempt(address, target) as attempt:
                return await self._decide(session, attempt)
        except LoginBusy as exc:
            log.info("refused CONNECT from %s unchecked: %s", address, exc)
            raise ConnectRefused(ConnectRefused.SERVER_UNAVAILABLE, str(exc)) from None

    async def _decide(self, session: Any, attempt: LoginAttempt) -> bool:
        services = services_of(self)
        address = getattr(session, "remote_address", None) or "?"
        client_id = session.client_id or ""
        username = session.username
        if not username:
            if not services.config.auth.allow_anonymous:
                attempt.failed()
                raise ConnectRefused(ConnectRefused.NOT_AUTHORIZED, "anonymous access is disabled")
            owner = principal_of_client_id(client_id)
            if owner is not None and await services.identity.get(owner) is not None:
                attempt.failed()
                raise ConnectRefused(ConnectRefused.IDENTIFIER_REJECTED,
                                     f"client id {client_id!r} belongs to a principal")
            session.principal = None
            session.kind = None
            session.is_anonymous = True
            return True
        login = None
        if attempt.principal is not None:
            login = await services.identity.login(attempt.principal, session.password or "")
        if login is None:
            attempt.failed()
            log.info("refused CONNECT from %s: bad credentials for %r", address, username)
            raise ConnectRefused(ConnectRefused.BAD_CREDENTIALS, "bad user name or password")
        principal = login.principal
        why = await self._client_id_problem(client_id, principal.id)
        if why is not None:
            attempt.failed(guessed=False)
            log.info("refused CONNECT from %s: client id %s %s", address, loggable(client_id), why)
            raise ConnectRefused(ConnectRefused.IDENTIFIER_REJECTED, f"client id {loggable(client_id)} {why}")
        attempt.succeeded()
        session.principal = principal.id
        session.kind = principal.kind
        session.is_anonymous = False
        session.expires_at = login.expires_at
        return True

    async def _client_id_problem(self, client_id: str, principal_id: str) -> str | None:
        """None when `principal_id` may use `client_id`: its own form (`alice`,
        `alice.<label>`), or a foreign one (an integration's default id such as
        `mqttjs_3f2a` or Home Assistant's random one) of printable ASCII without
        spaces that does not start like another existing principal's ids. The
        engine keys sessions by principal and client id, so a foreign id never
        collides with another principal's session."""
        head, dot, _rest = client_id.partition(".")
        if head == principal_id:
            if principal_of_client_id(client_id) == principal_id:
                return None
            return f"is not '{principal_id}' or '{principal_id}.<label>' (label: letters, digits, _ or -)"
        if not (client_id.isascii() and client_id.isprintable() and " " not in client_id) \
                or len(client_id) > MAX_FOREIGN_CLIENT_ID:
            return f"has spaces, control or non-ASCII characters, or more than {MAX_FOREIGN_CLIENT_ID}"
        if is_valid_principal_id(head) and await services_of(self).identity.get(head) is not None:
            return f"belongs to {head}"
        return None

    # ---- JWKS rotation --------------------------------------------------------
    async def on_roost_start(self, broker) -> None:  # type: ignore[no-untyped-def]
        jwt = services_of(self).identity.jwt
        if jwt is not None and jwt.jwks_path is not None:
            self._jwks_watcher = asyncio.create_task(self._watch_jwks(jwt), name="roost-jwks")

    async def on_roost_stop(self) -> None:
        await cancel_and_wait(self._jwks_watcher)

    async def _watch_jwks(self, jwt: JwtVerifier) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(JWKS_POLL_SECONDS)
            try:
                await loop.run_in_executor(None, jwt.reload_jwks)   # stat + read: off the loop
            except Exception:  # noqa: BLE001 - keep watching; the keys in use stay
                log.exception("re-reading auth.jwt.jwks_file failed")
