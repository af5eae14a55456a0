"""The device kinds Roost knows: what each reports, which commands it takes, which
events it sends.

One table shared by the simulators (devices/), the device SDK (argument checks),
the broker's Home Assistant discovery and the CLI. Plain data, standard library
only: firmware-side code may import it.

A kind not listed here still works as a device (telemetry, commands and events
pass through unchecked); it just gets no Home Assistant discovery and no
argument validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# Value types of telemetry fields and command arguments.
NUMBER = "number"
INTEGER = "integer"
BOOL = "bool"
STRING = "string"


@dataclass(frozen=True, slots=True)
class Field:
    """One telemetry field (a key of the flat object on roost/telemetry/<device>).

    `platform`, `device_class` and `state_class` are Home Assistant's vocabulary,
    so discovery is a straight translation.
    """

    name: str
    type: str                          # number | integer | bool | string
    unit: str | None = None            # "°C", "%", ...
    device_class: str | None = None    # temperature, humidity, door, battery, ...
    state_class: str | None = None     # measurement, ...
    platform: str = "sensor"           # sensor | binary_sensor
    description: str = ""


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    type: str                          # number | integer | bool | string
    required: bool = True
    minimum: float | None = None
    maximum: float | None = None
    unit: str | None = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Command:
    """A `{"type":"command","name":...,"args":{...}}` body the device accepts.
    `result` names the keys of the `data` it answers with when status is ok."""

    name: str
    args: tuple[Arg, ...] = ()
    description: str = ""
    result: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    """A `{"type":"event","name":...,"data":{...}}` body the device sends its people."""

    name: str
    description: str = ""
    data: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceKind:
    name: str
    description: str
    telemetry: tuple[Field, ...]
    commands: tuple[Command, ...]
    events: tuple[Event, ...] = ()
    # Home Assistant: the entity that represents the device as a whole (light,
    # climate, ...), or None when its telemetry sensors are all there is.
    ha_component: str | None = None
    # A kind the catalogue does not describe: any command name may be sent
    # (the device's own code knows), nothing is checked here.
    open_commands: bool = False

    def field(self, name: str) -> Field | None:
        return next((f for f in self.telemetry if f.name == name), None)

    def command(self, name: str) -> Command | None:
        return next((c for c in self.commands if c.name == name), None)

    def event(self, name: str) -> Event | None:
        return next((e for e in self.events if e.name == name), None)


# Every kind answers these two, so a person (or a test) can always ask a device
# what it is doing without knowing its kind.
COMMON_COMMANDS: tuple[Command, ...] = (
    Command("ping", description="answer at once", result=("pong",)),
    Command("get_state", description="the current state, same keys as the telemetry"),
)

THERMOSTAT = DeviceKind(
    name="thermostat",
    description="room thermostat: measures temperature and humidity, heats towards a set point",
    telemetry=(
        Field("temperature", NUMBER, "°C", "temperature", "measurement", description="measured temperature"),
        Field("humidity", NUMBER, "%", "humidity", "measurement", description="relative humidity"),
        Field("setpoint", NUMBER, "°C", "temperature", None, description="target temperature"),
        Field("heating", BOOL, None, "heat", None, platform="binary_sensor", description="heater running"),
        Field("mode", STRING, description="heat (heats towards the set point) or off (never heats)"),
    ),
    commands=COMMON_COMMANDS + (
        Command("set_setpoint", (Arg("setpoint", NUMBER, minimum=5.0, maximum=30.0, unit="°C"),),
                "change the target temperature", result=("setpoint",)),
        # Home Assistant's climate modes, so its mode selector maps one to one.
        Command("set_mode", (Arg("mode", STRING, choices=("heat", "off")),),
                "switch heating on (heat) or off", result=("mode",)),
    ),
    ha_component="climate",
)

LIGHT = DeviceKind(
    name="light",
    description="dimmable light",
    telemetry=(
        Field("on", BOOL, None, "light", None, platform="binary_sensor", description="switched on"),
        Field("brightness", INTEGER, "%", None, "measurement", description="brightness 0-100 %"),
    ),
    commands=COMMON_COMMANDS + (
        Command("turn_on", (Arg("brightness", INTEGER, required=False, minimum=0, maximum=100, unit="%"),),
                "switch on, optionally at a brightness", result=("on", "brightness")),
        Command("turn_off", (), "switch off", result=("on", "brightness")),
        Command("set_brightness", (Arg("brightness", INTEGER, minimum=0, maximum=100, unit="%"),),
                "change brightness (0 switches off)", result=("on", "brightness")),
    ),
    ha_component="light",
)

DOOR_SENSOR = DeviceKind(
    name="door_sensor",
    description="door contact sensor: tells its people when the door opens or closes",
    telemetry=(
        Field("open", BOOL, None, "door", None, platform="binary_sensor", description="door is open"),
        Field("battery", INTEGER, "%", "battery", "measurement", description="battery level"),
    ),
    commands=COMMON_COMMANDS,
    events=(
        Event("opened", "the door was opened", ("open",)),
        Event("closed", "the door was closed", ("open",)),
    ),
    ha_component=None,
)

KINDS: Mapping[str, DeviceKind] = MappingProxyType({k.name: k for k in (THERMOSTAT, LIGHT, DOOR_SENSOR)})


def get_kind(name: str | None) -> DeviceKind | None:
    return KINDS.get(name) if name else None


def kind_or_generic(name: str | None) -> DeviceKind:
    """The catalogue's kind, or a generic one for a kind it does not describe
    (a device registered with `--kind toaster` is still a device)."""
    return get_kind(name) or DeviceKind(name or "device", "a kind the catalogue does not describe", (),
                                        COMMON_COMMANDS, open_commands=True)


class InvalidArgs(ValueError):
    """Command arguments that do not fit the catalogue (message says which and why)."""


def _type_ok(arg_type: str, value: Any) -> bool:
    if arg_type == BOOL:
        return isinstance(value, bool)
    if arg_type == INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if arg_type == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if arg_type == STRING:
        return isinstance(value, str)
    return True


def check_args(command: Command, args: Any) -> dict[str, Any]:
    """The arguments if they fit `command`, else InvalidArgs. Unknown keys are refused
    so a typo ("brightnes") is reported rather than ignored."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise InvalidArgs("'args' must be an object")
    known = {a.name: a for a in command.args}
    for key in args:
        if key not in known:
            raise InvalidArgs(f"unknown argument {key!r} for {command.name} (known: {', '.join(known) or 'none'})")
    for a in command.args:
        if a.name not in args:
            if a.required:
                raise InvalidArgs(f"argument {a.name!r} is required")
            continue
        v = args[a.name]
        if not _type_ok(a.type, v):
            raise InvalidArgs(f"argument {a.name!r} must be of type {a.type}")
        if a.minimum is not None and v < a.minimum or a.maximum is not None and v > a.maximum:
            raise InvalidArgs(f"argument {a.name!r} must be between {a.minimum} and {a.maximum}")
        if a.choices and v not in a.choices:
            raise InvalidArgs(f"argument {a.name!r} must be one of {', '.join(a.choices)}")
    return dict(args)


def describe(kind: DeviceKind) -> dict[str, Any]:
    """The kind as plain JSON-ready data (for the CLI and documentation)."""
    return {
        "kind": kind.name,
        "description": kind.description,
        "telemetry": [{"name": f.name, "type": f.type, "unit": f.unit, "device_class": f.device_class}
                      for f in kind.telemetry],
        "commands": [{"name": c.name, "args": [{"name": a.name, "type": a.type, "required": a.required,
                                                 "min": a.minimum, "max": a.maximum, "unit": a.unit}
                                                for a in c.args]} for c in kind.commands],
        "events": [{"name": e.name, "description": e.description} for e in kind.events],
    }
