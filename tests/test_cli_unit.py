"""The person-side CLI without a broker: config file, output, argument checks,
and every network command against an address where nothing listens."""

from __future__ import annotations

import io
import json
import os
import stat

import click
import pytest
from click.testing import CliRunner

from client import config as cfgmod
from client.cli_chat import register
from client.cli_common import presence_line
from client.cli_devices import parse_args
from client.cli_social import presence_row
from client.config import ClientConfig, ClientConfigError
from client.output import Column, Output, fmt_seen, fmt_time, presence_state, presence_text, render_body
from tests.harness import free_port


@pytest.fixture
def cli():
    @click.group()
    def root() -> None:
        pass

    register(root)
    return root


@pytest.fixture
def env(tmp_path):
    """A clean environment: no login, config and state under tmp_path."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    keep.update(XDG_CONFIG_HOME=str(tmp_path / "cfg"), XDG_STATE_HOME=str(tmp_path / "state"), NO_COLOR="1")
    return keep


def run(cli, env, *args, input=None):
    # CliRunner's env only adds/overrides; unset the ROOST_* the outer shell may have.
    full = {k: None for k in os.environ if k.startswith("ROOST_")}
    full.update(env)
    return CliRunner(env=full).invoke(cli, list(args), input=input, catch_exceptions=False)


# ---- config file ------------------------------------------------------------------

def test_config_saved_with_mode_0600_and_read_back(tmp_path):
    path = tmp_path / "roost" / "client.json"
    cfgmod.save(ClientConfig(server="h:1884", user="alice", secret="s3cret", tls=True), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cfgmod.load(path) == ClientConfig(server="h:1884", user="alice", secret="s3cret", tls=True)
    assert cfgmod.remove(path) is True
    assert cfgmod.load(path) is None
    assert cfgmod.remove(path) is False


def test_config_path_follows_xdg(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "x"), "HOME": str(tmp_path / "home")}
    assert cfgmod.config_path(env) == tmp_path / "x" / "roost" / "client.json"
    assert cfgmod.config_path({"HOME": str(tmp_path / "home")}) == tmp_path / "home" / ".config" / "roost" / "client.json"
    assert cfgmod.state_dir({"XDG_STATE_HOME": str(tmp_path / "s")}) == tmp_path / "s" / "roost"


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    ("[1]", "JSON object"),
    ('{"server": "h", "bogus": 1}', "unknown key"),
    ('{"tls": "yes"}', "'tls' must be true or false"),
    ('{"user": 5}', "'user' must be a string"),
])
def test_damaged_config_is_refused_clearly(tmp_path, content, fragment):
    path = tmp_path / "client.json"
    path.write_text(content)
    with pytest.raises(ClientConfigError, match=fragment):
        cfgmod.load(path)


def test_flags_beat_environment_beat_file(tmp_path):
    path = tmp_path / "client.json"
    cfgmod.save(ClientConfig(server="filehost:1000", user="alice", secret="filepw"), path)
    base = {cfgmod.ENV_CLIENT_CONFIG: str(path)}
    s = cfgmod.resolve(env=base)
    assert (str(s.server), s.user, s.secret, s.tls) == ("filehost:1000", "alice", "filepw", False)
    s = cfgmod.resolve(env={**base, "ROOST_SERVER": "envhost", "ROOST_PASSWORD": "envpw", "ROOST_TLS": "1"})
    assert (str(s.server), s.secret, s.tls) == ("envhost:8883", "envpw", True)
    s = cfgmod.resolve(server="flaghost:2", password="flagpw", tls=False, env={**base, "ROOST_SERVER": "envhost"})
    assert (str(s.server), s.secret, s.tls) == ("flaghost:2", "flagpw", False)
    # ROOST_SECRET is an alias of ROOST_PASSWORD
    assert cfgmod.resolve(env={**base, "ROOST_SECRET": "x"}).secret == "x"


def test_stored_secret_is_never_sent_for_another_user(tmp_path):
    path = tmp_path / "client.json"
    cfgmod.save(ClientConfig(user="alice", secret="alicepw"), path)
    s = cfgmod.resolve(user="bob", env={cfgmod.ENV_CLIENT_CONFIG: str(path)})
    assert s.user == "bob" and s.secret is None
    s = cfgmod.resolve(env={cfgmod.ENV_CLIENT_CONFIG: str(path), "ROOST_USER": "bob", "ROOST_PASSWORD": "bobpw"})
    assert (s.user, s.secret) == ("bob", "bobpw")


@pytest.mark.parametrize("text, host, port", [
    ("example.org", "example.org", 1883),
    ("127.0.0.1:1999", "127.0.0.1", 1999),
    ("[::1]:1884", "::1", 1884),
    ("mqtt://h:5", "h", 5),
])
def test_parse_server(text, host, port):
    s = cfgmod.parse_server(text)
    assert (s.host, s.port) == (host, port)


@pytest.mark.parametrize("text", ["h:0", "h:99999", "h:abc", "", "a b:1", "h:1:2"])
def test_parse_server_refuses_nonsense(text):
    with pytest.raises(ClientConfigError):
        cfgmod.parse_server(text)


def test_bad_tls_env_value_is_refused():
    with pytest.raises(ClientConfigError, match="ROOST_TLS"):
        cfgmod.resolve(env={"ROOST_TLS": "maybe", cfgmod.ENV_CLIENT_CONFIG: "/nonexistent/x.json"})


# ---- output -------------------------------------------------------------------------

def test_bodies_render_as_one_line():
    assert render_body({"type": "text", "text": "hi"}) == "hi"
    assert render_body({"type": "command", "name": "set", "args": {"on": True, "level": 3}}) == "[command] set on=yes level=3"
    assert render_body({"type": "result", "for": 7, "status": "ok", "data": {}}) == "[result for #7] ok"
    assert render_body({"type": "event", "name": "door_opened", "data": {"door": "front"}}) == "[event] door_opened door=front"
    assert render_body("weird") == "weird"


def test_table_aligns_columns_without_colour_off_a_terminal(capsys):
    import io

    buf = io.StringIO()
    out = Output(out=buf, err=io.StringIO())
    out.table([{"id": "bob", "n": 3}, {"id": "carol-long", "n": 12}],
              [Column("id", "id"), Column("n", "n", align_right=True)])
    lines = buf.getvalue().splitlines()
    assert lines == ["ID           N", "bob          3", "carol-long  12"]
    assert "\x1b[" not in buf.getvalue()


# The broker says "never connected" with zeros (current contract) or nulls (older brokers).
NEVER_ZERO = {"state": "offline", "clients": 0, "since": 0, "last_seen": 0}
NEVER_NULL = {"state": "offline", "clients": 0, "since": None, "last_seen": None}


@pytest.mark.parametrize("never", [NEVER_ZERO, NEVER_NULL], ids=["zeros", "nulls"])
def test_never_connected_presence_shows_as_unknown(never):
    assert presence_text(never) == "unknown"            # contacts / devices PRESENCE column
    assert presence_state(never) == "unknown"           # `roost presence` STATE column
    assert fmt_seen(never["last_seen"]) == fmt_seen(never["since"]) == "-"
    line = presence_line("thermo1", never, Output(out=io.StringIO()))
    assert line == "- thermo1 is unknown"


def test_presence_times_and_words_of_principals_that_did_connect():
    seen = 1764170000.0
    offline = {"state": "offline", "clients": 0, "since": seen, "last_seen": seen}
    assert presence_text(offline) == f"offline (last seen {fmt_time(seen)})"
    assert presence_state(offline) == "offline"
    assert fmt_seen(seen) == fmt_time(seen) and "1970" not in fmt_seen(seen)
    online = {"state": "online", "clients": 2, "since": seen, "last_seen": seen}
    assert presence_text(online) == "online (2 clients)"
    assert presence_state(online) == "online"
    assert presence_line("bob", online, Output(out=io.StringIO())) == f"{fmt_time(seen)} bob is online (2 clients)"


def test_presence_rows_have_one_shape():
    rows = [presence_row("bob", True, {"state": "online", "clients": 1, "since": 5.0, "last_seen": 5.0}),
            presence_row("thermo1", True, NEVER_ZERO),
            presence_row("carol", True, None),         # no retained state
            presence_row("mallory", False, None)]      # not allowed to see
    assert {tuple(r) for r in rows} == {("id", "visible", "state", "clients", "since", "last_seen")}
    assert [(r["state"], r["visible"]) for r in rows] == [
        ("online", True), ("offline", True), ("unknown", True), ("not visible", False)]


def test_parse_args_reads_json_values():
    assert parse_args(("t=21.5", "on=true", "mode=eco", 'name="x y"', "list=[1,2]", "empty=")) == {
        "t": 21.5, "on": True, "mode": "eco", "name": "x y", "list": [1, 2], "empty": ""}


# ---- the commands, without a broker ---------------------------------------------------

def _all_command_paths(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _all_command_paths(command, prefix + (name,))
        else:
            yield prefix + (name,)


def test_every_command_has_an_example_in_its_help(cli, env):
    paths = list(_all_command_paths(cli))
    assert len(paths) >= 25
    for path in paths:
        res = run(cli, env, *path, "--help")
        assert res.exit_code == 0, path
        assert "Example" in res.stdout, f"roost {' '.join(path)} --help has no example"


# One invocation per network command, with valid arguments.
NETWORK_INVOCATIONS = [
    ("send", "bob", "hello"), ("listen",), ("chat", "bob"), ("history", "bob"), ("convs",),
    ("contacts",), ("contact", "request", "bob", "--note", "hi"), ("contact", "accept", "bob"),
    ("contact", "reject", "bob"), ("contact", "remove", "bob"), ("contact", "block", "bob"),
    ("contact", "unblock", "bob"), ("search", "bob"), ("profile",), ("profile", "--name", "A"),
    ("presence",), ("presence", "bob", "--follow"), ("group", "create", "fam", "bob"),
    ("group", "add", "grp:abc", "bob"), ("group", "remove", "grp:abc", "bob"), ("group", "leave", "grp:abc"),
    ("group", "info", "grp:abc"), ("group", "list"), ("devices",), ("claim", "thermo1", "12345678"),
    ("share", "thermo1", "bob"), ("unshare", "thermo1", "bob"),
    ("cmd", "thermo1", "set", "t=20"), ("telemetry", "thermo1"), ("telemetry", "thermo1", "--follow"),
]


@pytest.mark.parametrize("args", NETWORK_INVOCATIONS, ids=lambda a: " ".join(a))
def test_stopped_server_gives_one_line_and_exit_3(cli, env, args):
    env = {**env, "ROOST_SERVER": f"127.0.0.1:{free_port()}", "ROOST_USER": "alice", "ROOST_PASSWORD": "pw"}
    for extra in ((), ("--json",)):
        res = run(cli, env, *args, *extra)
        assert res.exit_code == 3, (args, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "connection refused" in lines[0], res.stderr
        assert "Traceback" not in res.stderr
        assert res.stdout == ""


@pytest.mark.parametrize("args", NETWORK_INVOCATIONS[:5], ids=lambda a: " ".join(a))
def test_not_logged_in_says_how_to_log_in(cli, env, args):
    res = run(cli, env, *args)
    assert res.exit_code == 3
    assert "not logged in" in res.stderr and "roost login" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_password_missing_for_other_user_is_explained(cli, env, tmp_path):
    cfgmod.save(ClientConfig(server=f"127.0.0.1:{free_port()}", user="alice", secret="pw"),
                tmp_path / "cfg" / "roost" / "client.json")
    res = run(cli, env, "convs", "--user", "bob")
    assert res.exit_code == 3 and "no password for 'bob'" in res.stderr


@pytest.mark.parametrize("args, fragment", [
    (("send", "Bob!", "hi"), "not a valid id"),
    (("send", "dm:zed:amy", "hi"), "not a conversation id"),
    (("send", "bob"), "Missing argument"),
    (("history", "bob", "--limit", "0"), "--limit"),
    (("history", "bob", "--limit", "500"), "--limit"),
    (("contact", "request", "NOT VALID"), "not a valid id"),
    (("group", "add", "dm:a:b", "bob"), "not a group conversation"),
    (("group", "create", "fam"), "Missing argument"),
    (("cmd", "thermo1", "set", "novalue"), "not key=value"),
    (("cmd", "thermo1", "set", "--timeout", "-1"), "--timeout"),
    (("profile", "bob", "--name", "x"), "leave out ID"),
    (("listen", "--label", "no spaces"), "--label"),
    (("contact", "befriend", "bob"), "No such command"),
    # empty required text: refused before anything is sent (the broker would answer bad_request)
    (("group", "create", "", "bob"), "NAME: must not be empty"),
    (("group", "create", "   ", "bob"), "NAME: must not be empty"),
    (("send", "bob", ""), "the message is empty"),
    (("send", "bob", "  "), "the message is empty"),
    (("search", ""), "QUERY: must not be empty"),
    (("profile", "--name", ""), "--name: must not be empty"),
    (("claim", "thermo1", ""), "CODE: must not be empty"),
    (("cmd", "thermo1", ""), "NAME: must not be empty"),
])
def test_wrong_input_is_a_usage_error(cli, env, args, fragment):
    env = {**env, "ROOST_SERVER": f"127.0.0.1:{free_port()}", "ROOST_USER": "alice", "ROOST_PASSWORD": "pw"}
    res = run(cli, env, *args)
    assert res.exit_code == 2, (args, res.stdout, res.stderr)
    assert fragment in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr


def test_bad_server_option_is_a_usage_error(cli, env):
    res = run(cli, {**env, "ROOST_USER": "alice", "ROOST_PASSWORD": "pw"}, "convs", "--server", "h:notaport")
    assert res.exit_code == 2 and "not a number" in res.stderr


def test_login_to_stopped_server_stores_nothing(cli, env, tmp_path):
    res = run(cli, env, "login", "--server", f"127.0.0.1:{free_port()}", "--password-stdin", "alice", input="pw\n")
    assert res.exit_code == 3 and "connection refused" in res.stderr
    assert not (tmp_path / "cfg" / "roost" / "client.json").exists()


def test_login_without_a_terminal_needs_password_stdin(cli, env):
    res = run(cli, env, "login", "--server", f"127.0.0.1:{free_port()}", "alice", input="")
    assert res.exit_code == 2 and "--password-stdin" in res.stderr


def test_logout_when_not_logged_in(cli, env):
    res = run(cli, env, "logout", "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["logged_out"] is False


def test_commands_register_on_any_group():
    group = click.Group("x")
    register(group)
    assert {"login", "logout", "send", "listen", "chat", "history", "convs", "contacts", "contact", "search",
            "profile", "presence", "group", "devices", "claim", "share", "cmd", "telemetry"} <= set(group.commands)


def test_listen_shows_the_servers_unread_numbers_and_counts_nothing_itself():
    from client.cli_chat import ListenPrinter, UnreadTracker
    from client.cli_common import Net

    buf = io.StringIO()
    net = Net(out=Output(out=buf, err=io.StringIO()))
    convs = {"convs": [{"conv": "dm:alice:bob", "kind": "dm", "peer": "bob", "last_seq": 4, "unread": 3}]}
    printer = ListenPrinter("alice", net, UnreadTracker("alice", convs), {})

    def msg(n: int, seq: int, sender: str = "bob") -> dict:
        return {"n": n, "kind": "msg", "conv": "dm:alice:bob", "seq": seq, "from": sender, "ts": 1.0,
                "body": {"type": "text", "text": f"m{seq}"}}

    def unread(n: int, count: int, total: int) -> dict:
        return {"n": n, "kind": "unread", "conv": "dm:alice:bob", "count": count, "total": total, "ts": 1.0}

    # alice read on her phone meanwhile: the server says 1, not 3 + 1
    printer.show(msg(10, 5))
    assert buf.getvalue() == ""                       # the line waits for the count behind it
    printer.show(unread(11, 1, 2))
    printer.show(unread(12, 1, 2))                    # tells nothing new: not shown
    printer.show(unread(13, 0, 1))                    # a read elsewhere: shown
    printer.show(msg(14, 6, sender="alice"))          # her own message: no count follows
    printer.show(msg(15, 7))
    printer.flush()                                   # no count came: the line without one
    printer.show(msg(16, 3))                          # replayed (counted at start): shown at once
    lines = buf.getvalue().splitlines()
    assert len(lines) == 5
    assert "bob: m5" in lines[0] and lines[0].endswith("(1 unread, 2 in all)")
    assert "unread dm:alice:bob: 0 (total 1)" in lines[1]
    assert "you: m6" in lines[2] and "unread" not in lines[2]
    assert "bob: m7" in lines[3] and "unread" not in lines[3]
    assert "bob: m3" in lines[4] and "unread" not in lines[4]
