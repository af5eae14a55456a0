"""The web app over HTTP and its WebSocket (issue 14, items 1 and 5): a real
broker subprocess, real HTTP requests and WebSockets (aiohttp's client), real
MQTT clients beside them. The browser tests are tests/test_web_browser.py."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from tests.clients import ConnectFailed, ImClient
from tests.harness import RoostProcess, free_port
from tests.test_mqtt_listeners import make_cert

STATIC = Path(__file__).resolve().parent.parent / "broker" / "web" / "static"


def web_config(**auth: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"listeners": {"web": {"type": "http", "bind": f"127.0.0.1:{free_port()}"}}}
    if auth:
        cfg["auth"] = auth
    return cfg


def base_url(broker: RoostProcess) -> str:
    return f"http://{broker.config['listeners']['web']['bind']}"


class WebClient:
    """One browser's worth of HTTP: its cookie jar, CSRF token and WebSocket."""

    def __init__(self, broker: RoostProcess) -> None:
        self.base = base_url(broker)
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.client_id = ""
        self.frames: list[dict[str, Any]] = []
        self._ids = 0

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.http.close()

    async def session(self) -> dict[str, Any]:
        async with self.http.get(self.base + "/api/session") as r:
            doc: dict[str, Any] = await r.json()
        self.csrf = doc["csrf"]
        return doc

    async def login(self, user: str, password: str) -> aiohttp.ClientResponse:
        await self.session()
        async with self.http.post(self.base + "/api/login", json={"user": user, "password": password},
                                  headers={"X-CSRF-Token": self.csrf}) as r:
            await r.read()
            if r.status == 200:
                self.csrf = (await r.json())["csrf"]
            return r

    async def connect(self) -> None:
        self.ws = await self.http.ws_connect(self.base + f"/ws?csrf={self.csrf}", headers={"Origin": self.base})
        hello = await self.next_frame()
        assert hello["topic"] == "roost/web/hello"
        self.client_id = hello["payload"]["client_id"]

    async def next_frame(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.ws is not None
        msg = await self.ws.receive(timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        doc: dict[str, Any] = json.loads(msg.data)
        self.frames.append(doc)
        return doc

    async def call(self, op: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        self._ids += 1
        rid = f"w{self._ids}"
        await self.ws.send_str(json.dumps({"id": rid, "op": op, **params}))
        while True:
            doc = await self.next_frame()
            if doc["topic"] == f"roost/resp/{self.client_id}" and doc["payload"]["id"] == rid:
                return dict(doc["payload"])

    async def wait_frame(self, fits: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        for doc in self.frames:
            if fits(doc) and not doc.get("_seen"):
                doc["_seen"] = True
                return doc
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            doc = await self.next_frame(left)
            if fits(doc):
                doc["_seen"] = True
                return doc
        raise TimeoutError("no such frame")


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 60))


def set_cookies(response: aiohttp.ClientResponse) -> dict[str, Any]:
    jar: dict[str, Any] = {}
    for header in response.headers.getall("Set-Cookie", []):
        c = SimpleCookie()
        c.load(header)
        for name, morsel in c.items():
            jar[name] = (morsel, header)
    return jar


def test_page_is_self_contained_with_a_strict_csp(roost_factory) -> None:
    broker = roost_factory(web_config())
    for name in ("index.html", "app.js", "app.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"https?://", text), f"{name} names an outside URL"
        assert "innerHTML" not in text and "outerHTML" not in text and "insertAdjacentHTML" not in text
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script in index.html"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler in index.html"

    async def body() -> None:
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/static/app.js", "/static/app.css"):
                async with http.get(base_url(broker) + path) as r:
                    assert r.status == 200, path
                    csp = r.headers["Content-Security-Policy"]
                    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
                    assert "frame-ancestors 'none'" in csp
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
            async with http.get(base_url(broker) + "/static/../roost.yaml") as r:
                assert r.status == 404
            async with http.get(base_url(broker) + "/metrics") as r:   # still served beside the app
                assert r.status == 200

    run(body)


def test_sign_in_cookie_csrf_and_logout(roost_factory) -> None:
    broker = roost_factory(web_config())
    broker.add_user("alice", "alice-pw", name="Alice")

    async def body() -> None:
        web = WebClient(broker)
        try:
            doc = await web.session()
            assert doc["user"] is None and doc["csrf"]
            url = web.base + "/api/login"
            creds = {"user": "alice", "password": "alice-pw"}
            # no CSRF token, a wrong one, another site's page: refused, nothing signed in
            async with web.http.post(url, json=creds) as r:
                assert r.status == 403
            async with web.http.post(url, json=creds, headers={"X-CSRF-Token": "x" + web.csrf}) as r:
                assert r.status == 403
            async with web.http.post(url, json=creds, headers={"X-CSRF-Token": web.csrf,
                                                               "Origin": "http://evil.example"}) as r:
                assert r.status == 403
            async with web.http.post(url, data="not json", headers={"X-CSRF-Token": web.csrf}) as r:
                assert r.status == 400
            assert (await web.session())["user"] is None

            r = await web.login("alice", "wrong")
            assert r.status == 401
            r = await web.login("alice", "alice-pw")
            assert r.status == 200
            cookies = set_cookies(r)
            morsel, header = cookies["roost_session"]
            assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/", header
            assert "alice-pw" not in header and "alice-pw" not in await r.text()
            info = await web.session()
            assert info["user"] == "alice" and info["name"] == "Alice"

            # the WebSocket: same origin and the session's CSRF token, or nothing
            for query, origin in ((f"csrf={web.csrf}", "http://evil.example"), ("csrf=nope", web.base),
                                  (f"csrf={web.csrf}", None)):
                headers = {"Origin": origin} if origin else {}
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await web.http.ws_connect(web.base + "/ws?" + query, headers=headers)
                assert err.value.status == 403
            await web.connect()
            assert web.client_id.startswith("alice.web-")
            got = await web.call("profile.get")
            assert got["ok"] and got["result"]["name"] == "Alice"
            bad = await web.call("no.such.op")
            assert bad["error"]["code"] == "bad_request"
            assert web.ws is not None
            await web.ws.send_str("not json")
            frame = await web.wait_frame(lambda d: d["topic"].startswith("roost/resp/")
                                         and d["payload"]["id"] is None)
            assert frame["payload"]["error"]["code"] == "bad_request"

            # logout needs the CSRF token too; then the session is gone on the server
            cookie = web.http.cookie_jar.filter_cookies(yarl.URL(web.base))["roost_session"].value
            async with web.http.post(web.base + "/api/logout") as r:
                assert r.status == 403
            assert (await web.session())["user"] == "alice"
            async with web.http.post(web.base + "/api/logout", headers={"X-CSRF-Token": web.csrf}) as r:
                assert r.status == 200
            closed = await web.ws.receive(10)
            while closed.type == aiohttp.WSMsgType.TEXT:   # frames sent before the close
                closed = await web.ws.receive(10)
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closed
            async with aiohttp.ClientSession(cookies={"roost_session": cookie}) as replay:
                async with replay.get(web.base + "/api/session") as r2:
                    assert (await r2.json())["user"] is None
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await replay.ws_connect(web.base + f"/ws?csrf={web.csrf}", headers={"Origin": web.base})
                assert err.value.status == 401
        finally:
            await web.close()

    run(body)


def test_failed_logins_are_shared_with_mqtt(roost_factory) -> None:
    broker = roost_factory(web_config(failure_delay=0.6, failure_delay_max=5.0))
    broker.add_user("alice", "alice-pw")

    async def body() -> None:
        web = WebClient(broker)
        try:
            for _ in range(3):
                assert (await web.login("alice", "guess")).status == 401
            # Three failures on the web from this address: the next MQTT CONNECT from it,
            # with the right password, waits their delay (1.8 s) before it is checked.
            started = time.monotonic()
            c = await asyncio.to_thread(ImClient("alice", "phone").open, broker, "alice-pw")
            waited = time.monotonic() - started
            c.disconnect()
            assert waited >= 1.5, waited
            # and MQTT failures slow the web's sign-in the same way
            for _ in range(2):
                with pytest.raises(ConnectFailed):
                    await asyncio.to_thread(ImClient("alice", "phone").open, broker, "guess")
            started = time.monotonic()
            assert (await web.login("alice", "alice-pw")).status == 200
            assert time.monotonic() - started >= 1.0
        finally:
            await web.close()

    run(body)


def test_websocket_speaks_the_protocol_with_mqtt_beside_it(roost_factory) -> None:
    broker = roost_factory(web_config())
    broker.add_user("alice", "alice-pw", name="Alice")
    broker.add_user("bob", "bob-pw", name="Bob")

    async def body() -> None:
        alice, bob = WebClient(broker), WebClient(broker)
        bob_phone = await asyncio.to_thread(ImClient("bob", "phone").open, broker, "bob-pw")
        try:
            for web, user in ((alice, "alice"), (bob, "bob")):
                assert (await web.login(user, f"{user}-pw")).status == 200
                await web.connect()
            assert (await alice.call("contact.request", to="bob", note="hi"))["ok"]
            await bob.wait_frame(lambda d: d["topic"] == "roost/inbox/bob" and d["payload"]["kind"] == "contact")
            assert (await bob.call("contact.accept", **{"from": "alice"}))["ok"]
            # bob's page counts as one of his clients, and alice's page hears presence change live
            contacts = (await alice.call("contacts"))["result"]["contacts"]
            assert [(c["id"], c["presence"]["clients"]) for c in contacts] == [("bob", 2)]
            await asyncio.to_thread(bob_phone.disconnect)
            await alice.wait_frame(lambda d: d["topic"] == "roost/presence/bob"
                                   and d["payload"]["clients"] == 1 and d["payload"]["state"] == "online")
            bob_phone = await asyncio.to_thread(ImClient("bob", "phone").open, broker, "bob-pw")
            sent = await alice.call("send", to="bob", cmid="w1", body={"type": "text", "text": "<b>hi</b>"})
            conv = sent["result"]["conv"]
            msg = await bob.wait_frame(lambda d: d["topic"] == "roost/inbox/bob" and d["payload"]["kind"] == "msg")
            assert msg["payload"]["body"]["text"] == "<b>hi</b>"
            unread = await bob.wait_frame(lambda d: d["payload"].get("kind") == "unread")
            assert unread["payload"]["count"] == 1 and unread["payload"]["total"] == 1
            # bob's phone (MQTT) shows the same numbers; the page's ack makes the receipt
            phone_unread = await asyncio.to_thread(bob_phone.wait_event, "unread", conv=conv)
            assert phone_unread["count"] == 1
            assert (await bob.call("ack", n=msg["payload"]["n"]))["ok"]
            await alice.wait_frame(lambda d: d["payload"].get("kind") == "delivered" and d["payload"]["to"] == "bob")
            assert (await bob.call("read", conv=conv, seq=1))["result"]["total_unread"] == 0
            await alice.wait_frame(lambda d: d["payload"].get("kind") == "read" and d["payload"]["by"] == "bob")
            cleared = await asyncio.to_thread(bob_phone.wait_event, "unread", conv=conv, count=0)
            assert cleared["total"] == 0
            # the web app's figures: /metrics and /status.json (counts only)
            async with alice.http.get(alice.base + "/metrics") as r:
                text = await r.text()
            assert "roost_web_sessions 2.0" in text and "roost_web_pages 2.0" in text, text[-600:]
            async with alice.http.get(alice.base + "/status.json") as r:
                assert (await r.json())["web"] == {"sessions": 2, "pages": 2, "dropped": 0, "sessions_evicted": 0}
        finally:
            bob_phone.disconnect()
            await alice.close()
            await bob.close()

    run(body)


def test_over_tls_the_cookie_is_secure_too(roost_factory, tmp_path) -> None:
    certfile, keyfile = make_cert(tmp_path)
    port = free_port()
    broker = roost_factory({"listeners": {"web": {"type": "http", "bind": f"127.0.0.1:{port}", "ssl": True,
                                                  "certfile": str(certfile), "keyfile": str(keyfile)}}})
    broker.add_user("alice", "alice-pw")
    tls = ssl.create_default_context(cafile=str(certfile))

    async def body() -> None:
        base = f"https://127.0.0.1:{port}"
        jar = aiohttp.CookieJar(unsafe=True)   # cookies for an IP address
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls), cookie_jar=jar) as http:
            async with http.get(base + "/api/session") as r:
                csrf = (await r.json())["csrf"]
            async with http.post(base + "/api/login", json={"user": "alice", "password": "alice-pw"},
                                 headers={"X-CSRF-Token": csrf}) as r:
                assert r.status == 200
                morsel, header = set_cookies(r)["roost_session"]
                assert morsel["secure"] and morsel["httponly"] and morsel["samesite"] == "Strict", header
                csrf = (await r.json())["csrf"]
            ws = await http.ws_connect(base.replace("https", "wss") + f"/ws?csrf={csrf}", headers={"Origin": base})
            hello = json.loads((await ws.receive(10)).data)
            assert hello["payload"]["user"] == "alice"
            await ws.close()

    run(body)


def test_a_new_password_signs_the_person_out_and_devices_cannot_sign_in(roost_factory) -> None:
    broker = roost_factory(web_config())
    broker.add_user("alice", "alice-pw")
    secret, _code = broker.add_device("hall-light", "light")

    async def body() -> None:
        web = WebClient(broker)
        try:
            assert (await web.login("hall-light", secret)).status == 403   # devices use MQTT
            assert (await web.login("alice", "alice-pw")).status == 200
            await web.connect()
            await asyncio.to_thread(broker.cli, "user", "passwd", "alice", "--password-stdin", input="new-pw\n")
            assert web.ws is not None
            closed = await web.ws.receive(10)       # the admin-log poll tells the broker within a second
            while closed.type == aiohttp.WSMsgType.TEXT:   # its own presence, say
                closed = await web.ws.receive(10)
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closed
            assert (await web.session())["user"] is None
            assert (await web.login("alice", "new-pw")).status == 200
        finally:
            await web.close()

    run(body)


def test_a_restart_keeps_sign_ins_and_a_password_set_meanwhile_ends_them(roost_factory) -> None:
    broker = roost_factory(web_config())
    broker.add_user("alice", "alice-pw")

    async def body() -> None:
        web = WebClient(broker)
        try:
            assert (await web.login("alice", "alice-pw")).status == 200
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(broker.start)
            assert (await web.session())["user"] == "alice"     # the session is in the store, not in memory
            await asyncio.to_thread(broker.stop)                # a new password while no broker runs
            await asyncio.to_thread(broker.cli, "user", "passwd", "alice", "--password-stdin", input="new-pw\n")
            await asyncio.to_thread(broker.start)
            assert (await web.session())["user"] is None
        finally:
            await web.close()

    run(body)


def test_sessions_are_bounded_and_expire(tmp_path: Path) -> None:
    from broker.store.base import Principal
    from broker.store.sqlite import SqliteStore
    from broker.web.sessions import WebSessions

    async def main() -> None:
        store = SqliteStore(tmp_path / "roost.db")   # the sessions live in the store (every node's)
        await store.open()
        try:
            for pid in ("alice", "bob", "carol", "dave"):
                await store.identity.add_principal(Principal(pid, "user", pid, "", "hash", 0.0))
            now = [1000.0]
            sessions = WebSessions(store.web_sessions, clock=lambda: now[0], max_sessions=3, idle_ttl=60,
                                   max_age=300, touch_every=20, recheck=5)
            token, s = await sessions.create("alice", "user")
            got = await sessions.get(token)
            assert got is not None and got.key == s.key and got.csrf == s.csrf
            assert await sessions.get("x" + token) is None and await sessions.get(None) is None
            for _ in range(5):                       # used every 50 s: idle never reached, but max_age is
                now[0] += 50
                assert await sessions.alive(s)
            assert (await store.web_sessions.get(s.key)).used == now[0]   # type: ignore[union-attr]
            now[0] += 51
            assert await sessions.get(token) is None and not await sessions.alive(s)   # over 300 s after sign-in
            t2, s2 = await sessions.create("bob", "user")
            now[0] += 10
            assert await sessions.get(t2) is not None                          # a use, not written (< 20 s)
            assert (await store.web_sessions.get(s2.key)).used == now[0] - 10  # type: ignore[union-attr]
            now[0] += 61
            assert await sessions.get(t2) is None                             # idle too long
            made = []
            for _ in range(5):
                now[0] += 1
                made.append(await sessions.create("carol", "user"))
            assert len(sessions) == 3 and sessions.evicted == 2               # oldest went first
            assert await sessions.get(made[0][0]) is None and await sessions.get(made[-1][0]) is not None
            await sessions.end(made[-1][1])                                   # signed out (by any node)
            assert await sessions.get(made[-1][0]) is None and len(sessions) == 2
            assert await sessions.end_principal("carol") == 2 and len(sessions) == 0
            t3, s3 = await sessions.create("dave", "user", expires_at=now[0] - 1)   # a JWT sign-in past its exp
            assert await sessions.get(t3) is None
            t4, s4 = await sessions.create("dave", "user")
            other = WebSessions(store.web_sessions, clock=lambda: now[0], recheck=5)   # another node
            assert await other.end_principal("dave") == 1
            assert await sessions.alive(s4)          # trusted for `recheck` seconds...
            now[0] += 5
            assert not await sessions.alive(s4)      # ...then read again: gone
        finally:
            await store.close()

    asyncio.run(main())
