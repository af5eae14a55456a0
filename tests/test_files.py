"""Pictures and files (issue 14 item 4): uploads in chunks over the gateway, the
file body, who may download, the bounds (size, quota, names, types) that store
nothing when they refuse, deduplication, and files surviving a restart of a real
broker (the CLI's `roost send --file` and `roost download` against it)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from broker.config import StorageConfig, config_from_dict
from broker.services.base import Caller
from broker.services.events import PrincipalRemoved
from broker.services.files import FileService
from broker.services.identity import IdentityService
from broker.services.runtime import Services
from broker.store.base import BlobStore
from broker.store.blobs import FsBlobStore
from broker.store.factory import create_blob_store, open_store
from client.cli import main as roost_main
from contract.errors import ErrorCode, ProtocolError
from contract.ops import FILE_CHUNK
from contract.sdkcore import files as sdkfiles
from tests.clients import ImClient
from tests.messaging_env import Env, FakeClock, close_env, open_env

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 300          # 76 808 bytes: two chunks


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def files_env(tmp_path: Path, config: dict[str, Any] | None = None,
                    clock: FakeClock | None = None) -> tuple[Env, FileService]:
    env = await open_env(tmp_path, config=config, clock=clock or FakeClock())
    files = FileService(env.services, FsBlobStore(tmp_path / "files"))
    env.services.files = files
    await files.load()
    await env.befriend("alice", "bob")
    return env, files


async def call(env: Env, files: FileService, who: str, op: str, **params: Any) -> dict[str, Any]:
    table = {**env.messaging.ops(), **env.social.ops(), **files.ops()}
    return await table[op](env.caller(who), params)


async def upload(env: Env, files: FileService, who: str, data: bytes, name: str = "cat.png",
                 media_type: str = "image/png") -> dict[str, Any]:
    async def sdk_call(op: str, params: dict[str, Any]) -> dict[str, Any]:
        return await call(env, files, who, op, **params)

    started = await sdk_call("file.upload", {"name": name, "media_type": media_type, "size": len(data)})
    offset, chunk = 0, started["chunk_size"]
    while offset < len(data):
        answer = await sdk_call("file.chunk", {"upload": started["upload"], "offset": offset,
                                               "data": base64.b64encode(data[offset:offset + chunk]).decode()})
        offset = answer["received"]
    return await sdk_call("file.finish", {"upload": started["upload"]})


async def download(env: Env, files: FileService, who: str, file_id: str) -> bytes:
    out, offset = b"", 0
    while True:
        answer = await call(env, files, who, "file.download", file=file_id, offset=offset)
        out += base64.b64decode(answer["data"])
        offset = len(out)
        if answer["eof"]:
            return out


async def refused(code: ErrorCode, coro: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        await coro
    assert info.value.code == code, info.value
    return info.value.message


def stored_files(root: Path) -> list[str]:
    """Every file under the blob folder (staged uploads included)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_upload_send_download_by_members_only_and_dedup(tmp_path):
    async def main() -> None:
        env, files = await files_env(tmp_path)
        try:
            ref = await upload(env, files, "alice", PNG)
            assert ref == {"id": hashlib.sha256(PNG).hexdigest(), "name": "cat.png", "size": len(PNG),
                           "media_type": "image/png"}
            assert stored_files(tmp_path / "files") == [f"{ref['id'][:2]}/{ref['id'][2:]}"]
            # bob may not have it before it is sent to him; carol never
            await refused(ErrorCode.NOT_FOUND, download(env, files, "bob", ref["id"]))
            sent = await call(env, files, "alice", "send", to="bob", cmid="f1", body=sdkfiles.file_body(ref))
            assert await download(env, files, "bob", ref["id"]) == PNG
            assert await download(env, files, "alice", ref["id"]) == PNG
            await refused(ErrorCode.NOT_FOUND, download(env, files, "carol", ref["id"]))
            # history carries the reference, never the bytes
            page = await call(env, files, "bob", "history", conv=sent["conv"])
            assert page["messages"][-1]["body"] == {"type": "file", **ref}
            # bob forwards it within the conversation; not into another one he did not upload it to
            await call(env, files, "bob", "send", conv=sent["conv"], cmid="f2", body=sdkfiles.file_body(ref))
            await env.befriend("bob", "carol")
            await refused(ErrorCode.NOT_FOUND, call(env, files, "bob", "send", to="carol", cmid="f3",
                                                    body=sdkfiles.file_body(ref)))
            # a made-up id, and a wrong size, are refused
            other = {**sdkfiles.file_body(ref), "id": "0" * 64}
            await refused(ErrorCode.NOT_FOUND, call(env, files, "alice", "send", to="bob", cmid="f4", body=other))
            await refused(ErrorCode.BAD_REQUEST, call(env, files, "alice", "send", to="bob", cmid="f5",
                                                      body={**sdkfiles.file_body(ref), "size": 3}))
            # the same bytes from carol: the same id, one blob, counted in her quota too
            again = await upload(env, files, "carol", PNG, name="dog.png")
            assert again["id"] == ref["id"] and again["name"] == "dog.png"
            assert len(stored_files(tmp_path / "files")) == 1
            assert await env.services.store.files.usage("carol") == len(PNG)
            await call(env, files, "carol", "send", to="bob", cmid="f6", body=sdkfiles.file_body(again))
            assert files.stats.blobs_written == 1 and files.stats.files_stored == 2
            # its uploaders removed, the picture stays with the messages that carry it
            for who in ("alice", "carol"):
                await env.services.store.identity.remove_principal(who)
            assert await download(env, files, "bob", ref["id"]) == PNG
        finally:
            await close_env(env)

    run(main())


