"""Third-party MQTT clients against `roost serve` over real sockets:

* Eclipse Mosquitto's command-line clients (mosquitto_pub / mosquitto_sub 2.x,
  Debian's mosquitto-clients; scripts/test installs it) with `-V mqttv5`,
  `mqttv311` and `mqttv31` (protocol name MQIsdp): QoS 0/1/2, retained messages,
  user properties, message expiry, wills, a shared subscription, a 3.1 client
  talking to a v5 one, and the PUBACK reason codes of refused IM requests (0x87,
  0x97).
* MQTT.js (npm `mqtt` 5, installed at test time into a cache folder, never into
  the repository) through tests/mqttjs_interop.mjs with protocolVersion 5, 4 and 3.

mosquitto_sub's output is read line by line as it comes (`-d` shows its SUBACK,
so a test publishes only once the subscription is in place); nothing sleeps."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import ROOT, RoostProcess

HOST = "127.0.0.1"
VERSIONS = ("mqttv5", "mqttv311", "mqttv31")
# one line per message: mosquitto_sub -F, tab-separated (%P: "key:value key:value")
FIELDS = ("topic", "qos", "retain", "user_properties", "expiry", "content_type", "response_topic",
          "correlation_data", "payload")
FORMAT = "MSG\t" + "\t".join(("%t", "%q", "%r", "%P", "%E", "%C", "%R", "%D", "%p"))

needs_mosquitto = pytest.mark.skipif(
    not (shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub") and shutil.which("stdbuf")),
    reason="mosquitto-clients is not installed (scripts/test installs it: apt-get install mosquitto-clients)")


@dataclass(frozen=True)
class Received:
    topic: str
    qos: int
    retain: bool
    user_properties: str
    expiry: str
    content_type: str
    response_topic: str
    correlation_data: str
    payload: str

    @staticmethod
    def parse(line: str) -> Received:
        values = dict(zip(FIELDS, line.split("\t", len(FIELDS))[1:], strict=True))
        return Received(values["topic"], int(values["qos"]), values["retain"] == "1", values["user_properties"],
                        values["expiry"], values["content_type"], values["response_topic"],
                        values["correlation_data"], values["payload"])


class MosquittoSub:
    """A running mosquitto_sub whose output is read as it comes, by a thread of its
    own (stdbuf: its stdout is a pipe, which the C library would otherwise
    buffer). `changed` is notified on every line; several subscribers may share one
    to wait on a condition over all of them."""

    def __init__(self, port: int, filters: list[str], *, version: str = "mqttv5", qos: int = 1,
                 extra: tuple[str, ...] = (), changed: threading.Condition | None = None) -> None:
        cmd = ["stdbuf", "-oL", "mosquitto_sub", "-h", HOST, "-p", str(port), "-V", version, "-d",
               "-q", str(qos), "-F", FORMAT, *extra]
        for topic_filter in filters:
            cmd += ["-t", topic_filter]
        self.changed = changed or threading.Condition()
        self.output: list[str] = []
        self.messages: list[Received] = []
        self.ended = False
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            with self.changed:
                self.output.append(line)
                if line.startswith("MSG\t"):
                    self.messages.append(Received.parse(line))
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_for(self, done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        """Wait until `done()` holds (checked after every line of output)."""
        with self.changed:
            if self.changed.wait_for(lambda: done() or self.ended, timeout) and done():
                return
            output = "\n".join(self.output)
        state = f"exited ({self.proc.wait()}) before" if self.ended else f"no {what} within {timeout:g} s;"
        raise AssertionError(f"mosquitto_sub {state} {what if self.ended else ''}; its output:\n{output}")

    def subscribed(self) -> MosquittoSub:
        """Wait for the SUBACK (its granted codes are in `granted`)."""
        self.wait_for(lambda: any(x.startswith("Subscribed (mid") for x in self.output), "SUBACK")
        return self

    @property
    def granted(self) -> list[int]:
        line = next(x for x in self.output if x.startswith("Subscribed (mid"))
        return [int(code) for code in line.split("):", 1)[1].split(",")]

    def receive(self, count: int, timeout: float = 10.0) -> list[Received]:
        self.wait_for(lambda: len(self.messages) >= count, f"{count} message(s)", timeout)
        return self.messages[:count]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# mosquitto_pub's words for a refusal it reports without its code (a PUBREC's)
REASONS = {"Not authorized": 0x87, "Quota exceeded": 0x97, "Payload format invalid": 0x99,
           "Implementation specific error": 0x83, "Unspecified error": 0x80, "Topic Name invalid": 0x90}


def mosquitto_pub(port: int, topic: str, *args: str, version: str = "mqttv5", message: str | None = "m",
                  lines: str | None = None) -> list[int]:
    """Publish with mosquitto_pub (`lines`: one message a line, -l). Returns the
    outcome of each QoS 1/2 message, in packet id order: the reason code of its
    PUBACK / PUBCOMP (0 when 3.1.x has none), or of the PUBREC that refused it."""
    cmd = ["mosquitto_pub", "-h", HOST, "-p", str(port), "-V", version, "-d", "-t", topic, *args]
    if lines is not None:
        cmd.append("-l")
    elif message is not None:
        cmd += ["-m", message]
    res = subprocess.run(cmd, input=lines, capture_output=True, text=True, timeout=15)
    out = res.stdout + res.stderr
    assert "received CONNACK (0)" in out, f"mosquitto_pub could not connect:\n{out}"
    outcome = {int(mid): int(rc or 0)
               for mid, rc in re.findall(r"received PUB(?:ACK|COMP) \(Mid: (\d+)(?:, RC:(\d+))?\)", out)}
    for mid, words in re.findall(r"Publish (\d+) failed: ([^.]+)\.", out):
        outcome.setdefault(int(mid), REASONS.get(words, -1))
    return [outcome[mid] for mid in sorted(outcome)]


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[RoostProcess]:
    proc = RoostProcess(tmp_path_factory.mktemp("thirdparty"), {"auth": {"allow_anonymous": True}}).start()
    proc.add_user("alice", "alice-pw")
    yield proc
    proc.stop()


@pytest.fixture
def subs(broker) -> Iterator[Callable[..., MosquittoSub]]:
    """Start mosquitto_sub clients on the broker; all are ended after the test."""
    started: list[MosquittoSub] = []
    changed = threading.Condition()     # one for all: a test may wait on several

    def start(filters: list[str], **kw) -> MosquittoSub:  # type: ignore[no-untyped-def]
        sub = MosquittoSub(broker.port, filters, changed=changed, **kw)
        started.append(sub)
        return sub

    yield start
    for sub in started:
        sub.close()


# ---- mosquitto_pub / mosquitto_sub ------------------------------------------------
@needs_mosquitto
@pytest.mark.parametrize("version", VERSIONS)
def test_mosquitto_qos_levels_and_retained(broker, subs, version):
    base = f"tp/{version}"
    live = subs([f"{base}/#"], version=version, qos=2).subscribed()
    assert live.granted == [2]
    for qos in (0, 1, 2):
        acks = mosquitto_pub(broker.port, f"{base}/q{qos}", "-q", str(qos), message=f"at {qos}", version=version)
        assert acks == ([] if qos == 0 else [0])
    got = live.receive(3)
    assert [(m.topic, m.qos, m.payload, m.retain) for m in got] == [
        (f"{base}/q{q}", q, f"at {q}", False) for q in (0, 1, 2)]

    mosquitto_pub(broker.port, f"{base}/kept", "-r", "-q", "1", message="kept", version=version)
    assert live.receive(4)[3].retain is False          # a live delivery is not flagged retained
    late = subs([f"{base}/#"], version=version, qos=2).subscribed()
    (kept,) = late.receive(1)
    assert (kept.topic, kept.payload, kept.qos, kept.retain) == (f"{base}/kept", "kept", 1, True)
    mosquitto_pub(broker.port, f"{base}/kept", "-r", "-n", message=None, version=version)   # cleared
    # a later subscriber sees only messages published after it subscribed
    third = subs([f"{base}/#"], version=version).subscribed()
    mosquitto_pub(broker.port, f"{base}/after", "-q", "1", message="after", version=version)
    assert [m.topic for m in third.receive(1)] == [f"{base}/after"]


@needs_mosquitto
def test_mosquitto_v5_properties_pass_through(broker, subs):
    sub = subs(["props/#"]).subscribed()
    acks = mosquitto_pub(broker.port, "props/a", "-q", "1", "-D", "publish", "user-property", "k", "v",
                         "-D", "publish", "user-property", "room", "kitchen",
                         "-D", "publish", "content-type", "text/plain",
                         "-D", "publish", "response-topic", "props/answers",
                         "-D", "publish", "correlation-data", "corr-1", message="with props")
    assert acks == [0]
    (m,) = sub.receive(1)
    assert m.payload == "with props"
    assert m.user_properties == "k:v room:kitchen"
    assert (m.content_type, m.response_topic, m.correlation_data) == ("text/plain", "props/answers", "corr-1")


@needs_mosquitto
def test_mosquitto_message_expiry(broker, subs):
    """Retained and queued messages: the time left is sent, an expired one is dropped."""
    keeper = ("-u", "alice", "-P", "alice-pw", "-i", "alice.keep", "-c", "-x", "60")    # a persistent v5 session
    subs(["exp/q/#"], extra=keeper).subscribed().close()
    for name, expiry in (("short", "1"), ("long", "60"), ("plain", None)):     # queued while it is away
        props = ("-D", "publish", "message-expiry-interval", expiry) if expiry else ()
        mosquitto_pub(broker.port, f"exp/q/{name}", "-q", "1", *props, message=name)
    live = subs(["exp/#"]).subscribed()
    mosquitto_pub(broker.port, "exp/kept", "-r", "-q", "1", "-D", "publish", "message-expiry-interval", "60",
                  message="for a minute")
    assert live.receive(1)[0].expiry in ("60", "59")
    mosquitto_pub(broker.port, "exp/sentinel", "-r", "-q", "1", message="stays")
    mosquitto_pub(broker.port, "exp/gone", "-r", "-q", "1", "-D", "publish", "message-expiry-interval", "1",
                  message="for a second")
    assert [(m.topic, m.expiry) for m in live.receive(3)[1:]] == [("exp/sentinel", ""), ("exp/gone", "1")]

    def retained() -> dict[str, Received]:
        # the retained messages of exp/gone then exp/sentinel, in that order:
        # once the sentinel is in, exp/gone's would have come before it
        sub = subs(["exp/gone", "exp/kept", "exp/sentinel"]).subscribed()
        sub.wait_for(lambda: any(m.topic == "exp/sentinel" for m in sub.messages), "the sentinel")
        sub.close()
        return {m.topic: m for m in sub.messages}

    first = retained()
    assert first["exp/kept"].retain and 0 < int(first["exp/kept"].expiry) <= 60   # time left sent
    assert first["exp/sentinel"].expiry == ""                                        # none set, none sent
    deadline = time.monotonic() + 10
    while "exp/gone" in (now := retained()):
        assert int(now["exp/gone"].expiry) <= 1
        assert time.monotonic() < deadline, "a retained message with a 1 s expiry is still kept after 10 s"
    assert "exp/kept" in now
    # exp/q/short was queued before exp/gone was kept: it has expired too
    back = subs(["exp/q/#"], extra=keeper)
    back.wait_for(lambda: any(m.topic == "exp/q/plain" for m in back.messages), "the queued messages")
    assert [m.topic for m in back.messages] == ["exp/q/long", "exp/q/plain"]
    assert 0 < int(back.messages[0].expiry) <= 60 and back.messages[1].expiry == ""
    for topic in ("exp/kept", "exp/sentinel"):
        mosquitto_pub(broker.port, topic, "-r", "-n", message=None)


@needs_mosquitto
def test_mosquitto_v5_connection_features(broker, subs):
    # an empty client id is assigned one of Roost's form, <principal>.<label>
    assigned = subs(["feat/#"], extra=("-u", "alice", "-P", "alice-pw"), qos=1).subscribed()
    assert any(re.match(r"Client alice\.auto-[0-9a-f]+ received CONNACK", line) for line in assigned.output), \
        assigned.output
    # a filter the ACL denies: SUBACK 0x87 (3.1.1: 0x80, the only failure code it has)
    assert subs(["roost/resp/anon.x"], version="mqttv5").subscribed().granted == [0x87]
    assert subs(["roost/resp/anon.x"], version="mqttv311").subscribed().granted == [0x80]
    # Maximum Packet Size: a larger message is not sent to the client
    small = subs(["feat/#"], extra=("-D", "connect", "maximum-packet-size", "200")).subscribed()
    # Retain As Published: a live retained message keeps its flag
    rap = subs(["feat/#"], extra=("--retain-as-published",)).subscribed()
    mosquitto_pub(broker.port, "feat/big", "-q", "1", message="x" * 500)
    mosquitto_pub(broker.port, "feat/kept", "-q", "1", "-r", message="kept")
    assert [(m.topic, m.retain) for m in assigned.receive(2)] == [("feat/big", False), ("feat/kept", False)]
    assert [(m.topic, m.retain) for m in rap.receive(2)] == [("feat/big", False), ("feat/kept", True)]
    small.wait_for(lambda: any(m.topic == "feat/kept" for m in small.messages), "feat/kept")
    assert [m.topic for m in small.messages] == ["feat/kept"]
    mosquitto_pub(broker.port, "feat/kept", "-r", "-n", message=None)


@needs_mosquitto
@pytest.mark.parametrize("version", VERSIONS)
def test_mosquitto_will(broker, subs, version):
    watcher = subs([f"will/{version}"], version="mqttv5").subscribed()
    will = ["--will-topic", f"will/{version}", "--will-payload", "lost", "--will-qos", "1"]
    if version == "mqttv5":
        will += ["-D", "will", "user-property", "why", "crash"]
    doomed = subs(["will/none"], version=version, extra=tuple(will)).subscribed()
    doomed.proc.kill()      # no DISCONNECT: the broker sees the connection drop
    (m,) = watcher.receive(1)
    assert (m.topic, m.payload, m.qos) == (f"will/{version}", "lost", 1)
    assert m.user_properties == ("why:crash" if version == "mqttv5" else "")


@needs_mosquitto
def test_mosquitto_shared_subscription(broker, subs):
    # one v5 and one 3.1.1 member of the same group
    members = [subs(["$share/workers/jobs/#"], version=v).subscribed() for v in ("mqttv5", "mqttv311")]
    outsider = subs(["jobs/#"]).subscribed()
    jobs = [f"job {i}" for i in range(10)]
    assert mosquitto_pub(broker.port, "jobs/x", "-q", "1", lines="\n".join(jobs) + "\n") == [0] * 10
    outsider.receive(10)                                     # a plain subscriber gets every message
    members[0].wait_for(lambda: sum(len(m.messages) for m in members) >= 10, "10 messages over the group")
    each = [[m.payload for m in member.messages] for member in members]
    assert sorted(each[0] + each[1]) == sorted(jobs)         # each message to one member
    assert each[0] and each[1], f"one member got every message: {each}"
    # a member leaves: the other gets everything after that
    members[0].close()
    more = [f"later {i}" for i in range(4)]
    mosquitto_pub(broker.port, "jobs/x", "-q", "1", lines="\n".join(more) + "\n")
    outsider.receive(14)
    got = members[1].receive(len(each[1]) + 4)
    assert [m.payload for m in got[len(each[1]):]] == more


@needs_mosquitto
def test_mosquitto_v31_and_v5_clients_talk(broker, subs):
    old = subs(["mix/#"], version="mqttv31", qos=2).subscribed()
    new = subs(["mix/#"], version="mqttv5", qos=2).subscribed()
    mosquitto_pub(broker.port, "mix/from5", "-q", "2", "-D", "publish", "user-property", "k", "v",
                  "-D", "publish", "message-expiry-interval", "30", message="from v5", version="mqttv5")
    mosquitto_pub(broker.port, "mix/from31", "-q", "1", message="from v3.1", version="mqttv31")
    got_old, got_new = old.receive(2), new.receive(2)
    assert [(m.topic, m.qos, m.payload) for m in got_old] == [("mix/from5", 2, "from v5"), ("mix/from31", 1, "from v3.1")]
    assert [(m.user_properties, m.expiry) for m in got_old] == [("", ""), ("", "")]   # a 3.1 client has no properties
    assert [(m.topic, m.qos, m.payload) for m in got_new] == [("mix/from5", 2, "from v5"), ("mix/from31", 1, "from v3.1")]
    assert got_new[0].user_properties == "k:v" and got_new[0].expiry in ("30", "29")


# ---- IM requests refused before they run: PUBACK reason codes over the wire -------
@pytest.fixture(scope="module")
def im_broker(tmp_path_factory) -> Iterator[RoostProcess]:
    # a tiny request budget (2, nearly no refill) and a small request size bound
    # (max_body * 6 + 64 KiB, broker/services/gateway.py)
    proc = RoostProcess(tmp_path_factory.mktemp("thirdparty-im"), {
        "auth": {"allow_anonymous": True},
        "limits": {"request_rate": 0.01, "request_burst": 2, "max_body": 1024},
    }).start()
    for user in ("alice", "bob", "rated"):
        proc.add_user(user, f"{user}-pw")
    yield proc
    proc.stop()


def as_user(user: str, label: str) -> tuple[str, ...]:
    return ("-u", user, "-P", f"{user}-pw", "-i", f"{user}.{label}")


@needs_mosquitto
def test_im_request_not_authorized_is_0x87(im_broker):
    request = json.dumps({"id": "r1", "op": "convs"})
    port = im_broker.port
    # on another principal's request topic, at QoS 1 (PUBACK) and 2 (PUBREC)
    assert mosquitto_pub(port, "roost/req/bob.x", "-q", "1", *as_user("alice", "x"), message=request) == [0x87]
    assert mosquitto_pub(port, "roost/req/bob.x", "-q", "2", *as_user("alice", "x"), message=request) == [0x87]
    # on a topic of the sender's principal but another client id
    assert mosquitto_pub(port, "roost/req/alice.y", "-q", "1", *as_user("alice", "x"), message=request) == [0x87]
    # not authenticated (anonymous access is on; the IM topics are not for anonymous clients)
    assert mosquitto_pub(port, "roost/req/anon.x", "-q", "1", "-i", "anon.x", message=request) == [0x87]
    # the same request on the sender's own topic runs
    assert mosquitto_pub(port, "roost/req/alice.x", "-q", "1", *as_user("alice", "x"), message=request) == [0]


@needs_mosquitto
def test_im_request_too_large_is_0x97_and_answered(im_broker, tmp_path):
    port = im_broker.port
    answers = MosquittoSub(port, ["app/alice/answers"], extra=as_user("alice", "watch")).subscribed()
    try:
        big = tmp_path / "big.json"
        big.write_text(json.dumps({"id": "big1", "op": "convs", "params": {"pad": "x" * 80_000}}))
        acks = mosquitto_pub(port, "roost/req/alice.big", "-q", "1", *as_user("alice", "big"), "-f", str(big),
                             "-D", "publish", "response-topic", "app/alice/answers",
                             "-D", "publish", "correlation-data", "big-1", message=None)
        assert acks == [0x97]
        (answer,) = answers.receive(1)
        assert answer.correlation_data == "big-1"
        assert json.loads(answer.payload)["error"]["code"] == "too_large"
    finally:
        answers.close()


@needs_mosquitto
def test_im_requests_over_the_rate_are_0x97_and_answered(im_broker):
    port = im_broker.port
    answers = MosquittoSub(port, ["app/rated/answers"], extra=as_user("rated", "watch")).subscribed()
    try:
        lines = "".join(json.dumps({"id": f"r{i}", "op": "convs"}) + "\n" for i in range(4))
        acks = mosquitto_pub(port, "roost/req/rated.x", "-q", "1", *as_user("rated", "x"),
                             "-D", "publish", "response-topic", "app/rated/answers", lines=lines)
        assert acks == [0, 0, 0x97, 0x97]        # the budget of 2, then refused
        got = {json.loads(m.payload)["id"]: json.loads(m.payload) for m in answers.receive(4)}
        assert [got[f"r{i}"].get("ok") for i in (0, 1)] == [True, True]
        assert [got[f"r{i}"]["error"]["code"] for i in (2, 3)] == ["rate_limited", "rate_limited"]
    finally:
        answers.close()


# ---- MQTT.js --------------------------------------------------------------------
MQTTJS_SCRIPT = ROOT / "tests" / "mqttjs_interop.mjs"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "roost-tests" / "mqttjs5"


@pytest.fixture(scope="module")
def mqttjs() -> Path:
    """A folder whose node_modules holds MQTT.js 5 (npm install once, then reused;
    a file lock keeps parallel test runs from installing at the same time)."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are not installed (MQTT.js interop needs them)")
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        pytest.skip(f"no cache folder for MQTT.js at {folder}: {err}")
    installed = folder / "node_modules" / "mqtt" / "package.json"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed.exists() or not json.loads(installed.read_text())["version"].startswith("5."):
            try:
                # no retries: an unreachable registry is a skip in seconds, not minutes
                res = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-save", "--fetch-retries=0",
                                      "--fetch-timeout=20000", "--prefix", str(folder), "mqtt@5"],
                                     capture_output=True, text=True, timeout=120)
            except subprocess.TimeoutExpired:
                pytest.skip("npm install mqtt@5 did not finish within 120 s (is the npm registry reachable?)")
            if res.returncode != 0 or not installed.exists():
                errors = [line for line in res.stderr.splitlines() if "complete log" not in line] or ["no output"]
                pytest.skip(f"npm install mqtt@5 failed (is the npm registry reachable?): {errors[0]}")
    return folder


@pytest.mark.parametrize("protocol_version", [5, 4, 3])
def test_mqttjs(broker, mqttjs, protocol_version):
    res = subprocess.run(["node", str(MQTTJS_SCRIPT), str(mqttjs), str(broker.port), str(protocol_version),
                          "alice", "alice-pw"], capture_output=True, text=True, timeout=60)
    checks = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    failed = [c for c in checks if not c["ok"]]
    assert res.returncode == 0 and not failed and checks, (
        f"MQTT.js v{protocol_version}: {failed or 'no checks ran'}\n{res.stdout}{res.stderr}")
    if protocol_version == 5:
        names = {c["check"] for c in checks}
        assert {"request/response: Correlation Data passed through", "IM answer carries the Correlation Data",
                "refused IM request: PUBACK 0x99"} <= names
