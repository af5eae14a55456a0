"""The web app's routes, mounted on an `http` listener next to /metrics
(broker/http/app.py):

* GET  /                 the page (static/index.html); /static/app.js, /static/app.css
* GET  /api/session      who is signed in and the CSRF token the page must send
* POST /api/login        {user, password} -> a session cookie (HttpOnly, SameSite=Strict)
* POST /api/logout       ends the session on the server and closes its pages
* GET  /ws               the WebSocket adapter of the gateway (broker/web/socket.py)
* the file routes of broker/web/files.py, when present (pictures and files)

Every response carries a Content-Security-Policy that allows scripts from this
origin only (no inline script), `nosniff` and no framing. Every state-changing
request (POST, and the WebSocket, which can act as the person) must come from
this origin and carry the CSRF token: a pre-sign-in token bound to an HttpOnly
cookie for /api/login, the session's own afterwards. Sign-in goes through the
identity service with the gateway's LoginGuard, the one the MQTT listeners
use, so failed logins slow guessing down across both.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from broker.services.gateway import ENVELOPE_SLACK
from broker.services.identity import LoginBusy
from broker.store.base import NotFoundError, StoreUnavailable
from broker.web.hub import WebHub
from broker.web.sessions import WebSession, WebSessions, new_token, same_token
from broker.web.socket import WsConnection, frame
from contract import topics
from contract.envelopes import error_response
from contract.errors import ErrorCode
from contract.ids import is_valid_principal_id

if TYPE_CHECKING:
    from broker.services.gateway import Gateway
    from broker.services.runtime import Services

log = logging.getLogger("roost.web")

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
SESSION_COOKIE = "roost_session"
PRE_COOKIE = "roost_presignin"     # binds the sign-in form's CSRF token to this browser
CSRF_HEADER = "X-CSRF-Token"
MAX_LOGIN_BODY = 4096
HEARTBEAT = 30.0                   # seconds between WebSocket pings (a vanished page is noticed)

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def own_origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def cross_origin(request: web.Request) -> bool:
    """True when the browser says the request comes from another site's page
    (Origin is sent on every POST and WebSocket by current browsers)."""
    origin = request.headers.get("Origin")
    return origin is not None and origin != own_origin(request)


class WebApp:
    def __init__(self, services: Services, *, sessions: WebSessions | None = None) -> None:
        gateway = services.gateway
        assert gateway is not None, "broker.app.build_services builds the gateway"
        self._services = services
        self.files = services.files      # the files service the file routes serve from (None: no files)
        self._gateway: Gateway = gateway
        self.sessions = sessions or WebSessions(services.store.web_sessions, secret_set_at=self._secret_set_at)
        self.hub = WebHub(services, self.sessions)
        self._static: dict[str, bytes] = {}
        self._max_frame = services.config.limits.max_body * 6 + ENVELOPE_SLACK
        self.routes: list[web.RouteDef] = [
            web.get("/", self.page),
            web.get("/favicon.ico", self.no_icon),
            web.get("/static/{name}", self.static),
            web.get("/api/session", self.session_info),
            web.post("/api/login", self.login),
            web.post("/api/logout", self.logout),
            web.get("/ws", self.websocket),
        ]
        file_routes = self._file_routes()
        self.files_http = bool(file_routes)     # told to the page: GET /files/<id> is served
        self.routes += file_routes

    def _file_routes(self) -> list[web.RouteDef]:
        """The pictures-and-files routes (broker/web/files.py, the files service's
        HTTP side), once that module exists."""
        if importlib.util.find_spec("broker.web.files") is None:
            return []
        files = importlib.import_module("broker.web.files")
        return list(files.routes(self))

    # ---- for every route -------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in SAFE_METHODS and cross_origin(request):
            response: web.StreamResponse = _error(403, "cross-origin request refused")
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = exc
            except StoreUnavailable:   # sessions are in the store: a PostgreSQL outage, say
                response = _error(503, "the store is unavailable, try again in a moment")
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    async def on_shutdown(self, app: web.Application) -> None:
        await self.hub.close_all("the broker is stopping")

    async def _secret_set_at(self, principal: str) -> float | None:
        p = await self._services.identity.get(principal)
        return p.secret_set_at if p is not None else None

    async def session_of(self, request: web.Request) -> WebSession | None:
        """The signed-in session of this request's cookie, or None (for the file routes too)."""
        return await self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def csrf_ok(self, request: web.Request, session: WebSession) -> bool:
        """A state-changing request of `session` carries its CSRF token."""
        return same_token(request.headers.get(CSRF_HEADER, ""), session.csrf)

    def _cookie(self, response: web.StreamResponse, request: web.Request, name: str, value: str) -> None:
        response.set_cookie(name, value, path="/", httponly=True, samesite="Strict", secure=request.secure)

    # ---- page ------------------------------------------------------------------
    async def _read_static(self, name: str) -> bytes:
        body = self._static.get(name)
        if body is None:
            body = await asyncio.get_running_loop().run_in_executor(None, (STATIC / name).read_bytes)
            self._static[name] = body
        return body

    async def page(self, request: web.Request) -> web.Response:
        return await self._static_response("index.html")

    async def no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES or name == "index.html":
            return _error(404, "not found")
        return await self._static_response(name)

    async def _static_response(self, name: str) -> web.Response:
        body = await self._read_static(name)
        return web.Response(body=body, content_type=STATIC_FILES[name], charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    # ---- sign-in -----------------------------------------------------------------
    async def session_info(self, request: web.Request) -> web.Response:
        session = await self.session_of(request)
        if session is not None:
            p = self._services.identity.get_cached(session.principal)
            return web.json_response({"user": session.principal, "name": p.name if p else session.principal,
                                      "csrf": session.csrf}, headers={"Cache-Control": "no-store"})
        token = request.cookies.get(PRE_COOKIE)
        if not token or len(token) > 128:
            token = new_token()
        response = web.json_response({"user": None, "csrf": token}, headers={"Cache-Control": "no-store"})
        self._cookie(response, request, PRE_COOKIE, token)
        return response

    async def login(self, request: web.Request) -> web.Response:
        pre = request.cookies.get(PRE_COOKIE, "")
        if not pre or not same_token(request.headers.get(CSRF_HEADER, ""), pre):
            return _error(403, "missing or wrong CSRF token (reload the page)")
        if request.content_length is None or request.content_length > MAX_LOGIN_BODY:
            return _error(400, "send {user, password} as JSON")
        try:
            doc = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            doc = None
        user = doc.get("user") if isinstance(doc, dict) else None
        password = doc.get("password") if isinstance(doc, dict) else None
        if not isinstance(user, str) or not isinstance(password, str) or len(user) > 64 or len(password) > 1024:
            return _error(400, "send {user, password} as JSON")
        address = request.remote or "?"
        target = user if user and password and is_valid_principal_id(user) else None
        identity = self._services.identity
        try:
            async with self._gateway.logins.attempt(address, target) as attempt:
                login = await identity.login(target, password) if target is not None else None
                if login is None:
                    attempt.failed()
                    log.info("web: refused sign-in from %s: bad credentials for %r", address, user[:64])
                    return _error(401, "wrong user or password")
                if login.principal.kind != "user":
                    attempt.failed(guessed=False)
                    return _error(403, "only people sign in here (devices and services use MQTT)")
                attempt.succeeded()
        except LoginBusy as exc:
            return _error(503, f"too many sign-ins at once, try again in a moment ({exc})")
        p = login.principal
        try:
            token, session = await self.sessions.create(p.id, p.kind, expires_at=login.expires_at)
        except NotFoundError:   # removed while signing in
            return _error(401, "wrong user or password")
        response = web.json_response({"user": p.id, "name": p.name, "csrf": session.csrf})
        self._cookie(response, request, SESSION_COOKIE, token)
        response.del_cookie(PRE_COOKIE, path="/")
        log.info("web: %s signed in from %s", p.id, address)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        session = await self.session_of(request)
        if session is None:
            return _error(401, "not signed in")
        if not self.csrf_ok(request, session):
            return _error(403, "missing or wrong CSRF token (reload the page)")
        await self.sessions.end(session)
        await self.hub.close_session(session, "signed out")
        response = web.json_response({"user": None})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    # ---- the WebSocket adapter -------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        session = await self.session_of(request)
        if session is None:
            return _error(401, "not signed in")
        # A WebSocket is a GET that can act as the person: same origin and the CSRF token.
        if request.headers.get("Origin") != own_origin(request):
            return _error(403, "cross-origin WebSocket refused")
        if not same_token(request.query.get("csrf", ""), session.csrf):
            return _error(403, "missing or wrong CSRF token (reload the page)")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=self._max_frame + 1024)
        await ws.prepare(request)
        client_id = f"{session.principal}.web-{secrets.token_hex(4)}"
        conn = WsConnection(ws, session, client_id)
        await self._serve(conn)
        return ws

    async def _serve(self, conn: WsConnection) -> None:
        gateway = self._gateway
        principal, client_id = conn.principal, conn.client_id
        # the page learns its client id first (its responses' topic)
        conn.offer(json.dumps({"topic": "roost/web/hello",
                               "payload": {"client_id": client_id, "user": principal, "files": self.files_http}}))
        writer = asyncio.get_running_loop().create_task(conn.run_writer(), name=f"web-writer-{client_id}")
        self.hub.add(conn)
        gateway.connection_opened(principal, client_id)
        reason = "closed"
        try:
            await gateway.client_connected(client_id, principal, True)
            await gateway.client_subscribed(client_id, principal, True, topics.inbox(principal), sink=conn)
            resp_topic = topics.resp(client_id)

            async def reply(payload: bytes) -> None:
                await conn.send(frame(resp_topic, payload))

            async for msg in conn.ws:
                if not await self.sessions.alive(conn.session):   # signed out, or expired (a token's exp)
                    reason = "signed out"
                    await conn.close("signed out")
                    break
                if msg.type == WSMsgType.TEXT:
                    gateway.submit_envelope(principal, conn.session.kind, client_id, msg.data.encode(), reply)
                elif msg.type == WSMsgType.BINARY:
                    await reply(error_response(None, ErrorCode.BAD_REQUEST, "send requests as text frames"))
                elif msg.type == WSMsgType.ERROR:
                    reason = "error"
                    break
        except ConnectionError:
            reason = "error"
        finally:
            self.hub.discard(conn)
            conn.closed()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            gateway.connection_closed(principal, client_id, reason, None)
            await gateway.client_disconnected(client_id, principal, reason)
            if not conn.ws.closed:
                await conn.ws.close()

    def figures(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions), "pages": len(self.hub), "dropped": self.hub.dropped(),
                "sessions_evicted": self.sessions.evicted}