def test_refused_uploads_store_nothing(tmp_path):
    async def main() -> None:
        clock = FakeClock()
        env, files = await files_env(tmp_path, {"files": {"max_size": 100_000, "quota": 150_000,
                                                          "upload_ttl": 60}}, clock)
        store = env.services.store.files
        try:
            start = lambda **p: call(env, files, "alice", "file.upload", **p)  # noqa: E731
            await refused(ErrorCode.TOO_LARGE, start(name="big.png", media_type="image/png", size=100_001))
            for name in ("../x", "a/b", "a\\b", "a\x00b", "..", "tab\there"):
                assert "path" in await refused(ErrorCode.BAD_REQUEST, start(name=name, media_type="text/plain",
                                                                            size=5)) or "\x00" in name or "\t" in name
            for media_type in ("text/html", "image/svg+xml", "nope"):
                await refused(ErrorCode.BAD_REQUEST, start(name="x", media_type=media_type, size=5))
            # content that is not what it claims
            await refused(ErrorCode.BAD_REQUEST, upload(env, files, "alice", b"<html>" * 10, name="x.png"))
            # chunks: the offset must be where the upload is; no more bytes than announced; base64 only
            up = (await start(name="a.txt", media_type="text/plain", size=4))["upload"]
            chunk = lambda **p: call(env, files, "alice", "file.chunk", upload=up, **p)  # noqa: E731
            await refused(ErrorCode.BAD_REQUEST, chunk(offset=1, data="QUJD"))
            await refused(ErrorCode.BAD_REQUEST, chunk(offset=0, data="QUJDREVG"))
            await refused(ErrorCode.BAD_REQUEST, chunk(offset=0, data="not base64!"))
            await refused(ErrorCode.NOT_FOUND, call(env, files, "bob", "file.chunk", upload=up, offset=0, data="QUJD"))
            assert (await chunk(offset=0, data="QUJD"))["received"] == 3
            await refused(ErrorCode.BAD_REQUEST, call(env, files, "alice", "file.finish", upload=up))   # 3 of 4
            # the quota: stored files and uploads in progress count
            await upload(env, files, "alice", PNG)
            await refused(ErrorCode.QUOTA_EXCEEDED, start(name="more.png", media_type="image/png", size=80_000))
            assert await store.usage("alice") == len(PNG)
            # an idle upload expires with its bytes
            clock.advance(61)
            assert await files.expire_idle() == 1
            await refused(ErrorCode.NOT_FOUND, chunk(offset=3, data="RA=="))
            assert stored_files(tmp_path / "files") == [f"{hashlib.sha256(PNG).hexdigest()[:2]}/"
                                                        f"{hashlib.sha256(PNG).hexdigest()[2:]}"]
            # a removed principal's uploads in progress go with it
            await call(env, files, "bob", "file.upload", name="b.txt", media_type="text/plain", size=3)
            assert len(stored_files(tmp_path / "files")) == 2
            await env.services.bus.publish(PrincipalRemoved("bob"))
            assert len(stored_files(tmp_path / "files")) == 1 and files.uploading_bytes() == 0
        finally:
            await close_env(env)

    run(main())


