"""Person-side device commands: devices, claim, share, cmd (command and wait
for the result) and telemetry."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from client.cli_common import ConnectionWatch, Net, clip, command, network, nonblank_arg, principal_arg
from client.output import (
    EXIT_DEVICE_ERROR, EXIT_SERVER_ERROR, EXIT_TIMEOUT, CliError, Column, Progress, fmt_kv, fmt_time,
    presence_colour, presence_text,
)
from client.sdk import EventStream, InboxItem, ReconnectedItem, RequestTimeout, TopicItem
from contract import topics


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
    """Become an owner of DEVICE with the pairing CODE printed when it was registered.

    \b
    Example:
      roost claim thermo1 483-219
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

    \b
    Examples:
      roost cmd thermo1 set_point value=21.5
      roost cmd light1 set on=true brightness=80 --json | jq .status
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
    doc = {"device": device, "command": name, "conv": conv, "seq": seq, "status": status,
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
        raise CliError(f"{device} answered {status}" + (f": {detail}" if detail else ""), EXIT_DEVICE_ERROR)


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
    client = net.open(inbox=False)
    out = net.out
    res = client.call("devices")
    found = next((d for d in res.get("devices") or [] if isinstance(d, dict) and d.get("id") == device), None)
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
    watch = ConnectionWatch(client, out)
    while True:
        try:
            item = client.items.get(timeout=1.0)
        except Exception:
            watch.check()
            continue
        if isinstance(item, TopicItem) and item.topic == topics.telemetry(device) and isinstance(item.payload, dict):
            reading = item.payload
            if net.json_mode:
                out.jsonl({"device": device, **reading})
            else:
                ts = reading.get("ts", time.time())
                rest = {k: v for k, v in reading.items() if k != "ts"}
                out.line(f"{out.s(fmt_time(ts), fg='bright_black')} {fmt_kv(rest)}")
        elif isinstance(item, ReconnectedItem):
            watch.reconnected()
        watch.check()


COMMANDS: list[click.Command] = [devices, claim, share, cmd, telemetry]
