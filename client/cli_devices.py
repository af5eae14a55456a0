"""Person-side device commands: devices, claim, share, cmd (command and wait
for the result) and telemetry."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from client.cli_common import ConnectionWatch, Net, clip, command, network, nonblank_arg, principal_arg, stream_label
from client.output import (
    EXIT_DEVICE_ERROR,
    EXIT_SERVER_ERROR,
    EXIT_TIMEOUT,
    CliError,
    Column,
    Progress,
    fmt_kv,
    fmt_time,
    presence_colour,
    presence_text,
)
from client.sdk import EventStream, InboxItem, ReconnectedItem, RequestTimeout, RoostClient, RoostError, TopicItem
from contract import catalog, topics


@command()
@network()
def devices(net: Net) -> None:
    """List your devices (owned or shared) with presence and latest telemetry.

    \b
    Example:
      roost devices
    """
    client = net.open(inbox=False)
    res = client.call("devices")
    if net.json_mode:
        net.out.doc(res)
        return
    net.out.table(res.get("devices") or [], [
        Column("id", "id"), Column("kind", "kind"), Column("name", "name"),
        Column("presence", "presence", presence_text, colour=presence_colour),
        Column("last_telemetry", "last telemetry", lambda v: clip(fmt_kv(v), 60)),
    ], empty="no devices yet (`roost claim DEVICE CODE` adds one)")


@command()
@click.argument("device")
@click.argument("code")
@network()
def claim(net: Net, device: str, code: str) -> None:
    """Become an owner of DEVICE with the pairing CODE printed when it was registered
    (8 digits; spaces and dashes are ignored).

    \b
    Example:
      roost claim thermo1 48321907
    """
    principal_arg(device, "DEVICE")
    nonblank_arg(code, "CODE")
    client = net.open(inbox=False)
    res = client.call("device.claim", {"device": device, "code": code})
    if net.json_mode:
        net.out.doc({"ok": True, "device": device, "result": res})
    else:
        net.out.line(f"you now own {device}")


@command()
@click.argument("device")
@click.argument("user_id", metavar="ID")
@network()
def share(net: Net, device: str, user_id: str) -> None:
    """Let contact ID use your DEVICE.

    \b
    Example:
      roost share thermo1 bob
    """
    principal_arg(device, "DEVICE")
    principal_arg(user_id)
    client = net.open(inbox=False)
    res = client.call("device.share", {"device": device, "with": user_id})
    if net.json_mode:
        net.out.doc({"ok": True, "device": device, "with": user_id, "result": res})
    else:
        net.out.line(f"shared {device} with {user_id}")


@command()
@click.argument("device")
@click.argument("user_id", metavar="ID")
@network()
def unshare(net: Net, device: str, user_id: str) -> None:
    """Stop letting ID use your DEVICE (undoes `roost share`).

    \b
    Example:
      roost unshare thermo1 bob
    """
    principal_arg(device, "DEVICE")
    principal_arg(user_id)
    client = net.open(inbox=False)
    res = client.call("device.unshare", {"device": device, "with": user_id})
    if net.json_mode:
        net.out.doc({"ok": True, "device": device, "with": user_id, "result": res})
    else:
        net.out.line(f"{user_id} may no longer use {device}")


def parse_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`key=value` pairs; values parsed as JSON when they are JSON (21, true, "x", [1])."""
    args: dict[str, Any] = {}
    for p in pairs:
        key, eq, raw = p.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"'{p}' is not key=value", param_hint="ARGS")
        try:
            args[key] = json.loads(raw)
        except ValueError:
            args[key] = raw
    return args