# ---- two nodes on one store: an upload refused while another of the same content records it ---------

class PausedAfterCommit:
    """The real blob store of one node, passed through; `hold()` makes the next
    commit stop right after it returns until `release()`, so a test can place
    another node's steps in that gap."""

    def __init__(self, inner: BlobStore) -> None:
        self._inner = inner
        self.committed = asyncio.Event()
        self._resume = asyncio.Event()
        self._resume.set()

    def hold(self) -> None:
        self.committed.clear()
        self._resume.clear()

    def release(self) -> None:
        self._resume.set()

    async def commit(self, upload: str, digest: str) -> bool:
        made = await self._inner.commit(upload, digest)
        self.committed.set()
        await self._resume.wait()
        return made

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def paused_or_done(blobs: PausedAfterCommit, task: asyncio.Task[Any]) -> None:
    waiter = asyncio.ensure_future(blobs.committed.wait())
    await asyncio.wait([waiter, task], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    assert blobs.committed.is_set() or task.done(), "neither paused after its commit nor finished"


async def started(files: FileService, caller: Caller, data: bytes, name: str) -> str:
    """An upload of `data`, every byte sent, not finished."""
    up = (await files.op_upload(caller, {"name": name, "media_type": "image/png", "size": len(data)}))["upload"]
    for offset in range(0, len(data), FILE_CHUNK):
        await files.op_chunk(caller, {"upload": up, "offset": offset,
                                      "data": base64.b64encode(data[offset:offset + FILE_CHUNK]).decode()})
    return up


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_an_upload_refused_on_one_node_never_takes_the_bytes_another_node_records(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """alice's upload of PNG on node 1 is refused at its finish (her other upload, on
    node 2, filled her quota meanwhile) while bob's upload of the same PNG on node 2
    is finishing: in the worst order (alice's bytes committed, bob's commit finding
    them, alice refused, then bob recorded) bob's file must still download whole.
    Before the fix, alice's refusal deleted the blob it had made and bob's record
    pointed at nothing."""
    storage = (StorageConfig(backend="postgres", dsn=request.getfixturevalue("postgres_dsn")) if backend == "postgres"
               else StorageConfig(path=str(tmp_path / "roost.db")))
    other = b"\x89PNG\r\n\x1a\n" + bytes(range(255, -1, -1)) * 300     # as big as PNG, another content
    cfg = config_from_dict({"files": {"quota": len(PNG) + len(other) // 2}})

    async def main() -> None:
        store = await open_store(storage)
        try:
            identity = IdentityService(store.identity)
            await identity.load()
            for who in ("alice", "bob"):
                await identity.add(who, "user", secret="pw", name=who)
            # two nodes: their own services and blob store objects on the one store (and folder)
            blobs1, blobs2 = (PausedAfterCommit(create_blob_store(storage, store, tmp_path / "files"))
                              for _ in range(2))
            files1, files2 = (FileService(Services(config=cfg, store=store, identity=identity), b)
                              for b in (blobs1, blobs2))
            await files1.load()
            alice, bob = Caller("alice", "user", "alice.phone"), Caller("bob", "user", "bob.laptop")
            alice_png = await started(files1, alice, PNG, "cat.png")
            alice_other = await started(files2, alice, other, "other.png")     # within quota: nothing stored yet
            await files2.op_finish(alice, {"upload": alice_other})              # now PNG no longer fits
            bob_png = await started(files2, bob, PNG, "same.png")

            blobs1.hold()
            blobs2.hold()
            refused_finish = asyncio.create_task(files1.op_finish(alice, {"upload": alice_png}))
            await paused_or_done(blobs1, refused_finish)      # (before the fix: its bytes committed, paused)
            bob_finish = asyncio.create_task(files2.op_finish(bob, {"upload": bob_png}))
            await paused_or_done(blobs2, bob_finish)          # bob's commit found the blob, or made it
            blobs1.release()
            await refused(ErrorCode.QUOTA_EXCEEDED, refused_finish)
            blobs2.release()
            ref = await bob_finish
            assert ref["id"] == hashlib.sha256(PNG).hexdigest()
            assert await store.files.get_upload(ref["id"], "alice") is None    # refused: nothing recorded
            for node in (files1, files2):      # whole, from either node
                out = b""
                while len(out) < len(PNG):
                    answer = await node.op_download(bob, {"file": ref["id"], "offset": len(out)})
                    out += base64.b64decode(answer["data"])
                assert out == PNG
        finally:
            await store.close()

    run(main())


# ---- a real broker over MQTT, the CLI and a restart --------------------------------------------

def cli(home: Path, *args: str, input: str | None = None) -> Any:
    env: dict[str, Any] = {k: None for k in os.environ if k.startswith("ROOST_")}
    env.update(XDG_CONFIG_HOME=str(home / "config"), XDG_STATE_HOME=str(home / "state"), NO_COLOR="1")
    res = CliRunner(env=env).invoke(roost_main, list(args), input=input, catch_exceptions=False)
    return res


def test_cli_sends_a_picture_members_download_it_and_it_survives_a_restart(roost_factory, tmp_path):
    roost = roost_factory({"files": {"max_size": 200_000}})
    passwords = {p: roost.add_user(p) for p in ("alice", "bob", "carol")}
    clients = {p: ImClient(p).open(roost, passwords[p]) for p in ("bob", "carol")}
    bob, carol = clients["bob"], clients["carol"]
    try:
        home = tmp_path / "alice-home"
        login = cli(home, "login", "--server", f"{roost.host}:{roost.port}", "--password-stdin", "alice",
                    input=passwords["alice"] + "\n")
        assert login.exit_code == 0, login.stderr
        assert cli(home, "contact", "request", "bob").exit_code == 0
        bob.call("contact.accept", **{"from": "alice"})

        picture = tmp_path / "cat.png"
        picture.write_bytes(PNG)
        sent = cli(home, "send", "bob", "--file", str(picture))
        assert sent.exit_code == 0, sent.stderr
        assert "(cat.png, 75.0 KiB)" in sent.stdout
        ev = bob.wait_event("msg", **{"from": "alice"})
        body = ev["body"]
        assert body == {"type": "file", "id": hashlib.sha256(PNG).hexdigest(), "name": "cat.png",
                        "size": len(PNG), "media_type": "image/png"}

        def fetch(client: ImClient) -> bytes:
            return sdkfiles.download(lambda op, params: client.call(op, **params), body["id"])[1]

        assert fetch(bob) == PNG
        err = carol.request("file.download", file=body["id"])
        assert not err["ok"] and err["error"]["code"] == "not_found"

        # one-line refusals from the CLI: too large, a type the broker does not take
        big = tmp_path / "big.bin"
        big.write_bytes(b"\0" * 200_001)
        res = cli(home, "send", "bob", "--file", str(big))
        assert res.exit_code != 0 and "too_large" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        history = cli(home, "history", "bob")
        assert "[file] cat.png (75.0 KiB)" in history.stdout

        roost.restart()
        for c in clients.values():
            c.disconnect()
        bob = ImClient("bob", "again").open(roost, passwords["bob"])
        clients["bob"] = bob
        assert fetch(bob) == PNG
        out = tmp_path / "saved.png"
        res = cli(home, "download", body["id"], "-o", str(out))
        assert res.exit_code == 0, res.stderr
        assert out.read_bytes() == PNG
        res = cli(home, "download", body["id"], "-o", str(out))   # never overwrites
        assert res.exit_code != 0 and "exists already" in res.stderr
        assert json.loads(cli(home, "history", "bob", "--json").stdout)
    finally:
        for c in clients.values():
            c.disconnect()


def test_a_camera_sends_its_snapshot_to_its_owner(roost):
    from devices.simulators import make

    secret, code = roost.add_device("cam1", "camera")
    alice = ImClient("alice").open(roost, roost.add_user("alice"))
    camera = make("camera", "cam1", secret, roost.host, roost.port)
    camera.device.start(wait=10)
    try:
        alice.call("device.claim", device="cam1", code=code)
        asked = alice.call("send", to="cam1", cmid="snap1", body={"type": "command", "name": "snapshot"})
        picture = alice.wait_event("msg", timeout=10, **{"from": "cam1"})["body"]
        assert picture["type"] == "file" and picture["media_type"] == "image/png"
        meta, data = sdkfiles.download(lambda op, params: alice.call(op, **params), picture["id"])
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and meta["size"] == len(data) == picture["size"]
        result = alice.wait_event("msg", timeout=10, **{"from": "cam1"})["body"]
        assert result == {"type": "result", "for": asked["seq"], "status": "ok",
                          "data": {"name": picture["name"], "size": len(data), "sent_to": ["alice"]}}
    finally:
        camera.device.stop()
        alice.disconnect()


def test_the_web_route_serves_files_to_members_only(roost_factory):
    pytest.importorskip("broker.web.app")
    import aiohttp

    from tests.harness import free_port

    bind = f"127.0.0.1:{free_port()}"
    roost = roost_factory({"listeners": {"web": {"type": "http", "bind": bind}}})
    pw = {p: roost.add_user(p) for p in ("alice", "bob", "carol")}
    alice = ImClient("alice").open(roost, pw["alice"])
    try:
        alice.call("contact.request", to="bob")
        ImClient("bob").open(roost, pw["bob"]).call("contact.accept", **{"from": "alice"})
        call = lambda op, params: alice.call(op, **params)  # noqa: E731
        picture = sdkfiles.upload(call, PNG, "cat <1>.png")
        note = sdkfiles.upload(call, b"<script>alert(1)</script>", "note.txt")
        for ref in (picture, note):
            alice.call("send", to="bob", cmid=f"w-{ref['id'][:8]}", body=sdkfiles.file_body(ref))
    finally:
        alice.disconnect()
    base = f"http://{bind}"

    async def main() -> None:
        async def signed_in(user: str) -> aiohttp.ClientSession:
            http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            async with http.get(base + "/api/session") as r:
                csrf = (await r.json())["csrf"]
            async with http.post(base + "/api/login", json={"user": user, "password": pw[user]},
                                 headers={"X-CSRF-Token": csrf}) as r:
                assert r.status == 200, await r.text()
            return http

        bob, carol = await signed_in("bob"), await signed_in("carol")
        anonymous = aiohttp.ClientSession()
        try:
            async with bob.get(f"{base}/files/{picture['id']}") as r:
                assert r.status == 200 and await r.read() == PNG
                assert r.headers["Content-Type"] == "image/png"
                assert r.headers["Content-Disposition"].startswith("inline;")
                assert r.headers["X-Content-Type-Options"] == "nosniff" and "sandbox" in r.headers["Content-Security-Policy"]
            async with bob.get(f"{base}/files/{note['id']}") as r:
                assert r.status == 200 and r.headers["Content-Disposition"].startswith("attachment;")
                assert r.headers["Content-Type"].startswith("text/plain")
            async with carol.get(f"{base}/files/{picture['id']}") as r:
                assert r.status == 404
            async with anonymous.get(f"{base}/files/{picture['id']}") as r:
                assert r.status == 401
            async with bob.get(f"{base}/files/{'0' * 64}") as r:
                assert r.status == 404
        finally:
            for http in (bob, carol, anonymous):
                await http.close()

    run(main())
