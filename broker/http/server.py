"""An aiohttp application served on a socket `bind_listeners` bound, looking to
RoostBroker (amqtt's Server, bound_ports) like the asyncio.Server of an MQTT
listener: `sockets`, `close()`, `wait_closed()`."""

from __future__ import annotations

import asyncio
import socket
import ssl

from aiohttp import web


class HttpServer:
    def __init__(self, runner: web.AppRunner, server: asyncio.Server) -> None:
        self._runner = runner
        self._server = server

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._server.sockets)

    def close(self) -> None:
        self._server.close()   # no new connections; the runner ends the open ones below

    async def wait_closed(self) -> None:
        await self._server.wait_closed()
        await self._runner.cleanup()


async def serve_http(app: web.Application, sock: socket.socket, ssl_context: ssl.SSLContext | None,
                     backlog: int) -> HttpServer:
    # No access log: a scrape every few seconds would fill the broker's log.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    handler = runner.server   # the protocol factory, made by setup()
    assert handler is not None
    server = await asyncio.get_running_loop().create_server(handler, sock=sock, ssl=ssl_context, backlog=backlog)
    return HttpServer(runner, server)
