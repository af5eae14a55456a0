"""Hostile input never hurts the broker (issue 10): a bounded, seeded MQTT 3.1.1
packet fuzzer over raw sockets, and a seeded JSON request fuzzer against the IM
request topic. Each asserts what a user would observe afterwards: the broker
still runs and serves well-behaved clients, clients that behaved all along were
never disturbed, every request got exactly one answer with a code of the
protocol's catalogue (never `internal`), nothing failed was stored, the memory
stayed within budget, and the log shows no traceback."""

from __future__ import annotations

import functools
import json
import math
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from broker.mqtt import codec
from contract.envelopes import OPS
from contract.errors import ErrorCode
from tests.clients import ImClient, MqttClient
from tests.harness import RoostProcess
from tests.test_mqtt_helpers import RawClient, split_packet

CATALOGUE = {str(c) for c in ErrorCode}
RSS_BUDGET = 150 * 1024 * 1024      # growth allowed over the broker's size before the fuzz


# ---- helpers shared with test_faults_crash ----------------------------------------


def tracebacks(roost: RoostProcess) -> list[str]:
    """Every traceback in the broker's log, each with the line that announced it."""
    lines = roost.log_path.read_text(errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            out.append("\n".join(lines[max(0, i - 1):i + 25]))
    return out


def rss_bytes(roost: RoostProcess) -> int:
    assert roost.proc is not None
    for line in Path(f"/proc/{roost.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# Well-behaved clients connect from their own loopback addresses: the fuzzer's
# addresses earn the login guard's failure delays and waiting limits (by design).
CALM_ADDRESS = "127.0.0.2"


def from_address(client: MqttClient, address: str) -> MqttClient:
    """`client` will connect from source `address` (any 127.x.y.z is this host)."""
    client.paho.connect = functools.partial(client.paho.connect, bind_address=address)
    return client


def open_fds(roost: RoostProcess) -> int:
    assert roost.proc is not None
    return len(list(Path(f"/proc/{roost.proc.pid}/fd").iterdir()))


def wait_for(condition: Any, timeout: float) -> bool:
    """Poll `condition` until it holds or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def well_behaved_round_trip(roost: RoostProcess, principal: str, password: str, label: str) -> None:
    """A fresh client connects, subscribes, publishes QoS 1 and receives its message."""
    c = from_address(MqttClient(f"{principal}.{label}"), CALM_ADDRESS).connect(
        roost.host, roost.port, username=principal, password=password)
    try:
        assert c.subscribe(f"check/{label}/#", 1) == [1]
        c.publish(f"check/{label}/x", b"still here", qos=1)
        m = c.wait_message(f"check/{label}/#")
        assert (m.payload, m.qos) == (b"still here", 1)
    finally:
        c.disconnect()


# ---- (a) the MQTT packet fuzzer ---------------------------------------------------


def _s(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + codec.encode_varint(len(body)) + body


TOPICS = [b"fz/a", b"fz/b/c", b"home/kitchen/temp", b"roost/req/alice.fz", b"roost/inbox/bob",
          b"roost/presence/alice", b"$SYS/x", b"/", b"a//b", "f\u00fcr/\u6f22".encode()]
FILTERS = [b"fz/#", b"+/+", b"#", b"+", b"roost/inbox/alice", b"roost/inbox/bob", b"roost/#", b"$SYS/#",
           b"a/" * 70 + b"#", b"fz/+/c", b"/#"]
BAD_UTF8 = [b"\xff\xfe", b"a/\xed\xa0\x80", b"a\x00b", b"\xc0\xaf", b"fz/\x80"]
BAD_WILDCARDS = [b"a/#/b", b"a+", b"#a", b"a/b#", b"++", b"+a/b"]


class PacketGen:
    def __init__(self, rng: random.Random, password: str) -> None:
        self.rng = rng
        self.password = password
        self.pid = 0

    def next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def connect(self, n: int) -> bytes:
        r = self.rng
        cid = r.choices([f"alice.fz{n}", f"alice.fz{n % 7}", "alice", "bob.fz", ""], [50, 20, 10, 3, 3])[0]
        will = (r.choice(["fz/will", "roost/inbox/bob"]), b"gone", r.randint(0, 2), r.random() < 0.5) \
            if r.random() < 0.2 else None
        password = self.password if r.random() < 0.9 else "wrong"
        return codec.encode_connect(cid, clean=r.random() < 0.95, keep_alive=r.choice([0, 1, 60, 65535]),
                                    username="alice", password=password, will=will)

    def flip(self, data: bytes, most: int) -> bytes:
        """`data` with 1..`most` random bits flipped."""
        b = bytearray(data)
        for _ in range(self.rng.randint(1, most)):
            b[self.rng.randrange(len(b))] ^= 1 << self.rng.randrange(8)
        return bytes(b)

    def bad_connect(self, n: int) -> bytes:
        """A CONNECT broken in one of its fields (or anywhere, by bit flips)."""
        r = self.rng
        good = self.connect(n)
        body = good[2:] if good[1] < 0x80 else good[3:]
        how = r.choice(["flip", "flip", "truncate", "level", "name", "reserved", "will_qos3", "no_user",
                        "long_id", "empty_user", "bad_utf8_id"])
        if how == "flip":
            return self.flip(good, 4)
        if how == "truncate":
            return _packet(0x10, body[:r.randrange(len(body))])
        if how == "level":
            return codec.encode_connect(f"alice.fz{n}", username="alice", password=self.password,
                                        level=r.choice([0, 3, 5, 255]))
        if how == "name":
            return codec.encode_connect(f"alice.fz{n}", username="alice", password=self.password,
                                        name=r.choice(["MQIsdp", "mqtt", "", "MQTT\x00"]))
        flags_at = 2 + 4 + 1          # after the protocol name "MQTT" and the level
        b = bytearray(body)
        if how == "reserved":
            b[flags_at] |= 0x01
        elif how == "will_qos3":
            b[flags_at] |= 0x18
        elif how == "no_user":       # password flag without the user name flag
            b[flags_at] = (b[flags_at] & ~0x80) | 0x40
        elif how == "long_id":
            return codec.encode_connect("alice." + "x" * r.choice([33, 200, 65000]), username="alice",
                                        password=self.password)
        elif how == "empty_user":
            return codec.encode_connect(f"alice.fz{n}", username="", password=self.password)
        else:
            return _packet(0x10, bytes(b[:flags_at + 3]) + _s(r.choice(BAD_UTF8)) + _s(b"alice") + _s(b"x"))
        return _packet(0x10, bytes(b))

    def publish(self, topic: bytes | None = None) -> bytes:
        r = self.rng
        qos = r.randint(0, 2)
        topic = topic if topic is not None else r.choice(TOPICS)
        if topic.startswith(b"roost/req/"):
            payload = r.choice([b'{"id":"x","op":"sync"}', b"{", b"[]", b'{"id":1}', b'{"id":"y","op":"nope"}'])
        else:
            payload = r.randbytes(r.choice([0, 1, 10, 200, 3000]))
        first = 0x30 | (qos << 1) | (r.random() < 0.3) | (0x08 if qos and r.random() < 0.2 else 0)
        body = _s(topic) + (self.next_pid().to_bytes(2, "big") if qos else b"") + payload
        return _packet(first, body)

    def subscribe(self, filters: list[bytes] | None = None) -> bytes:
        r = self.rng
        filters = filters if filters is not None else r.sample(FILTERS, r.randint(1, 3))
        body = self.next_pid().to_bytes(2, "big") + b"".join(_s(f) + bytes((r.randint(0, 2),)) for f in filters)
        return _packet(0x82, body)

    def unsubscribe(self, filters: list[bytes] | None = None) -> bytes:
        r = self.rng
        filters = filters if filters is not None else r.sample(FILTERS, r.randint(1, 2))
        return _packet(0xA2, self.next_pid().to_bytes(2, "big") + b"".join(_s(f) for f in filters))

    def valid(self) -> bytes:
        r = self.rng
        kind = r.choices(["pub", "sub", "unsub", "ping", "ack", "pubrel"], [40, 15, 8, 10, 15, 12])[0]
        if kind == "pub":
            return self.publish()
        if kind == "sub":
            return self.subscribe()
        if kind == "unsub":
            return self.unsubscribe()
        if kind == "ping":
            return b"\xc0\x00"
        if kind == "pubrel":
            return codec.ack(codec.PUBREL, r.randint(1, 65535))
        return codec.ack(r.choice([codec.PUBACK, codec.PUBREC, codec.PUBCOMP]), r.randint(1, 65535))

    def mutated(self, n: int) -> bytes:
        r = self.rng
        how = r.choice(["flip", "truncate", "length", "huge", "type", "utf8", "wildcard", "garbage",
                        "varint5", "zero_pid", "qos3", "second_connect", "empty_sub"])
        p = self.valid() if how not in ("second_connect",) else self.connect(n)
        if how == "flip":
            return self.flip(p, 3)
        if how == "truncate":
            return p[:r.randrange(1, len(p))] if len(p) > 1 else b""
        if how == "length":       # a remaining length that does not fit the body
            body = p[2:] if p[1] < 0x80 else p[3:]
            return bytes((p[0],)) + codec.encode_varint(max(0, len(body) + r.choice([-3, -1, 1, 2, 500]))) + body
        if how == "huge":
            return bytes((p[0],)) + r.choice([b"\xff\xff\xff\x7f", b"\x80\x80\x80\x01", b"\xff\xff\x7f"]) + p[2:]
        if how == "varint5":
            return bytes((p[0],)) + b"\xff\xff\xff\xff\x01" + p[2:]
        if how == "type":
            return bytes((r.randrange(256),)) + p[1:]
        if how == "utf8":
            bad = r.choice(BAD_UTF8)
            return r.choice([self.publish(bad), self.subscribe([bad]), self.unsubscribe([bad])])
        if how == "wildcard":
            bad = r.choice(BAD_WILDCARDS)
            return r.choice([self.publish(bad), self.publish(b"fz/+"), self.publish(b"fz/#"),
                             self.subscribe([bad]), self.unsubscribe([bad]), self.subscribe([b""])])
        if how == "zero_pid":
            return r.choice([_packet(0x32, _s(b"fz/a") + b"\x00\x00x"), _packet(0x82, b"\x00\x00" + _s(b"a") + b"\x01"),
                             codec.ack(codec.PUBACK, 0)])
        if how == "qos3":
            return r.choice([_packet(0x36, _s(b"fz/a") + b"\x00\x01x"), _packet(0x82, b"\x00\x01" + _s(b"a") + b"\x03")])
        if how == "second_connect":
            return p
        if how == "empty_sub":
            return r.choice([_packet(0x82, b"\x00\x05"), _packet(0xA2, b"\x00\x05"), _packet(0x80, b"\x00\x05")])
        return r.randbytes(r.randint(1, 64))

    def connection_plan(self, n: int) -> tuple[bytes, bool, bytes, int, int]:
        """What one connection sends: (first packet, whether it is a CONNECT to wait
        for, the rest, PINGREQs in the rest that must be answered, packets)."""
        r = self.rng
        if r.random() < 0.75:
            head, is_connect = self.connect(n), True
        elif r.random() < 0.5:
            head, is_connect = self.bad_connect(n), True
        else:
            head, is_connect = r.choice([self.valid(), self.mutated(n), r.randbytes(r.randint(1, 40))]), False
        parts: list[bytes] = []
        pings = 0
        for _ in range(r.randint(1, 16)):
            if r.random() < 0.8:
                parts.append(self.valid())
                pings += parts[-1] == b"\xc0\x00"
            else:
                parts.append(self.mutated(n))
        return head, is_connect, b"".join(parts), pings, 1 + len(parts)


def _read_packets(s: socket.socket, buf: bytes, deadline: float) -> tuple[list[int], bytes, bool]:
    """The types of the whole packets that arrive before `deadline`: (types, rest, closed)."""
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        chunk = s.recv(65536)
    except TimeoutError:
        return [], buf, False
    types = []
    buf += chunk
    while (packet := split_packet(buf))[0] is not None:
        (ptype, _flags, _body), buf = packet
        types.append(ptype)
    return types, buf, not chunk


def _fuzz_connection(port: int, source: str, head: bytes, is_connect: bool, rest: bytes, pings: int,
                     chunks: list[int], reset: bool) -> None:
    """Send `head` (a CONNECT: wait for its CONNACK), then `rest` split at `chunks`
    and a last PINGREQ, from `source`; read until every PINGREQ is answered or the
    broker closes (never more than 1 s); close, with RST when `reset`."""
    deadline = time.monotonic() + 1.0
    buf = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0, source_address=(source, 0)) as s:
            s.sendall(head)
            if is_connect:   # else a half-open CONNECT whose client went on would cut the fuzz short
                types: list[int] = []
                while not types and time.monotonic() < deadline:
                    types, buf, closed = _read_packets(s, buf, deadline)
                    if closed:
                        return
            data = rest + b"\xc0\x00"
            start = 0
            for end in [*chunks, len(data)]:
                if end > start:
                    s.sendall(data[start:end])
                    start = end
            if reset:    # vanish with RST, nothing flushed
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return
            answered = 0
            while answered <= pings and time.monotonic() < deadline:
                types, buf, closed = _read_packets(s, buf, deadline)
                answered += types.count(codec.PINGRESP)
                if closed:
                    return
    except OSError:
        pass     # the broker closed on us: that is its right


def test_mqtt_packet_fuzzer_leaves_the_broker_serving(roost_factory):
    roost = roost_factory({"auth": {"failure_delay": 0.01, "failure_delay_max": 0.05}})
    pw = roost.add_user("alice")
    bpw = roost.add_user("bob")
    rng = random.Random(20261010)
    gen = PacketGen(rng, pw)

    # a bystander that behaves, connected all through the fuzz
    bystander = from_address(MqttClient("bob.bystander"), CALM_ADDRESS).connect(
        roost.host, roost.port, username="bob", password=bpw)
    assert bystander.subscribe("calm/#", 1) == [1]
    well_behaved_round_trip(roost, "bob", bpw, "before")
    rss_before, fds_before = rss_bytes(roost), open_fds(roost)

    jobs = []
    packets = 0
    for n in range(1200):
        head, is_connect, rest, pings, count = gen.connection_plan(n)
        packets += count
        chunks = sorted(rng.sample(range(1, len(rest) + 1), min(len(rest), rng.randint(0, 3))))
        jobs.append((f"127.0.1.{n % 40 + 1}", head, is_connect, rest, pings, chunks, rng.random() < 0.15))
    assert packets > 8000

    stop = threading.Event()
    calm_sent: list[int] = []
    calm_slow: list[int] = []

    def bystander_traffic() -> None:
        for i in range(10_000):   # bounded; stops with the fuzz
            if stop.is_set():
                return
            info = bystander.paho.publish("calm/x", str(i).encode(), qos=1)
            info.wait_for_publish(5.0)
            if not info.is_published():
                calm_slow.append(i)   # no PUBACK within 5 s: the fuzz starved a calm client
            calm_sent.append(i)

    # connections that stop in the middle of a packet and hold it for the whole fuzz
    held = []
    for n in range(20):
        s = socket.create_connection((roost.host, roost.port), timeout=5, source_address=(f"127.0.2.{n + 1}", 0))
        data = gen.connect(10_000 + n) if n % 2 else codec.encode_connect(f"alice.held{n}", username="alice",
                                                                          password=pw) + gen.publish()
        s.sendall(data[:rng.randrange(1, len(data))])
        held.append(s)

    traffic = threading.Thread(target=bystander_traffic)
    traffic.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda job: _fuzz_connection(roost.port, *job), jobs))
    finally:
        stop.set()
        traffic.join(30)

    assert roost.running, roost.log_tail()
    # the bystander was never disconnected and got every one of its messages, in order
    got = [int(bystander.wait_message("calm/#", timeout=10).payload) for _ in calm_sent]
    assert got == calm_sent and calm_sent and calm_slow == []
    assert not bystander._disconnected.is_set()
    well_behaved_round_trip(roost, "alice", pw, "after")
    well_behaved_round_trip(roost, "bob", bpw, "after")
    assert rss_bytes(roost) - rss_before < RSS_BUDGET
    assert tracebacks(roost) == []
    for s in held:
        s.close()
    # every fuzz connection is let go: no socket leaks (closing ones get CLOSE_GRACE)
    assert wait_for(lambda: open_fds(roost) <= fds_before + 5, timeout=15), (fds_before, open_fds(roost))


# ---- (b) the JSON request fuzzer --------------------------------------------------


def _dumps(v: Any, ascii_only: bool = True) -> str:
    return json.dumps(v, ensure_ascii=ascii_only, allow_nan=True, separators=(",", ":"))


def _deep(depth: int, rng: random.Random) -> str:
    """A JSON text nested `depth` levels (built as text: no recursion here)."""
    if rng.random() < 0.5:
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


WEIRD: list[Any] = [None, True, False, 0, -1, 1.5, 2 ** 62, 2 ** 62 + 1, 2 ** 63, 2 ** 64, -(2 ** 63), 10 ** 300,
                    1e308, -1e308, 1e-320, float("nan"), float("inf"), float("-inf"), "", " ", "x" * 65,
                    "x" * 70_000, "\ud800", "\udfff", "a\ud800b", "\x00", "\u202e", "\U0001f600", "bob",
                    "dm:alice:bob", "grp:nope", [], [None], ["bob", "bob"], {}, {"type": "text"},
                    {"type": "text", "text": "\ud800"}, {"type": "file", "name": "x"}, [[]], "NaN"]

WRONG_TYPES: list[Any] = [None, True, 0, -1, 1.5, 2 ** 64, "", "x" * 65, [], ["bob"], {}, {"a": 1}]

BASE: dict[str, dict[str, Any]] = {
    "send": {"to": "bob", "cmid": "c", "body": {"type": "text", "text": "hi"}},
    "sync": {"after": 0, "limit": 10},
    "ack": {"n": 0},
    "read": {"conv": "dm:alice:bob", "seq": 1},
    "history": {"conv": "dm:alice:bob", "before": 5, "limit": 5},
    "contact.request": {"to": "carol", "note": "hi"},
    "contact.accept": {"from": "carol"},
    "contact.reject": {"from": "carol"},
    "contact.unblock": {"user": "carol"},
    "user.search": {"q": "bo"},
    "profile.get": {"user": "bob"},
    "profile.set": {"name": "Alice", "status": "here"},
    "group.create": {"name": "g", "members": ["bob"]},
    "group.add": {"conv": "grp:x", "members": ["bob"]},
    "group.remove": {"conv": "grp:x", "members": ["bob"]},
    "group.leave": {"conv": "grp:x"},
    "group.info": {"conv": "grp:x"},
    "device.claim": {"device": "lamp", "code": "123"},
    "device.share": {"device": "lamp", "with": "bob"},
}
# NaN/Infinity inside a message body are accepted and pushed as is: that bug has its
# own test below; the body mutations leave them out so the fuzzer checks the rest.
FINITE = [v for v in WEIRD if not (isinstance(v, float) and not math.isfinite(v))]
BODY_FIELDS = ["text", "name", "args", "for", "status", "data", "type", "size", "x"]
SAFE_OPS = [op for op in OPS if op not in ("contact.remove", "contact.block")]  # keep alice and bob friends
UNKNOWN_OPS = ["", "SEND", "send ", "nope", "send\u0000", "__class__", "\ud800", "sync.", "x" * 500]


class RequestGen:
    """Fuzzed request payloads, each with the ids its one answer may carry."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.n = 0

    def sweep(self) -> list[tuple[bytes, set[str | None]]]:
        """Every parameter of every operation, once with each value of the wrong type."""
        out = []
        for op, base in BASE.items():
            for key in base:
                for value in WRONG_TYPES:
                    self.n += 1
                    params = {**base, key: value}
                    if op == "send" and key != "cmid":
                        params["cmid"] = f"c{self.n}"
                    payload = json.dumps({"id": f"f{self.n}", "op": op, **params}).encode()
                    out.append((payload, expected_ids(payload)))
        return out

    def weird(self) -> Any:
        r = self.rng
        if r.random() < 0.08:
            return _Raw(_deep(r.choice([20, 200, 100_000]), r))
        return r.choice(WEIRD)

    def one(self) -> tuple[bytes, set[str | None]]:
        r = self.rng
        self.n += 1
        rid: Any = f"f{self.n}"
        op = r.choice(SAFE_OPS) if r.random() < 0.9 else r.choice(UNKNOWN_OPS)
        params: dict[str, Any] = dict(BASE.get(op, {}))
        if op == "send":
            params["cmid"] = f"c{self.n}"
        mutation = r.choice(["none", "field", "field", "field", "missing", "extra", "id", "op", "dup", "body"])
        pairs: list[tuple[str, Any]]
        if mutation == "field" and params:
            params[r.choice(list(params))] = self.weird()
        elif mutation == "body" and op == "send":
            body = {"type": r.choice(["text", "command", "result", "event", "file", "x", None, 1])}
            for key in r.sample(BODY_FIELDS, r.randint(0, 4)):
                body[key] = r.choice(FINITE) if r.random() < 0.7 else {"k": r.choice(FINITE)}
            params["body"] = body
        elif mutation == "missing" and params:
            del params[r.choice(list(params))]
        elif mutation == "extra":
            params[r.choice(["x", "id2", "", "\ud800", "op2", "a" * 300])] = self.weird()
        elif mutation == "id":
            rid = r.choice([None, 1, 1.5, True, [], {}, "", "x" * 65, f"f{self.n}\ud800", f"\udfff{self.n}",
                            f"f{self.n}\u00e9\U0001f600", f"f{self.n}\x00", f"f{self.n}" + "y" * 50, _MISSING])
        elif mutation == "op":
            op = r.choice([None, 1, [], {}, "", _MISSING, "\ud800", r.choice(UNKNOWN_OPS)])
        pairs = ([] if rid is _MISSING else [("id", rid)]) + ([] if op is _MISSING else [("op", op)])
        pairs += list(params.items())
        if mutation == "dup":
            pairs.insert(r.randrange(1, len(pairs) + 1), r.choice([("op", "nope"), ("op", op), ("id", rid),
                                                                   ("cmid", "c0"), ("after", -1)]))
        if r.random() < 0.1:
            r.shuffle(pairs)
        ascii_only = r.random() < 0.85
        text = "{" + ",".join(f"{_dumps(k, ascii_only)}:{_enc(v, ascii_only)}" for k, v in pairs) + "}"
        payload = text.encode("utf-8", "surrogatepass")
        raw = r.random()
        if raw < 0.04:
            payload = payload[:r.randrange(len(payload))]
        elif raw < 0.08:
            cut = r.randrange(len(payload))
            payload = payload[:cut] + r.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]) + payload[cut:]
        elif raw < 0.1:
            payload = r.choice([b"", b"null", b"[]", b'"x"', b"1", b"{", b"\xef\xbb\xbf{}", b"{}" * 3])
        return payload, expected_ids(payload)


