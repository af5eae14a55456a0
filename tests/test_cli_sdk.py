"""The people-side SDK (client/sdk.py) against a real broker: requests, errors,
the ordered event stream (gaps filled, duplicates dropped), cursor files."""

from __future__ import annotations

import queue
import time

import pytest

from client.config import Server
from client.sdk import (
    AuthError,
    ConnectError,
    CursorLocked,
    CursorStore,
    EventStream,
    InboxItem,
    RoostClient,
    ServerError,
)
from tests.harness import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair(roost):
    pw_a = roost.add_user("alice")
    pw_b = roost.add_user("bob")
    clients = []

    def make(user: str, pw: str, **kw) -> RoostClient:
        c = RoostClient(Server(roost.host, roost.port), user, pw, **kw)
        c.connect()
        clients.append(c)
        return c

    a, b = make("alice", pw_a), make("bob", pw_b)
    a.call("contact.request", {"to": "bob"})
    b.call("contact.accept", {"from": "alice"})
    yield a, b, make
    for c in clients:
        c.close()


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


def _msgs(stream: EventStream, count: int, timeout: float = 5.0) -> list[dict]:
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        for item in stream.poll(0.2):
            if isinstance(item, InboxItem) and item.event.get("kind") == "msg":
                got.append(item.event)
    return got


def test_requests_results_and_server_errors(pair):
    a, b, _ = pair
    res = a.send(_text("hi"), to="bob", cmid="c-1")
    assert (res["conv"], res["seq"], res["dup"]) == ("dm:alice:bob", 1, False)
    again = a.send(_text("hi"), to="bob", cmid="c-1")
    assert (again["seq"], again["dup"]) == (1, True)
    with pytest.raises(ServerError) as e:
        a.call("history", {"conv": "dm:bob:zed"})
    assert e.value.code == "forbidden"
    with pytest.raises(ServerError) as e:
        a.call("no.such.op")
    assert e.value.code == "bad_request"


def test_wrong_password_and_no_broker(roost):
    roost.add_user("carol")
    c = RoostClient(Server(roost.host, roost.port), "carol", "wrong", connect_timeout=5)
    t0 = time.monotonic()
    with pytest.raises(AuthError, match="refused carol"):
        c.connect()
    assert time.monotonic() - t0 < 4.5
    with pytest.raises(ConnectError, match="connection refused"):
        RoostClient(Server("127.0.0.1", free_port()), "carol", "x").connect()


def test_stream_fills_gaps_and_drops_duplicates(pair):
    a, b, _ = pair
    stream = EventStream(a)
    head = stream.start_at_head()
    for i in range(5):
        b.send(_text(f"m{i}"), to="alice")
    # wait until all five were pushed, then lose two of them (as if the consumer lagged)
    deadline = time.monotonic() + 5
    pushed: list = []
    msgs: list = []
    while len(msgs) < 5 and time.monotonic() < deadline:
        try:
            p = a.items.get(timeout=0.2)
        except queue.Empty:
            continue
        pushed.append(p)
        if isinstance(p, InboxItem) and p.event["kind"] == "msg":
            msgs.append(p)
    assert len(msgs) == 5
    keep = [p for p in pushed if p not in msgs[1:3]]
    for p in keep + [msgs[0], msgs[3]]:        # and duplicate two
        a.items.put(p)
    got = _msgs(stream, 5)
    assert [m["body"]["text"] for m in got] == ["m0", "m1", "m2", "m3", "m4"]
    assert stream.gaps_filled >= 1
    ns = [m["n"] for m in got]
    assert ns == sorted(ns) and ns[0] > head
    # nothing more comes (no duplicate after the gap was filled)
    assert _msgs(stream, 1, timeout=0.6) == []


def test_cursor_is_saved_on_ack_and_locked_per_label(pair, tmp_path, roost):
    a, b, make = pair
    store = CursorStore(tmp_path, Server(roost.host, roost.port), "alice", "laptop")
    store.lock()
    other = CursorStore(tmp_path, Server(roost.host, roost.port), "alice", "laptop")
    with pytest.raises(CursorLocked):
        other.lock()
    stream = EventStream(a, store=store)
    stream.start_at_head()
    b.send(_text("x"), to="alice")
    [ev] = _msgs(stream, 1)
    stream.flush_ack(force=True)
    assert store.load() in (ev["n"], ev["n"] + 1)   # the message, or the unread count right after it
    store.unlock()
    other.lock()
    other.unlock()
