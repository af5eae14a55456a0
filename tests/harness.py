"""Run a real Roost broker as a subprocess on a free loopback port, with its own
config file and SQLite store in a temporary folder."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _run_async(coro: Any) -> Any:
    """asyncio.run in a fresh thread, so it works whatever loop the caller has."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


class RoostProcess:
    def __init__(self, workdir: Path, extra_config: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.config: dict[str, Any] = deep_merge({
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "storage": {"path": str(self.workdir / "roost.db")},
            "log": {"level": "info"},
        }, extra_config or {})
        self.config_path = self.workdir / "roost.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = self.workdir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # ---- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 20.0) -> RoostProcess:
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "serve", "--config", str(self.config_path)],
            cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        waiting = self._listener_ports()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, waiting[0]), timeout=0.2):
                    waiting.pop(0)
                if not waiting:
                    return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"broker did not listen on {waiting} within {timeout}s:\n{self.log_tail()}")

    def _listener_ports(self) -> list[int]:
        """The MQTT port first, then every other listener's (HTTP, WebSocket, TLS): the
        broker binds them one after the other, and a test may use any of them at once."""
        ports = [self.port]
        for listener in self.config.get("listeners", {}).values():
            port = int(str(listener.get("bind", "")).rpartition(":")[2] or 0)
            if port and port not in ports:
                ports.append(port)
        return ports

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait: a clean shutdown."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"broker did not stop on SIGTERM:\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL: nothing gets to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> RoostProcess:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # ---- admin (directly on the store, as `roost user add` does) ----------
    def cli(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "client.cli", *args]
        res = subprocess.run(cmd, cwd=str(ROOT), input=input, capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, ROOST_CONFIG=str(self.config_path)))
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res

    def _identity(self, fn: Any) -> Any:
        from broker.services.identity import IdentityService
        from broker.store.sqlite import SqliteStore

        async def run() -> Any:
            store = SqliteStore(self.config["storage"]["path"])
            await store.open()
            try:
                return await fn(IdentityService(store.identity))
            finally:
                await store.close()

        return _run_async(run())

    def add_user(self, principal_id: str, password: str | None = None, name: str | None = None) -> str:
        password = password or f"pw-{principal_id}"
        self._identity(lambda ids: ids.add(principal_id, "user", secret=password, name=name))
        return password

    def add_device(self, principal_id: str, kind: str, name: str | None = None,
                   room: str | None = None) -> tuple[str, str]:
        reg = self._identity(lambda ids: ids.add(principal_id, "device", name=name, device_kind=kind, room=room))
        return reg.secret, reg.pairing_code

    def add_service(self, principal_id: str, name: str | None = None) -> str:
        reg = self._identity(lambda ids: ids.add(principal_id, "service", name=name))
        return reg.secret
