"""Simulated devices on the SDK: a thermostat, a light and a door sensor (the
catalogue's kinds), and a camera (a kind the catalogue does not describe) that
sends its snapshot as a picture.

Each simulator owns one `Device`, answers the commands of its kind in
contract/catalog.py, and on every `tick()` moves its state a little and
publishes it as telemetry. A `Fleet` ticks many of them from one thread, which
makes them a load source as well as a demo (`roost simulate --count 100`).
"""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
import zlib
from typing import Any

from contract import catalog
from devices.sdk import Command, Device

log = logging.getLogger("roost.simulate")


class Simulator:
    kind = ""

    def __init__(self, device: Device, rng: random.Random | None = None) -> None:
        self.device = device
        self.rng = rng or random.Random()
        self._lock = threading.Lock()   # handlers run on the SDK worker, ticks on the fleet thread
        device.command("get_state")(lambda cmd: self.state())

    @property
    def id(self) -> str:
        return self.device.id

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def step(self, dt: float) -> None:
        """Move the simulated world forward by `dt` seconds."""

    def tick(self, dt: float) -> None:
        with self._lock:
            self.step(dt)
        self.publish()

    def publish(self) -> bool:
        with self._lock:
            state = self.state()
        return self.device.telemetry(state)


class Thermostat(Simulator):
    kind = "thermostat"

    def __init__(self, device: Device, rng: random.Random | None = None) -> None:
        super().__init__(device, rng)
        self.temperature = round(self.rng.uniform(17.0, 22.0), 2)
        self.humidity = round(self.rng.uniform(35.0, 55.0), 1)
        self.setpoint = 20.0
        self.mode = "heat"    # "heat" or "off" (catalogue: set_mode)
        device.command("set_setpoint")(self._set_setpoint)
        device.command("set_mode")(self._set_mode)

    @property
    def heating(self) -> bool:
        # Switched off, it keeps its set point for when it is switched on again.
        return self.mode == "heat" and self.temperature < self.setpoint - 0.2

    def state(self) -> dict[str, Any]:
        return {"temperature": round(self.temperature, 2), "humidity": round(self.humidity, 1),
                "setpoint": self.setpoint, "heating": self.heating, "mode": self.mode}

    def step(self, dt: float) -> None:
        # Heats at ~0.05 °C/s when below the set point, cools slowly otherwise.
        rate = 0.05 if self.heating else -0.01
        self.temperature += rate * dt + self.rng.gauss(0, 0.02)
        self.humidity = min(90.0, max(20.0, self.humidity + self.rng.gauss(0, 0.3)))

    def _set_setpoint(self, cmd: Command) -> dict[str, Any]:
        with self._lock:
            self.setpoint = float(cmd.args["setpoint"])
        self.publish()
        return {"setpoint": self.setpoint}

    def _set_mode(self, cmd: Command) -> dict[str, Any]:
        with self._lock:
            self.mode = cmd.args["mode"]
        self.publish()
        return {"mode": self.mode}


class Light(Simulator):
    kind = "light"

    def __init__(self, device: Device, rng: random.Random | None = None) -> None:
        super().__init__(device, rng)
        self.on = False
        self.brightness = 100
        device.command("turn_on")(self._turn_on)
        device.command("turn_off")(self._turn_off)
        device.command("set_brightness")(self._set_brightness)

    def state(self) -> dict[str, Any]:
        return {"on": self.on, "brightness": self.brightness if self.on else 0}

    def _changed(self) -> dict[str, Any]:
        self.publish()
        with self._lock:
            return self.state()

    def _turn_on(self, cmd: Command) -> dict[str, Any]:
        with self._lock:
            self.on = True
            if "brightness" in cmd.args:
                self.brightness = cmd.args["brightness"]
        return self._changed()

    def _turn_off(self, cmd: Command) -> dict[str, Any]:
        with self._lock:
            self.on = False
        return self._changed()

    def _set_brightness(self, cmd: Command) -> dict[str, Any]:
        with self._lock:
            self.brightness = cmd.args["brightness"]
            self.on = self.brightness > 0
        return self._changed()


