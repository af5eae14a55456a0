"""One-shot CLI commands do not make their user blink online/offline (issue 15).

`roost send`, `roost contacts`, ... connect as `<user>.cli-<random>`, a transient
client (docs/PROTOCOL.md, Presence): the broker does not count it for presence.
A watcher sees nothing while such commands run; `roost listen` (label `listen`)
counts as online like any app.

Presence states are published from one FIFO in the order they happened, so the
first state a watcher gets after the commands is a fence: had a command counted,
its online (or its changed count) would come first, with an earlier time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.ids import is_transient_client_id
from plugins.presence import counted_principal
from tests.clients import ImClient, MqttClient
from tests.harness import ROOT, RoostProcess
from tests.test_cli_e2e import Stream, default_sigint

pytestmark = pytest.mark.timeout(120)


class CliUser:
    """A person at a terminal: own XDG folders, `roost` run as a subprocess."""

    def __init__(self, roost: RoostProcess, home: Path, principal: str, password: str) -> None:
        self.roost = roost
        self.password = password
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
        self.env.update(XDG_CONFIG_HOME=str(home / principal / "config"),
                        XDG_STATE_HOME=str(home / principal / "state"), NO_COLOR="1", PYTHONUNBUFFERED="1")
        self.principal = principal

    def run(self, *args: str, stdin: str | None = None) -> str:
        res = subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=str(ROOT), env=self.env,
                             input=stdin, capture_output=True, text=True, timeout=60,
                             preexec_fn=default_sigint, check=False)
        assert res.returncode == 0, f"roost {' '.join(args)} -> {res.returncode}: {res.stderr}"
        return res.stdout

    def login(self) -> None:
        self.run("login", "--server", f"{self.roost.host}:{self.roost.port}", "--password-stdin",
                 self.principal, stdin=self.password + "\n")

    def one_shots(self, peer: str) -> None:
        """A handful of the commands a new user runs, each its own connection."""
        self.run("send", peer, "dinner at eight?")
        self.run("contacts")
        self.run("convs")
        self.run("history", peer)
        self.run("presence", peer)
        self.run("profile", peer)

    def spawn(self, *args: str) -> Stream:
        return Stream([sys.executable, "-m", "client.cli", *args], self.env)


def watch(roost: RoostProcess, principal: str, password: str, target: str) -> MqttClient:
    c = MqttClient(f"{principal}.watch").connect(roost.host, roost.port, username=principal, password=password)
    assert c.subscribe(f"roost/presence/{target}") == [1]
    return c


def next_presence(c: MqttClient, target: str, timeout: float = 10.0) -> dict:
    return c.wait_message(f"roost/presence/{target}", timeout).json()


def wait_state(c: MqttClient, target: str, state: str, clients: int) -> dict:
    """Skip states until `target` is in `state` with `clients` (setting the scene)."""
    deadline = time.monotonic() + 10
    while True:
        p = next_presence(c, target, max(0.05, deadline - time.monotonic()))
        if p["state"] == state and p["clients"] == clients:
            return p


@pytest.fixture
def scene(roost, tmp_path):
    """alice (phone) and bob are contacts; bob is logged in on the CLI."""
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice", "phone").open(roost, apw)
    bob_setup = ImClient("bob", "setup").open(roost, bpw)
    alice.call("contact.request", to="bob")
    bob_setup.call("contact.accept", **{"from": "alice"})
    bob_setup.disconnect()
    bob = CliUser(roost, tmp_path, "bob", bpw)
    bob.login()
    return alice, apw, bob, bpw


@pytest.fixture
def streams():
    started: list[Stream] = []
    yield started
    for s in started:
        s.kill()


def test_one_shot_commands_do_not_flicker_and_listen_counts(roost, scene, streams):
    alice, apw, bob, _ = scene
    w = watch(roost, "alice", apw, "bob")
    wait_state(w, "bob", "offline", 0)             # the setup client has gone
    bob.one_shots("alice")
    assert alice.wait_event("msg", **{"from": "bob"})["body"]["text"] == "dinner at eight?"
    assert w.no_message("roost/presence/bob", wait=1.0)
    # `roost listen` is being there: bob comes online, and that is the very next state
    t0 = time.time()
    listen = bob.spawn("listen", "--json")
    streams.append(listen)
    listen.wait_err("listening as bob")
    p = next_presence(w, "bob")
    assert p["state"] == "online" and p["clients"] == 1 and p["since"] >= t0, p
    # a command while listening changes nothing either; leaving the stream goes offline
    bob.run("contacts")
    assert listen.interrupt() == 0
    p = next_presence(w, "bob")
    assert p["state"] == "offline" and p["clients"] == 0, p


def test_one_shot_commands_do_not_change_an_online_count(roost, scene):
    """bob's phone is online: his commands do not republish him as 2 clients, then 1."""
    _, apw, bob, bpw = scene
    phone = ImClient("bob", "phone").open(roost, bpw)
    w = watch(roost, "alice", apw, "bob")
    online = wait_state(w, "bob", "online", 1)
    bob.one_shots("alice")
    assert w.no_message("roost/presence/bob", wait=1.0)
    t0 = time.time()
    laptop = ImClient("bob", "laptop").open(roost, bpw)
    p = next_presence(w, "bob")
    assert p["clients"] == 2 and p["last_seen"] >= t0 and p["since"] == online["since"], p
    laptop.disconnect()
    phone.disconnect()
    assert [next_presence(w, "bob")["clients"] for _ in range(2)] == [1, 0]


@pytest.mark.parametrize(("client_id", "transient"), [
    ("bob.cli-1a2b3c4d", True), ("bob.cli-", True),
    ("bob", False), ("bob.listen", False), ("bob.cli", False), ("bob.CLI-1", False),
    ("bob.phone-cli-1", False), ("cli-1a2b", False), ("not an id.cli-1", False),
])
def test_transient_label_convention(client_id, transient):
    assert is_transient_client_id(client_id) is transient


class _Session:
    def __init__(self, client_id: str, principal: str | None) -> None:
        self.client_id = client_id
        self.principal = principal


def test_the_plugin_counts_only_non_transient_clients():
    assert counted_principal(_Session("bob.phone", "bob")) == "bob"
    assert counted_principal(_Session("bob", "bob")) == "bob"
    assert counted_principal(_Session("bob.cli-1a2b3c4d", "bob")) is None
    assert counted_principal(_Session("auto-0123456789abcdef", None)) is None
