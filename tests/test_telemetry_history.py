"""The recent telemetry history (issue 14 item 3, charts without InfluxDB): points
written with the latest-readings flush, one per device per interval, bounded per
device and by age, read through `device.history` by whoever may read the
device's latest state, kept across a restart."""

from __future__ import annotations

import asyncio
import time
import uuid

from broker.config import config_from_dict
from broker.services.base import Caller
from broker.services.identity import IdentityService
from broker.services.runtime import Services
from broker.services.telemetry import TelemetryService
from broker.store.sqlite import SqliteStore
from contract.errors import ErrorCode, ProtocolError
from tests.clients import ImClient, MqttClient, eventually_ok
from tests.messaging_env import FakeClock


def test_history_points_are_bounded_by_interval_count_and_age(tmp_path):
    async def main() -> None:
        clock = FakeClock(1_800_000_000.0)
        config = config_from_dict({"storage": {"path": str(tmp_path / "roost.db")},
                                   "telemetry": {"history_interval": 10, "history_points": 3, "history_ttl": 100}})
        store = SqliteStore(config.resolve(config.storage.path))
        await store.open()
        identity = IdentityService(store.identity)
        await identity.load()
        await identity.add("thermo", "device", device_kind="thermostat")
        await identity.add("alice", "user", secret="pw")
        services = Services(config=config, store=store, identity=identity, clock=clock)
        telemetry = TelemetryService(services)
        history = telemetry.ops()["device.history"]
        owner, stranger = Caller("alice", "user", "alice.web"), Caller("bob", "user", "bob.web")
        services.relations.set_device_users("thermo", {"alice"})
        try:
            ns = lambda: int(clock.now * 1e9)  # noqa: E731
            telemetry.accept("thermo", b'{"temp": 20.0, "mode": "heat"}', arrival_ns=ns())
            telemetry.accept("thermo", b'{"temp": 20.5, "on": true}', arrival_ns=ns())
            await telemetry.flush()
            got = await history(owner, {"device": "thermo"})
            # one point for what arrived in the interval (newest value of each); strings are not charted
            assert got == {"device": "thermo", "points": [{"ts": clock.now, "fields": {"temp": 20.5, "on": True}}]}
            for i in range(5):
                clock.advance(5)   # half the interval: every other flush writes a point
                telemetry.accept("thermo", f'{{"temp": {21 + i}}}'.encode(), arrival_ns=ns())
                await telemetry._flush_latest()
            points = (await history(owner, {"device": "thermo"}))["points"]
            assert [p["fields"]["temp"] for p in points] == [20.5, 22, 24]
            await telemetry.flush()   # what waits is written when forced (at stop)
            points = (await history(owner, {"device": "thermo", "metric": "temp", "limit": 2}))["points"]
            assert [p["fields"] for p in points] == [{"temp": 24}, {"temp": 25}]   # newest 3 kept, 2 asked
            assert (await history(owner, {"device": "thermo", "metric": "on"}))["points"] == []   # expired by count
            since = int(points[-1]["ts"])
            assert (await history(owner, {"device": "thermo", "since": since}))["points"] == []
            clock.advance(200)   # older than history_ttl: the next write drops them
            telemetry.accept("thermo", b'{"temp": 30}', arrival_ns=ns())
            await telemetry.flush()
            assert [p["fields"] for p in (await history(owner, {"device": "thermo"}))["points"]] == [{"temp": 30}]
            for caller, params in ((stranger, {"device": "thermo"}), (owner, {"device": "nobody"}),
                                   (owner, {"device": "alice"})):
                try:
                    await history(caller, params)
                except ProtocolError as err:
                    assert err.code == ErrorCode.NOT_FOUND
                else:
                    raise AssertionError(f"{params} answered to {caller.principal}")
            assert (await history(Caller("thermo", "device", "thermo"), {"device": "thermo"}))["points"]
        finally:
            await telemetry.stop()
            await store.close()

    asyncio.run(main())


def test_device_history_over_mqtt_for_owners_and_sharees_only_and_after_a_restart(roost_factory):
    roost = roost_factory({"telemetry": {"history_interval": 0}})
    dev = "t" + uuid.uuid4().hex[:8]
    secret, code = roost.add_device(dev, "thermostat")
    pw = {p: roost.add_user(p) for p in ("alice", "bob", "carol")}
    alice = ImClient("alice").open(roost, pw["alice"])
    bob = ImClient("bob").open(roost, pw["bob"])
    carol = ImClient("carol").open(roost, pw["carol"])
    device = MqttClient(dev).connect(roost.host, roost.port, username=dev, password=secret)
    try:
        alice.call("device.claim", device=dev, code=code)
        alice.call("contact.request", to="bob")
        bob.call("contact.accept", **{"from": "alice"})
        alice.call("device.share", device=dev, **{"with": "bob"})
        now = time.time()
        for i in range(3):
            device.publish(f"roost/telemetry/{dev}", {"ts": now - 30 + i * 10, "temperature": 20 + i}, qos=1)
            # one point per flush (history_interval 0): wait for each before the next
            deadline = time.monotonic() + 10
            while len(alice.call("device.history", device=dev)["points"]) < i + 1:
                assert time.monotonic() < deadline, "the point never reached the history"
                time.sleep(0.05)
        points = alice.call("device.history", device=dev, metric="temperature")["points"]
        assert [p["fields"]["temperature"] for p in points] == [20, 21, 22]
        assert bob.call("device.history", device=dev)["points"] == points
        err = carol.request("device.history", device=dev)
        assert not err["ok"] and err["error"]["code"] == "not_found"
        for c in (alice, bob, carol, device):
            c.disconnect()
        roost.restart()
        alice = ImClient("alice", "again").open(roost, pw["alice"])
        assert eventually_ok(alice, "device.history", device=dev)["points"] == points
    finally:
        for c in (alice, bob, carol, device):
            c.disconnect()