@command()
@click.argument("device")
@click.argument("name")
@click.argument("pairs", metavar="[KEY=VALUE]...", nargs=-1)
@click.option("--timeout", "-t", default=30.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds to wait for the device's result.")
@network()
def cmd(net: Net, device: str, name: str, pairs: tuple[str, ...], timeout: float) -> None:
    """Send command NAME to DEVICE and wait for its result.

    Values are JSON when they parse as JSON (numbers, true/false, quoted strings),
    text otherwise. Exit code 0 when the device answers "ok", 5 when it answers
    "error", 4 when no result comes within --timeout.

    `roost device commands DEVICE` lists the commands a device takes.

    \b
    Examples:
      roost cmd thermo1 set_setpoint setpoint=21.5
      roost cmd light1 turn_on brightness=80 --json | jq .status
    """
    principal_arg(device, "DEVICE")
    nonblank_arg(name, "NAME")
    args = parse_args(pairs)
    client = net.open()
    stream = EventStream(client, ack=False)
    body = {"type": "command", "name": name, "args": args}
    sent = client.send(body, to=device)
    conv, seq = sent.get("conv"), sent.get("seq")
    result = None
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 2.0
    with Progress(f"waiting for {device}'s result", net.out.err):
        while result is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for item in stream.poll(min(remaining, 0.5)):
                if isinstance(item, InboxItem):
                    ev = item.event
                    if ev.get("kind") == "msg" and ev.get("conv") == conv and _is_result_for(ev.get("body"), seq):
                        result = ev
                elif isinstance(item, ReconnectedItem):
                    next_check = 0.0
            # A reconnect before the first event leaves the stream without a cursor;
            # the conversation's history is the fallback that cannot miss the result.
            if result is None and time.monotonic() >= next_check and client.connected:
                next_check = time.monotonic() + 2.0
                try:
                    hist = client.call("history", {"conv": conv, "limit": 50})
                except RequestTimeout:
                    continue
                for m in hist.get("messages") or []:
                    if _is_result_for(m.get("body"), seq):
                        result = m
    if result is None:
        if net.json_mode:
            net.out.doc({"device": device, "command": name, "conv": conv, "seq": seq, "status": "timeout"})
        raise CliError(f"no result from {device} within {timeout:g}s (the command is {conv} #{seq})", EXIT_TIMEOUT)
    rbody = result.get("body") or {}
    status = rbody.get("status")
    doc: dict[str, Any] = {"device": device, "command": name, "conv": conv, "seq": seq, "status": status,
           "data": rbody.get("data") or {}, "result_seq": result.get("seq")}
    if net.json_mode:
        net.out.doc(doc)
    elif status == "ok":
        net.out.line(f"{device}: {net.out.s('ok', fg='green', bold=True)}"
                     + (f"  {fmt_kv(doc['data'])}" if doc["data"] else ""))
    if status != "ok":
        data = dict(doc["data"])
        reason = str(data.pop("error", "")) if isinstance(data.get("error"), str) else ""
        detail = "; ".join(x for x in (reason, fmt_kv(data) if data else "") if x)
        if reason.startswith("unknown command"):
            detail += _commands_hint(client, device)
        raise CliError(f"{device} answered {status}" + (f": {detail}" if detail else ""), EXIT_DEVICE_ERROR)


def _commands_hint(client: RoostClient, device: str) -> str:
    """`; thermo1 takes: ping, get_state, set_setpoint` for an unknown command's error.

    The device's answer only says the name is unknown; its kind (from `devices`)
    tells which commands it has. A hint must never turn the error into another one.
    """
    try:
        found = find_device(client, device)
    except RoostError:
        return ""
    kind = catalog.get_kind(found.get("kind") if found else None)
    if kind is None:
        return f" (see `roost device commands {device}`)"
    return f"; {device} takes: {', '.join(c.name for c in kind.commands)}"


def find_device(client: RoostClient, device: str) -> dict[str, Any] | None:
    """DEVICE's entry in the `devices` list (owned or shared with you), or None."""
    res = client.call("devices")
    return next((d for d in res.get("devices") or [] if isinstance(d, dict) and d.get("id") == device), None)


@command("commands")
@click.argument("device")
@network()
def device_commands(net: Net, device: str) -> None:
    """List the commands DEVICE takes, with their arguments.

    For a device you own or that is shared with you (its kind says which).

    \b
    Examples:
      roost device commands thermo1
      roost device commands light1 --json | jq -r '.commands[].name'
    """
    principal_arg(device, "DEVICE")
    client = net.open(inbox=False)
    found = find_device(client, device)
    if found is None:
        raise CliError(f"not_found: {device} is not one of your devices (see `roost devices`)", EXIT_SERVER_ERROR)
    kind_name = found.get("kind")
    kind = catalog.get_kind(kind_name)
    commands = [_command_doc(c) for c in kind.commands] if kind else []
    if net.json_mode:
        net.out.doc({"device": device, "kind": kind_name, "known_kind": kind is not None, "commands": commands})
        return
    if kind is None:
        net.out.line(f"{device} is a {kind_name}, a kind Roost does not describe: it takes the commands its "
                     "firmware knows (one built on the Roost device SDK answers ping)")
        return
    net.out.table(commands, [
        Column("name", "command"),
        Column("args", "arguments", _fmt_args),
        Column("description", "what it does"),
    ])
    net.out.line(f"example: roost cmd {device} {_example(kind)}", fg="bright_black")


def _command_doc(c: catalog.Command) -> dict[str, Any]:
    return {"name": c.name, "description": c.description,
            "args": [{"name": a.name, "type": a.type, "required": a.required, "min": a.minimum, "max": a.maximum,
                      "unit": a.unit, "choices": list(a.choices)} for a in c.args]}


def _fmt_args(args: Any) -> str:
    """`setpoint=number (5..30 °C)`, optional ones in brackets; `-` for none."""
    parts = []
    for a in args or []:
        limits = f"{a['min']:g}..{a['max']:g}" if a["min"] is not None and a["max"] is not None else ""
        extra = " ".join(x for x in (limits, a["unit"] or "", "|".join(a["choices"])) if x)
        text = f"{a['name']}={a['type']}" + (f" ({extra})" if extra else "")
        parts.append(text if a["required"] else f"[{text}]")
    return " ".join(parts) or "-"


def _example(kind: catalog.DeviceKind) -> str:
    """A command line for the kind's own commands (after the common ones), else ping."""
    own = [c for c in kind.commands if c not in catalog.COMMON_COMMANDS]
    c = own[0] if own else kind.commands[0]
    return " ".join([c.name, *(f"{a.name}={_example_value(a)}" for a in c.args if a.required)])


def _example_value(a: catalog.Arg) -> str:
    """A value the catalogue accepts for `a`, as typed on the command line."""
    if a.choices:
        return a.choices[0]
    if a.type == catalog.BOOL:
        return "true"
    if a.type == catalog.STRING:
        return "text"
    if a.minimum is not None and a.maximum is not None:
        middle = (a.minimum + a.maximum) / 2
        return str(int(middle)) if a.type == catalog.INTEGER else f"{middle:g}"
    return "1"


def _is_result_for(body: Any, seq: Any) -> bool:
    return isinstance(body, dict) and body.get("type") == "result" and body.get("for") == seq


@command()
@click.argument("device")
@click.option("--follow", "-f", is_flag=True, help="Keep printing readings as the device publishes them.")
@network(stream=True)
def telemetry(net: Net, device: str, follow: bool) -> None:
    """Show DEVICE's latest telemetry, or follow it live.

    \b
    Examples:
      roost telemetry thermo1
      roost telemetry thermo1 --follow --json | jq .temperature
    """
    principal_arg(device, "DEVICE")
    # Following is being there (counts as online); a one-off look is not.
    client = net.open(label=stream_label("telemetry") if follow else None, inbox=False)
    out = net.out
    found = find_device(client, device)
    if found is None:
        raise CliError(f"{device} is not one of your devices (see `roost devices`)", EXIT_SERVER_ERROR)
    latest = found.get("last_telemetry")
    if not follow:
        if net.json_mode:
            out.doc({"device": device, "telemetry": latest})
        elif isinstance(latest, dict) and latest:
            out.kv([(k, fmt_time(v) if k == "ts" else v) for k, v in latest.items()])
        else:
            out.line(f"no telemetry from {device} yet", fg="bright_black")
        return
    granted = client.subscribe([topics.telemetry(device)])
    if not all(granted.values()):
        raise CliError(f"forbidden: you may not watch {device}'s telemetry", EXIT_SERVER_ERROR)
    # stderr, also with --json: the sign that the stream is live
    out.warn(f"following {device}'s telemetry; Ctrl-C to stop")
    # The latest reading first, as `roost telemetry` shows it: a device that reports
    # every few minutes would otherwise leave the screen empty until then.
    if isinstance(latest, dict) and latest:
        _print_reading(net, device, latest)
    watch = ConnectionWatch(client, out)
    while True:
        try:
            item = client.items.get(timeout=1.0)
        except Exception:
            watch.check()
            continue
        if isinstance(item, TopicItem) and item.topic == topics.telemetry(device) and isinstance(item.payload, dict):
            _print_reading(net, device, item.payload)
        elif isinstance(item, ReconnectedItem):
            watch.reconnected()
        watch.check()


def _print_reading(net: Net, device: str, reading: dict[str, Any]) -> None:
    """One telemetry reading of a `--follow` stream: a JSON line, or `time k=v ...`."""
    if net.json_mode:
        net.out.jsonl({"device": device, **reading})
        return
    ts = reading.get("ts", time.time())
    rest = {k: v for k, v in reading.items() if k != "ts"}
    net.out.line(f"{net.out.s(fmt_time(ts), fg='bright_black')} {fmt_kv(rest)}")


COMMANDS: list[click.Command] = [devices, claim, share, unshare, cmd, telemetry]
