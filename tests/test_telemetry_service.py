"""TelemetryService on its own: real SQLite store, real VictoriaMetrics (InfluxDB v2
write API), no broker. The end-to-end MQTT path is in test_telemetry.py."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from broker.config import config_from_dict
from broker.services.identity import IdentityService
from broker.services.runtime import Services
from broker.services.telemetry import MalformedTelemetry, TelemetryService, parse_telemetry
from broker.services.telemetry_influx import line_protocol
from broker.store.sqlite import SqliteStore
from tests import victoria

needs_vm = pytest.mark.skipif(not victoria.available(), reason="victoria-metrics is not installed "
                              "(apt-get install -y victoria-metrics; scripts/test.sh does it)")


@pytest.fixture
def vm(tmp_path):
    server = victoria.VictoriaMetrics(tmp_path / "vm")
    server.start()
    yield server
    server.stop()


async def make_services(tmp_path, telemetry_cfg: dict) -> Services:
    config = config_from_dict({"storage": {"path": str(tmp_path / "roost.db")}, "telemetry": telemetry_cfg})
    store = SqliteStore(config.resolve(config.storage.path))
    await store.open()
    identity = IdentityService(store.identity)
    await identity.load()
    services = Services(config=config, store=store, identity=identity)
    services.telemetry = TelemetryService(services)
    await services.telemetry.load()
    await services.telemetry.start(None)
    return services


async def close(services: Services) -> None:
    await services.telemetry.stop()
    await services.store.close()


def influx_cfg(vm, **over) -> dict:
    cfg = {"url": vm.url, "org": "home", "bucket": "roost", "token": "t", "batch_size": 50,
           "flush_interval": 0.05, "max_retry_delay": 0.2, "timeout": 2}
    cfg.update(over)
    return {"influxdb": cfg}


async def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_parse_rejects_malformed():
    ok = parse_telemetry(b'{"ts": 1700000000.5, "temperature": 21, "on": true, "mode": "heat"}', 8)
    assert ok.ts == 1700000000.5 and ok.fields == {"temperature": 21, "on": True, "mode": "heat"}
    for bad in [b"not json", b"[1,2]", b'{"ts": 5}', b'{}', b'{"a": null}', b'{"a": [1]}', b'{"a": {"b": 1}}',
                b'{"ts": "now", "a": 1}', b'{"ts": true, "a": 1}', b'{"ts": 1.7e12, "a": 1}', b'{"a": NaN}',
                b'{"device": 1}', b'{"": 1}', b'{"a": "x\\ny"}', json.dumps({f"f{i}": i for i in range(9)}).encode()]:
        with pytest.raises(MalformedTelemetry):
            parse_telemetry(bad, 8)


def test_line_protocol_escapes():
    line = line_protocol("light", {"device": "l1", "room": "living room, east", "owner": ""},
                         {"on": True, "level": 3, "note": 'say "hi" \\o/'}, 1_700_000_000_000_000_000)
    assert line == ('light,device=l1,room=living\\ room\\,\\ east on=true,level=3.0,'
                    'note="say \\"hi\\" \\\\o/" 1700000000000000000')


def test_latest_readings_without_influxdb(tmp_path):
    async def main():
        services = await make_services(tmp_path, {})
        await services.identity.add("therm1", "device", device_kind="thermostat", room="hall")
        tel = services.telemetry
        assert tel.latest("therm1") is None
        assert tel.accept("therm1", b'{"temperature": 20.5, "humidity": 40}')
        assert tel.accept("therm1", b'{"ts": 1700000000, "temperature": 21}')
        assert not tel.accept("therm1", b'{"temperature": [1]}')
        latest = tel.latest("therm1")
        assert latest["temperature"] == 21 and latest["humidity"] == 40
        assert latest["ts"] > 1700000000  # the newest time seen, not the last object's older ts
        stats = tel.stats()
        assert stats["accepted"] == 2 and stats["malformed"] == 1 and stats["written"] == 0
        await close(services)
        # The readings survive a restart (write-behind flushed at stop).
        services = await make_services(tmp_path, {})
        assert services.telemetry.latest("therm1") == latest
        await close(services)

    asyncio.run(main())


@needs_vm
def test_points_reach_victoriametrics_point_for_point(tmp_path, vm):
    dev = "t" + uuid.uuid4().hex[:8]

    async def main():
        services = await make_services(tmp_path, influx_cfg(vm))
        await services.identity.add(dev, "device", device_kind="thermostat", room="living room")
        services.relations.set_device_users(dev, {"alice"})
        tel = services.telemetry
        base = float(int(time.time()) - 1000)
        for i in range(300):
            assert tel.accept(dev, json.dumps({"ts": base + i, "temperature": 20 + i / 10, "on": i % 2 == 0}).encode())
        assert not tel.accept(dev, b'{"temperature": "x", "bad": null}')
        await wait_for(lambda: tel.stats()["written"] == 300)
        await close(services)
        return base

    base = asyncio.run(main())
    samples = vm.export(f'thermostat_temperature{{device="{dev}"}}', expect=300)
    assert len(samples) == 300
    assert {s.labels["room"] for s in samples} == {"living room"}
    assert {s.labels["owner"] for s in samples} == {"alice"}
    assert sorted(s.ts_ms for s in samples) == [int((base + i) * 1000) for i in range(300)]
    assert sorted(s.value for s in samples)[:2] == [20.0, 20.1]
    assert len(vm.export_now(f'thermostat_on{{device="{dev}"}}')) == 300
    assert vm.export_now(f'{{__name__=~"thermostat_bad", device="{dev}"}}') == []


@needs_vm
def test_server_down_then_back_nothing_lost_nothing_twice(tmp_path, vm):
    dev = "t" + uuid.uuid4().hex[:8]

    async def main():
        services = await make_services(tmp_path, influx_cfg(vm))
        await services.identity.add(dev, "device", device_kind="thermostat")
        tel = services.telemetry
        for i in range(100):
            tel.accept(dev, json.dumps({"temperature": i}).encode())
        await wait_for(lambda: tel.stats()["written"] == 100)
        vm.stop()
        t0 = time.perf_counter()
        for i in range(100, 400):
            tel.accept(dev, json.dumps({"temperature": i}).encode())
            await asyncio.sleep(0)
        assert time.perf_counter() - t0 < 1.0   # intake never waits for the server
        await wait_for(lambda: tel.stats()["retries"] >= 2)
        assert tel.stats()["written"] == 100 and tel.stats()["buffered"] == 300
        vm.start()
        await wait_for(lambda: tel.stats()["written"] == 400, timeout=10)
        stats = tel.stats()
        assert stats["dropped"] == 0 and stats["buffered"] == 0
        await close(services)

    asyncio.run(main())
    values = sorted(s.value for s in vm.export(f'thermostat_temperature{{device="{dev}"}}', expect=400))
    assert values == [float(i) for i in range(400)]


@needs_vm
def test_full_buffer_drops_and_counts(tmp_path, vm):
    dev = "t" + uuid.uuid4().hex[:8]
    vm.stop()

    async def main():
        services = await make_services(tmp_path, influx_cfg(vm, buffer_size=50, batch_size=10))
        await services.identity.add(dev, "device", device_kind="light")
        tel = services.telemetry
        for i in range(200):
            tel.accept(dev, json.dumps({"level": i}).encode())
        stats = tel.stats()
        # The writer may already hold one batch (10) outside the 50-point buffer.
        assert stats["accepted"] == 200
        assert 140 <= stats["dropped"] <= 150 and stats["dropped"] + stats["buffered"] == 200
        assert tel.latest(dev)["level"] == 199   # latest readings never depend on InfluxDB
        vm.start()
        await wait_for(lambda: tel.stats()["buffered"] == 0, timeout=10)
        written = tel.stats()["written"]
        await close(services)
        return written, stats["dropped"]

    written, dropped = asyncio.run(main())
    assert written == 200 - dropped
    assert len(vm.export(f'light_level{{device="{dev}"}}', expect=written)) == written


def test_a_removed_and_re_registered_device_starts_without_readings(tmp_path):
    async def main():
        services = await make_services(tmp_path, {})
        await services.identity.add("lamp", "device", device_kind="light")
        tel = services.telemetry
        tel.accept("lamp", b'{"on": true, "brightness": 80}')
        assert tel.latest("lamp")["brightness"] == 80
        await services.identity.remove("lamp")           # as `roost device remove` does (store + directory)
        assert tel.latest("lamp") is None
        await services.identity.add("lamp", "device", device_kind="light")
        assert tel.latest("lamp") is None
        tel.accept("lamp", b'{"on": false}')
        assert tel.latest("lamp") == {"ts": tel.latest("lamp")["ts"], "on": False}
        await close(services)

    asyncio.run(main())


class HangingServer:
    """Accepts connections and reads requests but never answers: a stuck InfluxDB."""

    def __init__(self, port: int) -> None:
        import socket
        import threading

        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(16)
        self._conns: list = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)

    def close(self) -> None:
        self._sock.close()
        for c in self._conns:
            c.close()


@needs_vm
def test_stuck_server_then_recovery(tmp_path):
    vm = victoria.VictoriaMetrics(tmp_path / "vm")
    hanging = HangingServer(vm.port)
    dev = "t" + uuid.uuid4().hex[:8]

    async def main():
        services = await make_services(tmp_path, influx_cfg(vm, timeout=0.3))
        await services.identity.add(dev, "device", device_kind="thermostat")
        tel = services.telemetry
        t0 = time.perf_counter()
        for i in range(200):
            tel.accept(dev, json.dumps({"temperature": i}).encode())
            await asyncio.sleep(0)
        assert time.perf_counter() - t0 < 0.5
        await wait_for(lambda: tel.stats()["retries"] >= 2)
        assert tel.stats()["written"] == 0
        hanging.close()
        vm.start()
        await wait_for(lambda: tel.stats()["written"] == 200, timeout=10)
        await close(services)

    try:
        asyncio.run(main())
        values = sorted(s.value for s in vm.export(f'thermostat_temperature{{device="{dev}"}}', expect=200))
        assert values == [float(i) for i in range(200)]
    finally:
        hanging.close()
        vm.stop()


def test_stop_is_bounded_when_the_server_is_gone(tmp_path):
    async def main():
        port = victoria.free_port()
        services = await make_services(tmp_path, {"influxdb": {"url": f"http://127.0.0.1:{port}", "bucket": "b",
                                                               "max_retry_delay": 5, "flush_interval": 0.05}})
        await services.identity.add("t1", "device", device_kind="thermostat")
        tel = services.telemetry
        for i in range(50):
            tel.accept("t1", json.dumps({"temperature": i}).encode())
        await wait_for(lambda: tel.stats()["retries"] >= 1)
        t0 = time.perf_counter()
        await close(services)
        assert time.perf_counter() - t0 < 6
        stats = tel.stats()
        assert stats["dropped"] == 50 and stats["written"] == 0 and stats["accepted"] == 50

    asyncio.run(main())
