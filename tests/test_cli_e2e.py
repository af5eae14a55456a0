"""The person-side CLI against a real broker, as a new user would use it.

Two people and a device, each person with their own config folder (as in two
terminals): log in, befriend, chat, unread counts, receipts, listen (resume and
reconnect), groups, claim and command a device, telemetry, and every command
against a stopped broker.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from client.cli import main as roost_main
from tests.harness import ROOT, RoostProcess

pytestmark = pytest.mark.timeout(120)


class Person:
    """One person at their own terminal: own XDG folders, the `roost` CLI."""

    def __init__(self, roost: RoostProcess, home: Path, pid: str) -> None:
        self.id = pid
        self.roost = roost
        self.password = roost.add_user(pid, name=pid.capitalize())
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
        self.env.update(XDG_CONFIG_HOME=str(home / pid / "config"), XDG_STATE_HOME=str(home / pid / "state"),
                        NO_COLOR="1", PYTHONUNBUFFERED="1")

    def run(self, *args: str, input: str | None = None):
        env: dict[str, Any] = {k: None for k in os.environ if k.startswith("ROOST_")}
        env.update(self.env)
        return CliRunner(env=env).invoke(roost_main, list(args), input=input, catch_exceptions=False)

    def ok(self, *args: str, input: str | None = None):
        res = self.run(*args, input=input)
        assert res.exit_code == 0, f"roost {' '.join(args)} -> {res.exit_code}: {res.stderr}"
        return res

    def json(self, *args: str, input: str | None = None) -> Any:
        return json.loads(self.ok(*args, "--json", input=input).stdout)

    def login(self) -> None:
        self.ok("login", "--server", f"{self.roost.host}:{self.roost.port}", "--password-stdin", self.id,
                input=self.password + "\n")

    def spawn(self, *args: str) -> Stream:
        return Stream([sys.executable, "-m", "client.cli", *args], self.env)


def default_sigint() -> None:
    """preexec_fn: the CLI under test gets Ctrl-C's default disposition, whatever ours is.

    A test run started in the background (`scripts/test &`) ignores SIGINT, and an
    ignored signal stays ignored across exec: the `roost` subprocess would never
    see the SIGINT these tests send it, as a command in a terminal would.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Stream:
    """A long-running `roost` command in a subprocess, its stdout read line by line."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        # preexec_fn with threads around: safe here, it only makes one sigaction call.
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)  # noqa: PLW1509
        self._closed = threading.Event()     # stdout reached its end: every line is in self.lines
        self.lines: list[str] = []
        self.err: list[str] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True).start()

    def _pump(self, f, sink: list[str]) -> None:
        for line in f:
            with self._cv:
                sink.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            if sink is self.lines:
                self._closed.set()
            self._cv.notify_all()

    def all_lines(self, timeout: float = 10.0) -> list[str]:
        """Every line of stdout, once the process closed it."""
        assert self._closed.wait(timeout), f"stdout still open; stderr={self.err[-20:]}"
        with self._cv:
            return list(self.lines)

    def wait_err(self, fragment: str, timeout: float = 15.0) -> str:
        return self._wait(self.err, lambda l: fragment in l, timeout, fragment)

    def wait_json(self, timeout: float = 10.0, start: int = 0, **match: Any) -> dict[str, Any]:
        def ok(line: str) -> bool:
            try:
                doc = json.loads(line)
            except ValueError:
                return False
            return all(_get(doc, k) == v for k, v in match.items())

        return json.loads(self._wait(self.lines, ok, timeout, match, start))

    def docs(self) -> list[dict[str, Any]]:
        with self._cv:
            return [json.loads(l) for l in self.lines if l.startswith("{")]

    def _wait(self, sink: list[str], pred, timeout: float, what: Any, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        seen = start
        with self._cv:
            while True:
                for line in sink[seen:]:
                    if pred(line):
                        return line
                seen = len(sink)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and seen == len(sink)):
                    raise AssertionError(f"no line matching {what!r}; stdout={self.lines[-20:]} stderr={self.err[-20:]}")
                self._cv.wait(min(left, 0.2))

    def interrupt(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _get(doc: dict[str, Any], dotted: str) -> Any:
    cur: Any = doc
    for part in dotted.split("__"):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


@pytest.fixture
def people(roost, tmp_path):
    alice, bob = Person(roost, tmp_path, "alice"), Person(roost, tmp_path, "bob")
    alice.login()
    bob.login()
    return alice, bob


@pytest.fixture
def friends(people):
    alice, bob = people
    alice.ok("contact", "request", "bob", "--note", "hi, it's Alice")
    bob.ok("contact", "accept", "alice")
    return alice, bob


@pytest.fixture
def streams():
    started: list[Stream] = []
    yield started
    for s in started:
        s.kill()


# ---- login ------------------------------------------------------------------------------

def test_login_stores_credentials_0600_and_logout_removes_them(roost, tmp_path):
    carol = Person(roost, tmp_path, "carol")
    res = carol.ok("login", "--server", f"{roost.host}:{roost.port}", "--password-stdin", "carol",
                   input=carol.password + "\n")
    path = tmp_path / "carol" / "config" / "roost" / "client.json"
    assert str(path) in res.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored["user"] == "carol" and stored["server"] == f"{roost.host}:{roost.port}"
    assert carol.json("profile")["user"] == "carol"
    carol.ok("logout")
    assert not path.exists()
    res = carol.run("convs")
    assert res.exit_code == 3 and "not logged in" in res.stderr


def test_wrong_password_is_refused_and_nothing_stored(roost, tmp_path):
    dave = Person(roost, tmp_path, "dave")
    res = dave.run("login", "--server", f"{roost.host}:{roost.port}", "--password-stdin", "dave", input="wrong\n")
    assert res.exit_code == 3, res.stderr
    assert "refused" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "dave" / "config" / "roost" / "client.json").exists()


def test_env_overrides_the_stored_login(people, roost):
    alice, bob = people
    # alice's terminal acting as bob through the environment
    alice.env.update(ROOST_USER="bob", ROOST_PASSWORD=bob.password)
    assert alice.json("profile")["user"] == "bob"
    # ROOST_PASSWORD beats the stored secret, whoever the user is: bob's password for alice is refused
    res = alice.run("profile", "--user", "alice")
    assert res.exit_code == 3 and "refused alice" in res.stderr
    del alice.env["ROOST_PASSWORD"]
    assert alice.json("profile", "--user", "alice")["user"] == "alice"


# ---- social + chat ------------------------------------------------------------------------

def test_befriend_chat_unread_and_read(friends):
    alice, bob = friends
    assert [c["id"] for c in alice.json("contacts")["contacts"]] == ["bob"]
    assert [c["id"] for c in bob.json("contacts")["contacts"]] == ["alice"]

    sent = alice.json("send", "bob", "hello", "bob")
    assert sent["conv"] == "dm:alice:bob" and sent["seq"] == 1 and sent["dup"] is False
    # the same cmid twice stores one message
    first = alice.json("send", "bob", "dinner?", "--cmid", "dinner-1")
    again = alice.json("send", "bob", "dinner?", "--cmid", "dinner-1")
    assert again["seq"] == first["seq"] == 2 and again["dup"] is True
    res = alice.ok("send", "dm:alice:bob", "third")
    assert "dm:alice:bob" in res.stdout and "#3" in res.stdout

    convs = bob.json("convs")
    assert convs["total_unread"] == 3
    assert [(c["conv"], c["unread"]) for c in convs["convs"]] == [("dm:alice:bob", 3)]
    human = bob.ok("convs").stdout
    assert "dm:alice:bob" in human and "total unread: 3" in human

    hist = bob.json("history", "alice", "--limit", "2")
    assert [m["body"]["text"] for m in hist["messages"]] == ["dinner?", "third"]
    assert "hello bob" in bob.ok("history", "dm:alice:bob").stdout

    # chat with a piped stdin: shows history, marks it read, sends the lines
    res = bob.ok("chat", "alice", "--json", input="hi alice\nsee you at 8\n")
    lines = [json.loads(l) for l in res.stdout.splitlines()]
    assert [l["body"]["text"] for l in lines if l.get("kind") == "msg"][:3] == ["hello bob", "dinner?", "third"]
    assert [l["seq"] for l in lines if l.get("kind") == "sent"] == [4, 5]
    assert bob.json("convs")["total_unread"] == 0
    assert alice.json("convs")["total_unread"] == 2
    assert [m["body"]["text"] for m in alice.json("history", "bob")["messages"]][-2:] == ["hi alice", "see you at 8"]


def test_server_errors_are_one_line_and_exit_1(people):
    alice, bob = people
    res = alice.run("send", "bob", "not friends yet")
    assert res.exit_code == 1 and "forbidden" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    res = alice.run("contact", "accept", "bob")  # no request from bob
    assert res.exit_code == 1
    res = alice.run("group", "info", "grp:nosuchgroup")
    assert res.exit_code == 1


def test_search_profile_and_presence(friends):
    alice, bob = friends
    assert [u["id"] for u in alice.json("search", "bob")["users"]] == ["bob"]
    alice.ok("profile", "--name", "Alice A.", "--status", "gardening")
    prof = bob.json("profile", "alice")
    assert (prof["name"], prof["status"]) == ("Alice A.", "gardening")
    pres = alice.json("presence", "bob")["presence"]
    # bob only ran one-shot commands, which do not count for presence (issue 15): never seen
    assert pres[0]["id"] == "bob" and pres[0]["state"] in ("online", "offline", "unknown")
    mine = alice.json("presence")["presence"]
    assert {p["id"] for p in mine} == {"alice", "bob"}


def test_groups(friends, roost, tmp_path):
    alice, bob = friends
    carol = Person(roost, tmp_path, "carol")
    carol.login()
    alice.ok("contact", "request", "carol")
    carol.ok("contact", "accept", "alice")
    conv = alice.json("group", "create", "Family", "bob")["conv"]
    assert conv.startswith("grp:")
    alice.ok("group", "add", conv, "carol")
    info = alice.json("group", "info", conv)
    members = {m["id"] if isinstance(m, dict) else m for m in info["members"]}
    assert info["name"] == "Family" and members == {"alice", "bob", "carol"}
    assert carol.json("send", conv, "hi all")["conv"] == conv
    assert bob.json("convs")["total_unread"] >= 1
    carol.ok("group", "leave", conv)
    assert carol.run("send", conv, "still here?").exit_code == 1
    alice.ok("group", "remove", conv, "bob")


# ---- listen -------------------------------------------------------------------------------

def test_listen_shows_events_acks_resumes_and_survives_a_restart(friends, roost, streams):
    alice, bob = friends
    watcher = bob.spawn("listen", "--json")       # bob sees alice's receipts
    streams.append(watcher)
    watcher.wait_err("listening as bob")
    ls = alice.spawn("listen", "--json")
    streams.append(ls)
    ls.wait_err("listening as alice")

    bob.ok("send", "alice", "one")
    ev = ls.wait_json(kind="msg")
    assert ev["body"]["text"] == "one" and ev["from"] == "bob"
    # alice's listen acked the message: bob is told it was delivered
    watcher.wait_json(kind="delivered", seq=ev["seq"], to="alice")
    # alice reads it in another terminal: her listen shows the new count, bob gets the receipt
    alice.ok("chat", "bob", input="")
    ls.wait_json(kind="unread", conv="dm:alice:bob", count=0)
    watcher.wait_json(kind="read", seq=ev["seq"], by="alice")
    assert ls.interrupt() == 0

    # away: a message arrives; the next listen starts where the last one stopped
    bob.ok("send", "alice", "two")
    ls2 = alice.spawn("listen", "--json")
    streams.append(ls2)
    ls2.wait_err("listening as alice")
    assert ls2.wait_json(kind="msg")["body"]["text"] == "two"

    # the same label twice is refused (they would take each other's connection over)
    res = alice.run("listen")
    assert res.exit_code == 2 and "--label" in res.stderr

    # broker restart: listen reconnects and catches up, nothing twice
    roost.restart()
    bob.ok("send", "alice", "three")
    ls2.wait_err("reconnected", timeout=30)
    assert ls2.wait_json(kind="msg", timeout=20, body__text="three")["from"] == "bob"
    time.sleep(0.5)
    texts = [d["body"]["text"] for d in ls2.docs() if d.get("kind") == "msg"]
    assert texts == ["two", "three"]
    ns = [d["n"] for d in ls2.docs() if "n" in d]
    assert ns == sorted(set(ns))
    assert ls2.interrupt() == 0


def test_listen_human_output_and_presence_changes(friends, roost, tmp_path, streams):
    alice, bob = friends
    ls = alice.spawn("listen")
    streams.append(ls)
    ls.wait_err("listening as alice")
    bob.ok("send", "alice", "plain words")
    line = ls._wait(ls.lines, lambda l: "bob: plain words" in l and "dm:alice:bob" in l, 10, "message line")
    assert "(1 unread, 1 in all)" in line
    bob.ok("send", "alice", "more words")
    ls._wait(ls.lines, lambda l: "more words" in l and "(2 unread, 2 in all)" in l, 10, "running count")
    # a long-lived client of bob's goes away: alice sees the presence change
    chat = bob.spawn("chat", "alice")
    streams.append(chat)
    chat.wait_err("chatting in")
    chat.proc.stdin.write("/quit\n")
    chat.proc.stdin.flush()
    assert chat.proc.wait(10) == 0
    ls._wait(ls.lines, lambda l: "bob is" in l, 10, "presence line")


# ---- devices -------------------------------------------------------------------------------

def test_claim_command_share_and_telemetry(friends, roost, streams):
    from devices.sdk import CommandError, Device

    alice, bob = friends
    secret, code = roost.add_device("thermo1", "thermostat", name="Living room")
    res = alice.run("claim", "thermo1", "000000" if code != "000000" else "111111")
    assert res.exit_code == 1, res.stderr
    alice.ok("claim", "thermo1", code)

    dev = Device("thermo1", secret, host=roost.host, port=roost.port)

    @dev.command("set_setpoint")
    def _set(cmd):
        return {"setpoint": cmd.args["setpoint"]}

    @dev.command("explode")
    def _explode(cmd):
        raise CommandError("not today")

    dev.start()
    try:
        out = alice.json("cmd", "thermo1", "set_setpoint", "setpoint=21.5", "--timeout", "10")
        assert out["status"] == "ok" and out["data"] == {"setpoint": 21.5}
        res = alice.ok("cmd", "thermo1", "set_setpoint", "setpoint=19")
        assert "ok" in res.stdout and "setpoint=19" in res.stdout
        res = alice.run("cmd", "thermo1", "explode", "--timeout", "10")
        assert res.exit_code == 5 and "not today" in res.stderr

        # bob may not, until alice shares
        assert bob.run("cmd", "thermo1", "set_setpoint", "setpoint=20").exit_code == 1
        alice.ok("share", "thermo1", "bob")
        assert [d["id"] for d in bob.json("devices")["devices"]] == ["thermo1"]
        assert bob.json("cmd", "thermo1", "set_setpoint", "setpoint=20")["status"] == "ok"

        follow = alice.spawn("telemetry", "thermo1", "--follow", "--json")
        streams.append(follow)
        follow.wait_err("following thermo1")
        dev.telemetry(temperature=21.25, humidity=40)
        got = follow.wait_json(device="thermo1")
        assert got["temperature"] == 21.25
        deadline = time.monotonic() + 5
        latest = None
        while time.monotonic() < deadline:
            latest = alice.json("telemetry", "thermo1")["telemetry"]
            if latest and latest.get("temperature") == 21.25:
                break
            time.sleep(0.2)
        assert latest and latest["temperature"] == 21.25
        devices = alice.ok("devices").stdout
        assert "thermo1" in devices and "temperature=21.25" in devices
    finally:
        dev.stop()
    # the device is gone: no result within the timeout -> exit 4
    res = alice.run("cmd", "thermo1", "set_setpoint", "setpoint=18", "--timeout", "1")
    assert res.exit_code == 4 and "no result" in res.stderr


# ---- a stopped server ------------------------------------------------------------------------

STOPPED_CASES = [
    ("send", "bob", "hi"), ("listen",), ("chat", "bob"), ("history", "bob"), ("convs",), ("contacts",),
    ("contact", "request", "bob"), ("search", "bob"), ("profile",), ("presence",), ("group", "info", "grp:abc"),
    ("devices",), ("claim", "thermo1", "1"), ("share", "thermo1", "bob"), ("cmd", "thermo1", "x"),
    ("telemetry", "thermo1"), ("unshare", "thermo1", "bob"), ("group", "list"), ("device", "commands", "thermo1"),
]


def test_every_command_against_a_stopped_server(people, roost):
    alice, _ = people
    roost.stop()
    for args in STOPPED_CASES:
        res = alice.run(*args)
        assert res.exit_code == 3, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "connection refused" in res.stderr
        assert "Traceback" not in res.stderr


# ---- TLS -----------------------------------------------------------------------------------------

def test_login_over_tls_with_a_private_ca(roost_factory, tmp_path):
    from tests.harness import free_port
    from tests.test_mqtt_listeners import make_cert

    certfile, keyfile = make_cert(tmp_path)
    tls_port = free_port()
    broker = roost_factory({"listeners": {"tls": {"type": "tcp", "bind": f"127.0.0.1:{tls_port}", "ssl": True,
                                                  "certfile": str(certfile), "keyfile": str(keyfile)}}})
    erin = Person(broker, tmp_path, "erin")
    # the system CAs do not know our self-signed certificate: one clear line, exit 3
    res = erin.run("login", "--tls", "--server", f"127.0.0.1:{tls_port}", "--password-stdin", "erin",
                   input=erin.password + "\n")
    assert res.exit_code == 3 and "TLS failed" in res.stderr, res.stderr
    erin.ok("login", "--tls", "--ca", str(certfile), "--server", f"127.0.0.1:{tls_port}", "--password-stdin",
            "erin", input=erin.password + "\n")
    stored = json.loads((tmp_path / "erin" / "config" / "roost" / "client.json").read_text())
    assert stored["tls"] is True and stored["ca_file"] == str(certfile)
    assert erin.json("convs")["total_unread"] == 0


def test_presence_follow_sees_a_contact_come_and_go(friends, streams):
    alice, bob = friends
    follow = alice.spawn("presence", "bob", "--follow", "--json")
    streams.append(follow)
    first = follow.wait_json(kind="presence", id="bob")
    assert first["state"] in ("online", "offline", "unknown")
    mark = len(follow.lines)
    # a stream counts as online; a one-shot command would not (issue 15, tests/test_presence_cli.py)
    bob_listen = bob.spawn("listen")
    streams.append(bob_listen)
    follow.wait_json(kind="presence", id="bob", state="online", start=mark)
    assert bob_listen.interrupt() == 0
    follow.wait_json(kind="presence", id="bob", state="offline", start=mark + 1)
    assert follow.interrupt() == 0
    # the first line and the change lines have one shape (scripts can rely on every key)
    lines = follow.docs()
    assert len(lines) >= 3
    assert {tuple(sorted(l)) for l in lines} == {
        ("clients", "id", "kind", "last_seen", "since", "state", "visible")}, lines
    assert all(l["visible"] is True for l in lines)


def test_a_device_that_never_connected_shows_as_unknown(friends, roost):
    alice, _ = friends
    _, code = roost.add_device("plug1", "plug", name="Hall plug")
    alice.ok("claim", "plug1", code)
    listed = alice.json("devices")["devices"][0]["presence"]
    assert listed["state"] == "offline" and not listed["last_seen"]      # 0 (or null from older brokers)
    row = next(l for l in alice.ok("devices").stdout.splitlines() if l.startswith("plug1"))
    assert "unknown" in row and "offline" not in row, row
    table = alice.ok("presence", "plug1").stdout.splitlines()
    assert table[1].split() == ["plug1", "unknown", "-", "-", "-"], table
    assert "1970" not in "\n".join(table)


def test_cmd_gets_its_result_across_a_broker_restart(friends, roost, streams):
    from devices.sdk import Device

    alice, _ = friends
    secret, code = roost.add_device("lamp1", "light")
    alice.ok("claim", "lamp1", code)
    dev = Device("lamp1", secret, host=roost.host, port=roost.port)

    working = threading.Event()

    @dev.command("slow")
    def _slow(cmd):
        working.set()
        time.sleep(2.0)          # the broker restarts while the device works
        return {"done": True}

    dev.start()
    try:
        waiting = alice.spawn("cmd", "lamp1", "slow", "--timeout", "40", "--json")
        streams.append(waiting)
        assert working.wait(20), waiting.err     # the command reached the device
        roost.restart()
        assert waiting.proc.wait(45) == 0, waiting.err
        out = json.loads("\n".join(waiting.all_lines()))    # one (indented) JSON document
        assert out["status"] == "ok"
        assert out["data"] == {"done": True} and out["device"] == "lamp1"
    finally:
        dev.stop()


def test_listen_keeps_up_with_a_burst(friends, roost, streams):
    from client.config import Server
    from client.sdk import RoostClient

    alice, bob = friends
    ls = alice.spawn("listen", "--json")
    streams.append(ls)
    ls.wait_err("listening as alice")
    sender = RoostClient(Server(roost.host, roost.port), "bob", bob.password)
    sender.connect()
    try:
        for i in range(60):
            sender.send({"type": "text", "text": f"b{i}"}, to="alice")
    finally:
        sender.close()
    ls.wait_json(kind="msg", body__text="b59", timeout=20)
    msgs = [d for d in ls.docs() if d.get("kind") == "msg"]
    assert [m["body"]["text"] for m in msgs] == [f"b{i}" for i in range(60)]
    ns = [d["n"] for d in ls.docs() if "n" in d]
    assert ns == list(range(ns[0], ns[0] + len(ns)))      # every event once, in order, no gap
    assert ls.interrupt() == 0


def test_listen_after_the_store_was_replaced_skips_nothing(friends, roost, streams):
    """The saved position belongs to a mailbox: behind the same address and user a
    new store numbers its events from 1 again, and none of them may be skipped."""
    import os as _os

    alice, bob = friends
    for i in range(3):
        bob.ok("send", "alice", f"old{i}")
    ls = alice.spawn("listen", "--json")
    streams.append(ls)
    ls.wait_err("listening as alice")                  # first run: from now
    bob.ok("send", "alice", "old3")
    ls.wait_json(kind="msg", body__text="old3")
    time.sleep(1.0)
    assert ls.interrupt() == 0
    roost.stop()
    for suffix in ("", "-wal", "-shm"):
        path = roost.config["storage"]["path"] + suffix
        if _os.path.exists(path):
            _os.remove(path)
    roost.start()
    roost.add_user("alice", password=alice.password)
    roost.add_user("bob", password=bob.password)
    alice.ok("contact", "request", "bob")
    bob.ok("contact", "accept", "alice")
    for i in range(8):                                  # more events than the old mailbox had
        bob.ok("send", "alice", f"new{i}")
    ls2 = alice.spawn("listen", "--json")
    streams.append(ls2)
    ls2.wait_err("a new store?")
    for i in range(8):
        ls2.wait_json(kind="msg", body__text=f"new{i}")
    assert ls2.interrupt() == 0


def test_a_stream_ends_with_exit_3_when_its_account_is_removed(friends, roost, streams):
    alice, _bob = friends
    ls = alice.spawn("listen")
    streams.append(ls)
    ls.wait_err("listening as alice")
    roost.cli("user", "remove", "alice")
    ls.wait_err("now refuses alice", timeout=15)
    assert ls.proc.wait(15) == 3
