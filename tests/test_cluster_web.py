"""The web app in a cluster (issue 12, item 3) on one PostgreSQL and one
nats-server: a browser signed in through node 1 is signed in on node 2 (the
sessions are in the store, not in a node's memory), signing out on node 2 ends
it on node 1 too, and a file uploaded through node 1 is downloaded from node 2
with the same bytes (its content is in PostgreSQL, not on node 1's disk). While
PostgreSQL is down the web app answers 503 with a one-line error (the page's IM
requests `unavailable`) and it recovers by itself when PostgreSQL is back."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import RoostProcess, free_port
from tests.postgres import PostgresServer
from tests.test_cluster_routing import node_config, wait_until_formed
from tests.test_web_http import WebClient, base_url


def web_nodes(root: Path, nats_url: str, dsn: str, names: list[str]) -> dict[str, RoostProcess]:
    nodes = {}
    for name in names:
        cfg: dict[str, Any] = node_config(name, nats_url)
        cfg["storage"] = {"backend": "postgres", "dsn": dsn, "path": str(root / name / "roost.db")}
        cfg["listeners"] = {"web": {"type": "http", "bind": f"127.0.0.1:{free_port()}"}}
        cfg["files"] = {"path": str(root / name / "files")}   # each node a folder of its own
        nodes[name] = RoostProcess(root / name, cfg)
    first = next(iter(nodes.values()))
    first.cli("user", "add", "alice", "--password-stdin", input="pw-alice-123\n")
    for node in nodes.values():
        node.start()
    wait_until_formed(nodes)
    return nodes


async def upload(web: WebClient, data: bytes, name: str, media_type: str) -> dict[str, Any]:
    started = await web.call("file.upload", name=name, media_type=media_type, size=len(data))
    assert started["ok"], started
    upload_id, chunk = started["result"]["upload"], started["result"]["chunk_size"]
    for offset in range(0, len(data), chunk):
        answer = await web.call("file.chunk", upload=upload_id, offset=offset,
                                data=base64.b64encode(data[offset:offset + chunk]).decode())
        assert answer["ok"], answer
    finished = await web.call("file.finish", upload=upload_id)
    assert finished["ok"], finished
    return dict(finished["result"])


async def closed_within(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> bool:
    """The page's WebSocket is closed by its node (which checks its pages' sessions
    every 2 s) while the page sends nothing."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and not ws.closed:
        try:
            msg = await ws.receive(left)
        except TimeoutError:
            break
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return True
    return ws.closed


def test_sign_in_and_files_work_on_every_node(tmp_path, nats_server, postgres_dsn) -> None:
    nodes = web_nodes(tmp_path, nats_server.url, postgres_dsn, ["n1", "n2"])
    n1, n2 = base_url(nodes["n1"]), base_url(nodes["n2"])
    content = b"\x89PNG\r\n\x1a\n" + os.urandom(300 * 1024)    # several chunks on the way in and out

    async def body() -> None:
        web = WebClient(nodes["n1"])                  # one browser; its cookie jar is sent to both nodes
        try:
            assert (await web.login("alice", "pw-alice-123")).status == 200
            token = next(c.value for c in web.http.cookie_jar if c.key == "roost_session")
            await web.connect()                        # a page open on n1
            stored = await upload(web, content, "noise.png", "image/png")
            assert stored["id"] == hashlib.sha256(content).hexdigest()
            web.base = n2                              # the load balancer sends the next requests to n2
            assert (await web.session())["user"] == "alice"
            async with web.http.get(f"{n2}/files/{stored['id']}?download") as r:
                assert r.status == 200 and await r.read() == content
            async with web.http.post(f"{n2}/api/logout", headers={"X-CSRF-Token": web.csrf}) as r:
                assert r.status == 200
            assert web.ws is not None and await closed_within(web.ws, 8)    # the idle page on n1 closes too
            # the old cookie, sent to n1 (a copy kept by someone): signed out there as well
            async with aiohttp.ClientSession(cookies={"roost_session": token}) as stale:
                async with stale.get(f"{n1}/api/session") as r:
                    assert (await r.json())["user"] is None
                async with stale.get(f"{n1}/files/{stored['id']}") as r:
                    assert r.status == 401
        finally:
            await web.close()

    try:
        asyncio.run(asyncio.wait_for(body(), 90))
    finally:
        for node in nodes.values():
            node.kill()


async def one_line_error(response: aiohttp.ClientResponse) -> str:
    """The JSON error of a refused request: one line, no traceback."""
    doc = await response.json()
    message = doc["error"]
    assert isinstance(message, str) and message and "\n" not in message and "Traceback" not in message, doc
    return message


async def until(check: Any, timeout: float, what: str) -> None:
    """Until the coroutine function `check` returns true (each try is one round trip)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.2)


def test_a_postgres_outage_answers_503_and_the_web_app_recovers_by_itself(tmp_path, nats_server) -> None:
    pg = PostgresServer(fsync=True).start()      # its own: this test stops it
    pg.create_database("roost")
    nodes = web_nodes(tmp_path, nats_server.url, pg.dsn("roost"), ["n1"])
    base = base_url(nodes["n1"])
    content = b"\x89PNG\r\n\x1a\n" + os.urandom(70 * 1024)

    async def body() -> None:
        web, newcomer = WebClient(nodes["n1"]), WebClient(nodes["n1"])
        try:
            assert (await web.login("alice", "pw-alice-123")).status == 200
            await web.connect()
            stored = await upload(web, content, "before.png", "image/png")
            await newcomer.session()                             # a page loaded, not signed in yet
            await asyncio.to_thread(pg.kill)

            async with web.http.get(f"{base}/api/session") as r:                 # the session is in the store
                assert r.status == 503, r.status
                assert "unavailable" in await one_line_error(r)
            async with web.http.get(f"{base}/files/{stored['id']}") as r:
                assert r.status == 503 and await one_line_error(r)
            async with newcomer.http.post(f"{base}/api/login", json={"user": "alice", "password": "pw-alice-123"},
                                          headers={"X-CSRF-Token": newcomer.csrf}) as r:
                assert r.status == 503 and await one_line_error(r)
            async with web.http.get(f"{base}/") as r:                           # the page itself still loads
                assert r.status == 200
            answer = await web.call("file.download", file=stored["id"])          # the open page's IM requests
            assert not answer["ok"] and answer["error"]["code"] == "unavailable", answer
            assert "\n" not in answer["error"]["message"]

            await asyncio.to_thread(pg.start)

            async def signed_in() -> bool:
                async with web.http.get(f"{base}/api/session") as r:
                    return r.status == 200 and (await r.json())["user"] == "alice"

            await until(signed_in, 30, "the session readable again")
            async with web.http.get(f"{base}/files/{stored['id']}?download") as r:
                assert r.status == 200 and await r.read() == content
            assert (await newcomer.login("alice", "pw-alice-123")).status == 200
            answer = await web.call("file.download", file=stored["id"])          # the page, never reloaded
            assert answer["ok"], answer
            first = base64.b64decode(answer["result"]["data"])
            assert first and first == content[:len(first)]
        finally:
            await newcomer.close()
            await web.close()

    try:
        asyncio.run(asyncio.wait_for(body(), 120))
    finally:
        for node in nodes.values():
            node.kill()
        pg.remove()
