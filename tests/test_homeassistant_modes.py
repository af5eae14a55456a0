"""Home Assistant, issue 15 item 4: a thermostat switched off and on from Home
Assistant (modes `heat` / `off`), `origin` with Roost's real version, and one
state publish per command. Real broker, a paho client playing Home Assistant
with the integration's service account, simulated devices on the SDK."""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from broker.services.homeassistant_discovery import read_origin
from devices.simulators import Light, Simulator, Thermostat, make
from tests.clients import ImClient
from tests.harness import RoostProcess
from tests.test_homeassistant import HomeAssistant, setup  # noqa: F401 - the fixture

State = dict[str, Any]


def states_until(ha: HomeAssistant, device: str, fits: Callable[[State], bool], timeout: float = 8.0) -> list[State]:
    """Every state document Home Assistant receives for `device`, up to and
    including the first that `fits`."""
    seen: list[State] = []
    deadline = time.monotonic() + timeout
    while not seen or not fits(seen[-1]):
        m = ha.wait_message(f"roost/ha/{device}/state", max(0.05, deadline - time.monotonic()))
        seen.append(m.json() if m.payload else {})
    return seen


def start(sim: Simulator, ha: HomeAssistant, fits: Callable[[State], bool]) -> None:
    """The device online and its first telemetry in Home Assistant's state."""
    sim.device.start(wait=10)
    ha.wait_value(f"roost/ha/{sim.id}/availability", lambda v: v == "online")
    sim.publish()
    states_until(ha, sim.id, fits)


def command_once(ha: HomeAssistant, inbox: ImClient, sim: Simulator, payload: str,
                 changed: Callable[[State], bool], bump: Callable[[], None],
                 bumped: Callable[[State], bool]) -> State:
    """Send one command from Home Assistant; assert it costs exactly one state
    publish. The device publishes telemetry and answers with a `result`, both
    carrying the change; once the result is in the integration's inbox (after
    the broker applied it to the state), a further reading (`bump`) is the
    barrier: nothing but its own state may follow the command's."""
    ha.publish(f"roost/ha/{sim.id}/set", payload, qos=1)
    first = states_until(ha, sim.id, changed)
    assert len(first) == 1, first
    wait_result(inbox, sim.id, changed)
    bump()
    sim.publish()
    after = states_until(ha, sim.id, bumped)
    assert len(after) == 1, f"a second state publish for one command: {after}"
    return first[0]


def wait_result(inbox: ImClient, device: str, fits: Callable[[State], bool]) -> State:
    """The data of the device's next ok `result` to the integration that `fits`."""
    while True:
        body = inbox.wait_event("msg", **{"from": device})["body"]
        if body.get("type") == "result" and body.get("status") == "ok" and fits(body.get("data") or {}):
            return body["data"]


@dataclass
class Env:
    roost: RoostProcess
    ha: HomeAssistant
    inbox: ImClient          # a second connection of the integration account: its inbox (the results)
    secrets: dict[str, str]

    def sim(self, kind: str, device: str) -> Simulator:
        return make(kind, device, self.secrets[device], self.roost.host, self.roost.port)


@pytest.fixture
def env(setup) -> Env:  # noqa: F811 - the imported fixture
    roost, hass_pw, secrets = setup
    return Env(roost, HomeAssistant().open(roost, hass_pw), ImClient("hass", "inbox").open(roost, hass_pw), secrets)


def test_thermostat_discovery_offers_heat_and_off(env: Env) -> None:
    climate = env.ha.discovered({"therm"})["therm"]["components"]["climate"]
    assert climate["modes"] == ["heat", "off"]
    assert climate["mode_command_topic"] == "roost/ha/therm/set"
    assert climate["mode_command_template"] == '{"mode": "{{ value }}"}'
    assert climate["mode_state_topic"] == "roost/ha/therm/state"
    assert "value_json.mode" in climate["mode_state_template"]
    assert "'off' if value_json.mode == 'off'" in climate["action_template"]


def test_every_discovery_names_roost_and_its_version(env: Env) -> None:
    docs = env.ha.discovered({"lamp", "therm", "door", "toaster"})
    origin = read_origin()
    assert origin.sw_version == importlib.metadata.version("roost")
    for doc in docs.values():
        assert doc["origin"]["name"] == "Roost"
        assert doc["origin"]["sw_version"] == origin.sw_version
        # Home Assistant refuses a discovery document whose support_url is no
        # http(s) URL: there is one only when the project declares one.
        if origin.support_url is None:
            assert "support_url" not in doc["origin"]
        else:
            assert doc["origin"]["support_url"] == origin.support_url
            assert doc["origin"]["support_url"].startswith(("https://", "http://"))


def test_thermostat_switched_off_and_on_one_state_per_command(env: Env) -> None:
    ha = env.ha
    ha.discovered({"therm"})
    sim = env.sim("thermostat", "therm")
    assert isinstance(sim, Thermostat)
    reading: dict[str, float] = {}

    def warmer() -> None:
        """A new reading of the room, the barrier after a command."""
        with sim._lock:
            sim.temperature += 1.0
            reading["temperature"] = round(sim.temperature, 2)

    def warmed(s: State) -> bool:
        return s.get("temperature") == reading["temperature"]

    try:
        start(sim, ha, lambda s: s.get("mode") == "heat")
        off = command_once(ha, env.inbox, sim, '{"mode": "off"}',     # climate's mode_command_template
                           lambda s: s.get("mode") == "off", warmer, warmed)
        assert sim.mode == "off" and off["heating"] is False
        # Switched off, it does not heat, whatever the set point; it keeps the set point.
        ha.publish("roost/ha/therm/set", '{"setpoint": 30}', qos=1)
        assert states_until(ha, "therm", lambda s: s.get("setpoint") == 30)[-1]["heating"] is False
        wait_result(env.inbox, "therm", lambda d: d.get("setpoint") == 30)

        on = command_once(ha, env.inbox, sim, "heat",                 # Home Assistant's bare mode payload
                          lambda s: s.get("mode") == "heat", warmer, warmed)
        assert sim.mode == "heat" and on["setpoint"] == 30 and on["heating"] is True
    finally:
        sim.device.stop()


def test_a_light_command_publishes_its_state_once(env: Env) -> None:
    env.ha.discovered({"lamp"})
    sim = env.sim("light", "lamp")
    assert isinstance(sim, Light)

    def dim() -> None:
        with sim._lock:
            sim.brightness = 55

    try:
        start(sim, env.ha, lambda s: s.get("on") is False)
        command_once(env.ha, env.inbox, sim, "ON", lambda s: s.get("on") is True, dim,
                     lambda s: s.get("brightness") == 55)
        assert sim.on is True
    finally:
        sim.device.stop()


def test_only_the_thermostat_modes_reach_it(env: Env) -> None:
    env.ha.discovered({"therm"})
    therm = ImClient("therm", None).open(env.roost, env.secrets["therm"])
    env.ha.wait_value("roost/ha/therm/availability", lambda v: v == "online")
    env.ha.publish("roost/ha/therm/set", '{"mode": "cool"}', qos=1)    # no such mode: refused
    env.ha.publish("roost/ha/therm/set", "off", qos=1)
    ev = therm.wait_event("msg", **{"from": "hass"})
    assert ev["body"] == {"type": "command", "name": "set_mode", "args": {"mode": "off"}}
    with pytest.raises(TimeoutError):
        therm.wait_event("msg", timeout=0.5)
