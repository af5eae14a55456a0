"""`roost serve` that cannot start says why in one line and exits 1: no traceback,
and nothing on disk touched that did not need to be (ports and TLS files are
checked before the store; one `roost serve` per store)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import ROOT, deep_merge, free_port
from tests.test_mqtt_listeners import make_cert


def _config(tmp_path: Path, extra: dict[str, Any] | None = None) -> Path:
    cfg = deep_merge({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{free_port()}"}},
        "storage": {"path": str(tmp_path / "store" / "roost.db")},
        "log": {"level": "info"},
    }, extra or {})
    path = tmp_path / "roost.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _serve(config: Path, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """`roost serve` to its end; a broker that starts instead of failing runs into the timeout."""
    return subprocess.run([*(prefix or []), sys.executable, "-m", "client.cli", "serve", "--config", str(config)],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=20, check=False,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _one_error(res: subprocess.CompletedProcess[str]) -> str:
    """The single line the process printed, after checking it printed nothing else."""
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert res.returncode == 1, out
    return lines[0]


def _without_capabilities(*caps: str) -> list[str]:
    """A command prefix that takes these capabilities from the broker when the
    tests run as root (root passes the permission checks these failures need)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop capabilities")
    drop = ",".join(f"-{cap}" for cap in caps)
    return ["setpriv", "--inh-caps", drop, "--bounding-set", drop]


@pytest.mark.parametrize("busy", ["default", "ws"])
def test_busy_port_is_one_line_before_the_store(tmp_path, busy):
    ports = {"default": free_port(), "ws": free_port()}
    config = _config(tmp_path, {"listeners": {
        "default": {"bind": f"127.0.0.1:{ports['default']}"},
        "ws": {"type": "ws", "bind": f"127.0.0.1:{ports['ws']}"}}})
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[busy]))
        holder.listen()
        line = _one_error(_serve(config))
    assert f"127.0.0.1:{ports[busy]} (listener {busy}): address already in use" in line
    assert not (tmp_path / "store").exists()


def test_bind_address_not_on_this_machine(tmp_path):
    config = _config(tmp_path, {"listeners": {"default": {"bind": "192.0.2.1:1883"}}})  # TEST-NET-1
    line = _one_error(_serve(config))
    assert "cannot listen on 192.0.2.1:1883 (listener default): no such address on this machine" in line
    assert not (tmp_path / "store").exists()


def test_privileged_port_without_the_right_to_it(tmp_path):
    config = _config(tmp_path, {"listeners": {"default": {"bind": "127.0.0.1:1"}}})
    line = _one_error(_serve(config, _without_capabilities("net_bind_service")))
    assert "cannot listen on 127.0.0.1:1 (listener default): permission denied" in line
    assert "CAP_NET_BIND_SERVICE" in line
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("bad", ["certfile", "keyfile"])
def test_bad_certificate_or_key_is_named_before_the_store(tmp_path, bad):
    certfile, keyfile = make_cert(tmp_path)
    files = {"certfile": certfile, "keyfile": keyfile}
    files[bad].write_text("-----BEGIN GARBAGE-----\nnot PEM at all\n")
    config = _config(tmp_path, {"listeners": {"tls": {
        "bind": f"127.0.0.1:{free_port()}", "ssl": True, "certfile": str(certfile), "keyfile": str(keyfile)}}})
    line = _one_error(_serve(config))
    assert f"listener tls: {bad} {files[bad]} is not" in line
    assert not (tmp_path / "store").exists()


def test_second_serve_on_the_same_store_is_refused(roost_factory):
    first = roost_factory()
    store = first.config["storage"]["path"]
    second = roost_factory({"storage": {"path": store}}, start=False)   # its own port, the same store
    line = _one_error(_serve(second.config_path))
    assert f"store {store} is in use by another roost serve (pid {first.proc.pid})" in line
    # the lock is for `serve` only: admin commands work on the store of a running broker
    assert first.cli("user", "add", "carol", "--password", "carol-pw").returncode == 0
    first.kill()          # a broker that dies, even by SIGKILL, leaves no stale lock behind
    second.start()
    assert second.running


def test_unreadable_store(tmp_path):
    store = tmp_path / "store" / "roost.db"
    store.parent.mkdir(mode=0o700)
    store.write_bytes(b"")
    store.chmod(0)
    line = _one_error(_serve(_config(tmp_path), _without_capabilities("dac_override", "dac_read_search")))
    assert f"cannot open store {store}: permission denied" in line


def test_store_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("a file, not a folder")
    store = tmp_path / "afile" / "store" / "roost.db"
    line = _one_error(_serve(_config(tmp_path, {"storage": {"path": str(store)}})))
    assert "cannot create store folder" in line and str(tmp_path / "afile") in line


def test_store_file_that_is_not_a_database(tmp_path):
    store = tmp_path / "store" / "roost.db"
    store.parent.mkdir(mode=0o700)
    junk = b"these are someone's notes, not a database\n" * 50
    store.write_bytes(junk)
    line = _one_error(_serve(_config(tmp_path)))
    assert f"cannot open store {store}: file is not a database" in line
    assert store.read_bytes() == junk
