"""Plumbing shared by the person-side commands (cli_chat, cli_social, cli_devices).

Each network command opens its own MQTT connection as `<user>.<label>` through
client.sdk (one-shot commands with a transient `cli-` label that does not count
for presence, streams with one that does), takes `--server/--user/--password-stdin/--tls/--json` (and ROOST_*
variables) via `@network()`, prints through client.output, and turns every
expected failure into one line on stderr with a documented exit code
(docs/CLI.md). Usage errors are one line too (`command()`/`group()`).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from client import config as cfgmod
from client.cli_root import OneLineCommand, OneLineGroup
from client.config import ClientConfigError, Settings
from client.output import (
    EXIT_CONNECT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_SERVER_ERROR,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    UNKNOWN,
    CliError,
    Output,
    Progress,
    fmt_kv,
    fmt_seen,
    fmt_time,
    presence_colour,
    presence_text,
    render_body,
)
from contract import topics
from contract.ids import TRANSIENT_LABEL_PREFIX, dm_conv, is_valid_principal_id, parse_conv
from contract.sdkcore import AuthError, ConnectError, CursorLocked, RequestTimeout, RoostError
from contract.sdkcore import RequestError as ServerError

if TYPE_CHECKING:
    # The SDK (paho-mqtt and what it pulls in, ~5 MB) is imported when a command
    # connects, not by every `roost` invocation: `roost serve` never needs it.
    from client.sdk import RoostClient

DEFAULT_REQUEST_TIMEOUT = 10.0
ENV_TIMEOUT = "ROOST_TIMEOUT"
ENV_DEBUG = "ROOST_DEBUG"


# ---- shared plumbing ------------------------------------------------------------

@dataclass
class Net:
    """The network options of one command invocation."""

    server: str | None = None
    user: str | None = None
    password_stdin: bool = False
    tls: bool | None = None
    json_mode: bool = False
    mqtt: str | None = None          # "3.1.1" or "5" (--mqtt; default ROOST_MQTT, else 3.1.1)
    out: Output = field(default_factory=Output)
    _settings: Settings | None = None
    _clients: list[RoostClient] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            password = read_password_stdin() if self.password_stdin else None
            self._settings = cfgmod.resolve(server=self.server, user=self.user, password=password, tls=self.tls)
        return self._settings

    @property
    def me(self) -> str:
        s = self.settings
        if not s.user:
            raise CliError("not logged in: run `roost login ID` (or set ROOST_USER and ROOST_PASSWORD)", EXIT_CONNECT)
        return s.user

    def open(self, *, label: str | None = None, inbox: bool = True) -> RoostClient:
        """Connect as `<user>.<label>`; without a label, as a one-shot command
        (`one_shot_label()`). Streams pass `stream_label(...)` or the user's label."""
        s = self.settings
        me = self.me
        if not s.secret:
            raise CliError(
                f"no password for '{me}': run `roost login {me}`, pass --password-stdin or set ROOST_PASSWORD",
                EXIT_CONNECT)
        from client.sdk import RoostClient

        client = RoostClient(
            s.server, me, s.secret, label=label or one_shot_label(), tls=s.tls, ca_file=s.ca_file,
            request_timeout=request_timeout(), subscribe_inbox=inbox,
            mqtt_version=5 if (self.mqtt or os.environ.get("ROOST_MQTT", "3.1.1")) == "5" else 4,
        )
        with Progress(f"connecting to {s.server}", self.out.err):
            client.connect()
        self._clients.append(client)
        return client

    def close(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:  # closing must never turn success into a traceback
                pass
        self._clients.clear()


def one_shot_label() -> str:
    """A fresh label for a command that connects, asks and leaves. Its prefix marks
    the connection transient (docs/PROTOCOL.md, Presence): the broker does not count
    it for presence, so `roost send` does not show its user online and offline
    again to every contact (issue 15)."""
    return f"{TRANSIENT_LABEL_PREFIX}{uuid.uuid4().hex[:8]}"


def stream_label(kind: str) -> str:
    """A fresh label for a long-lived stream (`chat`, `presence --follow`): someone
    watching a conversation is there, so it counts as online like an app."""
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def request_timeout() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if not raw:
        return DEFAULT_REQUEST_TIMEOUT
    try:
        value = float(raw)
        if value <= 0:
            raise ValueError
        return value
    except ValueError:
        raise CliError(f"{ENV_TIMEOUT}='{raw}' is not a positive number of seconds", EXIT_USAGE) from None


def read_password_stdin() -> str:
    line = sys.stdin.readline()
    pw = line.rstrip("\r\n")
    if not pw:
        raise CliError("--password-stdin: no password on standard input", EXIT_USAGE)
    return pw


def to_cli_error(e: BaseException) -> CliError:
    if isinstance(e, CliError):
        return e
    if isinstance(e, ServerError):
        return CliError(f"{e.code}: {e.message}", EXIT_SERVER_ERROR)
    if isinstance(e, AuthError):
        return CliError(str(e), EXIT_CONNECT)
    if isinstance(e, ConnectError):
        return CliError(str(e), EXIT_CONNECT)
    if isinstance(e, RequestTimeout):
        return CliError(str(e), EXIT_TIMEOUT)
    if isinstance(e, CursorLocked):
        return CliError(str(e), EXIT_USAGE)
    if isinstance(e, ClientConfigError):
        return CliError(str(e), EXIT_USAGE)
    if isinstance(e, RoostError):
        return CliError(str(e), EXIT_SERVER_ERROR)
    return CliError(f"internal error: {type(e).__name__}: {e} (set {ENV_DEBUG}=1 for details)", EXIT_INTERNAL)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def guarded(fn: Callable[..., Any], net: Net, *, stream: bool = False) -> Any:
    """Run a command body: expected failures become one stderr line and an exit code."""
    previous = None
    if stream and threading.current_thread() is threading.main_thread():
        # SIGTERM ends a stream like Ctrl-C: last acks sent, cursor saved, exit 0.
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return fn()
    except BrokenPipeError:
        # The reader went away (`roost listen | head`): stop quietly, as other tools do.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return None
    except KeyboardInterrupt:
        if stream:
            return None          # Ctrl-C is how a stream is meant to end
        raise CliError("interrupted", EXIT_INTERRUPTED) from None
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except Exception as e:
        if os.environ.get(ENV_DEBUG) and not isinstance(e, (RoostError, ClientConfigError)):
            raise
        raise to_cli_error(e) from None
    finally:
        net.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_NET_OPTIONS = [
    click.option("--server", "-s", metavar="HOST:PORT", help="Broker address (default: from `roost login`, ROOST_SERVER)."),
    click.option("--user", "-u", metavar="ID", help="Act as this person (default: from `roost login`, ROOST_USER)."),
    click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input."),
    click.option("--tls/--no-tls", default=None, help="Use TLS (default: from `roost login`, ROOST_TLS)."),
    click.option("--json", "json_mode", is_flag=True, help="Print JSON (one document, or JSON lines for streams)."),
    click.option("--mqtt", "mqtt_version", type=click.Choice(["3.1.1", "5"]), default=None,
                 help="MQTT version to speak (default 3.1.1, or ROOST_MQTT)."),
]


def network(stream: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the network options; the command body receives a `Net` first."""

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def run(server, user, password_stdin, tls, json_mode, mqtt_version, **kw):
            net = Net(server=server, user=user, password_stdin=password_stdin, tls=tls,
                      json_mode=json_mode, mqtt=mqtt_version, out=Output(json_mode))
            return guarded(lambda: f(net, **kw), net, stream=stream)

        for opt in reversed(_NET_OPTIONS):
            run = opt(run)
        return run

    return deco


def principal_arg(value: str, what: str = "ID") -> str:
    if not is_valid_principal_id(value):
        raise click.BadParameter(f"'{value}' is not a valid id (lowercase letters, digits, '_' and '-', at most 32)",
                                 param_hint=what)
    return value


def nonblank_arg(value: str, what: str) -> str:
    """A required text argument that is empty or only spaces is a usage error (exit 2),
    caught here instead of sending a request the broker can only refuse."""
    if not value.strip():
        raise click.BadParameter("must not be empty", param_hint=what)
    return value


def target_params(target: str) -> dict[str, str]:
    """`bob` -> {"to": "bob"}; `dm:a:b` / `grp:x` -> {"conv": ...}."""
    if target.startswith(("dm:", "grp:")):
        if parse_conv(target) is None:
            raise click.BadParameter(f"'{target}' is not a conversation id (dm:<a>:<b> or grp:<id>)", param_hint="PEER|CONV")
        return {"conv": target}
    return {"to": principal_arg(target, "PEER|CONV")}


def conv_of(target: str, me: str) -> str:
    p = target_params(target)
    return p["conv"] if "conv" in p else dm_conv(me, p["to"])


def who(name: Any, me: str) -> str:
    return "you" if name == me else str(name)


def event_line(ev: dict[str, Any], me: str, out: Output, groups: Mapping[str, str] | None = None) -> str:
    """One human line for a mailbox event; `groups` names group conversations."""
    k = ev.get("kind")
    t = out.s(fmt_time(ev.get("ts")), fg="bright_black")
    conv = ev.get("conv", "")
    if k == "msg":
        sender = who(ev.get("from"), me)
        return f"{t} {out.s(str(conv), fg='cyan')} #{ev.get('seq')} {out.s(sender, bold=True)}: {render_body(ev.get('body'))}"
    if k == "delivered":
        return f"{t} {conv} #{ev.get('seq')} delivered to {ev.get('to')}"
    if k == "read":
        return f"{t} {conv} #{ev.get('seq')} read by {ev.get('by')}"
    if k == "unread":
        return f"{t} unread {conv}: {ev.get('count')} (total {ev.get('total')})"
    if k == "contact":
        e, other, note = ev.get("event"), ev.get("with"), ev.get("note")
        text = {"request": f"contact request from {other}", "accepted": f"contact accepted: {other}",
                "rejected": f"contact request rejected: {other}", "removed": f"contact removed: {other}"}.get(
            str(e), f"contact {e}: {other}")
        return f"{t} {out.s(text, fg='magenta')}" + (f' "{note}"' if note else "")
    if k == "group":
        return f"{t} {out.s(group_text(ev, me, groups or {}), fg='magenta')}"
    if k == "dropped":
        dropped = f"{ev.get('count')} event(s) dropped ({ev.get('reason')})"
        return f"{t} {out.s(dropped, fg='yellow')}"
    return f"{t} {k}: {fmt_kv({x: y for x, y in ev.items() if x not in ('n', 'kind', 'ts')})}"


def group_text(ev: dict[str, Any], me: str, groups: Mapping[str, str]) -> str:
    """`alice added carol, dave to "Family" (grp:k3x9)`: who did what to whom, where."""
    conv = str(ev.get("conv", ""))
    name = ev.get("name") if isinstance(ev.get("name"), str) else groups.get(conv)
    where = f'"{name}" ({conv})' if name else conv
    by = who(ev.get("by"), me)
    members = ", ".join(who(m, me) for m in ev.get("members") or [] if isinstance(m, str))
    event = ev.get("event")
    if event == "created":
        return f"{by} created group {where}" + (f" with {members}" if members else "")
    if event == "added":
        return f"{by} added {members or '?'} to {where}"
    if event == "removed":
        return f"{by} removed {members or '?'} from {where}"
    if event == "left":
        return f"{members or by} left {where}"
    return f"group {where}: {event} by {by}" + (f" ({members})" if members else "")


def print_presence(net: Net, principal: str, payload: Any) -> None:
    """A presence update in a stream: a JSON line, or one readable line."""
    if net.json_mode:
        net.out.jsonl({"kind": "presence", "id": principal, **(payload if isinstance(payload, dict) else {})})
    else:
        net.out.line(presence_line(principal, payload, net.out))


def presence_line(principal: str, payload: Any, out: Output) -> str:
    """`18:02:40 bob is offline (last seen 18:02:40)`; `- thermo1 is unknown` when it never connected."""
    text = presence_text(payload) if payload is not None else UNKNOWN
    colour = presence_colour(text)
    p = payload if isinstance(payload, dict) else {}
    when = fmt_seen(p.get("since") if text.startswith("online") else p.get("last_seen"))
    return f"{out.s(when, fg='bright_black')} {principal} is {out.s(text, fg=colour) if colour else text}"


class ConnectionWatch:
    """Tells a stream's user, once per change, that the connection dropped or came back."""

    def __init__(self, client: RoostClient, out: Output) -> None:
        self.client = client
        self.out = out
        self.was_up = True

    def check(self) -> None:
        self.client.check_refused()
        up = self.client.connected
        if self.was_up and not up:
            self.out.warn(f"connection to {self.client.server} lost; reconnecting...")
        self.was_up = up

    def reconnected(self) -> None:
        self.out.warn(f"reconnected to {self.client.server}; caught up")
        self.was_up = True


def command(*args: Any, **kw: Any) -> Callable[[Callable[..., Any]], click.Command]:
    return click.command(*args, cls=OneLineCommand, **kw)


def group(*args: Any, **kw: Any) -> Callable[[Callable[..., Any]], click.Group]:
    return click.group(*args, cls=OneLineGroup, **kw)



def contact_ids(client: RoostClient) -> list[str]:
    res = client.call("contacts")
    return [c["id"] for c in res.get("contacts") or [] if isinstance(c, dict) and is_valid_principal_id(c.get("id"))]


def device_ids(client: RoostClient) -> list[str]:
    try:
        res = client.call("devices")
    except ServerError:   # a broker without the devices feature: contacts only
        return []
    return [d["id"] for d in res.get("devices") or [] if isinstance(d, dict) and is_valid_principal_id(d.get("id"))]


def subscribe_presence(client: RoostClient, ids: list[str]) -> dict[str, bool]:
    if not ids:
        return {}
    grants = client.subscribe([topics.presence(i) for i in ids])
    return {topics.tail(t, topics.PRESENCE) or t: ok for t, ok in grants.items()}



def clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
