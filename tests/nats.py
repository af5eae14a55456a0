"""A private NATS server for tests: Debian's nats-server on a free loopback port.

    server = NatsServer().start()     # waits until it accepts connections
    server.url                        # nats://127.0.0.1:PORT
    server.kill(); server.start()     # an outage (SIGKILL) and the recovery, same port
    server.stop()                     # SIGTERM, waits for the process to end

Everything waits on conditions (the port answering, the process gone), never on
fixed sleeps. `wait_until(predicate)` is the condition wait the cluster tests share.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

NATS_SERVER = "/usr/sbin/nats-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        time.sleep(interval)


class NatsServer:
    def __init__(self, root: Path | None = None, port: int | None = None) -> None:
        binary = shutil.which("nats-server") or NATS_SERVER
        if not Path(binary).exists():
            raise RuntimeError("nats-server is not installed; scripts/test installs Debian's nats-server")
        self.binary = binary
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="roost-nats-"))
        self.port = port or free_port()
        self.log_path = self.root / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-a", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    return sock.recv(4).startswith(b"INFO")
            except OSError:
                return False

        wait_until(listening, timeout, "nats-server listening")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
