"""`roost simulate` registers devices on the broker's store, prints pairing
codes people can claim, runs the simulators, and reuses them on the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.clients import ImClient
from tests.harness import ROOT


def simulate(roost, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    return subprocess.run([sys.executable, "-m", "client.cli", "simulate", "--config", str(roost.config_path),
                           *args], cwd=str(ROOT), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def test_simulate_registers_runs_and_reuses(roost):
    res = simulate(roost, "--count", "3", "--duration", "1", "--interval", "0.2", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.splitlines()[0])
    devs = {d["id"]: d for d in doc["devices"]}
    assert {d["kind"] for d in devs.values()} == {"thermostat", "light", "door_sensor"}
    assert all(d["new"] and len(d["pairing_code"]) == 8 for d in devs.values())

    apw = roost.add_user("alice")
    alice = ImClient("alice", "phone").open(roost, apw)
    light = next(d for d in devs.values() if d["kind"] == "light")
    alice.call("device.claim", device=light["id"], code=light["pairing_code"])

    # second run: same devices, same secrets, not registered again; it answers commands
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "simulate", "--config", str(roost.config_path),
                             "--count", "3", "--duration", "8", "--interval", "0.2", "--json"],
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        doc2 = json.loads(proc.stdout.readline())
        assert {d["id"] for d in doc2["devices"]} == set(devs) and not any(d["new"] for d in doc2["devices"])
        deadline = time.monotonic() + 10
        while alice.call("devices")["devices"][0]["presence"]["state"] != "online":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        sent = alice.call("send", to=light["id"], cmid="c1",
                          body={"type": "command", "name": "set_brightness", "args": {"brightness": 70}})
        ev = alice.wait_event("msg", timeout=8, **{"from": light["id"]})
        assert ev["body"] == {"type": "result", "for": sent["seq"], "status": "ok",
                              "data": {"on": True, "brightness": 70}}
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0


def test_simulate_refuses_bad_input(roost):
    res = simulate(roost, "--count", "1", "--prefix", "Bad Prefix", "--duration", "1")
    assert res.returncode != 0 and "prefix" in res.stderr.lower()
    roost.add_user("sim-light-1")
    res = simulate(roost, "--count", "1", "--kind", "light", "--duration", "1")
    assert res.returncode != 0 and "not a device" in res.stderr
