"""The person-side `roost` commands: login, chat, social, devices.

`register(group)` adds them to the root click group (client/cli.py). Each network
command opens its own MQTT connection as `<user>.<label>` through client.sdk,
takes `--server/--user/--password-stdin/--tls/--json` (and ROOST_* variables),
prints through client.output, and turns every expected failure into one line on
stderr with a documented exit code (docs/CLI.md).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import click

from client import config as cfgmod
from client.config import ClientConfig, ClientConfigError, Settings
from client.output import (
    EXIT_CONNECT, EXIT_DEVICE_ERROR, EXIT_INTERRUPTED, EXIT_SERVER_ERROR, EXIT_TIMEOUT, EXIT_USAGE,
    CliError, Column, Output, Progress, fmt_kv, fmt_time, fmt_value, presence_colour, presence_text,
    render_body,
)
from client.sdk import (
    AuthError, ConnectError, CursorLocked, CursorStore, EventStream, InboxItem, LocalItem,
    ReconnectedItem, RequestTimeout, RoostClient, RoostError, ServerError, TopicItem,
)
from contract import topics
from contract.ids import CLIENT_LABEL_RE, dm_conv, is_valid_principal_id, parse_conv

DEFAULT_REQUEST_TIMEOUT = 10.0
ENV_TIMEOUT = "ROOST_TIMEOUT"
ENV_DEBUG = "ROOST_DEBUG"
HISTORY_MAX = 200
CHAT_HISTORY = 20


# ---- shared plumbing ------------------------------------------------------------

@dataclass
class Net:
    """The network options of one command invocation."""

    server: str | None = None
    user: str | None = None
    password_stdin: bool = False
    tls: bool | None = None
    json_mode: bool = False
    out: Output = field(default_factory=Output)
    _settings: Settings | None = None
    _clients: list[RoostClient] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            password = _read_password_stdin() if self.password_stdin else None
            self._settings = cfgmod.resolve(server=self.server, user=self.user, password=password, tls=self.tls)
        return self._settings

    @property
    def me(self) -> str:
        s = self.settings
        if not s.user:
            raise CliError("not logged in: run `roost login ID` (or set ROOST_USER and ROOST_PASSWORD)", EXIT_CONNECT)
        return s.user

    def open(self, *, label: str | None = None, inbox: bool = True) -> RoostClient:
        s = self.settings
        me = self.me
        if not s.secret:
            raise CliError(
                f"no password for '{me}': run `roost login {me}`, pass --password-stdin or set ROOST_PASSWORD",
                EXIT_CONNECT)
        client = RoostClient(
            s.server, me, s.secret, label=label, tls=s.tls, ca_file=s.ca_file,
            request_timeout=request_timeout(), subscribe_inbox=inbox,
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


def _read_password_stdin() -> str:
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
    return CliError(f"internal error: {type(e).__name__}: {e} (set {ENV_DEBUG}=1 for details)", 70)


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
]


def network(stream: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the network options; the command body receives a `Net` first."""

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def run(server, user, password_stdin, tls, json_mode, **kw):
            net = Net(server=server, user=user, password_stdin=password_stdin, tls=tls,
                      json_mode=json_mode, out=Output(json_mode))
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


def event_line(ev: dict[str, Any], me: str, out: Output) -> str:
    """One human line for a mailbox event."""
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
        return f"{t} group {conv}: {ev.get('event')} by {who(ev.get('by'), me)}"
    if k == "dropped":
        dropped = f"{ev.get('count')} event(s) dropped ({ev.get('reason')})"
        return f"{t} {out.s(dropped, fg='yellow')}"
    return f"{t} {k}: {fmt_kv({x: y for x, y in ev.items() if x not in ('n', 'kind', 'ts')})}"


def presence_line(principal: str, payload: Any, out: Output) -> str:
    text = presence_text(payload) if payload is not None else "unknown"
    colour = presence_colour(text)
    since = payload.get("since") if isinstance(payload, dict) else None
    when = out.s(fmt_time(since if text.startswith("online") else (payload or {}).get("last_seen") if isinstance(payload, dict) else None), fg="bright_black")
    return f"{when} {principal} is {out.s(text, fg=colour) if colour else text}"


class ConnectionWatch:
    """Tells a stream's user, once per change, that the connection dropped or came back."""

    def __init__(self, client: RoostClient, out: Output) -> None:
        self.client = client
        self.out = out
        self.was_up = True

    def check(self) -> None:
        up = self.client.connected
        if self.was_up and not up:
            self.out.warn(f"connection to {self.client.server} lost; reconnecting...")
        self.was_up = up

    def reconnected(self) -> None:
        self.out.warn(f"reconnected to {self.client.server}; caught up")
        self.was_up = True


