"""Home Assistant MQTT discovery payloads and command translation (pure functions).

Discovery is device-based (`<prefix>/device/<id>/config`, HOME_AUTOMATION.md): one
retained JSON document per Roost device with `device`, `origin` and `components`
(`cmps`), built from the device-kind catalogue (contract/catalog.py):

- the kind's own entity, when it has one (`ha_component`): a `light` (on/off and
  brightness 0-100) or a `climate` (set point, current temperature/humidity,
  heating action);
- one `sensor` / `binary_sensor` per telemetry field the kind's entity does not
  already show;
- for a kind the catalogue does not describe: one `sensor`, the time of the last
  report, carrying every reported field as attributes.

All entities read the device's state document on `roost/ha/<id>/state` (the
newest value of every field, JSON) through templates, take commands on
`roost/ha/<id>/set`, and share the availability on `roost/ha/<id>/availability`
(`online` / `offline`).

`command_from_set` turns what Home Assistant publishes on the set topic into a
Roost `command` (name, args), checked against the catalogue:

- `ON` / `OFF` (the light's default payloads) -> `turn_on` / `turn_off`;
- `{"brightness": n}` (our brightness_command_template) -> `set_brightness`;
- `{"state": "ON"|"OFF", "brightness": n}` (the light's JSON schema) -> `turn_on`/`turn_off`;
- `{"setpoint": x}` or `{"temperature": x}` (climate) -> `set_setpoint`;
- `{"mode": "heat"|"off"}` (our mode_command_template) or a bare `heat` / `off`
  (climate) -> `set_mode`;
- `{"name": <command>, "args": {...}}` -> that command, for any kind (scripts).
"""

from __future__ import annotations

import importlib.metadata
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract import topics
from contract.catalog import BOOL, DeviceKind, Field, InvalidArgs, check_args

ORIGIN_NAME = "Roost"
MANUFACTURER = "Roost"
DISTRIBUTION = "roost"
# Beside the package: only there when running from a source tree.
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# The [project.urls] labels worth showing as Home Assistant's support link, best first.
_URL_LABELS = ("homepage", "repository", "source", "documentation", "issues")

# Telemetry fields that the kind's own entity already shows (no extra sensor).
_COVERED = {"light": {"on", "brightness"}, "climate": {"setpoint", "heating", "mode"}}


@dataclass(frozen=True, slots=True)
class Origin:
    """Who publishes the discovery (Home Assistant shows it on the device page)."""

    name: str = ORIGIN_NAME
    sw_version: str = "unknown"
    support_url: str | None = None

    def doc(self) -> dict[str, str]:
        doc = {"name": self.name, "sw_version": self.sw_version}
        if self.support_url:
            doc["support_url"] = self.support_url
        return doc


