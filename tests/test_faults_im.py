"""IM promises under faults and hostile load (issue 10), against real brokers:

- a store that runs out of space answers write requests `unavailable` (one line,
  never `internal`), keeps serving reads, logins and routing, recovers by itself
  when space returns, and never answered `ok` for what it did not commit;
- rate limits and contact-request budgets hold per principal, not per client id;
- a lone UTF-16 surrogate anywhere in a request gets exactly one `bad_request`.

The full disk is a small tmpfs (root only) holding nothing but the store, filled
by a file of this test until the filesystem says ENOSPC; and, anywhere, a file
size limit (RLIMIT_FSIZE, set on the running broker with prlimit) just above
the store's files, so its next growth fails with EFBIG (Python ignores SIGXFSZ).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clients import ImClient, MqttClient, eventually_ok
from tests.harness import RoostProcess

TMPFS_SIZE = "2m"


# ---- a disk that fills up ---------------------------------------------------------


class SmallDisk:
    """A tmpfs of TMPFS_SIZE; `fill()` takes every free byte, `free()` gives it back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = path / "filler"

    def config(self) -> dict[str, Any]:
        return {"storage": {"path": str(self.path / "roost.db")}}

    def fill(self, roost: RoostProcess) -> None:
        with open(self._filler, "ab", buffering=0) as f:
            for chunk in (64 * 1024, 4096, 1):      # tmpfs counts pages: end byte by byte
                while True:
                    try:
                        f.write(b"\0" * chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break

    def free(self, roost: RoostProcess) -> None:
        self._filler.unlink(missing_ok=True)


class FileSizeLimit:
    """No space for the broker's files to grow: RLIMIT_FSIZE on its process just
    above its store's files (the log keeps room for its few lines)."""

    LOG_ROOM = 256 * 1024

    def config(self) -> dict[str, Any]:
        return {}

    def fill(self, roost: RoostProcess) -> None:
        assert roost.proc is not None
        db = Path(roost.config["storage"]["path"])
        sizes = [p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists()]
        limit = max([*sizes, roost.log_path.stat().st_size + self.LOG_ROOM]) + 4096
        _soft, hard = resource.prlimit(roost.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(roost.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))

    def free(self, roost: RoostProcess) -> None:
        assert roost.proc is not None
        _soft, hard = resource.prlimit(roost.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(roost.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))


@pytest.fixture(params=["tmpfs", "file-size-limit"])
def no_space(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SmallDisk | FileSizeLimit]:
    if request.param == "file-size-limit":
        yield FileSizeLimit()
        return
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount_point)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield SmallDisk(mount_point)
    finally:
        # Lazy: the broker (killed by roost_factory after this) may still hold files.
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


def broker_on(roost_factory: Any, space: SmallDisk | FileSizeLimit) -> RoostProcess:
    return roost_factory(space.config(), start=False)


def befriend(a: ImClient, b: ImClient) -> None:
    a.call("contact.request", to=b.principal)
    b.call("contact.accept", **{"from": a.principal})


def log_lines(roost: RoostProcess) -> list[str]:
    return roost.log_path.read_text(errors="replace").splitlines()


def tracebacks_after(roost: RoostProcess, logger: str) -> list[str]:
    """Tracebacks announced by a line of `logger` (e.g. roost.im)."""
    lines = log_lines(roost)
    return ["\n".join(lines[i - 1:i + 8]) for i, line in enumerate(lines)
            if line.startswith("Traceback") and i > 0 and f" {logger}" in lines[i - 1]]