# ---- one-line usage errors -------------------------------------------------------------

class OneLineUsageError(click.UsageError):
    """A usage error shown as one line (click's default is usage + hint + message)."""

    def __init__(self, error: click.UsageError) -> None:
        super().__init__(error.format_message(), error.ctx)
        self.exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        path = self.ctx.command_path if self.ctx is not None else "roost"
        CliError(f"{self.format_message().rstrip('.')} (see `{path} --help`)", EXIT_USAGE).show(file)


def _one_line(error: click.UsageError) -> click.UsageError:
    no_args_help = getattr(click.exceptions, "NoArgsIsHelpError", ())
    if isinstance(error, OneLineUsageError) or (no_args_help and isinstance(error, no_args_help)):
        return error
    return OneLineUsageError(error)


class OneLineCommand(click.Command):
    def make_context(self, *args: Any, **kw: Any) -> click.Context:
        try:
            return super().make_context(*args, **kw)
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from None


class OneLineGroup(click.Group):
    command_class = OneLineCommand

    def make_context(self, *args: Any, **kw: Any) -> click.Context:
        try:
            return super().make_context(*args, **kw)
        except click.UsageError as e:
            raise _one_line(e) from None

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            raise _one_line(e) from None


def command(*args: Any, **kw: Any) -> Callable[[Callable[..., Any]], click.Command]:
    return click.command(*args, cls=OneLineCommand, **kw)


def group(*args: Any, **kw: Any) -> Callable[[Callable[..., Any]], click.Group]:
    return click.group(*args, cls=OneLineGroup, **kw)


# ---- login / logout --------------------------------------------------------------

@command()
@click.argument("user_id", metavar="ID")
@click.option("--server", "-s", metavar="HOST:PORT", help="Broker address (default 127.0.0.1:1883, or ROOST_SERVER).")
@click.option("--tls/--no-tls", default=None, help="Connect with TLS (default port 8883).")
@click.option("--ca", "ca_file", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="CA certificate(s) to trust for TLS (default: the system's; or ROOST_CA).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input instead of a prompt.")
@click.option("--json", "json_mode", is_flag=True, help="Print the result as JSON.")
def login(user_id: str, server: str | None, tls: bool | None, ca_file: str | None, password_stdin: bool,
          json_mode: bool) -> None:
    """Log in as ID: check the password with the broker and store it.

    The server, id and password are saved in the client config file
    (~/.config/roost/client.json, mode 0600), used by every other command.

    \b
    Example:
      roost login --server 127.0.0.1:1883 alice
      echo "$PW" | roost login --password-stdin alice
      roost login --tls --ca /etc/roost/ca.pem --server hub.local:8883 alice
    """
    out = Output(json_mode)
    net = Net(json_mode=json_mode, out=out)

    def body() -> None:
        principal_arg(user_id)
        path = cfgmod.config_path()
        stored = cfgmod.load(path) or ClientConfig()
        server_text = server or os.environ.get(cfgmod.ENV_SERVER) or stored.server or cfgmod.DEFAULT_SERVER
        env_tls = os.environ.get(cfgmod.ENV_TLS)
        use_tls = tls if tls is not None else (cfgmod.parse_bool(cfgmod.ENV_TLS, env_tls) if env_tls else stored.tls)
        srv = cfgmod.parse_server(server_text, tls=use_tls)
        if password_stdin:
            password = _read_password_stdin()
        elif os.environ.get(cfgmod.ENV_PASSWORD) or os.environ.get(cfgmod.ENV_SECRET):
            password = os.environ.get(cfgmod.ENV_PASSWORD) or os.environ[cfgmod.ENV_SECRET]
        else:
            password = click.prompt(f"Password for {user_id}", hide_input=True, err=True)
        ca = ca_file or os.environ.get(cfgmod.ENV_CA) or stored.ca_file
        if ca:
            ca = os.path.abspath(ca)   # later commands may run from another directory
        client = RoostClient(srv, user_id, password, tls=use_tls, ca_file=ca,
                             label=f"login-{uuid.uuid4().hex[:6]}", subscribe_inbox=False,
                             request_timeout=request_timeout())
        with Progress(f"connecting to {srv}", out.err):
            client.connect()
        client.close()
        saved = cfgmod.save(ClientConfig(server=str(srv), user=user_id, secret=password, tls=use_tls,
                                         ca_file=ca if use_tls else None), path)
        if json_mode:
            out.doc({"user": user_id, "server": str(srv), "tls": use_tls, "config": str(saved)})
        else:
            out.line(f"Logged in as {out.s(user_id, bold=True)} on {srv}{' (TLS)' if use_tls else ''}.")
            out.line(f"Credentials saved in {saved} (mode 0600). `roost logout` removes them.")

    guarded(body, net)


