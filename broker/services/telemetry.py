"""Device telemetry: validation, points for InfluxDB, latest readings per device.

A device publishes a flat JSON object on `roost/telemetry/<device>` (PROTOCOL.md,
"Telemetry"). `TelemetryService.accept` runs on the event loop for every such
publish and must stay cheap: it validates, formats one InfluxDB line and hands it
to the writer thread's bounded buffer (telemetry_influx.py), and merges the
fields into the device's latest readings in memory, and its numbers and bools
into the device's next recent-history point. Latest readings reach the
store write-behind: at most one row write per device per `LATEST_FLUSH` seconds,
all devices in one transaction, so a chatty sensor costs one upsert a second.
The recent history (`device.history`, for charts without InfluxDB) is written
with the same flush: at most one point per device per `telemetry.history_interval`
(the fields received since the last point, newest value each), at most
`telemetry.history_points` per device and none older than `telemetry.history_ttl`.

What makes an object malformed (counted, logged at a limited rate, never
written, and not routed to subscribers):
- not JSON (strict UTF-8, every string valid Unicode: no lone surrogate such as
  `"\ud800"`, which could be neither stored nor forwarded to InfluxDB), not an
  object, or no field besides `ts`;
- `ts` present but not a positive number of unix seconds, or more than a day ahead;
- a field name empty, longer than 64 characters, containing control characters,
  or one of the tag names (device, room, owner);
- a value that is not a finite number, a bool or a string (of at most 1024
  characters, no control characters): null, arrays and objects are refused;
- more than `telemetry.max_fields` fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from broker.services.base import Caller, Handler, bad, cancel_and_wait, param_int, param_str
from broker.services.events import PrincipalRemoved, TelemetryReceived, TelemetrySaved
from broker.services.inbox import describe_failure
from broker.services.telemetry_influx import FieldValue, InfluxWriter, RateLimitedLog, line_protocol, seconds_to_ns
from broker.store.base import HistoryPoint, LatestReading
from contract.errors import ErrorCode, ProtocolError
from contract.ids import is_valid_principal_id
from contract.ops import DEFAULT_DEVICE_HISTORY_LIMIT, MAX_DEVICE_HISTORY_LIMIT, MAX_METRIC, MAX_NUMBER

if TYPE_CHECKING:
    from broker.services.runtime import Services

log = logging.getLogger("roost.telemetry")

MAX_FIELD_NAME = 64
MAX_STRING_VALUE = 1024
MAX_FUTURE = 86400.0           # seconds a `ts` may be ahead of the broker's clock
TAG_NAMES = ("device", "room", "owner")
LATEST_FLUSH = 1.0             # seconds between write-behind flushes of latest readings
SAVED_PER_EVENT = 100          # readings per TelemetrySaved event (one NATS message each in a cluster)
REPORT_INTERVAL = 300.0        # seconds between counter lines in the log (only when they changed)

class MalformedTelemetry(ValueError):
    """Why a telemetry object was refused (the text goes to the log)."""


@dataclass(frozen=True, slots=True)
class Reading:
    ts: float | None
    fields: dict[str, FieldValue]


def _has_control(s: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in s)


def parse_telemetry(payload: bytes, max_fields: int, now: float | None = None) -> Reading:
    try:
        # Strict UTF-8: json.loads(bytes) would let encoded surrogates through.
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedTelemetry("payload is not JSON") from None
    if not isinstance(doc, dict):
        raise MalformedTelemetry("payload is not a JSON object")
    ts = doc.pop("ts", None)
    if ts is not None:
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts <= 0:
            raise MalformedTelemetry("'ts' must be a positive number of unix seconds")
        if ts > (now if now is not None else time.time()) + MAX_FUTURE:
            raise MalformedTelemetry("'ts' is more than a day ahead (unix seconds expected, not milliseconds)")
        ts = float(ts)
    if not doc:
        raise MalformedTelemetry("no fields")
    if len(doc) > max_fields:
        raise MalformedTelemetry(f"{len(doc)} fields, more than the {max_fields} allowed")
    for name, value in doc.items():
        if not name or len(name) > MAX_FIELD_NAME or _has_control(name):
            raise MalformedTelemetry(f"bad field name {name[:MAX_FIELD_NAME]!r}")
        if name in TAG_NAMES:
            raise MalformedTelemetry(f"field name {name!r} is reserved for a tag")
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise MalformedTelemetry(f"field {name!r} is not a finite number")
            continue
        if isinstance(value, str):
            if len(value) > MAX_STRING_VALUE or _has_control(value):
                raise MalformedTelemetry(f"field {name!r}: strings are at most {MAX_STRING_VALUE} "
                                         "characters without control characters")
            continue
        raise MalformedTelemetry(f"field {name!r} must be a number, a bool or a string")
    return Reading(ts=ts, fields=doc)


@dataclass
class TelemetryStats:
    accepted: int = 0          # objects that became a point (and a latest reading)
    malformed: int = 0         # objects refused
    written: int = 0           # points InfluxDB acknowledged
    dropped: int = 0           # points discarded (buffer full / unsent at shutdown)
    retries: int = 0           # failed InfluxDB writes that were retried
    rejected: int = 0          # points InfluxDB refused for good (4xx)
    buffered: int = 0          # points waiting for InfluxDB right now
    latest_saved: int = 0      # latest-reading rows written to the store
    latest_errors: int = 0     # failed write-behind flushes (retried on the next one)
    history_saved: int = 0     # recent-history points written to the store
    history_errors: int = 0    # failed history writes (retried on the next flush)


class TelemetryService:
    def __init__(self, services: Services) -> None:
        self._services = services
        self._bus = services.bus
        self._bus.subscribe(PrincipalRemoved, self._principal_removed)
        self._bus.subscribe(TelemetrySaved, self._apply_saved)   # saved here or on another node
        cfg = services.config.telemetry
        self._max_fields = max(1, cfg.max_fields)
        self._store = services.store.telemetry
        self._influx = InfluxWriter(cfg.influxdb) if cfg.influxdb is not None else None
        self._latest: dict[str, LatestReading] = {}
        # created_at of the principal each reading belongs to: a device removed by an
        # admin (another process) and registered again under the same id starts empty.
        self._born: dict[str, float | None] = {}
        self._dirty: set[str] = set()
        # The next history point of each device (numbers and bools since its last one) and when the last was written.
        self._next_point: dict[str, HistoryPoint] = {}
        self._point_written: dict[str, float] = {}
        self._dirty_event = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._reported: dict[str, int] = {}
        self._stats = TelemetryStats()
        self._malformed_log = RateLimitedLog(log)
        self._latest_log = RateLimitedLog(log, interval=60.0)   # a full store fails every flush

    # ---- service lifecycle -------------------------------------------------
    async def load(self) -> None:
        self._latest = {r.device: r for r in await self._store.load_latest()}
        self._born = {d: self._created_at(d) for d in self._latest}

    async def start(self, publisher: Any) -> None:
        if self._influx is not None:
            self._influx.start()
            cfg = self._services.config.telemetry.influxdb
            assert cfg is not None   # the writer exists only when it is configured
            log.info("telemetry goes to InfluxDB at %s (bucket %s)", cfg.url, cfg.bucket)
        self._flusher = asyncio.create_task(self._flush_loop(), name="roost-telemetry-latest")
        self._reporter = asyncio.create_task(self._report_loop(), name="roost-telemetry-report")

    async def stop(self) -> None:
        await cancel_and_wait(self._flusher, self._reporter)
        self._flusher = self._reporter = None
        await self.flush()
        if self._influx is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._influx.stop)
        self._report()

    def ops(self) -> dict[str, Handler]:
        return {"device.history": self.op_history}

    # ---- intake (event loop, cheap) ----------------------------------------
    def accept(self, device: str, payload: bytes, *, arrival_ns: int | None = None) -> bool:
        """Validate and take one telemetry object from `device`. False: malformed
        (counted and logged; nothing written)."""
        arrival_ns = arrival_ns if arrival_ns is not None else time.time_ns()
        try:
            reading = parse_telemetry(payload, self._max_fields, now=arrival_ns / 1e9)
        except MalformedTelemetry as exc:
            self.refuse(device, str(exc))
            return False
        self._stats.accepted += 1
        time_ns = seconds_to_ns(reading.ts) if reading.ts is not None else arrival_ns
        if self._influx is not None:
            measurement, tags = self._series_of(device)
            self._influx.offer(line_protocol(measurement, tags, reading.fields, time_ns))
        self._remember(device, time_ns / 1e9, reading.fields)
        return True

    def refuse(self, device: str, reason: str) -> None:
        """Count and log a telemetry publish that will not be used."""
        self._stats.malformed += 1
        self._malformed_log.warning("malformed telemetry from %s refused: %s (%d malformed so far)",
                                    device, reason, self._stats.malformed)

    def _series_of(self, device: str) -> tuple[str, dict[str, str]]:
        p = self._services.identity.get_cached(device)
        measurement = (p.device_kind if p is not None and p.device_kind else "device")
        tags = {"device": device}
        if p is not None and p.room:
            tags["room"] = p.room
        owner = self._owner_of(device)
        if owner:
            tags["owner"] = owner
        return measurement, tags

    def _owner_of(self, device: str) -> str | None:
        """The device's owners (sorted, comma-separated); sharees are not owners."""
        devices = self._services.devices
        owners = devices.owners(device) if devices is not None else self._services.relations.device_users(device)
        return ",".join(sorted(owners)) if owners else None

    # ---- latest readings ------------------------------------------------------
    def _created_at(self, device: str) -> float | None:
        p = self._services.identity.get_cached(device)
        return p.created_at if p is not None else None

    def _remember(self, device: str, ts: float, fields: dict[str, FieldValue]) -> None:
        born = self._created_at(device)
        prev = self._latest.get(device)
        if prev is not None and self._born.get(device) != born:
            prev = None
        self._born[device] = born
        if prev is None:
            merged = dict(fields)
        else:
            merged = dict(prev.fields)
            for k in fields:
                merged.pop(k, None)   # re-insert at the end: the dict stays ordered by recency
            merged.update(fields)
            while len(merged) > self._max_fields:
                del merged[next(iter(merged))]
        reading = LatestReading(device=device, ts=max(ts, prev.ts) if prev else ts, fields=merged)
        self._latest[device] = reading
        self._add_to_next_point(device, ts, fields, fresh=prev is None)
        self._dirty.add(device)
        self._dirty_event.set()
        # Consumers must not block (this runs for every accepted publish); a failing one is logged.
        self._bus.publish_nowait(TelemetryReceived(device, self._as_dict(reading)))

    def _add_to_next_point(self, device: str, ts: float, fields: dict[str, FieldValue], *, fresh: bool) -> None:
        charted = {k: v for k, v in fields.items() if not isinstance(v, str)}
        if not charted:
            return
        pending = self._next_point.get(device)
        if pending is None or fresh:
            self._next_point[device] = HistoryPoint(device, ts, charted)
        else:
            self._next_point[device] = HistoryPoint(device, max(ts, pending.ts), {**pending.fields, **charted})

    @staticmethod
    def _as_dict(r: LatestReading) -> dict[str, Any]:
        return {"ts": r.ts, **r.fields}

    def latest(self, device: str) -> dict[str, Any] | None:
        """`{"ts": <newest>, field: value, ...}`: the newest value of every field the
        device reported (at most `telemetry.max_fields`), or None."""
        r = self._latest.get(device)
        if r is None or self._born.get(device) != self._created_at(device):
            return None
        return self._as_dict(r)

    async def _principal_removed(self, event: PrincipalRemoved) -> None:
        await self.principal_removed(event.principal)

    async def principal_removed(self, principal: str) -> None:
        await self.forget(principal)

    async def forget(self, device: str) -> None:
        """The device was removed: drop its readings."""
        self._latest.pop(device, None)
        self._born.pop(device, None)
        self._dirty.discard(device)
        self._next_point.pop(device, None)
        self._point_written.pop(device, None)
        await self._store.delete_latest(device)

    async def _flush_loop(self) -> None:
        while True:
            await self._dirty_event.wait()
            await asyncio.sleep(LATEST_FLUSH)
            await self._flush_latest()

    async def _flush_latest(self) -> None:
        self._dirty_event.clear()
        await self._flush_history()
        if not self._dirty:
            return
        devices, self._dirty = self._dirty, set()
        batch = [self._latest[d] for d in devices if d in self._latest]
        try:
            self._stats.latest_saved += await self._store.put_latest(batch)
            self._saved(batch)
        except Exception as exc:  # noqa: BLE001 - retried with the next flush
            self._stats.latest_errors += 1
            line, not_the_store = describe_failure(exc)
            if not not_the_store or len(batch) == 1:
                self._latest_log.warning("saving latest telemetry of %d devices failed (%s); will retry",
                                         len(batch), line)
                self._dirty |= {r.device for r in batch if r.device in self._latest}
                self._dirty_event.set()
            else:
                # Not the store: one reading it cannot take must not hold back the others forever.
                await self._flush_each(batch)

    async def flush(self) -> None:
        """Write what waits for the next flush now: latest readings and every pending
        history point (stop does; so may a test)."""
        await self._flush_history(force=True)
        await self._flush_latest()

    async def _flush_history(self, *, force: bool = False) -> None:
        """Write the history points that are due (all of them with `force`)."""
        if not self._next_point:
            return
        cfg = self._services.config.telemetry
        now = self._services.clock()
        due = [d for d in self._next_point
               if force or now - self._point_written.get(d, float("-inf")) >= cfg.history_interval]
        if len(due) < len(self._next_point):
            self._dirty_event.set()   # come back for the others when their interval has passed
        if not due:
            return
        points = [self._next_point.pop(d) for d in due]
        try:
            self._stats.history_saved += await self._store.put_history(
                points, keep=max(1, cfg.history_points), expire_before=now - cfg.history_ttl)
        except Exception as exc:  # noqa: BLE001 - retried with the next flush
            self._stats.history_errors += 1
            self._latest_log.warning("saving telemetry history of %d devices failed (%s); will retry",
                                     len(points), describe_failure(exc)[0])
            for point in points:   # newer fields received meanwhile win
                later = self._next_point.get(point.device)
                self._next_point[point.device] = point if later is None else HistoryPoint(
                    point.device, later.ts, {**point.fields, **later.fields})
            self._dirty_event.set()
            return
        for d in due:
            self._point_written[d] = now

    async def op_history(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        """`device.history`: for whoever may read the device's latest state (its owners and
        sharees, the device itself, the integration account); anyone else: not_found."""
        device = param_str(params, "device", max_len=64)
        if not device or not is_valid_principal_id(device):
            raise bad("'device' is not a valid id")
        metric = param_str(params, "metric", required=False, max_len=MAX_METRIC)
        if metric == "":
            raise bad("'metric' must not be empty")
        since = param_int(params, "since", required=False, default=0, maximum=MAX_NUMBER)
        limit = param_int(params, "limit", required=False, default=DEFAULT_DEVICE_HISTORY_LIMIT, minimum=1,
                          maximum=MAX_DEVICE_HISTORY_LIMIT)
        relations = self._services.relations
        p = self._services.identity.get_cached(device)
        allowed = caller.principal == device or relations.may_use_device(caller.principal, device) or (
            relations.integration_account is not None and caller.principal == relations.integration_account)
        if p is None or p.kind != "device" or not allowed:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no device {device!r}")
        points = await self._store.history(device, metric=metric, since=float(since), limit=limit)
        return {"device": device, "points": [{"ts": pt.ts, "fields": pt.fields} for pt in points]}

    async def _flush_each(self, batch: list[LatestReading]) -> None:
        for reading in batch:
            try:
                self._stats.latest_saved += await self._store.put_latest([reading])
                self._saved([reading])
            except Exception as exc:  # noqa: BLE001 - an outage is retried, a bad reading given up
                line, trace = describe_failure(exc)
                if trace:
                    log.warning("latest telemetry of %s cannot be saved (%s); kept in memory only",
                                reading.device, line)
                elif reading.device in self._latest:
                    self._dirty.add(reading.device)
                    self._dirty_event.set()

    def _saved(self, batch: list[LatestReading]) -> None:
        for i in range(0, len(batch), SAVED_PER_EVENT):
            self._bus.publish_nowait(TelemetrySaved(tuple(batch[i:i + SAVED_PER_EVENT])))

    def _apply_saved(self, event: TelemetrySaved) -> None:
        """Readings another node saved (or this one: then nothing here is older)."""
        for r in event.readings:
            born = self._created_at(r.device)
            if born is None:
                continue
            mine = self._latest.get(r.device)
            if mine is None or self._born.get(r.device) != born or r.ts > mine.ts:
                self._latest[r.device] = r
                self._born[r.device] = born

    # ---- counters ----------------------------------------------------------------
    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self._report()

    def _report(self) -> None:
        stats = self.stats()
        changed = {k: v for k, v in stats.items() if k != "buffered"} != \
            {k: v for k, v in self._reported.items() if k != "buffered"}
        if changed:
            self._reported = stats
            log.info("telemetry: %s", ", ".join(f"{k} {v}" for k, v in stats.items()))

    def stats(self) -> dict[str, int]:
        s = self._stats
        if self._influx is not None:
            w = self._influx.stats
            s.written, s.dropped, s.retries, s.rejected = w.written, w.dropped, w.retries, w.rejected
            s.buffered = self._influx.buffered
        return asdict(s)