def stored_row(roost: RoostProcess, sql: str, *args: Any, timeout: float = 10.0) -> tuple[Any, ...]:
    """The first row of `sql` on the broker's store, waited for (written behind)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = sqlite3.connect(f"file:{roost.config['storage']['path']}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute(sql, args).fetchone()
        finally:
            conn.close()
        if row is not None:
            return tuple(row)
        if time.monotonic() > deadline:
            raise AssertionError(f"no row for {sql} {args} within {timeout}s")
        time.sleep(0.05)


def text_body(i: int, size: int = 0) -> dict[str, Any]:
    return {"type": "text", "text": f"m{i} " + "x" * size}


# ---- 1. a full store --------------------------------------------------------------


def test_a_full_store_answers_unavailable_serves_reads_and_recovers_by_itself(roost_factory, no_space):
    roost = broker_on(roost_factory, no_space)
    apw, bpw, cpw = roost.add_user("alice"), roost.add_user("bob"), roost.add_user("carol")
    secret, code = roost.add_device("thermo", "thermostat")
    roost.start()
    alice = ImClient("alice").open(roost, apw)
    bob = ImClient("bob").open(roost, bpw)
    befriend(alice, bob)
    alice.call("device.claim", device="thermo", code=code)
    conv = alice.call("send", to="bob", cmid="before", body=text_body(0))["conv"]

    no_space.fill(roost)
    answers: dict[str, dict[str, Any]] = {}
    for i in range(1, 40):                       # big bodies: the store must grow to take them
        doc = alice.request("send", to="bob", cmid=f"full-{i}", body=text_body(i, 30_000))
        answers[f"full-{i}"] = doc
        if not doc["ok"]:
            break
    refused = [d for d in answers.values() if not d["ok"]]
    assert refused, "the store never filled up"
    error = refused[0]["error"]
    assert error["code"] == "unavailable" and "\n" not in error["message"], error

    # Every write op: ok (it fitted, so it committed) or unavailable; never internal.
    writes = [("profile.set", {"name": "Alice Full"}), ("contact.request", {"to": "carol"}),
              ("read", {"conv": conv, "seq": 1}), ("group.create", {"name": "g", "members": ["bob"]}),
              ("send", {"to": "bob", "cmid": "full-last", "body": text_body(99, 30_000)})]
    for op, params in writes:
        doc = alice.request(op, **params)
        assert doc["ok"] or (doc["error"]["code"] == "unavailable" and "\n" not in doc["error"]["message"]), doc
        if op == "send":
            answers["full-last"] = doc

    # Reads, logins and routing go on.
    assert alice.call("sync", after=0)["events"]
    assert alice.call("history", conv=conv)["messages"][0]["cmid"] == "before"
    assert any(c["conv"] == conv for c in alice.call("convs")["convs"])
    assert [c["id"] for c in bob.call("contacts")["contacts"]] == ["alice"]
    carol = ImClient("carol", "late").open(roost, cpw)
    assert carol.call("convs")["total_unread"] == 0
    listener = MqttClient("carol.listen").connect(roost.host, roost.port, username="carol", password=cpw)
    assert listener.subscribe("plain/room", 1) == [1]
    carol.publish("plain/room", b"still routed", qos=1)
    assert listener.wait_message("plain/room").payload == b"still routed"
    # A device comes online and reports; presence and latest readings wait for the store.
    thermo = MqttClient("thermo").connect(roost.host, roost.port, username="thermo", password=secret)
    thermo.publish("roost/telemetry/thermo", {"t": 21.5}, qos=1)
    assert alice.call("devices")["devices"][0]["presence"]["state"] == "online"

    # One line per outage in the log, no traceback per request.
    assert tracebacks_after(roost, "roost.im") == []
    im_lines = [line for line in log_lines(roost) if " roost.im:" in line]
    assert 1 <= len(im_lines) <= 2, im_lines

    # Space returns: the store writes again without a restart.
    no_space.free(roost)
    result = eventually_ok(alice, "send", to="bob", cmid="after", body=text_body(100))
    assert result["dup"] is False
    assert bob.wait_event("msg", cmid="after")["seq"] == result["seq"]   # bob's pusher lived through it
    # What was written behind reaches the store once it can (retried, not dropped).
    assert json.loads(stored_row(roost, "SELECT fields FROM telemetry_latest WHERE device=?", "thermo")[0]) == {"t": 21.5}
    assert stored_row(roost, "SELECT state FROM presence WHERE principal=? AND state='online'", "thermo") == ("online",)

    # Exactly what was answered ok was committed: no more, no less.
    stored = {m["cmid"] for m in alice.call("history", conv=conv, limit=200)["messages"]}
    answered_ok = {cmid for cmid, d in answers.items() if d["ok"]} | {"before", "after"}
    assert stored == answered_ok
    profile = alice.call("profile.get")
    for logger in ("roost.im", "roost.inbox", "roost.presence", "roost.telemetry", "roost.messaging"):
        assert tracebacks_after(roost, logger) == [], logger
    roost.stop()
    roost.start()
    again = ImClient("alice", "again").open(roost, apw)
    assert again.call("profile.get")["name"] == profile["name"]
    assert {m["cmid"] for m in again.call("history", conv=conv, limit=200)["messages"]} == answered_ok


# ---- 8. lone surrogates ------------------------------------------------------------


def responses(client: ImClient, wait: float = 1.0) -> list[dict[str, Any]]:
    """Every response that arrives until none has come for `wait` seconds."""
    out = []
    while True:
        try:
            out.append(client.wait_message(f"roost/resp/{client.client_id}", timeout=wait).json())
        except TimeoutError:
            return out


@pytest.mark.parametrize("payload, rid", [
    (rb'{"id": "s1\ud800", "op": "sync"}', None),
    (rb'{"id": "s2", "op": "send", "to": "bob", "cmid": "c1", "body": {"type": "text", "text": "a\udc00"}}', "s2"),
    (rb'{"id": "s3", "op": "profile.set", "name": "\uDBFF"}', "s3"),
    (rb'{"id": "s4", "op": "sync", "\ud800": 1}', "s4"),
    (rb'{"id": "s5", "op": "user.search", "q": "\udfffbo"}', "s5"),
    (b'{"id": "s6\xed\xa0\x80", "op": "sync"}', None),            # an encoded surrogate: not UTF-8
])
def test_a_lone_surrogate_anywhere_is_one_bad_request(roost, payload, rid):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice").open(roost, apw)
    bob = ImClient("bob").open(roost, bpw)
    befriend(alice, bob)
    alice.send_raw(payload)
    got = responses(alice)
    assert len(got) == 1, got
    assert got[0]["id"] == rid and got[0]["ok"] is False
    assert got[0]["error"]["code"] == "bad_request", got[0]
    # nothing was stored, and the broker is fine
    assert alice.call("history", conv="dm:alice:bob")["messages"] == []
    assert alice.call("profile.get")["name"] == "alice"
    assert alice.call("send", to="bob", cmid="ok", body={"type": "text", "text": "\U0001f600"})["seq"] == 1
    assert tracebacks_after(roost, "roost.im") == []


@pytest.mark.parametrize("payload", [
    rb'{"id": "z1", "op": "send", "to": "bob", "cmid": "c\u0000", "body": {"type": "text", "text": "hi"}}',
    rb'{"id": "z1", "op": "profile.set", "name": "al\u0000ice"}',
    rb'{"id": "z1", "op": "group.create", "name": "g", "members": ["bob\u0000"]}',
])
def test_a_nul_in_a_parameter_is_one_bad_request_on_every_engine(roost, payload):
    """PostgreSQL's text cannot hold U+0000: refused before any store sees it,
    so both engines answer the same."""
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice").open(roost, apw)
    bob = ImClient("bob").open(roost, bpw)
    befriend(alice, bob)
    alice.send_raw(payload)
    got = responses(alice)
    assert [(g["id"], g["ok"], g["error"]["code"]) for g in got] == [("z1", False, "bad_request")], got
    assert alice.call("history", conv="dm:alice:bob")["messages"] == []
    assert alice.call("profile.get")["name"] == "alice"
    # inside a message body a NUL is data, carried as JSON
    alice.send_raw(rb'{"id": "z2", "op": "send", "to": "bob", "cmid": "c", "body": {"type": "text", "text": "a\u0000b"}}')
    assert alice.wait_response("z2")["ok"]
    assert bob.wait_event("msg", cmid="c")["body"]["text"] == "a\x00b"
    assert tracebacks_after(roost, "roost.im") == []


def test_paired_surrogate_escapes_are_fine(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice").open(roost, apw)
    bob = ImClient("bob").open(roost, bpw)
    befriend(alice, bob)
    alice.send_raw(rb'{"id": "p1", "op": "send", "to": "bob", "cmid": "c", "body": {"type": "text", "text": "\ud83d\ude00"}}')
    doc = alice.wait_response("p1")
    assert doc["ok"], doc
    assert bob.wait_event("msg", cmid="c")["body"]["text"] == "\U0001f600"
    assert json.loads(json.dumps("\U0001f600")) == "\U0001f600"


# ---- 5. limits per principal; strangers and mailboxes -------------------------------


def fire(client: ImClient, op: str, count: int, prefix: str) -> None:
    for i in range(count):
        client.publish(f"roost/req/{client.client_id}", {"id": f"{prefix}{i}", "op": op}, qos=1, wait=False)


def test_the_request_rate_is_per_principal_whatever_its_client_ids(roost_factory):
    roost = roost_factory({"limits": {"request_rate": 0.01, "request_burst": 5}})
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    clients = [ImClient("alice", f"c{k}").open(roost, apw, subscribe_inbox=False) for k in range(4)]
    for k, c in enumerate(clients):
        fire(c, "convs", 5, f"k{k}-")
    docs = [d for c in clients for d in responses(c)]
    assert len(docs) == 20
    assert sum(d["ok"] for d in docs) == 5                  # one budget for all four clients
    assert {d["error"]["code"] for d in docs if not d["ok"]} == {"rate_limited"}
    # A new connection does not bring new tokens; another principal is not affected.
    clients[0].disconnect()
    fresh = ImClient("alice", "fresh").open(roost, apw, subscribe_inbox=False)
    assert fresh.request("convs")["error"]["code"] == "rate_limited"
    bob = ImClient("bob").open(roost, bpw, subscribe_inbox=False)
    assert bob.call("convs")["total_unread"] == 0


def contact_events(client: ImClient, other: str) -> list[str]:
    events = client.call("sync", after=0, limit=1000)["events"]
    return [e["event"] for e in events if e["kind"] == "contact" and e["with"] == other]


def test_a_stranger_requesting_and_withdrawing_in_a_loop_is_stopped(roost):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice").open(roost, apw, subscribe_inbox=False)
    bob = ImClient("bob").open(roost, bpw, subscribe_inbox=False)
    assert alice.call("contact.request", to="bob", note="hi")["state"] == "requested"
    assert alice.call("contact.request", to="bob", note="hi?")["state"] == "pending"   # re-sent: nothing new
    alice.call("contact.remove", user="bob")
    codes = []
    for _ in range(20):
        codes.append(alice.request("contact.request", to="bob")["error"]["code"])
        alice.request("contact.remove", user="bob")
    assert set(codes) == {"rate_limited"}
    assert contact_events(bob, "alice") == ["request", "removed"]
    # bob may still ask alice himself: her own budget and cool-down are untouched
    assert bob.call("contact.request", to="alice")["state"] == "requested"
    assert alice.call("contact.accept", **{"from": "bob"}) == {}


def test_a_person_receives_a_bounded_number_of_requests_per_hour(roost_factory):
    roost = roost_factory({"limits": {"contact_requests_per_hour": 3}})
    bpw = roost.add_user("bob")
    strangers = [(f"s{i}", roost.add_user(f"s{i}")) for i in range(5)]
    bob = ImClient("bob").open(roost, bpw, subscribe_inbox=False)
    answers = {}
    for sid, pw in strangers:
        c = ImClient(sid).open(roost, pw, subscribe_inbox=False)
        answers[sid] = c.request("contact.request", to="bob")
        c.disconnect()
    assert [answers[s]["ok"] for s, _ in strangers] == [True, True, True, False, False]
    assert answers["s4"]["error"]["code"] == "rate_limited" and "\n" not in answers["s4"]["error"]["message"]
    assert [r["from"] for r in bob.call("contacts")["incoming"]] == ["s0", "s1", "s2"]
    requests = [e for e in bob.call("sync", after=0)["events"] if e["kind"] == "contact"]
    assert len(requests) == 3
    # bob's own requests are not bounded by his incoming budget
    assert bob.call("contact.request", to="s3")["state"] == "requested"


def test_telemetry_with_a_lone_surrogate_is_refused_and_does_not_poison_the_store(roost):
    apw = roost.add_user("alice")
    secret, code = roost.add_device("thermo", "thermostat")
    alice = ImClient("alice").open(roost, apw, subscribe_inbox=False)
    alice.call("device.claim", device="thermo", code=code)
    assert alice.subscribe("roost/telemetry/thermo") == [1]
    device = MqttClient("thermo").connect(roost.host, roost.port, username="thermo", password=secret)
    device.publish("roost/telemetry/thermo", rb'{"label": "\ud800", "t": 1}', qos=1)
    device.publish("roost/telemetry/thermo", b'{"\xed\xa0\x80": 2}', qos=1)
    device.publish("roost/telemetry/thermo", rb'{"t": 21.5, "mood": "\ud83d\ude00"}', qos=1)
    assert alice.wait_message("roost/telemetry/thermo").json() == {"t": 21.5, "mood": "\U0001f600"}
    assert alice.no_message("roost/telemetry/thermo", 0.3)
    latest = alice.call("devices")["devices"][0]["last_telemetry"]
    assert {k: v for k, v in latest.items() if k != "ts"} == {"t": 21.5, "mood": "\U0001f600"}
    device.disconnect()
    alice.disconnect()
    roost.restart()                                  # the latest readings were saved
    again = ImClient("alice", "again").open(roost, apw, subscribe_inbox=False)
    assert again.call("devices")["devices"][0]["last_telemetry"] == latest


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_one_bad_request_and_never_pushed(roost, number):
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    alice = ImClient("alice").open(roost, apw, subscribe_inbox=False)
    bob = ImClient("bob").open(roost, bpw)
    befriend(alice, bob)
    alice.send_raw(f'{{"id": "n1", "op": "send", "to": "bob", "cmid": "c1", '
                   f'"body": {{"type": "event", "name": "t", "data": {{"v": {number}}}}}}}')
    got = responses(alice)
    assert [(d["id"], d["error"]["code"]) for d in got] == [("n1", "bad_request")], got
    alice.call("send", to="bob", cmid="fine", body={"type": "text", "text": "fine"})
    assert bob.wait_event("msg")["cmid"] == "fine"
