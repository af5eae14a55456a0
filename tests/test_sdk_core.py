"""The SDK core (contract/sdkcore/) on its own, no broker: request correlation,
re-publishing and retries, gap filling from the cursor, the cursor file, backoff."""

from __future__ import annotations

import itertools
import json
import threading
from typing import Any

import pytest

from contract.sdkcore import (
    AuthError,
    Backoff,
    ConnectError,
    ConnectTimeout,
    CursorFile,
    CursorLocked,
    LinkState,
    MailboxFollower,
    Place,
    RequestError,
    Requests,
    RequestTimeout,
    RoostError,
    SavedCursor,
    mailbox_head,
)

pytestmark = pytest.mark.timeout(30)


# ---- errors -------------------------------------------------------------------------

def test_one_error_tree():
    for cls in (ConnectError, AuthError, ConnectTimeout, RequestError, RequestTimeout, CursorLocked):
        assert issubclass(cls, RoostError)
    assert issubclass(AuthError, ConnectError) and issubclass(ConnectTimeout, ConnectError)
    # the device SDK used to raise the built-in TimeoutError: code catching it still works
    assert issubclass(ConnectTimeout, TimeoutError) and issubclass(RequestTimeout, TimeoutError)
    e = RequestError("send", "forbidden", "not a contact")
    assert (e.op, e.code, e.message, str(e)) == ("send", "forbidden", "not a contact", "send: forbidden: not a contact")


def test_client_and_device_sdks_share_the_tree():
    import client.sdk
    import devices.sdk

    assert client.sdk.ServerError is RequestError is devices.sdk.RequestError
    assert client.sdk.RoostError is devices.sdk.RoostError is RoostError
    assert client.sdk.RequestTimeout is RequestTimeout and client.sdk.CursorLocked is CursorLocked


# ---- request correlation ------------------------------------------------------------------

class FakeServer:
    """Records what is published; answers through `Requests.resolve` as told."""

    def __init__(self) -> None:
        self.link = LinkState()
        self.link.ready()
        self.sent: list[dict[str, Any]] = []
        self.answer: Any = lambda req: {"id": req["id"], "ok": True, "result": {"echo": req}}
        self.requests: Requests | None = None

    def make(self, **kw: Any) -> Requests:
        kw.setdefault("timeout", 2.0)
        self.requests = Requests(self.link, self.publish, where="test:1883", **kw)
        return self.requests

    def publish(self, payload: bytes) -> None:
        req = json.loads(payload)
        self.sent.append(req)
        doc = self.answer(req)
        if doc is not None:
            assert self.requests is not None
            self.requests.resolve(doc)


def test_a_response_reaches_the_request_with_its_id():
    srv = FakeServer()
    reqs = srv.make()
    res = reqs.call("sync", {"after": 3, "limit": 10})
    assert res["echo"] == {"id": srv.sent[0]["id"], "op": "sync", "after": 3, "limit": 10}
    assert reqs.in_flight() == 0
    # a late or foreign answer finds no waiter
    assert reqs.resolve({"id": srv.sent[0]["id"], "ok": True}) is False
    assert reqs.resolve({"id": "nobody", "ok": True}) is False
    assert reqs.resolve({"ok": False, "error": {"code": "bad_request"}}) is False