def _pyproject(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            project = tomllib.load(f).get("project")
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return project if isinstance(project, dict) else {}


def _pick_url(urls: dict[str, str]) -> str | None:
    """The best-labelled http(s) URL: Home Assistant refuses the whole discovery
    document when `support_url` is anything else, so no URL beats a bad one."""
    usable = {label.strip().lower(): url.strip() for label, url in urls.items()
              if isinstance(url, str) and url.strip().startswith(("https://", "http://"))}
    for label in _URL_LABELS:
        if label in usable:
            return usable[label]
    return next(iter(usable.values()), None)


def read_origin(pyproject: Path = PYPROJECT, distribution: str = DISTRIBUTION) -> Origin:
    """Roost's version and project URL from the installed package's metadata,
    else from pyproject.toml. Reads files: call it once, off the event loop."""
    project = _pyproject(pyproject)
    try:
        meta = importlib.metadata.metadata(distribution)
        version = meta["Version"]
        # "Label, URL" entries (core metadata Project-URL)
        urls = dict(entry.split(", ", 1) for entry in meta.get_all("Project-URL") or [] if ", " in entry)
    except importlib.metadata.PackageNotFoundError:
        version, urls = None, {}
    if not isinstance(version, str) or not version:
        declared = project.get("version")
        version = declared if isinstance(declared, str) else "unknown"
    if not _pick_url(urls) and isinstance(project.get("urls"), dict):
        urls = project["urls"]   # an editable install's metadata predates a URL added since
    return Origin(sw_version=version, support_url=_pick_url(urls))


class BadSetPayload(ValueError):
    """A payload on roost/ha/<id>/set that is no command for this device."""


def discovery_topic(prefix: str, device: str) -> str:
    return f"{prefix}/device/{device}/config"


def status_topic(prefix: str) -> str:
    return f"{prefix}/status"


def _title(name: str) -> str:
    return name.replace("_", " ").capitalize()


def _field_component(device: str, f: Field, state: str) -> dict[str, Any]:
    c: dict[str, Any] = {
        "platform": f.platform,
        "unique_id": f"roost_{device}_{f.name}",
        "name": _title(f.name),
        "state_topic": state,
    }
    if f.platform == "binary_sensor" or f.type == BOOL:
        c["platform"] = "binary_sensor"
        c["value_template"] = f"{{{{ 'ON' if value_json.{f.name} else 'OFF' }}}}"
        c["payload_on"] = "ON"
        c["payload_off"] = "OFF"
    else:
        c["value_template"] = f"{{{{ value_json.{f.name} }}}}"
        if f.unit:
            c["unit_of_measurement"] = f.unit
        if f.state_class:
            c["state_class"] = f.state_class
    if f.device_class:
        c["device_class"] = f.device_class
    return c


def _generic_component(device: str, state: str) -> dict[str, Any]:
    return {
        "platform": "sensor",
        "unique_id": f"roost_{device}_last_report",
        "name": "Last report",
        "state_topic": state,
        "value_template": "{{ value_json.ts | timestamp_local if value_json.ts is defined else 'unknown' }}",
        "json_attributes_topic": state,
    }


def _light_component(device: str, state: str, command: str) -> dict[str, Any]:
    return {
        "platform": "light",
        "unique_id": f"roost_{device}_light",
        "name": None,   # the device's own name
        "state_topic": state,
        "state_value_template": "{{ 'ON' if value_json.on else 'OFF' }}",
        "command_topic": command,
        "payload_on": "ON",
        "payload_off": "OFF",
        "brightness_state_topic": state,
        "brightness_value_template": "{{ value_json.brightness }}",
        "brightness_command_topic": command,
        "brightness_command_template": '{"brightness": {{ value }}}',
        "brightness_scale": 100,
        # Turning on at a brightness sends only the brightness (set_brightness
        # switches the light on); a plain "turn on" sends ON.
        "on_command_type": "brightness",
    }


def _climate_component(device: str, kind: DeviceKind, state: str, command: str) -> dict[str, Any]:
    c: dict[str, Any] = {
        "platform": "climate",
        "unique_id": f"roost_{device}_climate",
        "name": None,
        "temperature_command_topic": command,
        "temperature_command_template": '{"setpoint": {{ value }}}',
        "temperature_state_topic": state,
        "temperature_state_template": "{{ value_json.setpoint }}",
        "current_temperature_topic": state,
        "current_temperature_template": "{{ value_json.temperature }}",
        "action_topic": state,
        "action_template": "{{ 'heating' if value_json.heating else 'idle' }}",
        "temperature_unit": "C",
        "temp_step": 0.5,
    }
    c.update(_climate_modes(kind, state, command))
    if kind.field("humidity") is not None:
        c["current_humidity_topic"] = state
        c["current_humidity_template"] = "{{ value_json.humidity }}"
    cmd = kind.command("set_setpoint")
    arg = cmd.args[0] if cmd is not None and cmd.args else None
    if arg is not None and arg.minimum is not None:
        c["min_temp"] = arg.minimum
    if arg is not None and arg.maximum is not None:
        c["max_temp"] = arg.maximum
    return c


def _climate_modes(kind: DeviceKind, state: str, command: str) -> dict[str, Any]:
    """Home Assistant's modes from the kind's `set_mode` choices (heat/off): a
    thermostat without the command can only heat."""
    cmd = kind.command("set_mode")
    modes = list(cmd.args[0].choices) if cmd is not None and cmd.args and cmd.args[0].choices else []
    if not modes:
        return {"modes": ["heat"], "mode_state_topic": state, "mode_state_template": "heat"}
    return {
        "modes": modes,
        "mode_command_topic": command,
        "mode_command_template": '{"mode": "{{ value }}"}',
        "mode_state_topic": state,
        # a device that has not reported its mode yet is heating, as before set_mode existed
        "mode_state_template": f"{{{{ value_json.mode if value_json.mode is defined else '{modes[0]}' }}}}",
        "action_template": "{{ 'off' if value_json.mode == 'off' else "
                           "('heating' if value_json.heating else 'idle') }}",
    }


def discovery_payload(*, device: str, name: str, room: str | None, kind: DeviceKind,
                      origin: Origin | None = None) -> dict[str, Any]:
    """The device-based discovery document for one device; `origin` as read by
    `read_origin` (omitted: name only, no version is claimed)."""
    state = topics.ha_state(device)
    command = topics.ha_set(device)
    availability = topics.ha_availability(device)
    cmps: dict[str, dict[str, Any]] = {}
    if kind.ha_component == "light":
        cmps["light"] = _light_component(device, state, command)
    elif kind.ha_component == "climate":
        cmps["climate"] = _climate_component(device, kind, state, command)
    covered = _COVERED.get(kind.ha_component or "", set())
    for f in kind.telemetry:
        if f.name not in covered:
            cmps[f.name] = _field_component(device, f, state)
    if not cmps:
        cmps["last_report"] = _generic_component(device, state)
    for c in cmps.values():
        c["availability_topic"] = availability
    dev: dict[str, Any] = {
        "identifiers": [f"roost_{device}"],
        "name": name or device,
        "manufacturer": MANUFACTURER,
        "model": kind.name,
    }
    if room:
        dev["suggested_area"] = room
    return {
        "device": dev,
        "origin": (origin or Origin()).doc(),
        "availability_topic": availability,
        "payload_available": "online",
        "payload_not_available": "offline",
        "qos": 1,
        "components": cmps,
    }


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def is_ours(payload: bytes) -> bool:
    """Was this retained discovery document published by Roost? (Others' are left alone.)"""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return False
    if not isinstance(doc, dict) or not isinstance(doc.get("origin"), dict):
        return False
    # case-blind: earlier versions published the name as "roost"
    name = doc["origin"].get("name")
    return isinstance(name, str) and name.lower() == ORIGIN_NAME.lower()


@dataclass(frozen=True, slots=True)
class HaCommand:
    name: str
    args: dict[str, Any]


def _checked(kind: DeviceKind, name: str, args: Any) -> HaCommand:
    cmd = kind.command(name)
    if cmd is None and kind.open_commands:
        if not isinstance(args, dict):
            raise BadSetPayload(f"{name}: 'args' must be an object")
        return HaCommand(name, args)
    if cmd is None:
        raise BadSetPayload(f"a {kind.name} has no command {name!r}")
    try:
        return HaCommand(name, check_args(cmd, args))
    except InvalidArgs as exc:
        raise BadSetPayload(f"{name}: {exc}") from None


def command_from_set(kind: DeviceKind, payload: bytes) -> HaCommand:
    text = payload.decode("utf-8", "replace").strip()
    if text.upper() in ("ON", "OFF") and kind.ha_component == "light":
        return _checked(kind, "turn_on" if text.upper() == "ON" else "turn_off", {})
    if text.lower() in ("heat", "off") and kind.ha_component == "climate":
        # Home Assistant's own mode payload, should mode_command_template be dropped
        return _checked(kind, "set_mode", {"mode": text.lower()})
    try:
        doc = json.loads(text)
    except ValueError:
        raise BadSetPayload(f"not a command payload: {text[:40]!r}") from None
    if not isinstance(doc, dict):
        # A bare number on a light is a brightness (brightness_command_template omitted).
        if kind.ha_component == "light" and isinstance(doc, int) and not isinstance(doc, bool):
            return _checked(kind, "set_brightness", {"brightness": doc})
        raise BadSetPayload("expected ON/OFF or a JSON object")
    if "name" in doc:
        if not isinstance(doc["name"], str):
            raise BadSetPayload("'name' must be a string")
        return _checked(kind, doc["name"], doc.get("args", {}))
    if kind.ha_component == "light":
        if "state" in doc:
            state = str(doc["state"]).upper()
            if state == "OFF":
                return _checked(kind, "turn_off", {})
            if state != "ON":
                raise BadSetPayload("'state' must be ON or OFF")
            args = {"brightness": doc["brightness"]} if "brightness" in doc else {}
            return _checked(kind, "turn_on", args)
        if set(doc) == {"brightness"}:
            return _checked(kind, "set_brightness", doc)
    if kind.ha_component == "climate":
        if set(doc) == {"mode"}:
            return _checked(kind, "set_mode", doc)
        for key in ("setpoint", "temperature"):
            if set(doc) == {key}:
                return _checked(kind, "set_setpoint", {"setpoint": doc[key]})
    raise BadSetPayload(f"no {kind.name} command matches {text[:60]!r}")
