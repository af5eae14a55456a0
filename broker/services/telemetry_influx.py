"""Telemetry points to InfluxDB (write API v2) from a worker thread.

The event loop only formats a line and appends it to a bounded buffer
(`InfluxWriter.offer`, a few microseconds, never blocks). One worker thread takes
batches of up to `batch_size` lines (or whatever arrived within `flush_interval`)
and writes them with influxdb-client's synchronous write API. While the server is
slow or down, the worker retries the *same* batch with exponential backoff capped
at `max_retry_delay`; new points keep filling the buffer meanwhile and, once it
holds `buffer_size` lines, further points are dropped, counted and logged.

A batch is retried only when the write failed before the server accepted it
(connection refused, timeout, 5xx, 429). A timeout after the server already
stored the batch can make it arrive twice; every point carries an explicit
timestamp fixed at arrival, so InfluxDB (which keeps one value per series and
time) stores it once. A 4xx other than 429 means the batch itself is wrong
(400 bad line, 413 too large, 401/403/404 token/bucket): it is never
retried (it cannot succeed), but counted as `rejected` and logged.

Numbers are always written as floats so a device sending `21` then `21.5`
never hits InfluxDB's field-type conflict.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from broker.config import InfluxConfig

log = logging.getLogger("roost.telemetry.influx")

FieldValue = float | int | bool | str

# Which HTTP answers mean "try the same batch again later".
_RETRY_STATUSES = {429, 500, 502, 503, 504}


# ---- line protocol -----------------------------------------------------------

def _esc_measurement(s: str) -> str:
    return s.replace("\\", "\\\\").replace(",", "\\,").replace(" ", "\\ ")


def _esc_key(s: str) -> str:
    return s.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _esc_tag_value(s: str) -> str:
    # Line protocol has no escape for newlines in tags; they never come from
    # devices (tags are ids and admin-set rooms), so flatten them.
    s = s.replace("\n", " ").replace("\r", " ")
    return _esc_key(s)


def _field_value(v: FieldValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(float(v))
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def line_protocol(measurement: str, tags: dict[str, str], fields: dict[str, FieldValue], time_ns: int) -> str:
    """One point as an InfluxDB line; tags sorted by key (InfluxDB's preferred order),
    empty tag values left out (line protocol cannot carry them)."""
    parts = [_esc_measurement(measurement)]
    for k in sorted(tags):
        if tags[k]:
            parts.append(f"{_esc_key(k)}={_esc_tag_value(tags[k])}")
    head = ",".join(parts)
    body = ",".join(f"{_esc_key(k)}={_field_value(v)}" for k, v in fields.items())
    return f"{head} {body} {time_ns}"


def seconds_to_ns(ts: float) -> int:
    whole = math.floor(ts)
    return whole * 1_000_000_000 + round((ts - whole) * 1e9)


# ---- rate-limited logging ------------------------------------------------------

class RateLimitedLog:
    """Logs the first occurrence, then at most one line per `interval` with the
    number of occurrences it did not log, so a flood cannot flood the log."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._log = logger
        self._interval = interval
        self._last = -math.inf
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._last = now
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self._log.warning(msg, *args)


# ---- the writer ------------------------------------------------------------------

@dataclass
class WriterStats:
    written: int = 0      # points the server acknowledged
    dropped: int = 0      # points discarded: buffer full, or still unsent at shutdown
    retries: int = 0      # failed write attempts that were retried
    rejected: int = 0     # points in batches the server refused for good (4xx)


class InfluxWriter:
    def __init__(self, cfg: InfluxConfig, *, initial_retry_delay: float = 0.5, drain_timeout: float = 5.0) -> None:
        self._cfg = cfg
        self._batch_size = max(1, cfg.batch_size)
        self._buffer_size = max(1, cfg.buffer_size)
        self._flush_interval = max(0.01, cfg.flush_interval)
        self._max_delay = max(0.01, cfg.max_retry_delay)
        self._initial_delay = min(initial_retry_delay, self._max_delay)
        self._drain_timeout = drain_timeout
        self._buffer: deque[str] = deque()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None       # influxdb_client.InfluxDBClient once started
        self._write_api: Any = None
        self._inflight = 0
        self.stats = WriterStats()
        self._drop_log = RateLimitedLog(log)
        self._fail_log = RateLimitedLog(log)

    # ---- event-loop side (never blocks) --------------------------------
    def offer(self, line: str) -> bool:
        with self._cond:
            if len(self._buffer) >= self._buffer_size or self._stopping.is_set():
                self.stats.dropped += 1
                full = True
            else:
                self._buffer.append(line)
                full = False
                if len(self._buffer) >= self._batch_size:
                    self._cond.notify()
        if full:
            self._drop_log.warning("telemetry buffer full (%d points): dropping points for InfluxDB; "
                                   "%d dropped so far", self._buffer_size, self.stats.dropped)
        return not full

    def _count(self, name: str, n: int) -> None:
        # Counters change on the writer thread, the event loop and at stop: one lock.
        with self._cond:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    @property
    def buffered(self) -> int:
        """Points waiting, the batch being written included."""
        return len(self._buffer) + self._inflight

    # ---- lifecycle -------------------------------------------------------
    def start(self) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        # retries=False: the only retry policy is ours (no hidden duplicate writes).
        # No token or org is None, which the client accepts but does not declare.
        options: dict[str, Any] = {"url": self._cfg.url, "token": self._cfg.token or None,
                                   "org": self._cfg.org or None, "timeout": int(self._cfg.timeout * 1000),
                                   "retries": False}
        self._client = InfluxDBClient(**options)
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        self._thread = threading.Thread(target=self._run, name="roost-influx-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Blocking (call from an executor): write what is buffered for up to
        `drain_timeout` seconds while the server answers, then give up, counting
        whatever is left as dropped."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            # Bounded even when a request hangs: the thread is a daemon, and what it
            # still holds is counted as dropped.
            self._thread.join(self._drain_timeout + 0.5)
        with self._cond:
            left = len(self._buffer)
            if self._thread is not None and self._thread.is_alive():
                left += self._inflight
            self._buffer.clear()
        if left:
            self._count("dropped", left)
            log.warning("stopping: %d telemetry points could not be written to InfluxDB and were dropped", left)
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    # ---- worker thread -----------------------------------------------------
    def _next_batch(self, drain_deadline: float | None) -> list[str] | None:
        with self._cond:
            deadline = time.monotonic() + self._flush_interval
            while len(self._buffer) < self._batch_size and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopping.is_set() and (not self._buffer or
                                            (drain_deadline is not None and time.monotonic() > drain_deadline)):
                return None
            n = min(self._batch_size, len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(n)]
            self._inflight = n
            return batch

    def _run(self) -> None:
        drain_deadline: float | None = None
        while True:
            if self._stopping.is_set() and drain_deadline is None:
                drain_deadline = time.monotonic() + self._drain_timeout
            batch = self._next_batch(drain_deadline)
            if batch is None:
                return
            if batch:
                try:
                    self._write_with_retry(batch)
                finally:
                    self._inflight = 0

    def _write_with_retry(self, batch: list[str]) -> None:
        from influxdb_client.domain.write_precision import WritePrecision
        from influxdb_client.rest import ApiException

        delay = self._initial_delay
        while True:
            wait: float | None = None
            try:
                self._write_api.write(bucket=self._cfg.bucket, org=self._cfg.org or None, record=batch,
                                      write_precision=WritePrecision.NS)
                self._count("written", len(batch))
                return
            except ApiException as exc:
                status = exc.status or 0
                if status not in _RETRY_STATUSES:
                    self._count("rejected", len(batch))
                    log.error("InfluxDB refused %d points with HTTP %s %s (not retried): %s", len(batch), status,
                              exc.reason, _body(exc))
                    return
                wait = _retry_after(exc)
                reason = f"HTTP {status} {exc.reason}"
            except Exception as exc:  # noqa: BLE001 - network errors of every kind are retried
                reason = f"{type(exc).__name__}: {exc}"
            if self._stopping.is_set():
                self._count("dropped", len(batch))
                log.warning("stopping: InfluxDB write failed (%s); %d points dropped", reason, len(batch))
                return
            self._count("retries", 1)
            wait = min(self._max_delay, wait if wait is not None else delay)
            delay = min(self._max_delay, delay * 2)
            self._fail_log.warning("InfluxDB write of %d points failed (%s); retrying in %.1f s, %d points buffered",
                                   len(batch), reason, wait, len(self._buffer))
            if self._stopping.wait(wait):
                # Shutting down during a backoff: one last try, then give up.
                try:
                    self._write_api.write(bucket=self._cfg.bucket, org=self._cfg.org or None, record=batch,
                                          write_precision=WritePrecision.NS)
                    self._count("written", len(batch))
                except Exception:  # noqa: BLE001
                    self._count("dropped", len(batch))
                    log.warning("stopping: InfluxDB unreachable; %d points dropped", len(batch))
                return


def _retry_after(exc: object) -> float | None:
    headers = getattr(exc, "headers", None)
    if not headers:
        return None
    try:
        value = headers.get("Retry-After")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _body(exc: object) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return (body or "")[:300]
