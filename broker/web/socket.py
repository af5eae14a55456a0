"""One signed-in page's WebSocket: the gateway's adapter for that connection.

Frames (docs/WEB.md):
* page -> broker: a request envelope, exactly the payload an MQTT client
  publishes on `roost/req/<client id>` (docs/PROTOCOL.md);
* broker -> page: `{"topic": T, "payload": P}` with the MQTT topic the same
  bytes would travel on and P the very payload: `roost/resp/<client id>`
  (responses), `roost/inbox/<principal>` (mailbox events), `roost/presence/<p>`
  and `roost/telemetry/<device>` (live presence and readings).

The connection is the `Publisher` of its own inbox pusher (the gateway's
`sink`), so mailbox events are pushed in `n` order, as to an MQTT client.
Outgoing frames wait in a queue bounded in bytes: a response waits for room
(requests in progress are bounded by the gateway), a mailbox push that finds it
full is refused and retried by its pusher (never a gap), a presence or
telemetry frame is dropped and counted (the next one carries the newest state).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque

from aiohttp import web

from broker.web.sessions import WebSession

log = logging.getLogger("roost.web")

MAX_QUEUED_BYTES = 8 * 1024 * 1024   # frames waiting for one slow page


def frame(topic: str, payload: bytes) -> str:
    """The broker -> page frame; `payload` is JSON already (never re-encoded)."""
    return '{"topic":' + json.dumps(topic) + ',"payload":' + payload.decode() + "}"


class WsConnection:
    def __init__(self, ws: web.WebSocketResponse, session: WebSession, client_id: str,
                 max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.ws = ws
        self.session = session
        self.client_id = client_id
        self._max = max_queued_bytes
        self._queue: deque[str] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self.open = True
        self.dropped = 0

    @property
    def principal(self) -> str:
        return self.session.principal

    # ---- outgoing ----------------------------------------------------------------
    def _full(self, size: int) -> bool:
        return bool(self._queue) and self._bytes + size > self._max

    def _put(self, text: str) -> None:
        self._queue.append(text)
        self._bytes += len(text)
        self._wake.set()

    def offer(self, text: str) -> bool:
        """Queue a frame if there is room (False: full, or closed)."""
        if not self.open or self._full(len(text)):
            return False
        self._put(text)
        return True

    async def send(self, text: str) -> None:
        """Queue a frame, waiting for room (a response must not be lost)."""
        while self.open and self._full(len(text)):
            self._room.clear()
            await self._room.wait()
        if self.open:
            self._put(text)

    def notice(self, topic: str, payload: bytes) -> None:
        """A presence or telemetry frame: dropped (counted, logged) when the page lags."""
        if not self.offer(frame(topic, payload)) and self.open:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("web page %s is not reading: %d presence/telemetry frame(s) dropped so far "
                            "(%d bytes queued)", self.client_id, self.dropped, self._bytes)

    async def run_writer(self) -> None:
        """Write queued frames in order until the connection closes."""
        try:
            while self.open:
                await self._wake.wait()
                self._wake.clear()
                while self._queue and self.open:
                    text = self._queue.popleft()
                    self._bytes -= len(text)
                    self._room.set()
                    await self.ws.send_str(text)
        except (ConnectionError, RuntimeError):
            pass   # the page went away; the reader sees the close
        finally:
            self.closed()

    def closed(self) -> None:
        self.open = False
        self._queue.clear()
        self._bytes = 0
        self._room.set()
        self._wake.set()

    async def close(self, message: str) -> None:
        self.closed()
        if not self.ws.closed:
            await self.ws.close(code=4001, message=message.encode()[:120])

    # ---- Publisher, for this client's inbox pusher ---------------------------------
    async def deliver(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        return client_id == self.client_id and self.offer(frame(topic, payload))

    def deliver_nowait(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool | None:
        if client_id != self.client_id or not self.open:
            return False
        return True if self.offer(frame(topic, payload)) else None

    def client_ids_of(self, principal: str) -> list[str]:
        return [self.client_id] if self.open and principal == self.principal else []

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        return 0   # services publish through the broker, never through one page

    async def kick_principal(self, principal: str) -> int:
        return 0   # the web hub closes pages itself (broker/web/hub.py)

    def refresh_acl(self) -> None:
        pass