class _Raw(str):
    """JSON text inserted as is."""


_MISSING = object()


def _enc(v: Any, ascii_only: bool) -> str:
    return str(v) if isinstance(v, _Raw) else _dumps(v, ascii_only)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


LARGE = 6 * 65536 + 64 * 1024     # larger requests are refused unparsed (docs/PROTOCOL.md, too_large)


def _request_id(text: str, **kw: Any) -> str | None:
    doc = json.loads(text, **kw)
    rid = doc.get("id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) and 1 <= len(rid) <= 64 else None


def expected_ids(payload: bytes) -> set[str | None]:
    """The ids docs/PROTOCOL.md allows in the one answer to `payload` (None: null).
    Two where the protocol leaves room: NaN/Infinity and CESU-8 surrogates are not
    JSON/UTF-8, but a lenient parser (Python's) takes them; an id with a lone
    surrogate cannot be written as UTF-8, so it may be refused as no valid id; a
    request too large to parse has its id echoed only when it comes first."""
    if len(payload) > LARGE:
        first = re.match(rb'\s*\{\s*"id"\s*:\s*("(?:[^"\\]|\\.){1,64}")', payload)
        return {None, json.loads(first.group(1))} if first else {None}
    try:
        ids: set[str | None] = {_request_id(payload.decode("utf-8"), parse_constant=_reject_constant)}
    except RecursionError:
        return {None}            # nested too deeply
    except ValueError:           # not UTF-8, not JSON
        ids = {None}
    try:
        ids.add(_request_id(payload.decode("utf-8", "surrogatepass")))
    except (ValueError, RecursionError):
        pass
    if any(i is not None and _lone_surrogate(i) for i in ids):
        ids.add(None)
    return ids


def _lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def strict_json(payload: bytes) -> Any:
    return json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)


