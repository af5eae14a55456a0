"""The open pages, by principal: live presence and telemetry for them, and
signing a principal out everywhere when it is removed or its password changes.

Presence and telemetry reach MQTT clients as publishes the ACL filters
(broker/services/acl.py); a page gets the same documents, chosen by the same
relations: a presence change to whoever may observe that principal, a device's
newest readings to its owners and sharees (and the device itself). A device
shared with or unshared from someone tells that person's pages (DEVICES_NOTICE)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from broker.services.events import (
    DeviceShared,
    DeviceUnshared,
    PresenceChanged,
    PrincipalRemoved,
    SecretChanged,
    TelemetryReceived,
)
from broker.store.base import StoreUnavailable
from broker.store.jsonutil import compact_json
from broker.web.sessions import WebSession, WebSessions
from broker.web.socket import WsConnection
from contract import topics

if TYPE_CHECKING:
    from broker.services.runtime import Services

log = logging.getLogger("roost.web")

DEVICES_NOTICE = "roost/web/devices"   # the page's own topic: your devices changed (shared, unshared)


class WebHub:
    def __init__(self, services: Services, sessions: WebSessions) -> None:
        self._services = services
        self._sessions = sessions
        self._by_principal: dict[str, set[WsConnection]] = {}
        self._dropped_before = 0   # frames dropped by pages that have closed since
        self._checker: asyncio.Task[None] | None = None   # closes pages whose session ended on another node
        bus = services.bus
        bus.subscribe(PresenceChanged, self._presence_changed)
        bus.subscribe(TelemetryReceived, self._telemetry_received)
        bus.subscribe(PrincipalRemoved, self._principal_removed)
        bus.subscribe(SecretChanged, self._secret_changed)
        bus.subscribe(DeviceShared, self._devices_changed)
        bus.subscribe(DeviceUnshared, self._devices_changed)

    def __len__(self) -> int:
        return sum(len(c) for c in self._by_principal.values())

    def add(self, conn: WsConnection) -> None:
        self._by_principal.setdefault(conn.principal, set()).add(conn)
        if self._checker is None:   # started with the first page (on the running loop), stopped by close_all
            self._checker = asyncio.get_running_loop().create_task(self._check_sessions(), name="roost-web-sessions")

    def discard(self, conn: WsConnection) -> None:
        group = self._by_principal.get(conn.principal)
        if group is not None and conn in group:
            self._dropped_before += conn.dropped
            group.discard(conn)
            if not group:
                del self._by_principal[conn.principal]

    def dropped(self) -> int:
        """Presence and telemetry frames dropped for pages that did not read, since start."""
        return self._dropped_before + sum(c.dropped for group in self._by_principal.values() for c in group)

    async def close_session(self, session: WebSession, why: str) -> None:
        for conn in [c for c in self._by_principal.get(session.principal, ()) if c.session.key == session.key]:
            await conn.close(why)

    async def close_all(self, why: str) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None
        for conn in [c for group in self._by_principal.values() for c in group]:
            await conn.close(why)

    async def _check_sessions(self) -> None:
        """Every `recheck` seconds: close the open pages whose session ended
        elsewhere (signed out through another node, or expired)."""
        while True:
            await asyncio.sleep(self._sessions.recheck)
            conns = [c for group in self._by_principal.values() for c in group]
            ended = await self._sessions.ended(c.session for c in conns)
            for conn in conns:
                if conn.session.key in ended:
                    await conn.close("signed out")

    # ---- bus ---------------------------------------------------------------------
    def _presence_changed(self, event: PresenceChanged) -> None:
        if not self._by_principal:
            return
        relations = self._services.relations
        topic = topics.presence(event.principal)
        payload = compact_json(event.state).encode()
        for principal, group in self._by_principal.items():
            if relations.can_observe(principal, event.principal):
                for conn in group:
                    conn.notice(topic, payload)

    def _telemetry_received(self, event: TelemetryReceived) -> None:
        if not self._by_principal:
            return
        readers = self._services.relations.device_users(event.device) | {event.device}
        topic = topics.telemetry(event.device)
        payload: bytes | None = None
        for principal in readers:
            group = self._by_principal.get(principal)
            if group:
                payload = payload or compact_json(event.latest).encode()
                for conn in group:
                    conn.notice(topic, payload)

    def _devices_changed(self, event: DeviceShared | DeviceUnshared) -> None:
        # Not a mailbox event (an MQTT client asks `devices` again when it wants):
        # a page-only notice, so a device shared with you appears without a reload.
        payload = compact_json({"device": event.device,
                                "event": "shared" if isinstance(event, DeviceShared) else "unshared"}).encode()
        for conn in self._by_principal.get(event.principal, ()):
            conn.notice(DEVICES_NOTICE, payload)

    async def _sign_out(self, principal: str, why: str) -> None:
        try:
            ended = await self._sessions.end_principal(principal)
        except StoreUnavailable:   # its pages still close; a removed principal's rows go with it in the store
            log.warning("web: could not end the sessions of %s (%s): the store is unavailable", principal, why)
            ended = 0
        conns = list(self._by_principal.get(principal, ()))
        for conn in conns:
            await conn.close(why)
        if ended or conns:
            log.info("web: %s signed out (%s): %d session(s), %d page(s)", principal, why, ended, len(conns))

    async def _principal_removed(self, event: PrincipalRemoved) -> None:
        await self._sign_out(event.principal, "removed")

    async def _secret_changed(self, event: SecretChanged) -> None:
        if event.what == "password":
            await self._sign_out(event.principal, "password changed")

