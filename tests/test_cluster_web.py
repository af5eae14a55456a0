"""The web app in a cluster (issue 12, item 3) on one PostgreSQL and one
nats-server: a browser signed in through node 1 is signed in on node 2 (the
sessions are in the store, not in a node's memory), signing out on node 2 ends
it on node 1 too, and a file uploaded through node 1 is downloaded from node 2
with the same bytes (its content is in PostgreSQL, not on node 1's disk)."""

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
