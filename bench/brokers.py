"""The brokers under test, each run as a subprocess on a free loopback port.

* `amqtt`     stock amqtt 0.12.1 (`python -m bench.stock_amqtt PORT`), anonymous clients.
* `roost`     `roost serve --config <generated config>` with principals registered in its
              store before it starts (first one through `roost user add --json`).
* `mosquitto` the system's mosquitto binary with a generated config, when installed.

Every process gets the hard RLIMIT_NOFILE as its soft limit (`ulimit -n`) and its
own session, and `stop()` always reaps it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.mqtt import MqttError, connect

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def child_setup() -> None:
    """Runs in every child the benchmark starts, before exec: `ulimit -n` to the hard
    limit, and SIGKILL when the benchmark dies, even by SIGKILL (nothing left behind)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Credentials:
    client_id: str
    username: str | None
    password: str | None


class BrokerProcess:
    name = "?"
    authenticated = False

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"
        self.started_at = 0.0

    # -- to override --------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def plain_client(self, label: str) -> Credentials:
        """Credentials of a plain-MQTT client named `label` (unique within a scenario)."""
        return Credentials(label, None, None)

    def user_client(self, principal: str, label: str) -> Credentials:
        """Credentials of a client of user `principal` (anonymous where the broker
        has no users: the client id alone tells the clients apart)."""
        return Credentials(f"{principal}.{label}", None, None)

    async def prepare(self, needs: dict[str, Any]) -> None:
        """Create whatever the scenarios need before the first start (principals...)."""

    # -- lifecycle ----------------------------------------------------------------
    def spawn(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)   # a /tmp cleaner may have taken it
        # A fresh port every start: on a shared machine another process may have taken
        # the last one while the broker was stopped.
        self.port = free_port()
        log = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=child_setup,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        log.close()

    async def start(self, timeout: float = 30.0) -> float:
        """Start and wait until an MQTT CONNECT succeeds; returns seconds it took."""
        self.spawn()
        await self.wait_serving(timeout)
        return time.monotonic() - self.started_at

    async def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        creds = self.plain_client("bench-probe")
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode if self.proc else None}):\n"
                                   f"{self.log_tail()}")
            try:
                conn = await connect(self.host, self.port, creds.client_id, creds.username, creds.password,
                                     timeout=2.0)
                conn.close()
                return
            except (TimeoutError, OSError, MqttError) as exc:
                last = exc
                await asyncio.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} not serving after {timeout}s ({last}):\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    # -- observation ----------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def rss_mb(self) -> float | None:
        return self.status_mb("VmRSS")

    def status_mb(self, field: str) -> float | None:
        """A size from /proc/<pid>/status (VmRSS, VmHWM...) in MB."""
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def cpu_s(self) -> float:
        """User + system CPU seconds the broker process used so far."""
        if self.pid is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return 0.0

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class StockAmqtt(BrokerProcess):
    name = "amqtt"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.stock_amqtt", str(self.port)]


class Floor(BrokerProcess):
    """bench/floor.py: the least a Python broker on uvloop can do (a reference column)."""
    name = "floor"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.floor", str(self.port)]


class Mosquitto(BrokerProcess):
    name = "mosquitto"

    @staticmethod
    def binary() -> str | None:
        return shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)

    def command(self) -> list[str]:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {HOST}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_connections -1\n"
            # Default 1000: beyond it QoS 1 messages to a slow subscriber are dropped,
            # and a dropped message is no throughput. Lifted like amqtt's (unbounded).
            "max_queued_messages 0\n"
            # Default false: Nagle delays its small packets, and every client here
            # (and Roost, and amqtt via asyncio) sends with TCP_NODELAY.
            "set_tcp_nodelay true\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n")
        binary = self.binary()
        assert binary is not None
        return [binary, "-c", str(conf)]


