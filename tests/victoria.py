"""A real VictoriaMetrics server for telemetry tests (it accepts InfluxDB's v2 write API).

`VictoriaMetrics(tmp_dir)` runs Debian's `victoria-metrics` binary on a free
loopback port with its own storage directory; `.start()` waits for `/health`,
`.stop()` terminates it (SIGTERM, then SIGKILL), `.export(match)` flushes and
reads back what was stored. The `victoria` fixture in tests that need it skips
the test with a clear reason when the binary is not installed (see
scripts/test.sh, which installs it).

VictoriaMetrics stores measurement `m` with field `f` as metric `m_f`, tags as
labels, and cuts time to milliseconds (see docs/TELEMETRY.md, "What was verified against what").
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BINARY = "victoria-metrics"
SETTLE = 1.2  # seconds until VictoriaMetrics shows what it accepted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> bool:
    return shutil.which(BINARY) is not None


@dataclass(frozen=True, slots=True)
class Sample:
    metric: str
    labels: dict[str, str]
    value: float
    ts_ms: int


class VictoriaMetrics:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.data_dir.parent / f"victoria-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self._log, "ab")
        try:
            self._proc = subprocess.Popen(
                [BINARY, f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self.data_dir}",
                 "-retentionPeriod=100y", "-search.latencyOffset=0s"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"victoria-metrics exited with {self._proc.returncode}; see {self._log}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.read().strip() == b"OK":
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"victoria-metrics did not become healthy in {timeout} s; see {self._log}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def flush(self) -> None:
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10) as r:
            r.read()

    def export(self, match: str, expect: int | None = None, timeout: float = 10.0) -> list[Sample]:
        """Every stored sample of the series matching `match` (a PromQL series selector).

        VictoriaMetrics makes freshly inserted rows searchable about a second
        after they were accepted, even after /internal/force_flush. So this polls
        until at least `expect` samples show up, then waits one more settle period
        and reads again, so that extra (duplicate) samples would show too.
        """
        deadline = time.monotonic() + timeout
        if expect:
            while len(self.export_now(match)) < expect and time.monotonic() < deadline:
                time.sleep(0.1)
        time.sleep(SETTLE)
        return self.export_now(match)

    def export_now(self, match: str) -> list[Sample]:
        self.flush()
        q = urllib.parse.urlencode({"match[]": match, "start": "0"})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{q}", timeout=10) as r:
            body = r.read().decode()
        samples: list[Sample] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            doc = json.loads(line)
            labels = dict(doc["metric"])
            name = labels.pop("__name__")
            for v, t in zip(doc["values"], doc["timestamps"]):
                samples.append(Sample(name, labels, float(v), int(t)))
        return samples

    def __enter__(self) -> VictoriaMetrics:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
