"""What a new user tripped over (issue 15), each against a real broker or the real
`roost` command: TLS addresses, device commands, group lines, one-line errors,
history of an unknown id, short searches, one shape for device listings, the
latest reading of `telemetry --follow`, and Ctrl-C in admin commands.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract import catalog
from tests.harness import ROOT, RoostProcess, free_port
from tests.test_cli_e2e import Person, Stream, default_sigint

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def streams():
    started: list[Stream] = []
    yield started
    for s in started:
        s.kill()


@pytest.fixture
def friends(roost, tmp_path):
    alice, bob = Person(roost, tmp_path, "alice"), Person(roost, tmp_path, "bob")
    alice.login()
    bob.login()
    alice.ok("contact", "request", "bob")
    bob.ok("contact", "accept", "alice")
    return alice, bob


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("roost: error: "), stderr
    assert "Traceback" not in stderr and "Usage:" not in stderr
    return lines[0]


def roost_cmd(*args: str, env: dict[str, str] | None = None, input: str | None = None,
              cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The real `roost` in a subprocess (click's own error printing included)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "client.cli", *args], check=False, cwd=str(cwd), env=full, input=input,
                          capture_output=True, text=True, timeout=60,
                          preexec_fn=default_sigint)   # one sigaction, see default_sigint


# ---- TLS addresses -------------------------------------------------------------------------

@pytest.fixture
def tls_broker(roost_factory, tmp_path):
    from tests.test_mqtt_listeners import make_cert

    certfile, keyfile = make_cert(tmp_path)
    port = free_port()
    broker = roost_factory({"listeners": {"tls": {"type": "tcp", "bind": f"127.0.0.1:{port}", "ssl": True,
                                                  "certfile": str(certfile), "keyfile": str(keyfile)}}})
    broker.tls_port = port
    broker.certfile = certfile
    return broker


def test_login_honours_an_mqtts_url(tls_broker, tmp_path):
    erin = Person(tls_broker, tmp_path, "erin")
    erin.ok("login", "--server", f"mqtts://127.0.0.1:{tls_broker.tls_port}", "--ca", str(tls_broker.certfile),
            "--password-stdin", "erin", input=erin.password + "\n")
    stored = json.loads((tmp_path / "erin" / "config" / "roost" / "client.json").read_text())
    assert stored["tls"] is True and stored["server"] == f"127.0.0.1:{tls_broker.tls_port}"
    assert erin.json("convs")["total_unread"] == 0


def test_a_plain_connection_to_a_tls_port_says_try_tls_at_once(tls_broker, tmp_path):
    erin = Person(tls_broker, tmp_path, "erin")
    started = time.monotonic()
    res = erin.run("login", "--server", f"127.0.0.1:{tls_broker.tls_port}", "--password-stdin", "erin",
                   input=erin.password + "\n")
    took = time.monotonic() - started
    assert res.exit_code == 3
    assert "is this a TLS port? try --tls" in one_error_line(res.stderr)
    assert took < 5, f"took {took:.1f}s"


# ---- device commands -------------------------------------------------------------------------

def _all_catalogued_commands() -> set[str]:
    return {c.name for k in catalog.KINDS.values() for c in k.commands}


def test_cmd_help_and_the_protocol_example_use_real_commands(friends):
    alice, _ = friends
    helptext = alice.ok("cmd", "--help").stdout
    examples = re.findall(r"roost cmd \S+ (\S+)", helptext)
    assert examples and set(examples) <= _all_catalogued_commands(), examples
    session = (ROOT / "docs" / "PROTOCOL.md").read_text().split("## Example session", 1)[1]
    names = re.findall(r'"type": ?"command", ?"name": ?"([^"]+)"', session)
    light = {c.name for c in catalog.LIGHT.commands}
    assert names and set(names) <= light, names      # the example's device is a light


@pytest.fixture
def thermostat(friends, roost):
    from devices.simulators import make

    alice, _ = friends
    secret, code = roost.add_device("thermo1", "thermostat", name="Living room")
    alice.ok("claim", "thermo1", code)
    sim = make("thermostat", "thermo1", secret, roost.host, roost.port)
    sim.device.start()
    yield sim
    sim.device.stop()


def test_an_unknown_command_lists_the_commands_and_device_commands_shows_them(friends, thermostat):
    alice, _ = friends
    res = alice.run("cmd", "thermo1", "set_point", "value=21", "--timeout", "10")
    assert res.exit_code == 5
    line = one_error_line(res.stderr)
    names = [c.name for c in catalog.THERMOSTAT.commands]
    assert "unknown command 'set_point'" in line and f"thermo1 takes: {', '.join(names)}" in line, line

    doc = alice.json("device", "commands", "thermo1")
    assert doc["kind"] == "thermostat"
    assert [c["name"] for c in doc["commands"]] == names
    setpoint = next(c for c in doc["commands"] if c["name"] == "set_setpoint")
    assert setpoint["args"][0]["name"] == "setpoint" and setpoint["args"][0]["required"] is True
    human = alice.ok("device", "commands", "thermo1").stdout
    assert "set_setpoint" in human and "setpoint=number (5..30 °C)" in human
    assert "example: roost cmd thermo1 set_setpoint setpoint=17.5" in human
    res = alice.run("device", "commands", "nosuchdev")
    assert res.exit_code == 1 and "not one of your devices" in one_error_line(res.stderr)


# ---- groups and shares -----------------------------------------------------------------------------

def test_listen_names_the_group_and_the_members(friends, roost, tmp_path, streams):
    alice, bob = friends
    carol = Person(roost, tmp_path, "carol")
    carol.login()
    bob.ok("contact", "request", "carol")
    carol.ok("contact", "accept", "bob")
    ls = alice.spawn("listen")
    streams.append(ls)
    ls.wait_err("listening as alice")
    conv = bob.json("group", "create", "Family", "alice")["conv"]
    ls._wait(ls.lines, lambda l: f'bob created group "Family" ({conv}) with bob, you' in l
             or f'bob created group "Family" ({conv}) with you, bob' in l, 10, "created line")
    bob.ok("group", "add", conv, "carol")
    ls._wait(ls.lines, lambda l: f'bob added carol to "Family" ({conv})' in l, 10, "added line")
    carol.ok("group", "leave", conv)
    ls._wait(ls.lines, lambda l: f'carol left "Family" ({conv})' in l, 10, "left line")


def test_listen_names_a_group_one_is_added_to_later(friends, roost, tmp_path, streams):
    alice, bob = friends
    carol = Person(roost, tmp_path, "carol")
    carol.login()
    bob.ok("contact", "request", "carol")
    carol.ok("contact", "accept", "bob")
    conv = bob.json("group", "create", "Book club", "carol")["conv"]
    ls = alice.spawn("listen")
    streams.append(ls)
    ls.wait_err("listening as alice")
    bob.ok("group", "add", conv, "alice")
    ls._wait(ls.lines, lambda l: f'bob added you to "Book club" ({conv})' in l, 10, "added line")


def test_group_list_and_unshare(friends, roost):
    alice, bob = friends
    conv = alice.json("group", "create", "Family", "bob")["conv"]
    groups = bob.json("group", "list")["groups"]
    assert groups == [{"conv": conv, "name": "Family", "members": ["alice", "bob"], "unread": 0}]
    table = bob.ok("group", "list").stdout.splitlines()
    assert table[0].split() == ["CONV", "NAME", "MEMBERS", "UNREAD"]
    assert conv in table[1] and "Family" in table[1] and "alice, bob" in table[1]

    _, code = roost.add_device("plug1", "light")
    alice.ok("claim", "plug1", code)
    alice.ok("share", "plug1", "bob")
    assert [d["id"] for d in bob.json("devices")["devices"]] == ["plug1"]
    assert "bob may no longer use plug1" in alice.ok("unshare", "plug1", "bob").stdout
    assert bob.json("devices")["devices"] == []
    res = bob.run("unshare", "plug1", "alice")          # no longer his to know of (issue 15)
    assert res.exit_code == 1 and "not_found: no device 'plug1'" in one_error_line(res.stderr)


# ---- history, search --------------------------------------------------------------------------------

def test_history_of_an_unknown_id_is_not_found_like_send(friends):
    alice, _ = friends
    sent = alice.run("send", "nosuchuser", "hi")
    res = alice.run("history", "nosuchuser")
    assert res.exit_code == sent.exit_code == 1
    assert "not_found" in one_error_line(res.stderr) and "not_found" in sent.stderr
    assert alice.run("history", "nosuchuser", "--json").exit_code == 1
    # a real person without messages yet: an empty history, exit 0
    assert "no messages" in alice.ok("history", "bob").stdout


def test_a_one_character_search_says_names_need_two(friends):
    alice, _ = friends
    res = alice.run("search", "b")
    assert res.exit_code == 2
    assert "at least 2 characters" in one_error_line(res.stderr)
    assert [u["id"] for u in alice.json("search", "bo")["users"]] == ["bob"]


# ---- devices: one shape, pairing codes, telemetry -----------------------------------------------------

def test_device_listings_have_one_shape(friends, roost):
    alice, _ = friends
    _, code = roost.add_device("door1", "door_sensor", room="hall")
    alice.ok("claim", "door1", code)
    admin = json.loads(roost.cli("device", "list", "--json").stdout)["devices"]
    person = alice.json("devices")["devices"]
    assert admin == [{"id": "door1", "kind": "door_sensor", "name": "door1", "room": "hall"}]
    assert {k: person[0][k] for k in admin[0]} == admin[0]


def test_the_claim_example_has_an_eight_digit_code(friends, roost):
    alice, _ = friends
    _, code = roost.add_device("plug2", "light")
    example = re.search(r"roost claim \S+ (\S+)", alice.ok("claim", "--help").stdout).group(1)
    digits = re.sub(r"[ -]", "", example)
    assert digits.isdigit() and len(digits) == len(code) == 8, example


def test_telemetry_follow_shows_the_latest_reading_at_once(friends, thermostat, streams):
    alice, _ = friends
    thermostat.device.telemetry(temperature=19.75, humidity=41)
    deadline = time.monotonic() + 10
    while (alice.json("telemetry", "thermo1")["telemetry"] or {}).get("temperature") != 19.75:
        assert time.monotonic() < deadline, "the reading never became the latest"
        time.sleep(0.1)
    follow = alice.spawn("telemetry", "thermo1", "--follow", "--json")
    streams.append(follow)
    got = follow.wait_json(device="thermo1", timeout=10)      # nothing new is published meanwhile
    assert got["temperature"] == 19.75
    human = alice.spawn("telemetry", "thermo1", "--follow")
    streams.append(human)
    human._wait(human.lines, lambda l: "temperature=19.75" in l, 10, "latest reading")


# ---- one-line errors everywhere -----------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (("nosuch",), "No such command 'nosuch'"),
    (("user", "nosuch"), "No such command 'nosuch'"),
    (("user", "add"), "Missing argument 'ID'"),
    (("device", "add", "d1"), "--kind"),
    (("--bogus",), "No such option"),
])
def test_usage_errors_and_unknown_commands_are_one_line(args, fragment):
    res = roost_cmd(*args)
    assert res.returncode == 2, res.stderr
    assert fragment in one_error_line(res.stderr)


@pytest.fixture
def store(tmp_path) -> RoostProcess:
    proc = RoostProcess(tmp_path / "store")   # not started: admin commands work on the store
    os.chmod(proc.workdir, 0o700)             # else the store warns that others can read it (a 2nd line)
    return proc


def test_admin_errors_have_the_same_prefix(store):
    res = store.cli("user", "remove", "nobody", check=False)
    assert res.returncode == 1
    assert one_error_line(res.stderr) == "roost: error: no user 'nobody'"


def test_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits: [1\n")
    res = roost_cmd("user", "list", "--config", str(bad))
    assert res.returncode == 1
    line = one_error_line(res.stderr)
    assert "is not valid YAML at line 2" in line, line


def test_a_store_that_is_not_a_database_is_one_line(store):
    Path(store.config["storage"]["path"]).write_bytes(b"this is not a database, it is a text file\n" * 100)
    res = store.cli("user", "list", check=False)
    assert res.returncode == 1
    assert "file is not a database" in one_error_line(res.stderr)


def test_passwd_without_a_terminal_is_one_line(store):
    store.cli("user", "add", "alice", "--password-stdin", input="pw\n")
    res = store.cli("user", "passwd", "alice", check=False, input="")
    assert res.returncode == 2
    assert "--password-stdin" in one_error_line(res.stderr)
    assert "Warning" not in res.stderr


def test_ctrl_c_in_an_admin_command_exits_130(store):
    store.cli("user", "add", "alice", "--password-stdin", input="pw\n")
    pid, fd = pty.fork()
    if pid == 0:       # the child: a terminal, and Ctrl-C as in any shell
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        env = dict(os.environ, ROOST_CONFIG=str(store.config_path), NO_COLOR="1")
        os.chdir(str(ROOT))
        os.execve(sys.executable, [sys.executable, "-m", "client.cli", "user", "passwd", "alice"], env)
    seen = b""
    deadline = time.monotonic() + 20
    while b"Password" not in seen:
        assert time.monotonic() < deadline, seen
        if select.select([fd], [], [], 0.5)[0]:
            seen += os.read(fd, 1024)
    os.kill(pid, signal.SIGINT)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:          # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 130, out
    text = out.decode(errors="replace")
    assert "roost: error: interrupted" in text and "Aborted" not in text, text


# ---- tests started in the background --------------------------------------------------------------------

def test_streams_stop_on_sigint_even_when_the_test_run_ignores_it(friends, streams):
    """`scripts/test &` starts with SIGINT ignored; a stream the tests interrupt must stop all the same."""
    alice, _ = friends
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ls = alice.spawn("listen")
    finally:
        signal.signal(signal.SIGINT, previous)
    streams.append(ls)
    ls.wait_err("listening as alice")
    assert ls.interrupt() == 0