def befriend(roost: RoostProcess, a: str, apw: str, b: str, bpw: str) -> None:
    ca, cb = ImClient(a, "setup").open(roost, apw), ImClient(b, "setup").open(roost, bpw)
    ca.call("contact.request", to=b)
    cb.call("contact.accept", **{"from": a})
    ca.disconnect()
    cb.disconnect()


def sync_all(client: ImClient) -> list[dict[str, Any]]:
    """Every event of the client's mailbox, through `sync` pages (bounded)."""
    events: list[dict[str, Any]] = []
    after = 0
    for _ in range(1000):
        page = client.call("sync", after=after, limit=1000)
        json.dumps(page, allow_nan=False)    # strict JSON: no NaN/Infinity for other parsers to choke on
        events += page["events"]
        after = page["last"]
        if not page["more"]:
            return events
    raise AssertionError("sync never ended")


def test_json_request_fuzzer_answers_each_request_once_with_a_catalogued_code(roost_factory):
    roost = roost_factory({"limits": {"request_rate": 100_000, "request_burst": 100_000,
                                      "max_pending_requests": 100_000}})
    apw, bpw = roost.add_user("alice", name="Alice"), roost.add_user("bob", name="Bob")
    cpw, dpw = roost.add_user("carol"), roost.add_user("dave")
    befriend(roost, "alice", apw, "bob", bpw)
    befriend(roost, "carol", cpw, "dave", dpw)
    rss_before = rss_bytes(roost)
    rng = random.Random(10_2026)
    gen = RequestGen(rng)
    requests = gen.sweep() + [gen.one() for _ in range(800)]
    assert sum(1 for _p, ids in requests if None not in ids) > 400     # most have a usable id

    bob = ImClient("bob", "inbox").open(roost, bpw)     # receives what alice manages to send
    alice = ImClient("alice", "fz").open(roost, apw, subscribe_inbox=False)
    resp_topic = f"roost/resp/{alice.client_id}"
    for payload, _ids in requests:
        alice.publish(f"roost/req/{alice.client_id}", payload, qos=1, wait=False)

    answers: dict[Any, list[dict[str, Any]]] = {}
    problems: list[str] = []
    for _ in requests:
        try:
            m = alice.wait_message(resp_topic, timeout=10)
        except TimeoutError:
            break      # some were not answered: counted below
        try:
            doc = strict_json(m.payload)
        except ValueError as exc:
            problems.append(f"response is not strict JSON ({exc}): {m.payload[:200]!r}")
            continue
        if not isinstance(doc, dict):
            problems.append(f"response is not an object: {doc!r}")
            continue
        answers.setdefault(doc.get("id"), []).append(doc)
        if not isinstance(doc.get("ok"), bool):
            problems.append(f"no boolean ok: {doc}")
        elif not doc["ok"]:
            code = doc.get("error", {}).get("code")
            if code not in CATALOGUE or code == "internal":
                problems.append(f"error code {code!r}: {doc}")
    assert alice.no_message(resp_topic, wait=1.0), "more responses than requests"

    # exactly one answer each: first the requests whose answer's id is certain ...
    left = {rid: len(docs) for rid, docs in answers.items()}
    flexible = []
    for payload, ids in requests:
        if len(ids) == 1:
            (rid,) = ids
            left[rid] = left.get(rid, 0) - 1
        else:
            flexible.append((payload, ids))
    for _payload, ids in flexible:      # ... then those that may carry their id or null
        rid = next((i for i in ids if i is not None and left.get(i, 0) > 0), None)
        left[rid] = left.get(rid, 0) - 1
    problems += [f"{-n} answers missing for id {rid!r}" if n < 0 else f"{n} extra answers with id {rid!r}"
                 for rid, n in left.items() if n]
    assert not problems, "\n".join(problems)

    # nothing a failed request did was stored: alice's messages are exactly her ok sends
    sent = {(d["result"]["conv"], d["result"]["seq"]) for docs in answers.values() for d in docs
            if d.get("ok") and isinstance(d.get("result"), dict) and "seq" in d["result"] and "dup" in d["result"]}
    mine = [(e["conv"], e["seq"]) for e in sync_all(alice) if e["kind"] == "msg" and e["from"] == "alice"]
    assert sorted(mine) == sorted(sent) and len(mine) == len(set(mine))
    pushed = 0
    while pushed < len(sent):     # bob was pushed each of them, as strict JSON
        m = bob.wait_message("roost/inbox/bob", timeout=10)
        pushed += strict_json(m.payload)["kind"] == "msg"

    # and the broker is healthy: another pair chats, alice sends normally
    assert roost.running
    carol = ImClient("carol", "after").open(roost, cpw)
    dave = ImClient("dave", "after").open(roost, dpw)
    r = carol.call("send", to="dave", cmid="after-1", body={"type": "text", "text": "fine?"})
    assert dave.wait_event("msg", cmid="after-1")["seq"] == r["seq"] == 1
    assert alice.call("send", to="bob", cmid="after-2", body={"type": "text", "text": "ok"})["dup"] is False
    well_behaved_round_trip(roost, "dave", dpw, "after")
    assert rss_bytes(roost) - rss_before < RSS_BUDGET
    assert tracebacks(roost) == []


