"""Home Assistant discovery documents and set-topic command translation (pure functions)."""

from __future__ import annotations

import json

import pytest

from broker.services.homeassistant_discovery import (
    BadSetPayload,
    HaCommand,
    Origin,
    command_from_set,
    discovery_payload,
    encode,
    is_ours,
    read_origin,
)
from contract.catalog import DOOR_SENSOR, KINDS, LIGHT, THERMOSTAT


@pytest.mark.parametrize("kind", list(KINDS.values()), ids=list(KINDS))
def test_every_kind_has_valid_device_discovery(kind):
    doc = discovery_payload(device="dev1", name="Dev One", room=None, kind=kind,
                            origin=Origin(sw_version="1.2.3", support_url="https://example.org/roost"))
    assert doc["device"] == {"identifiers": ["roost_dev1"], "name": "Dev One", "manufacturer": "Roost",
                             "model": kind.name}
    assert doc["origin"] == {"name": "Roost", "sw_version": "1.2.3", "support_url": "https://example.org/roost"}
    assert doc["components"], "at least one entity"
    for key, c in doc["components"].items():
        assert set(key) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-")
        assert c["platform"] in ("sensor", "binary_sensor", "light", "climate")
        assert c["unique_id"].startswith("roost_dev1_")
        assert c["availability_topic"] == "roost/ha/dev1/availability"
        topics = [v for k, v in c.items() if k.endswith("_topic")]
        assert all(t.startswith("roost/ha/dev1/") for t in topics)
        assert all(t.rsplit("/", 1)[1] in ("state", "set", "availability") for t in topics)
    assert is_ours(encode(doc))
    assert not is_ours(b'{"origin": {"name": "zigbee2mqtt"}}') and not is_ours(b"")
    assert is_ours(b'{"origin": {"name": "roost", "sw": "0.1.0"}}')   # as earlier versions published it


def test_light_and_thermostat_entities():
    light = discovery_payload(device="l", name="L", room="hall", kind=LIGHT)
    assert set(light["components"]) == {"light"}      # on/brightness are the light itself
    c = light["components"]["light"]
    assert c["command_topic"] == c["brightness_command_topic"] == "roost/ha/l/set"
    assert c["brightness_scale"] == 100 and light["device"]["suggested_area"] == "hall"

    therm = discovery_payload(device="t", name="T", room=None, kind=THERMOSTAT)
    assert set(therm["components"]) == {"climate", "temperature", "humidity"}
    assert therm["components"]["climate"]["min_temp"] == 5.0
    assert therm["components"]["humidity"]["unit_of_measurement"] == "%"
    climate = therm["components"]["climate"]
    assert climate["modes"] == ["heat", "off"]
    assert climate["mode_command_topic"] == "roost/ha/t/set" and climate["mode_state_topic"] == "roost/ha/t/state"
    assert therm["origin"] == {"name": "Roost", "sw_version": "unknown"}   # no origin given: no version claimed

    door = discovery_payload(device="d", name="D", room=None, kind=DOOR_SENSOR)
    assert door["components"]["open"]["value_template"] == "{{ 'ON' if value_json.open else 'OFF' }}"
    assert all("command_topic" not in c for c in door["components"].values())


@pytest.mark.parametrize("payload,expected", [
    (b"ON", HaCommand("turn_on", {})),
    (b"off", HaCommand("turn_off", {})),
    (b'{"brightness": 30}', HaCommand("set_brightness", {"brightness": 30})),
    (b"55", HaCommand("set_brightness", {"brightness": 55})),
    (b'{"state": "ON", "brightness": 10}', HaCommand("turn_on", {"brightness": 10})),
    (b'{"state": "OFF"}', HaCommand("turn_off", {})),
    (b'{"name": "ping"}', HaCommand("ping", {})),
])
def test_light_set_payloads(payload, expected):
    assert command_from_set(LIGHT, payload) == expected


@pytest.mark.parametrize("payload", [b"", b"DANCE", b'{"brightness": 101}', b'{"brightness": "x"}',
                                     b'{"state": "BLINK"}', b'{"name": "explode"}', b"[1]", b'{"hue": 3}',
                                     b'{"name": "turn_on", "args": {"brightnes": 3}}'])
def test_bad_light_set_payloads(payload):
    with pytest.raises(BadSetPayload):
        command_from_set(LIGHT, payload)


def test_thermostat_set_payloads():
    assert command_from_set(THERMOSTAT, b'{"setpoint": 21.5}') == HaCommand("set_setpoint", {"setpoint": 21.5})
    assert command_from_set(THERMOSTAT, b'{"temperature": 19}') == HaCommand("set_setpoint", {"setpoint": 19})
    assert command_from_set(THERMOSTAT, b'{"mode": "off"}') == HaCommand("set_mode", {"mode": "off"})
    assert command_from_set(THERMOSTAT, b"heat") == HaCommand("set_mode", {"mode": "heat"})
    assert command_from_set(THERMOSTAT, b"OFF") == HaCommand("set_mode", {"mode": "off"})
    for bad in (b"ON", b'{"setpoint": 45}', b'{"setpoint": 20, "x": 1}', b'{"mode": "cool"}', b"cool",
                b'{"mode": "off", "setpoint": 20}'):
        with pytest.raises(BadSetPayload):
            command_from_set(THERMOSTAT, bad)
    assert json.loads(encode({"a": "°C"})) == {"a": "°C"}


def test_origin_from_the_installed_package_else_pyproject(tmp_path):
    import importlib.metadata

    here = read_origin()
    assert here.name == "Roost" and here.sw_version == importlib.metadata.version("roost")
    assert here.support_url is None or here.support_url.startswith(("https://", "http://"))

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\nversion = "9.8.7"\n'
                         '[project.urls]\nDocumentation = "https://docs.example.org"\n'
                         'Homepage = "https://example.org/roost"\nChat = "irc://example.org/roost"\n')
    origin = read_origin(pyproject, distribution="no-such-distribution-installed")
    assert origin == Origin(sw_version="9.8.7", support_url="https://example.org/roost")   # Homepage first
    # Home Assistant would refuse the whole document for a support_url that is no http(s) URL
    pyproject.write_text('[project]\nversion = "1"\n[project.urls]\nHomepage = "docs/HOMEASSISTANT.md"\n')
    assert read_origin(pyproject, distribution="no-such-distribution-installed").support_url is None
    assert read_origin(tmp_path / "missing.toml", distribution="no-such-distribution-installed") == Origin()
