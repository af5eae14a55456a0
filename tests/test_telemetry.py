"""Telemetry end to end (issue 5 item 4): devices publish on roost/telemetry/<device>
to a real broker; points are counted in a real VictoriaMetrics (InfluxDB v2 write
API); latest readings come back through `devices`."""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid

import pytest

from tests import victoria
from tests.clients import ImClient, MqttClient

needs_vm = pytest.mark.skipif(not victoria.available(), reason="victoria-metrics is not installed "
                              "(apt-get install -y victoria-metrics; scripts/test.sh does it)")


@pytest.fixture
def vm(tmp_path):  # noqa: ANN201
    server = victoria.VictoriaMetrics(tmp_path / "vm")
    server.start()
    yield server
    server.stop()


def influx(vm, **over) -> dict:  # noqa: ANN001
    cfg = {"url": vm.url, "org": "home", "bucket": "roost", "token": "secret-token", "batch_size": 100,
           "flush_interval": 0.1, "max_retry_delay": 0.5, "timeout": 2}
    cfg.update(over)
    return {"telemetry": {"influxdb": cfg}}


def owned_device(roost, kind: str = "thermostat", room: str | None = "kitchen"):  # noqa: ANN001, ANN201
    """A fresh device (unique id isolates the series), claimed by alice; returns
    (device id, device client, alice client)."""
    dev = "d" + uuid.uuid4().hex[:10]
    secret, code = roost.add_device(dev, kind, room=room)
    try:
        apw = roost.add_user("alice")
    except Exception:  # noqa: BLE001 - alice exists already
        apw = "pw-alice"
    alice = ImClient("alice", uuid.uuid4().hex[:6]).open(roost, apw)
    alice.call("device.claim", device=dev, code=code)
    device = MqttClient(dev).connect(roost.host, roost.port, username=dev, password=secret)
    return dev, device, alice


@needs_vm
def test_telemetry_counted_point_for_point(roost_factory, vm):
    roost = roost_factory(influx(vm))
    dev, device, alice = owned_device(roost)
    assert alice.subscribe(f"roost/telemetry/{dev}") == [1]
    base = int(time.time()) - 600
    for i in range(200):
        device.publish(f"roost/telemetry/{dev}", {"ts": base + i, "temperature": 20 + i / 100, "heating": i % 2 == 0},
                       qos=1)
    # Malformed: each is refused, never written, never forwarded.
    for bad in ["not json", "[1]", '{"temperature": null}', '{"temperature": {"c": 1}}', '{"ts": "yesterday", "x": 1}',
                json.dumps({f"f{i}": i for i in range(100)})]:
        device.publish(f"roost/telemetry/{dev}", bad, qos=1)
    device.publish(f"roost/telemetry/{dev}", {"temperature": 99.5}, qos=1)   # arrival time

    got = [alice.wait_message(f"roost/telemetry/{dev}").json() for _ in range(201)]
    assert got[-1] == {"temperature": 99.5}
    assert alice.no_message(f"roost/telemetry/{dev}", 0.3)

    temps = vm.export(f'thermostat_temperature{{device="{dev}"}}', expect=201)
    assert len(temps) == 201
    assert {(s.labels["room"], s.labels["owner"]) for s in temps} == {("kitchen", "alice")}
    by_time = sorted(temps, key=lambda s: s.ts_ms)
    assert [s.ts_ms for s in by_time[:200]] == [(base + i) * 1000 for i in range(200)]
    assert by_time[-1].value == 99.5 and abs(by_time[-1].ts_ms / 1000 - time.time()) < 30
    assert len(vm.export_now(f'thermostat_heating{{device="{dev}"}}')) == 200
    assert vm.export_now(f'{{__name__=~"thermostat_f.*", device="{dev}"}}') == []

    latest = alice.call("devices")["devices"][0]["last_telemetry"]
    assert latest["temperature"] == 99.5 and latest["heating"] is False


def test_another_device_cannot_publish_for_a_device(roost):
    dev, device, alice = owned_device(roost)
    assert alice.subscribe(f"roost/telemetry/{dev}") == [1]
    osecret, _ = roost.add_device("intruder", "thermostat")
    intruder = MqttClient("intruder").connect(roost.host, roost.port, username="intruder", password=osecret)
    intruder.publish(f"roost/telemetry/{dev}", {"temperature": -40}, qos=1)
    assert alice.no_message(f"roost/telemetry/{dev}", 0.5)
    assert alice.call("devices")["devices"][0]["last_telemetry"] is None


def test_latest_readings_without_influxdb(roost):
    dev, device, alice = owned_device(roost, room=None)
    assert alice.call("devices")["devices"][0]["last_telemetry"] is None
    device.publish(f"roost/telemetry/{dev}", {"temperature": 19.5, "humidity": 45}, qos=1)
    device.publish(f"roost/telemetry/{dev}", {"ts": 1_700_000_000, "temperature": 20.25}, qos=1)
    device.publish(f"roost/telemetry/{dev}", '{"temperature": "NaN?", "bad": []}', qos=1)
    deadline = time.monotonic() + 5
    while True:
        latest = alice.call("devices")["devices"][0]["last_telemetry"]
        if latest and latest.get("temperature") == 20.25 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert latest["temperature"] == 20.25 and latest["humidity"] == 45
    assert latest["ts"] > 1_700_000_000    # the newest time seen
    # Kept in the store: still there after a restart.
    device.disconnect()
    alice.disconnect()
    roost.restart()
    alice = ImClient("alice", "again").open(roost, "pw-alice")
    assert alice.call("devices")["devices"][0]["last_telemetry"] == latest


@needs_vm
def test_influxdb_down_half_way_broker_stays_fast_nothing_lost_or_doubled(roost_factory, vm):
    roost = roost_factory(influx(vm))
    dev, device, alice = owned_device(roost)
    n_total = 600

    def publish(start: int, stop: int) -> None:
        for i in range(start, stop):
            device.publish(f"roost/telemetry/{dev}", {"temperature": i}, qos=1)

    def round_trips(k: int) -> list[float]:
        out = []
        for _ in range(k):
            t0 = time.perf_counter()
            alice.call("convs")
            out.append(time.perf_counter() - t0)
        return out

    publish(0, 200)
    vm.export(f'thermostat_temperature{{device="{dev}"}}', expect=200, timeout=10)
    vm.stop()
    # While the server is down: telemetry keeps flowing and requests stay fast.
    writer = threading.Thread(target=publish, args=(200, 400))
    writer.start()
    down = round_trips(20)
    writer.join()
    publish(400, 500)
    assert statistics.median(down) < 0.1 and max(down) < 1.0, down
    time.sleep(1.0)   # several failed attempts and backoffs
    vm.start()
    publish(500, n_total)
    samples = vm.export(f'thermostat_temperature{{device="{dev}"}}', expect=n_total, timeout=15)
    values = sorted(s.value for s in samples)
    assert values == [float(i) for i in range(n_total)]    # everything, once
    assert "retrying" in roost.log_tail(400)
