"""The device SDK keeps its promises against a real broker: nothing it was sent
is lost across its own absence or a broker restart, and it reconnects by itself."""

from __future__ import annotations

import time

from devices.sdk import Device
from tests.clients import ImClient
from tests.test_devices_e2e import command, wait_result


def make_counter(roost, secret: str, **kw) -> tuple[Device, list[int]]:  # noqa: ANN001, ANN003
    dev = Device("lamp", secret, roost.host, roost.port, min_backoff=1, max_backoff=2, **kw)
    seen: list[int] = []

    @dev.command("count")
    def count(cmd):  # noqa: ANN001, ANN202
        seen.append(cmd.args["i"])
        return {"i": cmd.args["i"]}

    return dev, seen


def test_commands_sent_while_offline_arrive_in_order_once(roost):
    apw = roost.add_user("alice")
    secret, code = roost.add_device("lamp", "light")
    alice = ImClient("alice", "phone").open(roost, apw)
    alice.call("device.claim", device="lamp", code=code)
    dev, seen = make_counter(roost, secret)
    dev.start(wait=10)            # creates the persistent session
    dev.stop()
    seqs = [command(alice, "lamp", "count", i=i)["seq"] for i in range(5)]
    dev2, seen2 = make_counter(roost, secret)
    dev2.start(wait=10)
    try:
        for seq in seqs:
            assert wait_result(alice, "lamp", seq)["status"] == "ok"
        assert seen2 == [0, 1, 2, 3, 4]
        # and again: nothing handled twice after another reconnect
        dev2.stop()
        dev3, seen3 = make_counter(roost, secret)
        dev3.start(wait=10)
        time.sleep(1.0)
        assert seen3 == []
        dev3.stop()
    finally:
        dev2.stop()


def test_device_reconnects_after_broker_restart_and_loses_nothing(roost, tmp_path):
    apw = roost.add_user("alice")
    secret, code = roost.add_device("lamp", "light")
    alice = ImClient("alice", "phone").open(roost, apw)
    alice.call("device.claim", device="lamp", code=code)
    dev, seen = make_counter(roost, secret, state_file=str(tmp_path / "lamp.json"))
    dev.start(wait=10)
    try:
        first = command(alice, "lamp", "count", i=1)["seq"]
        assert wait_result(alice, "lamp", first)["status"] == "ok"
        roost.kill()
        roost.start()
        alice = ImClient("alice", "phone2").open(roost, apw)
        assert dev.wait_connected(10), "the SDK reconnects by itself"
        second = command(alice, "lamp", "count", i=2)["seq"]
        assert wait_result(alice, "lamp", second)["status"] == "ok"
        assert seen == [1, 2]
    finally:
        dev.stop()


def test_more_commands_than_the_session_queue_while_away(roost_factory, tmp_path):
    """More arrives while the device is away than its MQTT session may queue:
    the device still handles every command, in order, once (the mailbox, the
    SDK's catch-up `sync` from its saved cursor and its gap check cover it)."""
    roost = roost_factory({"limits": {"max_queued": 5}})
    apw = roost.add_user("alice")
    secret, code = roost.add_device("lamp", "light")
    alice = ImClient("alice", "phone").open(roost, apw)
    alice.call("device.claim", device="lamp", code=code)
    state = str(tmp_path / "lamp.json")
    dev, _ = make_counter(roost, secret, state_file=state)
    dev.start(wait=10)
    first = command(alice, "lamp", "count", i=-1)["seq"]
    assert wait_result(alice, "lamp", first)["status"] == "ok"
    dev.stop()
    seqs = [command(alice, "lamp", "count", i=i)["seq"] for i in range(20)]
    dev2, seen = make_counter(roost, secret, state_file=state)
    dev2.start(wait=10)
    try:
        for seq in seqs:
            assert wait_result(alice, "lamp", seq)["status"] == "ok"
        assert seen == list(range(20))
    finally:
        dev2.stop()


def test_events_survive_the_request_rate_limit(roost_factory):
    """A chatty device hits the broker's request rate limit: the SDK backs off
    and every event still reaches the owner, once, in order."""
    roost = roost_factory({"limits": {"request_rate": 5.0, "request_burst": 3}})
    apw = roost.add_user("alice")
    secret, code = roost.add_device("door", "door_sensor")
    alice = ImClient("alice", "phone").open(roost, apw)
    alice.call("device.claim", device="door", code=code)
    dev = Device("door", secret, roost.host, roost.port, kind="door_sensor", request_timeout=20)
    dev.start(wait=10)
    try:
        for i in range(8):
            assert dev.send_event("opened", {"i": i}) != {}
        got = [alice.wait_event("msg", timeout=5, **{"from": "door"})["body"]["data"]["i"] for _ in range(8)]
        assert got == list(range(8))
    finally:
        dev.stop()


def test_telemetry_published_while_the_broker_is_down_arrives_later(roost):
    apw = roost.add_user("alice")
    secret, code = roost.add_device("thermo", "thermostat")
    alice = ImClient("alice", "phone").open(roost, apw)
    alice.call("device.claim", device="thermo", code=code)
    dev = Device("thermo", secret, roost.host, roost.port, kind="thermostat", min_backoff=1, max_backoff=1)
    dev.start(wait=10)
    try:
        roost.stop()
        assert dev.telemetry(temperature=19.5, humidity=40.0)    # queued by paho
        roost.start()
        assert dev.wait_connected(10)
        alice = ImClient("alice", "phone2").open(roost, apw)
        deadline = time.monotonic() + 5
        while True:
            latest = alice.call("devices")["devices"][0]["last_telemetry"]
            if latest and latest.get("temperature") == 19.5:
                break
            assert time.monotonic() < deadline, latest
            time.sleep(0.2)
    finally:
        dev.stop()