@command()
@click.option("--json", "json_mode", is_flag=True, help="Print the result as JSON.")
def logout(json_mode: bool) -> None:
    """Forget the stored server, id and password.

    \b
    Example:
      roost logout
    """
    out = Output(json_mode)
    path = cfgmod.config_path()
    removed = cfgmod.remove(path)
    if json_mode:
        out.doc({"logged_out": removed, "config": str(path)})
    elif removed:
        out.line(f"Logged out; removed {path}.")
    else:
        out.line(f"Not logged in (no {path}).")


# ---- chat ---------------------------------------------------------------------------

@command()
@click.argument("target", metavar="PEER|CONV")
@click.argument("text", nargs=-1, required=True)
@click.option("--cmid", metavar="ID", help="Client message id; re-running with the same one never sends twice.")
@network()
def send(net: Net, target: str, text: tuple[str, ...], cmid: str | None) -> None:
    """Send a text message to a person, a device or a conversation.

    Prints the conversation and the message's sequence number. The send is
    retried with the same client message id, so it is stored at most once.
    TEXT "-" reads the message from standard input.

    \b
    Examples:
      roost send bob "dinner at 8?"
      roost send grp:k3x9 on my way
      uptime | roost send bob -
    """
    params = target_params(target)
    message = sys.stdin.read().rstrip("\n") if text == ("-",) else " ".join(text)
    if not message:
        raise click.BadParameter("the message is empty", param_hint="TEXT")
    client = net.open(inbox=False)
    cmid = cmid or uuid.uuid4().hex
    result: dict[str, Any] | None = None
    last_error: RoostError | None = None
    with Progress("sending", net.out.err):
        for _attempt in range(3):
            try:
                result = client.send({"type": "text", "text": message}, cmid=cmid, **params)
                break
            except (RequestTimeout, ConnectError) as e:  # same cmid: a retry never stores twice
                last_error = e
    if result is None:
        assert last_error is not None
        raise last_error
    if net.json_mode:
        net.out.doc(result)
    else:
        dup = " (already sent earlier)" if result.get("dup") else ""
        net.out.line(f"sent {result.get('conv')} #{result.get('seq')}{dup}")


@command()
@click.option("--label", default="listen", show_default=True, metavar="LABEL",
              help="Client label; the last seen event is remembered per label.")
@click.option("--since", type=click.IntRange(min=0), metavar="N",
              help="Replay events after N (0: the whole mailbox) instead of resuming.")
@network(stream=True)
def listen(net: Net, label: str, since: int | None) -> None:
    """Watch messages, receipts, unread counts and contacts' presence live.

    Resumes from the last event this label saw (first run: from now), acks what it
    shows (so senders get `delivered`), and catches up after a reconnect. With
    --json: one JSON object per line (presence as {"kind": "presence", ...}).

    \b
    Examples:
      roost listen
      roost listen --json | jq -c 'select(.kind == "msg")'
    """
    if not CLIENT_LABEL_RE.match(label):
        raise click.BadParameter("letters, digits, '_' and '-', at most 32", param_hint="--label")
    me = net.me
    store = CursorStore(cfgmod.state_dir(), net.settings.server, me, label)
    store.lock()
    stream: EventStream | None = None
    try:
        client = net.open(label=label)
        stream = EventStream(client, store=store)
        out = net.out
        saved = since if since is not None else store.load()
        if saved is None:
            stream.start_at_head()
            missed: list[dict[str, Any]] = []
        else:
            stream.cursor = saved
            missed = stream.catch_up()
            if not missed:
                head = client.mailbox_head()
                if head < saved:  # a new store on the server: old numbers mean nothing
                    out.warn(f"the server's mailbox is behind the saved position #{saved}; starting at #{head}")
                    stream.cursor = head
        unread = UnreadTracker(me, client.call("convs"))
        # Presence of contacts and of one's own devices (both visible to us by the contract).
        _subscribe_presence(client, list(dict.fromkeys(_contact_ids(client) + _device_ids(client))))
        # stderr: a person reads it, scripts wait for it, the JSON on stdout stays clean
        out.warn(f"listening as {me} on {client.server} from event #{saved if saved is not None else stream.cursor}"
                 f"{f' ({len(missed)} missed)' if missed else ''}; Ctrl-C to stop")
        for ev in missed:
            _print_event(ev, me, net, unread)
        watch = ConnectionWatch(client, out)
        while True:
            for item in stream.poll(1.0):
                if isinstance(item, InboxItem):
                    ev = item.event
                    _print_event(ev, me, net, unread)
                    if ev.get("kind") == "contact" and ev.get("event") == "accepted" and is_valid_principal_id(ev.get("with")):
                        try:
                            _subscribe_presence(client, [ev["with"]])
                        except RoostError as e:  # presence is a nicety; the stream goes on
                            out.warn(f"cannot watch {ev['with']}'s presence: {e}")
                elif isinstance(item, TopicItem):
                    pid = topics.tail(item.topic, topics.PRESENCE)
                    if pid is not None and not item.retained:
                        if net.json_mode:
                            out.jsonl({"kind": "presence", "id": pid, **(item.payload if isinstance(item.payload, dict) else {})})
                        else:
                            out.line(presence_line(pid, item.payload, out))
                elif isinstance(item, ReconnectedItem):
                    watch.reconnected()
            watch.check()
    finally:
        if stream is not None:
            try:
                stream.flush_ack(force=True)
            except Exception:  # the connection may be gone; the cursor is saved on the next run's ack
                pass
        store.unlock()


