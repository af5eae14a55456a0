"""The engine's clock: every TICK it closes connections that went silent or
stalled, that never sent CONNECT or took too long to authenticate, or whose
login (a JWT) expired; it stops stalled sessions from holding publishers; and
once a minute it expires persistent sessions disconnected for SESSION_EXPIRY.

Keepalive: a connection silent for 1.5 x keepalive is closed and its will
published (amqtt defect 4).
"""

from __future__ import annotations

import asyncio
import logging
import time

from broker.mqtt.connection import CONNECTED, NEW
from broker.mqtt.hooks import DisconnectReason
from broker.mqtt.lifecycle import ClientLifecycle
from broker.mqtt.registry import SessionRegistry
from broker.mqtt.routing import Router

log = logging.getLogger("roost.mqtt")

TICK = 0.5                       # seconds between checks
CONNECT_TIMEOUT = 10.0           # seconds from TCP accept to CONNECT
AUTH_TIMEOUT = 60.0              # seconds a CONNECT may spend in authentication
PAUSED_GRACE = 60.0              # extra seconds for a connection we stopped reading
EXPIRY_SWEEP = 60.0              # seconds between session expiry sweeps


class Ticker:
    def __init__(self, *, lifecycle: ClientLifecycle, registry: SessionRegistry, router: Router,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._lifecycle = lifecycle
        self._registry = registry
        self._router = router
        self._loop = loop

    async def run(self) -> None:
        last_sweep = time.time()
        while True:
            await asyncio.sleep(TICK)
            now = self._loop.time()
            self.check_connections(now, time.time())
            self._router.release_stalled(now)
            wall = time.time()
            if wall - last_sweep > EXPIRY_SWEEP:
                last_sweep = wall
                self._registry.expire(wall)

    def check_connections(self, now: float, wall: float) -> None:
        """`now`: loop time; `wall`: epoch seconds (login expiry)."""
        for conn in list(self._lifecycle.conns):
            if conn.state == CONNECTED:
                expires_at = conn.info.expires_at if conn.info is not None else None
                if expires_at is not None and wall >= expires_at:
                    # its login (a JWT) ran out: closed as EMQX does, will published
                    log.info("closing %s: its login token expired", conn.client_id)
                    conn.close(DisconnectReason.KICKED)
                    continue
                ka = conn.keep_alive
                if conn.paused_since is not None:
                    # we are not reading it (it does not read what we send, or its
                    # requests pile up): its pings cannot be heard; give it longer
                    if now - conn.paused_since > ka * 1.5 + PAUSED_GRACE:
                        log.warning("closing %s: stalled for %.0fs", conn.client_id, now - conn.paused_since)
                        conn.close(DisconnectReason.KEEPALIVE)
                elif ka and now - conn.last_recv > ka * 1.5:
                    log.info("closing %s: nothing received for 1.5 x keepalive (%ds)", conn.client_id, ka)
                    conn.close(DisconnectReason.KEEPALIVE)
            elif conn.state == NEW:
                limit = CONNECT_TIMEOUT if conn.info is None else AUTH_TIMEOUT
                if now - conn.created > limit:
                    conn.abort(DisconnectReason.KICKED)