class Roost(BrokerProcess):
    name = "roost"
    authenticated = True
    PLAIN_PRINCIPAL = "bench"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.config_path = workdir / "roost.yaml"
        self.db_path = workdir / "roost.db"
        self.passwords: dict[str, str] = {}

    def config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{self.port}"}},
            "storage": {"path": str(self.db_path)},
            "auth": {"allow_anonymous": False},
            # The benchmark drives few clients hard: lift the per-client request
            # rate limit (a home has many clients, each far below it).
            "limits": {"max_connections": 25000, "request_rate": 1_000_000.0, "request_burst": 1_000_000,
                       "max_pending_requests": 1000},
            "messaging": {"allow_dm_without_contact": True},
            "log": {"level": "warning"},
        }

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.config_path.write_text(yaml.safe_dump(self.config()))

    # `roost` run as `python -m client.cli` from this checkout, so the code measured
    # is the code beside the benchmark, never a stale installed copy.
    ROOST = [sys.executable, "-m", "client.cli"]

    # --cprofile DIR: the broker runs under cProfile, one file per start (written at its clean stop)
    cprofile_dir: Path | None = None
    cprofile_label = "roost"

    # --instructions: the broker runs under callgrind, instrumentation off until
    # bench/instructions.py turns it on (start-up at valgrind's plain speed)
    callgrind_out: Path | None = None

    def command(self) -> list[str]:
        self.write_config()
        cmd = [*self.ROOST, "serve", "--config", str(self.config_path)]
        if self.callgrind_out is not None:
            return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={self.callgrind_out}", *cmd]
        if self.cprofile_dir is not None:
            out = self.cprofile_dir / f"{self.cprofile_label}-{int(time.time() * 1000)}.prof"
            cmd = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", *cmd[2:]]
        return cmd

    def plain_client(self, label: str) -> Credentials:
        p = self.PLAIN_PRINCIPAL
        return Credentials(f"{p}.{label}", p, self.passwords.get(p))

    def im_client(self, principal: str, label: str = "b") -> Credentials:
        return Credentials(f"{principal}.{label}", principal, self.passwords[principal])

    def user_client(self, principal: str, label: str) -> Credentials:
        return self.im_client(principal, label)

    async def prepare(self, needs: dict[str, Any]) -> None:
        """Register principals: `bench` through the CLI (the documented admin path),
        the IM principals in one batch through the store (each CLI call costs a
        Python start-up and an argon2 hash)."""
        self.write_config()
        if self.PLAIN_PRINCIPAL not in self.passwords:
            self.passwords[self.PLAIN_PRINCIPAL] = self.cli_add_user(self.PLAIN_PRINCIPAL, "bench-secret")
        missing = [p for p in needs.get("principals", []) if p not in self.passwords]
        if missing:
            await self.store_add_users({p: f"pw-{p}" for p in missing})

    def cli_add_user(self, principal: str, password: str) -> str:
        res = subprocess.run([*self.ROOST, "user", "add", principal, "--password-stdin", "--json",
                              "--config", str(self.config_path)],
                             input=password + "\n", cwd=str(ROOT), capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"roost user add {principal} failed: {res.stderr.strip()}")
        json.loads(res.stdout)  # it must print one JSON document
        return password

    async def store_add_users(self, users: dict[str, str]) -> None:
        from broker.services.identity import IdentityService
        from broker.store.sqlite import SqliteStore

        store = SqliteStore(self.db_path)
        await store.open()
        try:
            ids = IdentityService(store.identity)
            await ids.load()
            for principal, password in users.items():
                if await ids.get(principal) is None:
                    await ids.add(principal, "user", secret=password)
                self.passwords[principal] = password
        finally:
            await store.close()

    async def store_add_mailbox_owners(self, principals: list[str]) -> None:
        """Register many users that nobody logs in as (owners of filled mailboxes: Roost
        forgets the mailboxes of principals that do not exist). One argon2 hash for all."""
        from broker.services.identity import hash_secret
        from broker.store.base import Principal
        from broker.store.sqlite import SqliteStore

        secret_hash = hash_secret(os.urandom(16).hex())
        store = SqliteStore(self.db_path)
        await store.open()
        try:
            for p in principals:
                if await store.identity.get_principal(p) is None:
                    await store.identity.add_principal(Principal(
                        id=p, kind="user", name=p, status="", secret_hash=secret_hash, created_at=time.time()))
        finally:
            await store.close()


def make(name: str, workdir: Path) -> BrokerProcess:
    classes = {"amqtt": StockAmqtt, "roost": Roost, "mosquitto": Mosquitto, "floor": Floor}
    if name not in classes:
        raise ValueError(f"unknown broker {name!r} (known: {', '.join(classes)})")
    return classes[name](workdir / name)