def test_non_finite_numbers_in_a_body_are_refused_not_pushed_to_other_clients(roost):
    """NaN/Infinity are not JSON (RFC 8259); Python's json reads and writes them.
    A body holding one must be refused, never stored and pushed as `NaN` text that
    strict parsers (JavaScript's JSON.parse, Go, serde) reject: one such message
    would break the recipient's inbox and every sync page that holds it."""
    apw, bpw = roost.add_user("alice"), roost.add_user("bob")
    befriend(roost, "alice", apw, "bob", bpw)
    alice, bob = ImClient("alice", "x").open(roost, apw), ImClient("bob", "x").open(roost, bpw)
    for i, const in enumerate(["NaN", "Infinity", "-Infinity"]):
        alice.send_raw(f'{{"id":"n{i}","op":"send","to":"bob","cmid":"c{i}",'
                       f'"body":{{"type":"event","name":"t","data":{{"v":{const}}}}}}}')
        doc = alice.wait_response(f"n{i}")
        assert (doc["ok"], doc.get("error", {}).get("code")) == (False, "bad_request"), doc
    alice.call("send", to="bob", cmid="fine", body={"type": "text", "text": "fine"})
    assert strict_json(bob.wait_message("roost/inbox/bob").payload)["cmid"] == "fine"


def test_a_refused_client_id_can_neither_forge_nor_flood_log_lines(roost):
    """Whoever can open a socket chooses the client id of a CONNECT that is then
    refused: the log must show it escaped and bounded."""
    roost.add_user("alice")
    forged = "alice.x\n2026-01-01 00:00:00,000 ERROR roost.auth: FORGED\nTraceback (most recent call last):"
    for cid in (forged, "alice." + "x" * 60_000):
        raw = RawClient(roost.port)
        body = raw.connect(cid, username="alice", password="wrong")
        assert body[1] in (2, 4)          # refused; the refusal is logged before its CONNACK
        raw.close()
    lines = roost.log_path.read_text(errors="replace").splitlines()
    assert [line for line in lines if line.startswith("2026-01-01")] == []
    assert tracebacks(roost) == []
    assert max(len(line) for line in lines) < 4096
