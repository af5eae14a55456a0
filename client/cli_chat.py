"""The person-side `roost` commands: login, logout and chat (send, listen, chat,
history, convs); `register(group)` adds these and those of cli_social and
cli_devices to the root click group (client/cli.py).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Any

import click

from client import config as cfgmod
from client.cli_common import (
    ConnectionWatch,
    Net,
    clip,
    command,
    contact_ids,
    conv_of,
    device_ids,
    event_line,
    guarded,
    network,
    one_shot_label,
    principal_arg,
    print_presence,
    read_password_stdin,
    request_timeout,
    stream_label,
    subscribe_presence,
    target_params,
    to_cli_error,
    who,
)
from client.config import ClientConfig
from client.output import (
    EXIT_SERVER_ERROR,
    EXIT_USAGE,
    CliError,
    Column,
    Output,
    Progress,
    fmt_size,
    fmt_time,
    fmt_value,
    render_body,
)
from client.sdk import (
    ConnectError,
    CursorStore,
    EventStream,
    InboxItem,
    LocalItem,
    ReconnectedItem,
    RequestTimeout,
    RoostClient,
    RoostError,
    ServerError,
    TopicItem,
)
from contract import topics
from contract.ids import CLIENT_LABEL_RE, is_valid_principal_id, parse_conv

HISTORY_MAX = 200
CHAT_HISTORY = 20
READ_INTERVAL = 0.3     # seconds between `read` requests of one chat
FILE_READ_MAX = 1 << 30 # the broker's files.max_size is far smaller; this only bounds our memory


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
      roost login --server mqtts://hub.local alice     # mqtts:// means --tls
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
        use_tls = cfgmod.server_tls(server_text, use_tls)   # as every other command does
        srv = cfgmod.parse_server(server_text, tls=use_tls)
        if password_stdin:
            password = read_password_stdin()
        elif os.environ.get(cfgmod.ENV_PASSWORD) or os.environ.get(cfgmod.ENV_SECRET):
            password = os.environ.get(cfgmod.ENV_PASSWORD) or os.environ[cfgmod.ENV_SECRET]
        elif not sys.stdin.isatty():
            raise CliError("no terminal to ask the password on: use --password-stdin or set ROOST_PASSWORD",
                           EXIT_USAGE)
        else:
            password = click.prompt(f"Password for {user_id}", hide_input=True, err=True)
        ca = ca_file or os.environ.get(cfgmod.ENV_CA) or stored.ca_file
        if ca:
            ca = os.path.abspath(ca)   # later commands may run from another directory
        client = RoostClient(srv, user_id, password, tls=use_tls, ca_file=ca,
                             label=one_shot_label(), subscribe_inbox=False,
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
@click.argument("text", nargs=-1)
@click.option("--cmid", metavar="ID", help="Client message id; re-running with the same one never sends twice.")
@click.option("--file", "file_path", metavar="PATH", type=click.Path(exists=True, dir_okay=False),
              help="Send this picture or file (uploaded to the broker) instead of text.")
@network()
def send(net: Net, target: str, text: tuple[str, ...], cmid: str | None, file_path: str | None) -> None:
    """Send a text message, or a picture or file, to a person, a device or a conversation.

    Prints the conversation and the message's sequence number. The send is
    retried with the same client message id, so it is stored at most once.
    TEXT "-" reads the message from standard input.

    \b
    Examples:
      roost send bob "dinner at 8?"
      roost send grp:k3x9 on my way
      uptime | roost send bob -
      roost send bob --file cat.jpg
    """
    params = target_params(target)
    if file_path is not None:
        if text:
            raise click.BadParameter("give a message or --file, not both", param_hint="TEXT")
        _send_file(net, params, file_path)
        return
    if not text:
        raise click.MissingParameter("give the message, or --file PATH", param_hint="'TEXT...'",
                                     param_type="argument")
    message = sys.stdin.read().rstrip("\n") if text == ("-",) else " ".join(text)
    if not message.strip():   # as in `chat`, where blank lines are not sent
        raise click.BadParameter("the message is empty", param_hint="TEXT")
    client = net.open(inbox=False)
    cmid = cmid or uuid.uuid4().hex
    result: dict[str, Any] | None = None
    last_error: RoostError | None = None
    with Progress("sending", net.out.err):
        for _attempt in range(3):
            try:
                result = client.send({"type": "text", "text": message}, to=params.get("to"), conv=params.get("conv"),
                                     cmid=cmid)
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


def _send_file(net: Net, params: dict[str, str], file_path: str) -> None:
    name = os.path.basename(file_path)
    try:
        with open(file_path, "rb") as f:
            data = f.read(FILE_READ_MAX + 1)
    except OSError as e:
        raise CliError(f"cannot read {file_path}: {e.strerror}", EXIT_USAGE) from None
    if len(data) > FILE_READ_MAX:
        raise CliError(f"{file_path} is larger than {FILE_READ_MAX} bytes", EXIT_USAGE)
    client = net.open(inbox=False)
    with Progress("uploading", net.out.err):
        result = client.send_file(data, name, to=params.get("to"), conv=params.get("conv"))
    if net.json_mode:
        net.out.doc(result)
    else:
        net.out.line(f"sent {result.get('conv')} #{result.get('seq')} ({name}, {fmt_size(len(data))})")


@command()
@click.argument("file_id", metavar="FILE_ID")
@click.option("--out", "-o", "out_path", metavar="PATH", type=click.Path(dir_okay=True),
              help="Where to save it (default: its name, in the current folder; - for standard output).")
@network()
def download(net: Net, file_id: str, out_path: str | None) -> None:
    """Save a picture or file sent to you (its id is in `roost history --json`).

    \b
    Examples:
      roost download 3f7a...e1 -o cat.jpg
    """
    client = net.open(inbox=False)
    with Progress("downloading", net.out.err):
        try:
            meta, data = client.download_file(file_id)
        except ValueError as e:   # the bytes do not match the id
            raise CliError(str(e), EXIT_SERVER_ERROR) from None
    if out_path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    target = out_path or os.path.basename(str(meta["name"])) or file_id
    if os.path.isdir(target):
        target = os.path.join(target, os.path.basename(str(meta["name"])) or file_id)
    try:
        with open(target, "xb") as f:   # never overwrite what is there
            f.write(data)
    except FileExistsError:
        raise CliError(f"{target} exists already (choose another with --out)", EXIT_USAGE) from None
    except OSError as e:
        raise CliError(f"cannot write {target}: {e.strerror}", EXIT_USAGE) from None
    if net.json_mode:
        net.out.doc({**meta, "path": target})
    else:
        net.out.line(f"saved {target} ({fmt_size(len(data))})")


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
    printer: ListenPrinter | None = None
    try:
        client = net.open(label=label)
        stream = EventStream(client, store=store)
        out = net.out
        saved = since if since is not None else store.load()
        if saved is None:
            stream.start_at_head()
            missed: list[dict[str, Any]] = []
        else:
            if since is not None:
                stream.cursor = since
            else:
                note = stream.resume(saved, store.load_ts())
                if note:
                    out.warn(note)
            saved = stream.cursor
            missed = stream.catch_up()
        convs_now = client.call("convs")
        groups = group_names(convs_now)
        printer = ListenPrinter(me, net, UnreadTracker(me, convs_now), groups)
        # Presence of contacts and of one's own devices (both visible to us by the contract).
        subscribe_presence(client, list(dict.fromkeys(contact_ids(client) + device_ids(client))))
        # stderr: a person reads it, scripts wait for it, the JSON on stdout stays clean
        out.warn(f"listening as {me} on {client.server} from event #{saved if saved is not None else stream.cursor}"
                 f"{f' ({len(missed)} missed)' if missed else ''}; Ctrl-C to stop")
        for ev in missed:
            if not net.json_mode:   # JSON lines are the events as they are
                learn_group_name(client, groups, ev)
            printer.show(ev)
        watch = ConnectionWatch(client, out)
        while True:
            items = stream.poll(1.0)
            if not items:
                printer.flush()     # a message line waited long enough for its count
            for item in items:
                if isinstance(item, InboxItem):
                    ev = item.event
                    if not net.json_mode:
                        learn_group_name(client, groups, ev)
                    printer.show(ev)
                    if ev.get("kind") == "contact" and ev.get("event") == "accepted" and is_valid_principal_id(ev.get("with")):
                        try:
                            subscribe_presence(client, [ev["with"]])
                        except RoostError as e:  # presence is a nicety; the stream goes on
                            out.warn(f"cannot watch {ev['with']}'s presence: {e}")
                elif isinstance(item, TopicItem):
                    pid = topics.tail(item.topic, topics.PRESENCE)
                    if pid is not None and not item.retained:
                        printer.flush()
                        print_presence(net, pid, item.payload)
                elif isinstance(item, ReconnectedItem):
                    watch.reconnected()
            watch.check()
    finally:
        if printer is not None:
            printer.flush()
        if stream is not None:
            try:
                stream.flush_ack(force=True)
            except Exception:  # the connection may be gone; the cursor is saved on the next run's ack
                pass
        store.unlock()


class UnreadTracker:
    """Unread counts per conversation, as the server tells them: the `convs`
    numbers read at start, then every `unread` event (the broker follows every
    change with one: a new message from someone else, a read on any of your
    devices, ...). Nothing is counted here (PROTOCOL.md, Events).
    """

    def __init__(self, me: str, convs_result: dict[str, Any]) -> None:
        self.me = me
        self.counts: dict[str, int] = {}
        self.snapshot_seq: dict[str, int] = {}   # messages up to here are in the counts read at start
        for c in convs_result.get("convs") or []:
            if isinstance(c, dict) and isinstance(c.get("conv"), str) and isinstance(c.get("unread"), int):
                self.counts[c["conv"]] = c["unread"]
                last = c.get("last_seq")
                if not isinstance(last, int) and isinstance(c.get("last"), dict):
                    last = c["last"].get("seq")
                if isinstance(last, int):
                    self.snapshot_seq[c["conv"]] = last

    def counted_message(self, ev: dict[str, Any]) -> bool:
        """A live message from someone else: its `unread` event follows it."""
        conv, seq = ev.get("conv"), ev.get("seq")
        if ev.get("kind") != "msg" or ev.get("from") == self.me or not isinstance(conv, str):
            return False
        # A replayed one was counted before the start: the count after it is history.
        return not (isinstance(seq, int) and seq <= self.snapshot_seq.get(conv, 0))

    def apply(self, ev: dict[str, Any]) -> bool:
        """Take the numbers of an `unread` event; False if it told nothing new."""
        conv, count = ev.get("conv"), ev.get("count")
        if ev.get("kind") != "unread" or not isinstance(conv, str) or not isinstance(count, int):
            return True
        new = self.counts.get(conv) != count
        self.counts[conv] = count
        return new


class ListenPrinter:
    """`listen`'s output. A live message from someone else is shown with the
    server's count after it (`(N unread, M in all)`): its line waits for the
    `unread` event right behind it in the mailbox (same transaction), which then
    is not shown on a line of its own. An `unread` event that tells nothing new
    is not shown either. JSON lines are the events as they are.
    """

    def __init__(self, me: str, net: Net, unread: UnreadTracker, groups: dict[str, str]) -> None:
        self.me, self.net, self.unread, self.groups = me, net, unread, groups
        self._held: dict[str, Any] | None = None    # a message line waiting for its count

    def show(self, ev: dict[str, Any]) -> None:
        if self.net.json_mode:
            self.net.out.jsonl(ev)
            return
        held, self._held = self._held, None
        if held is not None:
            if ev.get("kind") == "unread" and ev.get("conv") == held.get("conv") and isinstance(ev.get("count"), int):
                self.unread.apply(ev)
                self._line(held, f"{ev['count']} unread, {ev.get('total')} in all")
                return
            self._line(held)
        if self.unread.counted_message(ev):
            self._held = ev
        elif self.unread.apply(ev):
            self._line(ev)

    def flush(self) -> None:
        """Show a waiting message line without its count (no `unread` event came)."""
        held, self._held = self._held, None
        if held is not None:
            self._line(held)

    def _line(self, ev: dict[str, Any], note: str | None = None) -> None:
        out = self.net.out
        line = event_line(ev, self.me, out, self.groups)
        out.line(f"{line}  {out.s(f'({note})', fg='yellow')}" if note else line)


def group_names(convs_result: dict[str, Any]) -> dict[str, str]:
    """conv -> name of every group in a `convs` result (group lines name their group)."""
    return {c["conv"]: c["name"] for c in convs_result.get("convs") or []
            if isinstance(c, dict) and c.get("kind") == "group" and isinstance(c.get("conv"), str)
            and isinstance(c.get("name"), str)}


def learn_group_name(client: RoostClient, groups: dict[str, str], ev: dict[str, Any]) -> None:
    """Keep `groups` up to date from a group event: `created` carries the name; for a
    group one was just added to, `group.info` tells it (once per group)."""
    conv = ev.get("conv")
    if ev.get("kind") != "group" or not isinstance(conv, str):
        return
    if isinstance(ev.get("name"), str):
        groups[conv] = ev["name"]
    elif conv not in groups:
        try:
            name = client.call("group.info", {"conv": conv}).get("name")
        except RoostError:      # removed meanwhile, or a lost connection: the line shows the id
            name = None
        groups[conv] = name if isinstance(name, str) else ""


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
    client = net.open(label=stream_label("chat"))
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
    next_read = 0.0

    def mark_read(force: bool = False) -> None:
        # One `read` for everything shown so far, at most every READ_INTERVAL: a busy
        # conversation must not run into the broker's request rate limit.
        nonlocal last_read, next_read
        if latest_other <= last_read or not client.connected:
            return
        if not force and time.monotonic() < next_read:
            return
        next_read = time.monotonic() + READ_INTERVAL
        try:
            client.call("read", {"conv": conv, "seq": latest_other})
            last_read = latest_other
        except ServerError as e:
            out.warn(f"could not mark read: {e.message}")
            last_read = latest_other       # the server refuses it: asking again won't help
        except (RequestTimeout, ConnectError):
            pass                           # retried on the next round

    try:
        while True:
            mark_read()
            for item in stream.poll(READ_INTERVAL if latest_other > last_read else 1.0):
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
                        mark_read(force=True)
                        if unsent:
                            raise CliError(f"{unsent} line(s) could not be sent", EXIT_SERVER_ERROR)
                        return
                    if not line.strip():
                        continue
                    try:
                        res = client.send({"type": "text", "text": line}, to=params.get("to"), conv=params.get("conv"))
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
        try:
            mark_read(force=True)
        except Exception:   # leaving must not fail; the next open marks it read anyway
            pass
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
    me = net.me
    messages = res.get("messages") or []
    if not messages:
        check_peer_exists(client, conv, me)
    if net.json_mode:
        net.out.doc(res)
        return
    net.out.table(messages, [
        Column("seq", "seq", align_right=True),
        Column("ts", "time", fmt_time),
        Column("from", "from", lambda v: who(v, me)),
        Column("body", "message", render_body),
    ], empty=f"no messages in {conv}")
    first = messages[0].get("seq") if messages and isinstance(messages[0], dict) else None
    if res.get("more") and isinstance(first, int):
        net.out.line(f"older messages: roost history {target} --before {first}", fg="bright_black")


def check_peer_exists(client: RoostClient, conv: str, me: str) -> None:
    """An empty history of a direct conversation with an id nobody has is a typo, not
    "no messages": the broker answers it like a quiet conversation, so ask for the
    other side's profile, whose `not_found` is the same as `send`'s."""
    parsed = parse_conv(conv)
    if parsed is None or parsed[0] != "dm":
        return
    peer = next((p for p in parsed[1] if p != me), me)
    try:
        client.call("profile.get", {"user": peer})
    except ServerError as e:
        if e.code == "not_found":
            raise
        # forbidden (a stranger) and the like: the person exists; an empty history is right


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
    me = net.me
    rows = []
    for c in res.get("convs") or []:
        if not isinstance(c, dict):
            continue
        last = c.get("last")
        rows.append({**c, "with": c.get("peer") or c.get("name"), "last_text": _last_text(last, me),
                     "last_ts": last.get("ts") if isinstance(last, dict) else None})
    out = net.out
    out.table(rows, [
        Column("conv", "conv"),
        Column("kind", "kind"),
        Column("with", "with"),
        Column("last_ts", "when", fmt_time),
        Column("last_text", "last message", lambda v: clip(fmt_value(v), 50)),
        Column("unread", "unread", align_right=True, colour=lambda s: "yellow" if s not in ("0", "-") else None),
    ], empty="no conversations yet")
    out.line(f"total unread: {res.get('total_unread', 0)}", bold=True)


def _last_text(last: Any, me: str) -> str | None:
    if isinstance(last, dict):
        sender = who(last["from"], me) if last.get("from") else None
        text = render_body(last.get("body")) if "body" in last else fmt_value(last.get("seq"))
        return f"{sender}: {text}" if sender else text
    return None if last is None else f"#{last}"


# ---- registration -------------------------------------------------------------------

def _commands() -> list[click.Command]:
    from client import cli_devices, cli_social

    return [login, logout, send, download, listen, chat, history, convs, *cli_social.COMMANDS, *cli_devices.COMMANDS]


def register(group: click.Group) -> None:
    """Add the person-side commands to the root `roost` group."""
    from client import cli_devices

    for c in _commands():
        group.add_command(c)
    # `roost device commands ID` sits with the admin `device` commands (cli_admin),
    # where a new user looks for it, but asks the broker as a person.
    admin_device = group.commands.get("device")
    if isinstance(admin_device, click.Group):
        admin_device.add_command(cli_devices.device_commands)