class UnreadTracker:
    """Unread counts per conversation, kept live from the event stream.

    The broker sends `unread` events when a read position changes; a new message
    from someone else raises the count by one without an event (docs/PROTOCOL.md),
    so `listen` counts those itself, starting from `convs`.
    """

    def __init__(self, me: str, convs_result: dict[str, Any]) -> None:
        self.me = me
        self.counts: dict[str, int] = {}
        self.snapshot_seq: dict[str, int] = {}   # messages up to here are already in the counts
        for c in convs_result.get("convs") or []:
            if isinstance(c, dict) and isinstance(c.get("conv"), str) and isinstance(c.get("unread"), int):
                self.counts[c["conv"]] = c["unread"]
                last = c.get("last_seq")
                if not isinstance(last, int) and isinstance(c.get("last"), dict):
                    last = c["last"].get("seq")
                if isinstance(last, int):
                    self.snapshot_seq[c["conv"]] = last

    def update(self, ev: dict[str, Any]) -> str | None:
        """Apply an event; for a message from someone else, a short `N unread` note."""
        conv = ev.get("conv")
        if not isinstance(conv, str):
            return None
        if ev.get("kind") == "unread" and isinstance(ev.get("count"), int):
            self.counts[conv] = ev["count"]
        elif ev.get("kind") == "msg" and ev.get("from") != self.me:
            seq = ev.get("seq")
            if not (isinstance(seq, int) and seq <= self.snapshot_seq.get(conv, 0)):
                self.counts[conv] = self.counts.get(conv, 0) + 1
            return f"{self.counts[conv]} unread, {self.total} in all"
        return None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _print_event(ev: dict[str, Any], me: str, net: Net, unread: UnreadTracker | None = None) -> None:
    note = unread.update(ev) if unread is not None else None
    if net.json_mode:
        net.out.jsonl(ev)
    else:
        line = event_line(ev, me, net.out)
        net.out.line(f"{line}  {net.out.s(f'({note})', fg='yellow')}" if note else line)


def _contact_ids(client: RoostClient) -> list[str]:
    res = client.call("contacts")
    return [c["id"] for c in res.get("contacts") or [] if isinstance(c, dict) and is_valid_principal_id(c.get("id"))]


def _device_ids(client: RoostClient) -> list[str]:
    try:
        res = client.call("devices")
    except ServerError:   # a broker without the devices feature: contacts only
        return []
    return [d["id"] for d in res.get("devices") or [] if isinstance(d, dict) and is_valid_principal_id(d.get("id"))]


def _subscribe_presence(client: RoostClient, ids: list[str]) -> dict[str, bool]:
    if not ids:
        return {}
    grants = client.subscribe([topics.presence(i) for i in ids])
    return {topics.tail(t, topics.PRESENCE) or t: ok for t, ok in grants.items()}


@command()
@click.argument("target", metavar="PEER|CONV")
@click.option("--history", "history_n", default=CHAT_HISTORY, show_default=True, type=click.IntRange(0, HISTORY_MAX),
              help="How many earlier messages to show on open.")