def test_concurrent_requests_each_get_their_own_answer():
    srv = FakeServer()
    held: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def later(req: dict[str, Any]) -> None:
        with lock:
            held[req["id"]] = {"id": req["id"], "ok": True, "result": {"i": req["i"]}}
        return None

    srv.answer = later
    reqs = srv.make()
    results: dict[int, int] = {}

    def ask(i: int) -> None:
        results[i] = reqs.call("profile.get", {"i": i})["i"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while True:     # answer in reverse order once all are in flight
        with lock:
            if len(held) == 8:
                break
    for rid in reversed(list(held)):
        assert reqs.resolve(held[rid])
    for t in threads:
        t.join()
    assert results == {i: i for i in range(8)}


def test_an_error_answer_raises_request_error_with_the_protocol_code():
    srv = FakeServer()
    srv.answer = lambda req: {"id": req["id"], "ok": False, "error": {"code": "not_found", "message": "no such user"}}
    reqs = srv.make()
    with pytest.raises(RequestError) as err:
        reqs.call("user.search", {"q": "zed"})
    assert (err.value.op, err.value.code, err.value.message) == ("user.search", "not_found", "no such user")
    # request() hands over the whole document instead
    assert reqs.request("user.search")["error"]["code"] == "not_found"


def test_no_answer_is_a_request_timeout_and_no_link_a_connect_timeout():
    srv = FakeServer()
    srv.answer = lambda req: None
    reqs = srv.make(timeout=0.3)
    with pytest.raises(RequestTimeout, match="no answer to 'convs' within 0.3s"):
        reqs.call("convs")
    assert reqs.in_flight() == 0
    srv.link.lost()
    with pytest.raises(ConnectTimeout, match="not connected to test:1883"):
        reqs.call("convs")
    assert srv.sent and len(srv.sent) == 1      # nothing published while down


def test_a_link_lost_while_waiting_is_a_connect_timeout():
    srv = FakeServer()

    def drop(req: dict[str, Any]) -> None:
        srv.link.lost()

    srv.answer = drop
    reqs = srv.make(timeout=0.3)
    with pytest.raises(ConnectTimeout, match="lost the connection to test:1883 waiting for 'ack'"):
        reqs.call("ack", {"n": 1})


def test_a_repeatable_request_is_published_again_after_a_reconnect_with_the_same_id():
    srv = FakeServer()
    first = threading.Event()

    def answer(req: dict[str, Any]) -> dict[str, Any] | None:
        if not first.is_set():
            first.set()
            srv.link.lost()          # the answer is lost with the connection...
            srv.link.ready()         # ...which comes back
            return None
        return {"id": req["id"], "ok": True, "result": {}}

    srv.answer = answer
    reqs = srv.make(repeatable={"sync"})
    assert reqs.call("sync", {"after": 0}) == {}
    assert len(srv.sent) == 2 and srv.sent[0] == srv.sent[1]


def test_a_request_not_repeatable_is_not_published_twice():
    srv = FakeServer()

    def answer(req: dict[str, Any]) -> None:
        srv.link.lost()
        srv.link.ready()

    srv.answer = answer
    reqs = srv.make(repeatable={"sync"}, timeout=0.5)
    with pytest.raises(RequestTimeout):
        reqs.call("contact.request", {"to": "bob"})
    assert len(srv.sent) == 1


def test_rate_limited_answers_are_retried_with_backoff_until_the_deadline():
    srv = FakeServer()
    codes = iter(["rate_limited", "unavailable", None])

    def answer(req: dict[str, Any]) -> dict[str, Any]:
        code = next(codes)
        if code is None:
            return {"id": req["id"], "ok": True, "result": {"seq": 7}}
        return {"id": req["id"], "ok": False, "error": {"code": code, "message": "later"}}

    srv.answer = answer
    slept: list[float] = []
    reqs = srv.make(retry=Backoff(0.2, 5.0), sleep=slept.append)
    assert reqs.call("send", {"cmid": "c1"}) == {"seq": 7}
    assert slept == [0.2, 0.4]

    # past the deadline the error is raised; other codes are never retried
    now = itertools.count(step=1.0)
    srv.answer = lambda req: {"id": req["id"], "ok": False, "error": {"code": "rate_limited", "message": "slow down"}}
    reqs = srv.make(retry=Backoff(0.2, 5.0), sleep=slept.append, clock=lambda: float(next(now)), timeout=3.0)
    with pytest.raises(RequestError, match="rate_limited"):
        reqs.call("send")
    srv.answer = lambda req: {"id": req["id"], "ok": False, "error": {"code": "forbidden", "message": "no"}}
    slept.clear()
    with pytest.raises(RequestError, match="forbidden"):
        srv.make(retry=Backoff(0.2, 5.0), sleep=slept.append).call("send")
    assert slept == []


def test_link_state_counts_reconnects():
    link = LinkState()
    assert link.epoch == 0 and not link.is_ready() and not link.wait_ready(0.01)
    link.connected()
    assert link.is_connected() and not link.is_ready()
    assert link.ready() is False          # the first time
    link.lost()
    assert not link.is_connected() and not link.is_ready()
    assert link.ready() is True and link.epoch == 2


# ---- following the mailbox ------------------------------------------------------------

class Mailbox:
    def __init__(self, last: int, page_limit: int = 1000) -> None:
        self.events = [{"n": n, "kind": "msg", "ts": 1000.0 + n} for n in range(1, last + 1)]
        self.calls: list[tuple[int, int]] = []
        self.page_limit = page_limit
        self.refuse_probe = False

    def sync(self, after: int, limit: int) -> dict[str, Any]:
        self.calls.append((after, limit))
        if self.refuse_probe and after > len(self.events):
            raise RequestError("sync", "bad_request", "after beyond the mailbox")
        limit = min(limit, self.page_limit)
        page = [e for e in self.events if e["n"] > after][:limit]
        more = bool(page) and page[-1]["n"] < len(self.events)
        return {"events": page, "more": more, "last": len(self.events)}


def test_place_sorts_next_old_and_gap():
    box = MailboxFollower(Mailbox(0).sync)
    assert box.place(17) is Place.NEXT          # no cursor yet: whatever comes is next
    box.advance({"n": 5, "ts": 1.5})
    assert (box.cursor, box.cursor_ts) == (5, 1.5)
    assert box.place(6) is Place.NEXT
    assert box.place(5) is Place.OLD and box.place(1) is Place.OLD
    assert box.place(7) is Place.GAP


def test_missing_pages_through_sync_from_the_cursor_in_order():
    mb = Mailbox(25)
    box = MailboxFollower(mb.sync, cursor=3, page=10)
    got = [ev["n"] for ev in box.missing()]
    assert got == list(range(4, 26))
    assert box.cursor == 25 and box.cursor_ts == 1025.0
    assert mb.calls == [(3, 10), (13, 10), (23, 10)]
    assert list(box.missing()) == [] and mb.calls[-1] == (25, 10)


def test_missing_stops_at_until_after_the_page_that_reaches_it():
    mb = Mailbox(30)
    box = MailboxFollower(mb.sync, cursor=0, page=10)
    assert [ev["n"] for ev in box.missing(until=12)] == list(range(1, 21))
    assert box.cursor == 20


def test_missing_without_a_cursor_fetches_nothing():
    mb = Mailbox(5)
    assert list(MailboxFollower(mb.sync).missing()) == [] and mb.calls == []


def test_an_event_whose_handling_failed_is_fetched_again():
    mb = Mailbox(6)
    box = MailboxFollower(mb.sync, cursor=0)
    handled = []
    with pytest.raises(RuntimeError):
        for ev in box.missing():
            if ev["n"] == 4:
                raise RuntimeError("handler crashed")
            handled.append(ev["n"])
    assert handled == [1, 2, 3] and box.cursor == 3
    assert [ev["n"] for ev in box.missing()] == [4, 5, 6]


def test_malformed_and_unsorted_events_in_a_page():
    def sync(after: int, limit: int) -> dict[str, Any]:
        events = [{"n": 3}, "junk", {"n": True}, {"n": "2"}, {"n": 2}, {"n": 1}, {"kind": "x"}]
        return {"events": [e for e in events if not isinstance(e, dict) or not isinstance(e.get("n"), int)
                           or e["n"] > after], "more": False}

    box = MailboxFollower(sync, cursor=1)
    assert [ev["n"] for ev in box.missing()] == [2, 3]


def test_mailbox_head_fast_path_and_paging():
    mb = Mailbox(42)
    assert mailbox_head(mb.sync) == 42 and len(mb.calls) == 1
    assert mailbox_head(mb.sync, after=50) == 50
    mb = Mailbox(42, page_limit=10)
    mb.refuse_probe = True          # a server refusing the probe: page through
    assert mailbox_head(mb.sync, page=10) == 42 and len(mb.calls) > 4

    def echo(after: int, limit: int) -> dict[str, Any]:   # a server echoing the cursor as `last`
        events = [{"n": n} for n in range(after + 1, min(after + limit, 9) + 1)]
        return {"events": events, "more": bool(events) and events[-1]["n"] < 9, "last": after}

    assert mailbox_head(echo, page=4) == 9


# ---- the cursor file -----------------------------------------------------------------

def test_cursor_file_round_trip_and_atomic_replace(tmp_path):
    f = CursorFile(tmp_path / "deep" / "er" / "me.json", clock=lambda: 123.0)
    assert f.load() is None
    f.save(7, 1795707858.952)
    assert f.load() == SavedCursor(7, 1795707858.952)
    f.save(8)
    assert f.load() == SavedCursor(8, None)
    assert json.loads(f.path.read_text()) == {"n": 8, "ts": None, "saved": 123.0}
    assert sorted(p.name for p in f.path.parent.iterdir()) == ["me.json"]     # no temporary file left


def test_cursor_file_a_failed_write_keeps_the_old_cursor(tmp_path, monkeypatch):
    f = CursorFile(tmp_path / "c.json")
    f.save(3)

    def broken(*a: Any, **kw: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("contract.sdkcore.cursor.os.replace", broken)
    with pytest.raises(OSError):
        f.save(4)
    assert f.load() == SavedCursor(3, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


@pytest.mark.parametrize("content", ["", "{", "[]", '{"n": -1}', '{"n": true}', '{"n": "5"}', '{"ts": 1.0}'])
def test_cursor_file_unreadable_is_no_cursor(tmp_path, content):
    path = tmp_path / "c.json"
    path.write_text(content)
    assert CursorFile(path).load() is None


def test_cursor_file_reads_the_device_sdks_earlier_format(tmp_path):
    path = tmp_path / "lamp.json"
    path.write_text('{"last_n": 12}')
    assert CursorFile(path).load() == SavedCursor(12, None)


# ---- backoff --------------------------------------------------------------------------

def test_backoff_doubles_up_to_the_ceiling():
    assert list(itertools.islice(Backoff(0.2, 5.0).delays(), 7)) == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert list(itertools.islice(Backoff(1, 30).delays(), 3)) == [1, 2, 4]
    for bad in ((0, 1), (2, 1), (1, 2, 0.5)):
        with pytest.raises(ValueError):
            Backoff(*bad)


def test_the_sdks_name_only_ops_of_the_contract_registry():
    from client.sdk import REPEATABLE_OPS
    from contract.errors import ErrorCode
    from contract.ops import OPS
    from contract.sdkcore import RETRYABLE_CODES

    assert REPEATABLE_OPS <= set(OPS)
    assert RETRYABLE_CODES <= {str(c) for c in ErrorCode}


def test_the_device_side_imports_only_contract_paho_and_the_standard_library():
    """Firmware-safe: devices/ and the core need nothing but paho-mqtt and contract/
    (the core not even paho)."""
    import ast
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def imported(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        return names - set(sys.stdlib_module_names) - {"__future__"}

    for path in sorted((root / "contract" / "sdkcore").glob("*.py")):
        assert imported(path) <= {"contract"}, path
    for path in sorted((root / "devices").glob("*.py")):
        assert imported(path) <= {"contract", "paho", "devices"}, path
