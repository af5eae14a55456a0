"""The routes of an http listener.

* GET /metrics      Prometheus text format (broker/http/metrics.py)
* GET /healthz      200 while the process serves at all (liveness)
* GET /readyz       200 once started, with every listener bound and the store
                    taking writes; else 503 and the reasons, one per line
* GET /status.json  what `roost status` prints (counts only: no client ids or
                    principal names)

and, with `web` (broker/web/app.py, the household's web app), its page, sign-in
and WebSocket: one listener serves both. Each socket gets its own aiohttp
Application (one runner each); they share this object, so one
CollectorRegistry and one set of web sessions per broker.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.http.metrics import WebCollector, exposition, registry_for
from broker.monitor import Monitor

if TYPE_CHECKING:
    from broker.web.app import WebApp


class HttpApp:
    def __init__(self, monitor: Monitor, web_app: WebApp | None = None) -> None:
        self._monitor = monitor
        self._web = web_app
        self._registry = registry_for(monitor)
        if web_app is not None:
            self._registry.register(WebCollector(web_app))
        self.routes: list[web.RouteDef] = [
            web.get("/metrics", self.metrics),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/status.json", self.status),
        ]

    def application(self) -> web.Application:
        if self._web is None:
            app = web.Application()
            app.add_routes(self.routes)
            return app
        app = web.Application(middlewares=[self._web.middleware])
        app.add_routes(self.routes + self._web.routes)
        app.on_shutdown.append(self._web.on_shutdown)
        return app

    async def metrics(self, request: web.Request) -> web.Response:
        # The scrape reads live figures: one pass over the sessions, on the loop
        # (no I/O; the store's size is measured by the monitor's own task).
        body = exposition(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        problems = self._monitor.problems()
        if problems:
            return web.Response(status=503, text="".join(p + "\n" for p in problems))
        return web.Response(text="ready\n")

    async def status(self, request: web.Request) -> web.Response:
        doc = self._monitor.status()
        if self._web is not None:
            doc["web"] = self._web.figures()   # counts only, like the rest
        return web.Response(text=json.dumps(doc), content_type="application/json")