class DoorSensor(Simulator):
    kind = "door_sensor"

    def __init__(self, device: Device, rng: random.Random | None = None, *, toggle_every: float = 60.0) -> None:
        super().__init__(device, rng)
        self.open = False
        self.battery = self.rng.randint(60, 100)
        self.toggle_every = toggle_every    # mean seconds between door movements (0: never by itself)

    def state(self) -> dict[str, Any]:
        return {"open": self.open, "battery": self.battery}

    def step(self, dt: float) -> None:
        if self.toggle_every > 0 and self.rng.random() < dt / self.toggle_every:
            # Sending events waits for the broker: do it on the SDK's worker,
            # not on the fleet's thread that ticks everyone.
            self.device.submit(self.toggle)

    def toggle(self) -> dict[str, int]:
        """The door moves: telemetry, then an `opened`/`closed` event to every person."""
        with self._lock:
            self.open = not self.open
            is_open = self.open
            if self.rng.random() < 0.05:
                self.battery = max(0, self.battery - 1)
        self.publish()
        return self.device.send_event("opened" if is_open else "closed", {"open": is_open})


def png_image(width: int, height: int, pixel: Any) -> bytes:
    """A PNG (8-bit RGB) whose pixel (x, y) is `pixel(x, y) -> (r, g, b)`: standard library only."""
    rows = b"".join(b"\x00" + bytes(c for x in range(width) for c in pixel(x, y)) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class Camera(Simulator):
    """Reports `motion`; on the `snapshot` command it takes a picture (a small
    generated PNG) and sends it as a file message to every owner and sharee."""

    kind = "camera"
    width, height = 160, 120

    def __init__(self, device: Device, rng: random.Random | None = None) -> None:
        super().__init__(device, rng)
        self.motion = False
        self.snapshots = 0
        device.command("snapshot")(lambda cmd: self.snapshot())

    def state(self) -> dict[str, Any]:
        return {"motion": self.motion, "snapshots": self.snapshots}

    def step(self, dt: float) -> None:
        self.motion = self.rng.random() < 0.1

    def picture(self) -> bytes:
        with self._lock:
            shade = self.rng.randrange(256)
        return png_image(self.width, self.height, lambda x, y: (x * 255 // self.width, y * 255 // self.height, shade))

    def snapshot(self) -> dict[str, Any]:
        name = time.strftime("snapshot-%Y%m%d-%H%M%S.png")
        data = self.picture()
        sent = self.device.send_file(data, name, "image/png")
        with self._lock:
            self.snapshots += 1
        return {"name": name, "size": len(data), "sent_to": sorted(sent)}


SIMULATORS: dict[str, type[Simulator]] = {cls.kind: cls for cls in (Thermostat, Light, DoorSensor)}
assert set(SIMULATORS) == set(catalog.KINDS), "every catalogued kind has a simulator"
# Simulators of kinds the catalogue does not describe: `make` builds them, `roost simulate` does not.
UNCATALOGUED: dict[str, type[Simulator]] = {Camera.kind: Camera}


def make(kind: str, device_id: str, secret: str, host: str, port: int, *, rng: random.Random | None = None,
         **device_options: Any) -> Simulator:
    simulators = {**SIMULATORS, **UNCATALOGUED}
    if kind not in simulators:
        raise ValueError(f"no simulator for kind {kind!r} (known: {', '.join(simulators)})")
    device = Device(device_id, secret, host, port, kind=kind, **device_options)
    return simulators[kind](device, rng)


class Fleet:
    """Starts simulators, ticks them every `interval` seconds (spread over the
    interval so a big fleet does not publish in bursts), stops them."""

    def __init__(self, sims: list[Simulator], interval: float = 5.0) -> None:
        self.sims = sims
        self.interval = interval
        self._stop = threading.Event()

    def start(self, connect_timeout: float = 30.0) -> None:
        for sim in self.sims:
            sim.device.start(wait=None)
        deadline = time.monotonic() + connect_timeout
        for sim in self.sims:
            if not sim.device.wait_connected(max(0.0, deadline - time.monotonic())):
                log.warning("%s: not connected yet (it keeps retrying)", sim.id)

    def run(self, duration: float | None = None) -> None:
        """Tick until `stop()` or `duration` seconds have passed."""
        end = None if duration is None else time.monotonic() + duration
        for sim in self.sims:
            sim.publish()
        while not self._stop.is_set() and (end is None or time.monotonic() < end):
            slot = self.interval / max(1, len(self.sims))
            for sim in self.sims:
                if self._stop.wait(slot) or (end is not None and time.monotonic() >= end):
                    return
                sim.tick(self.interval)

    def request_stop(self) -> None:
        """Make `run` return soon (safe from a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        for sim in self.sims:
            sim.device.stop()

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for sim in self.sims:
            for k, v in sim.device.stats.items():
                total[k] = total.get(k, 0) + v
        return total