@network(stream=True)
def chat(net: Net, target: str, history_n: int) -> None:
    """Chat with a person, a device or a group, interactively.

    Shows the latest messages, then incoming ones as they arrive; every line you
    type is sent; messages shown are marked read. Standard input may be a pipe:
    its lines are sent and the command ends at end of input. Type /quit or
    Ctrl-D to leave.

    \b
    Examples:
      roost chat bob
      printf 'hello\\nare you home?\\n' | roost chat bob
    """
    me = net.me
    conv = conv_of(target, me)
    params = target_params(target)
    out = net.out
    client = net.open()
    stream = EventStream(client)
    stream.start_at_head()
    hist = client.call("history", {"conv": conv, "limit": history_n}) if history_n else {"messages": []}
    last_read = 0
    latest_other = 0
    for m in hist.get("messages") or []:
        _print_chat_msg(m, conv, me, net)
        if isinstance(m.get("seq"), int) and m.get("from") != me:
            latest_other = max(latest_other, m["seq"])
    # stderr, also with --json: the sign that the chat is live
    out.warn(f"chatting in {conv} as {me}; type a message and press Enter, /quit to leave")

    interactive = sys.stdin.isatty()

    def read_lines() -> None:
        try:
            for line in sys.stdin:
                client.post(("line", line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        client.post(("eof", None))

    threading.Thread(target=read_lines, daemon=True, name="stdin").start()
    watch = ConnectionWatch(client, out)
    unsent = 0
    try:
        while True:
            if latest_other > last_read and client.connected:
                try:
                    client.call("read", {"conv": conv, "seq": latest_other})
                    last_read = latest_other
                except ServerError as e:
                    out.warn(f"could not mark read: {e.message}")
                    last_read = latest_other       # the server refuses it: asking again won't help
                except (RequestTimeout, ConnectError):
                    pass                           # retried on the next round
            for item in stream.poll(1.0):
                if isinstance(item, InboxItem):
                    ev = item.event
                    if ev.get("conv") != conv:
                        continue
                    kind = ev.get("kind")
                    if kind == "msg":
                        _print_chat_msg(ev, conv, me, net)
                        if ev.get("from") != me and isinstance(ev.get("seq"), int):
                            latest_other = max(latest_other, ev["seq"])
                    elif kind in ("delivered", "read", "group"):
                        if net.json_mode:
                            out.jsonl(ev)
                        elif kind != "delivered":
                            out.line(out.s(event_line(ev, me, out), fg="bright_black"))
                elif isinstance(item, LocalItem):
                    what, line = item.value
                    if what == "eof" or line.strip() in ("/quit", "/exit"):
                        if unsent:
                            raise CliError(f"{unsent} line(s) could not be sent", EXIT_SERVER_ERROR)
                        return
                    if not line.strip():
                        continue
                    try:
                        res = client.send({"type": "text", "text": line}, **params)
                    except (RequestTimeout, ConnectError, ServerError) as e:
                        # Keep chatting; a piped chat still ends non-zero (below).
                        unsent += 1
                        out.warn(f"not sent: {to_cli_error(e).format_message()}")
                        continue
                    if net.json_mode:
                        out.jsonl({"kind": "sent", **res})
                    elif not interactive:
                        out.line(out.s(f"sent #{res.get('seq')}", fg="bright_black"))
                elif isinstance(item, ReconnectedItem):
                    watch.reconnected()
            watch.check()
    finally:
        stream.flush_ack(force=True)


def _print_chat_msg(m: dict[str, Any], conv: str, me: str, net: Net) -> None:
    if net.json_mode:
        net.out.jsonl({"kind": "msg", "conv": conv, **{k: v for k, v in m.items() if k != "kind"}})
        return
    out = net.out
    sender = who(m.get("from"), me)
    colour = "green" if sender == "you" else "cyan"
    out.line(f"{out.s(fmt_time(m.get('ts')), fg='bright_black')} {out.s(sender, fg=colour, bold=True)}: {render_body(m.get('body'))}")


@command()
@click.argument("target", metavar="CONV|PEER")
@click.option("--limit", "-n", default=50, show_default=True, type=click.IntRange(1, HISTORY_MAX), help="How many messages.")
@click.option("--before", type=click.IntRange(min=1), metavar="SEQ", help="Only messages before this sequence number.")
@network()
def history(net: Net, target: str, limit: int, before: int | None) -> None:
    """Show the messages of a conversation, oldest first.

    \b
    Examples:
      roost history bob --limit 20
      roost history grp:k3x9 --before 120 --json | jq '.messages[].body.text'
    """
    conv = conv_of(target, net.me)
    client = net.open(inbox=False)
    params: dict[str, Any] = {"conv": conv, "limit": limit}
    if before is not None:
        params["before"] = before
    res = client.call("history", params)
    if net.json_mode:
        net.out.doc(res)
        return
    me = net.me
    net.out.table(res.get("messages") or [], [
        Column("seq", "seq", align_right=True),
        Column("ts", "time", fmt_time),
        Column("from", "from", lambda v: who(v, me)),
        Column("body", "message", render_body),
    ], empty=f"no messages in {conv}")


@command()
@network()
def convs(net: Net) -> None:
    """List your conversations with their last message and unread counts.

    \b
    Examples:
      roost convs
      roost convs --json | jq '.total_unread'
    """
    client = net.open(inbox=False)
    res = client.call("convs")
    if net.json_mode:
        net.out.doc(res)
        return
    rows = []
    for c in res.get("convs") or []:
        if not isinstance(c, dict):
            continue
        last = c.get("last")
        rows.append({**c, "with": c.get("peer") or c.get("name"), "last_text": _last_text(last), "last_ts": last.get("ts") if isinstance(last, dict) else None})
    out = net.out
    out.table(rows, [
        Column("conv", "conv"),
        Column("kind", "kind"),
        Column("with", "with"),
        Column("last_ts", "when", fmt_time),
        Column("last_text", "last message", lambda v: _clip(fmt_value(v), 50)),
        Column("unread", "unread", align_right=True, colour=lambda s: "yellow" if s not in ("0", "-") else None),
    ], empty="no conversations yet")
    out.line(f"total unread: {res.get('total_unread', 0)}", bold=True)


def _last_text(last: Any) -> str | None:
    if isinstance(last, dict):
        sender = last.get("from")
        text = render_body(last.get("body")) if "body" in last else fmt_value(last.get("seq"))
        return f"{sender}: {text}" if sender else text
    return None if last is None else f"#{last}"


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


# ---- social ------------------------------------------------------------------------

@command()
@network()
def contacts(net: Net) -> None:
    """List your contacts with their presence.

    \b
    Example:
      roost contacts
    """
    client = net.open(inbox=False)
    res = client.call("contacts")
    if net.json_mode:
        net.out.doc(res)
        return
    out = net.out
    out.table(res.get("contacts") or [], [
        Column("id", "id"), Column("kind", "kind"), Column("name", "name"),
        Column("presence", "presence", presence_text, colour=presence_colour),
    ], empty="no contacts yet (`roost contact request ID` asks someone)")
    # Pending requests and blocks are extensions some brokers add to the result.
    for r in res.get("incoming") or []:
        if isinstance(r, dict):
            note = f' "{r["note"]}"' if r.get("note") else ""
            out.line(f"request from {r.get('from')}{note} (roost contact accept {r.get('from')})", fg="magenta")
    for r in res.get("outgoing") or []:
        if isinstance(r, dict):
            out.line(f"waiting for {r.get('to')} to accept", fg="bright_black")
    blocked = [str(b) for b in res.get("blocked") or []]
    if blocked:
        out.line(f"blocked: {', '.join(blocked)}", fg="bright_black")


@group()
def contact() -> None:
    """Ask, accept, reject, remove, block and unblock contacts.

    \b
    Example:
      roost contact request bob --note "it's Alice from next door"
      roost contact accept alice
    """


def _contact_cmd(action: str, op: str, param: str, done: str, help_text: str) -> click.Command:
    @click.argument("user_id", metavar="ID")
    @network()
    def cmd(net: Net, user_id: str, note: str | None = None) -> None:
        principal_arg(user_id)
        client = net.open(inbox=False)
        params: dict[str, Any] = {param: user_id}
        if note:
            params["note"] = note
        res = client.call(op, params)
        if net.json_mode:
            net.out.doc({"ok": True, "action": action, "user": user_id, "result": res})
        else:
            net.out.line(done.format(id=user_id))

    cmd.__doc__ = help_text
    if action == "request":
        cmd = click.option("--note", metavar="TEXT", help="A note the other person sees with the request.")(cmd)
    return contact.command(action)(cmd)


_contact_cmd("request", "contact.request", "to", "contact request sent to {id}",
             "Ask ID to become a contact.\n\n\b\nExample:\n  roost contact request bob --note \"hi, it's Alice\"")
_contact_cmd("accept", "contact.accept", "from", "{id} is now a contact",
             "Accept ID's contact request.\n\n\b\nExample:\n  roost contact accept alice")
_contact_cmd("reject", "contact.reject", "from", "rejected {id}'s request",
             "Reject ID's contact request.\n\n\b\nExample:\n  roost contact reject mallory")
_contact_cmd("remove", "contact.remove", "user", "{id} is no longer a contact",
             "Remove ID from your contacts.\n\n\b\nExample:\n  roost contact remove bob")
_contact_cmd("block", "contact.block", "user", "blocked {id}",
             "Block ID: their requests and messages no longer reach you.\n\n\b\nExample:\n  roost contact block mallory")
_contact_cmd("unblock", "contact.unblock", "user", "unblocked {id}",
             "Unblock ID.\n\n\b\nExample:\n  roost contact unblock mallory")


@command()
@click.argument("query")
@network()
def search(net: Net, query: str) -> None:
    """Find people by exact id or by the start of their name (2+ characters).

    \b
    Examples:
      roost search bob
      roost search "Ali"
    """
    client = net.open(inbox=False)
    res = client.call("user.search", {"q": query})
    if net.json_mode:
        net.out.doc(res)
        return
    net.out.table(res.get("users") or [], [Column("id", "id"), Column("kind", "kind"), Column("name", "name")],
                  empty=f"nobody matches '{query}'")


@command()
@click.argument("user_id", metavar="[ID]", required=False)
@click.option("--name", metavar="NAME", help="Set your display name.")
@click.option("--status", metavar="TEXT", help="Set your status text.")
@network()
def profile(net: Net, user_id: str | None, name: str | None, status: str | None) -> None:
    """Show a profile (yours by default), or set your name and status.

    \b
    Examples:
      roost profile
      roost profile bob
      roost profile --name "Alice M." --status "in the garden"
    """
    if user_id is not None:
        principal_arg(user_id)
        if name is not None or status is not None:
            raise click.UsageError("--name/--status change your own profile; leave out ID")
    client = net.open(inbox=False)
    if name is not None or status is not None:
        params = {k: v for k, v in (("name", name), ("status", status)) if v is not None}
        res = client.call("profile.set", params)
    else:
        res = client.call("profile.get", {"user": user_id or net.me})
    if net.json_mode:
        net.out.doc(res)
    else:
        net.out.kv([("user", res.get("user")), ("kind", res.get("kind")), ("name", res.get("name")),
                    ("status", res.get("status"))])


@command()
@click.argument("ids", metavar="[ID]...", nargs=-1)
@click.option("--follow", "-f", is_flag=True, help="Keep watching and print every change.")
@click.option("--wait", default=2.0, show_default=True, type=click.FloatRange(0.1, 30),
              help="Seconds to wait for the retained state of each id.")
@network(stream=True)
def presence(net: Net, ids: tuple[str, ...], follow: bool, wait: float) -> None:
    """Show who is online (you and your contacts by default).

    Reads the retained roost/presence/<id> of each id; ids you may not see are
    reported as such.

    \b
    Examples:
      roost presence
      roost presence bob thermo1 --follow
    """
    for i in ids:
        principal_arg(i)
    me = net.me
    client = net.open(inbox=False)
    wanted = list(dict.fromkeys(ids or [me, *_contact_ids(client)]))
    grants = _subscribe_presence(client, wanted)
    states: dict[str, Any] = {}
    deadline = time.monotonic() + wait
    pending = {i for i in wanted if grants.get(i)}
    while pending and time.monotonic() < deadline:
        try:
            item = client.items.get(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:
            break
        if isinstance(item, TopicItem):
            pid = topics.tail(item.topic, topics.PRESENCE)
            if pid in pending:
                states[pid] = item.payload
                pending.discard(pid)
    rows = []
    for i in wanted:
        p = states.get(i)
        row = {"id": i, "visible": bool(grants.get(i))}
        if isinstance(p, dict):
            row.update(p)
        else:
            row["state"] = "unknown" if grants.get(i) else "not visible"
        rows.append(row)
    out = net.out
    if net.json_mode:
        if follow:
            for r in rows:
                out.jsonl({"kind": "presence", **r})
        else:
            out.doc({"presence": rows})
    else:
        out.table(rows, [
            Column("id", "id"),
            Column("state", "state", lambda v: fmt_value(v), colour=presence_colour),
            Column("clients", "clients", align_right=True),
            Column("since", "since", fmt_time),
            Column("last_seen", "last seen", fmt_time),
        ])
    if not follow:
        return
    watch = ConnectionWatch(client, out)
    while True:
        try:
            item = client.items.get(timeout=1.0)
        except Exception:
            watch.check()
            continue
        if isinstance(item, TopicItem):
            pid = topics.tail(item.topic, topics.PRESENCE)
            if pid is None or (item.retained and states.get(pid) == item.payload):
                continue
            states[pid] = item.payload
            if net.json_mode:
                out.jsonl({"kind": "presence", "id": pid, **(item.payload if isinstance(item.payload, dict) else {})})
            else:
                out.line(presence_line(pid, item.payload, out))
        elif isinstance(item, ReconnectedItem):
            watch.reconnected()
        watch.check()


@group("group")
def group_cmd() -> None:
    """Create and manage group conversations.

    \b
    Example:
      roost group create "Family" bob carol
      roost group info grp:k3x9
    """


@group_cmd.command("create")
@click.argument("name")
@click.argument("members", metavar="MEMBER...", nargs=-1, required=True)
@network()
def group_create(net: Net, name: str, members: tuple[str, ...]) -> None:
    """Create a group NAME with you and MEMBERs; prints its conversation id.

    \b
    Example:
      roost group create "Family" bob carol
    """
    for m in members:
        principal_arg(m, "MEMBER")
    client = net.open(inbox=False)
    res = client.call("group.create", {"name": name, "members": list(members)})
    if net.json_mode:
        net.out.doc(res)
    else:
        net.out.line(f"created {res.get('conv')}")


def _group_members_cmd(action: str, verb: str) -> None:
    help_text = (f"{action.capitalize()} MEMBERs {'to' if action == 'add' else 'from'} the group CONV.\n\n"
                 f"\b\nExample:\n  roost group {action} grp:k3x9 dave")

    @group_cmd.command(action, help=help_text)
    @click.argument("conv", metavar="CONV")
    @click.argument("members", metavar="MEMBER...", nargs=-1, required=True)
    @network()
    def cmd(net: Net, conv: str, members: tuple[str, ...]) -> None:
        _check_group(conv)
        for m in members:
            principal_arg(m, "MEMBER")
        client = net.open(inbox=False)
        res = client.call(f"group.{action}", {"conv": conv, "members": list(members)})
        if net.json_mode:
            net.out.doc({"ok": True, "conv": conv, action: list(members), "result": res})
        else:
            net.out.line(f"{verb} {', '.join(members)}")



_group_members_cmd("add", "added")
_group_members_cmd("remove", "removed")


def _check_group(conv: str) -> None:
    parsed = parse_conv(conv)
    if parsed is None or parsed[0] != "grp":
        raise click.BadParameter(f"'{conv}' is not a group conversation id (grp:<id>)", param_hint="CONV")


@group_cmd.command("leave")
@click.argument("conv", metavar="CONV")
@network()
def group_leave(net: Net, conv: str) -> None:
    """Leave the group CONV.

    \b
    Example:
      roost group leave grp:k3x9
    """
    _check_group(conv)
    client = net.open(inbox=False)
    res = client.call("group.leave", {"conv": conv})
    if net.json_mode:
        net.out.doc({"ok": True, "conv": conv, "result": res})
    else:
        net.out.line(f"left {conv}")


@group_cmd.command("info")
@click.argument("conv", metavar="CONV")
@network()
def group_info(net: Net, conv: str) -> None:
    """Show a group's name and members.

    \b
    Example:
      roost group info grp:k3x9
    """
    _check_group(conv)
    client = net.open(inbox=False)
    res = client.call("group.info", {"conv": conv})
    if net.json_mode:
        net.out.doc(res)
        return
    members = res.get("members") or []
    names = [m.get("id", fmt_value(m)) if isinstance(m, dict) else str(m) for m in members]
    net.out.kv([("conv", res.get("conv")), ("name", res.get("name")), ("members", ", ".join(names))])


# ---- devices -----------------------------------------------------------------------

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
        Column("last_telemetry", "last telemetry", lambda v: _clip(fmt_kv(v), 60)),
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


# ---- registration -------------------------------------------------------------------

COMMANDS: list[click.Command] = [
    login, logout, send, listen, chat, history, convs,
    contacts, contact, search, profile, presence, group_cmd,
    devices, claim, share, cmd, telemetry,
]


def register(group: click.Group) -> None:
    """Add the person-side commands to the root `roost` group."""
    for command in COMMANDS:
        group.add_command(command)


@click.group()
def _standalone() -> None:
    """Roost person-side commands (standalone entry for development)."""


register(_standalone)

if __name__ == "__main__":
    _standalone(prog_name="roost")
