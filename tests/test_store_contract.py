"""The store contract: what every engine behind `broker.store.base.Store` must do.

One module for every backend: the `store` fixture is parametrised by engine and
each test runs against a real, freshly created store of it. A new engine
(PostgreSQL) adds one fixture param here and must pass every test unchanged.

Each test declares which Store members it exercises (`@covers`); the store it
gets records the calls, and a test fails when it did not call what it declares.
`test_every_store_member_is_covered` fails when the Protocol gains a member that
no test declares. Numbers and times are given explicitly (`now=`), so nothing
here waits on the clock.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from broker.config import StorageConfig
from broker.store import base
from broker.store.base import (
    AlreadyExists,
    DeviceUser,
    FileRecord,
    HistoryPoint,
    LatestReading,
    MessageDone,
    MessageKept,
    NotFoundError,
    NotMember,
    PresenceRecord,
    Principal,
    RequestLimits,
    RetainedMessage,
    SavedMessage,
    SavedSession,
    SessionDrop,
    SessionUpsert,
    Store,
    StoreClosed,
    WebSessionRecord,
)
from broker.store.factory import open_store

T = TypeVar("T")
TS = 1764000000.0

# The repositories of a Store and the Protocol each one implements.
DOMAINS: dict[str, type] = {
    "identity": base.IdentityStore,
    "retained": base.RetainedStore,
    "sessions": base.SessionStore,
    "messaging": base.MessagingStore,
    "social": base.SocialStore,
    "devices": base.DeviceStore,
    "presence": base.PresenceStore,
    "telemetry": base.TelemetryStore,
    "files": base.FileStore,
    "web_sessions": base.WebSessionStore,
    "health": base.StoreHealth,
}


def _own_members(proto: type) -> set[str]:
    """The public members a Protocol class itself declares (methods, properties, attributes)."""
    return {n for n in vars(proto) if not n.startswith("_")} | {
        n for n in getattr(proto, "__annotations__", {}) if not n.startswith("_")}


def store_members() -> set[str]:
    """Every member of Store, as "open" / "close" and "<domain>.<member>"."""
    top = _own_members(Store)
    assert top - {"open", "close"} == set(DOMAINS), "DOMAINS must list every repository of Store"
    return {"open", "close"} | {f"{d}.{m}" for d, proto in DOMAINS.items() for m in _own_members(proto)}


def covers(*members: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Declare the Store members a test exercises (checked against its calls)."""
    def mark(fn: Callable[..., None]) -> Callable[..., None]:
        fn.covers = frozenset(members)  # type: ignore[attr-defined]
        return fn
    return mark


class Recording:
    """A Store (or one of its repositories) that notes every member used through it."""

    def __init__(self, target: Any, used: set[str], prefix: str = "") -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_used", used)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not self._prefix and name in DOMAINS:
            return Recording(value, self._used, f"{name}.")
        self._used.add(self._prefix + name)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self._used.add(self._prefix + name)
        setattr(self._target, name, value)


def _storage(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> StorageConfig:
    if engine == "sqlite":
        return StorageConfig(path=str(tmp_path / "store" / "roost.db"))
    if engine == "postgres":   # a fresh database on the session's private server (tests/conftest.py)
        return StorageConfig(backend="postgres", dsn=request.getfixturevalue("postgres_dsn"))
    raise AssertionError(f"no test set-up for engine {engine}")


OpenStore = Callable[[], AbstractAsyncContextManager[Any]]


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """`async with store() as s:` opens the backend's store (the same one each time,
    so a second `store()` sees what the first committed). The test's declared
    `@covers` members must all be used by the end of the test."""
    storage = _storage(request.param, tmp_path, request)
    used: set[str] = set()
    failed: list[BaseException] = []

    @asynccontextmanager
    async def opened() -> AsyncIterator[Any]:
        s = await open_store(storage)
        used.add("open")
        try:
            yield Recording(s, used)
        except BaseException as exc:
            failed.append(exc)
            raise
        finally:
            await s.close()
            used.add("close")

    yield opened
    if not failed:   # a test that failed half-way has said enough
        missing = getattr(request.function, "covers", frozenset()) - used
        assert not missing, f"{request.function.__name__} declares it covers {sorted(missing)} but never used them"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def add_users(s: Store, *ids: str, kind: str = "user") -> None:
    for pid in ids:
        await s.identity.add_principal(Principal(pid, kind, pid.capitalize(), "", "hash", TS))


def body(text: str) -> str:
    return json.dumps({"type": "text", "text": text}, separators=(",", ":"))


def dm(a: str, b: str) -> tuple[str, tuple[str, str]]:
    x, y = sorted((a, b))
    return f"dm:{x}:{y}", (x, y)


def send(s: Store, sender: str, to: str, cmid: str, *, now: float = TS, text: str = "hi") -> Awaitable[base.SendOutcome]:
    conv, members = dm(sender, to)
    return s.messaging.send(sender=sender, conv=conv, dm_members=members, cmid=cmid, body=body(text), now=now)


async def mailbox(s: Store, principal: str) -> list[dict[str, Any]]:
    events, _head = await s.messaging.sync(principal, 0, 100000)
    return [e.doc for e in events]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return [d["kind"] for d in docs]


# ---- the meta-test -------------------------------------------------------------

def test_every_store_member_is_covered() -> None:
    declared: set[str] = set()
    for fn in globals().values():
        if inspect.isfunction(fn) and fn.__name__.startswith("test_"):
            declared |= getattr(fn, "covers", frozenset())
    members = store_members()
    assert not declared - members, f"tests declare members Store does not have: {sorted(declared - members)}"
    assert not members - declared, f"Store members no test exercises: {sorted(members - declared)}"


# ---- lifecycle and health ------------------------------------------------------------

@covers("open", "close", "health.engine", "health.location", "health.size", "health.commits",
        "health.write_failures", "health.pending_writes", "health.unavailable_since", "health.on_commit")
def test_open_close_reopen_and_health(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            commits: list[float] = []
            s.health.on_commit = commits.append
            before = s.health.commits
            await add_users(s, "alice")
            assert s.health.commits > before and commits and all(c >= 0 for c in commits)
            assert s.health.write_failures == 0 and s.health.unavailable_since is None
            assert s.health.pending_writes == 0
            assert s.health.engine in ("sqlite", "postgres")
            location = s.health.location
            assert isinstance(location, str) and location
            if s.health.engine == "postgres":   # the dsn without its password
                assert location.startswith("postgresql://") and ":" not in location.split("@")[0][13:]
            size = await s.health.size()
            assert isinstance(size, int) and size > 0
            s.health.on_commit = None
            held = s
        with pytest.raises(StoreClosed):
            await held.identity.get_principal("alice")
        with pytest.raises(StoreClosed):
            await add_users(held, "bob")
        async with store() as s:   # what was committed is there after a reopen
            p = await s.identity.get_principal("alice")
            assert p is not None and p.name == "Alice"
    run(main())


# ---- identity ------------------------------------------------------------------------

@covers("identity.add_principal", "identity.get_principal", "identity.list_principals", "identity.remove_principal",
        "identity.set_secret", "identity.set_pairing_code", "identity.set_profile", "identity.search_users")
def test_identity(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "bob", "alice", "alfred")
            await s.identity.add_principal(Principal("lamp", "device", "Lamp", "", "h", TS, device_kind="light",
                                                     room="hall"))
            with pytest.raises(AlreadyExists):
                await s.identity.add_principal(Principal("lamp", "user", "x", "", "h", TS))
            with pytest.raises(AlreadyExists):   # one id space for every kind
                await add_users(s, "alice")
            lamp = await s.identity.get_principal("lamp")
            assert lamp is not None and (lamp.kind, lamp.device_kind, lamp.room) == ("device", "light", "hall")
            assert await s.identity.get_principal("nobody") is None
            assert [p.id for p in await s.identity.list_principals()] == ["alfred", "alice", "bob", "lamp"]
            assert [p.id for p in await s.identity.list_principals("device")] == ["lamp"]

            old = await s.identity.get_principal("alice")
            assert old is not None
            assert await s.identity.set_secret("alice", "new-hash")
            new = await s.identity.get_principal("alice")
            assert new is not None and new.secret_hash == "new-hash" and new.secret_set_at >= old.secret_set_at
            assert not await s.identity.set_secret("nobody", "x")

            assert await s.identity.set_pairing_code("lamp", "code-hash")
            lamp = await s.identity.get_principal("lamp")
            assert lamp is not None and lamp.pairing_code == "code-hash"
            assert not await s.identity.set_pairing_code("alice", "x")   # devices only
            assert not await s.identity.set_pairing_code("nobody", "x")

            p = await s.identity.set_profile("bob", name="Robert", status="away")
            assert p is not None and (p.name, p.status) == ("Robert", "away")
            p = await s.identity.set_profile("bob", name=None, status="here")
            assert p is not None and (p.name, p.status) == ("Robert", "here")
            assert await s.identity.set_profile("nobody", name="x", status=None) is None

            # users only; the id exactly, or a name prefix of two characters or more
            assert [u.id for u in await s.identity.search_users("Al", 10)] == ["alfred", "alice"]
            assert [u.id for u in await s.identity.search_users("Al", 1)] == ["alfred"]
            assert [u.id for u in await s.identity.search_users("bob", 10)] == ["bob"]
            assert await s.identity.search_users("Lamp", 10) == []
            assert await s.identity.search_users("%", 10) == []

            assert await s.identity.remove_principal("bob")
            assert not await s.identity.remove_principal("bob")
            assert await s.identity.get_principal("bob") is None
            await add_users(s, "bob")   # the id may be registered again
    run(main())


@covers("identity.log_admin", "identity.admin_log_after", "identity.admin_log_head")
def test_admin_log(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            assert await s.identity.admin_log_head() == 0
            assert await s.identity.admin_log_after(0) == []
            await s.identity.log_admin("alice", "added")
            await s.identity.log_admin("bob", "added")
            await s.identity.log_admin("alice", "passwd")
            rows = await s.identity.admin_log_after(0)
            assert [(p, a) for _seq, p, a in rows] == [("alice", "added"), ("bob", "added"), ("alice", "passwd")]
            seqs = [seq for seq, _p, _a in rows]
            assert seqs == sorted(seqs) and len(set(seqs)) == 3
            assert await s.identity.admin_log_head() == seqs[-1]
            assert [a for _s, _p, a in await s.identity.admin_log_after(seqs[0])] == ["added", "passwd"]
    run(main())


# ---- retained messages -----------------------------------------------------------------

@covers("retained.put", "retained.load_all", "retained.delete")
def test_retained_set_replace_clear(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            assert await s.retained.load_all() == []
            await s.retained.put(RetainedMessage("home/a", b"1", 0))
            await s.retained.put(RetainedMessage("home/b", b"\x00\xffbinary", 1))
            await s.retained.put(RetainedMessage("home/a", b"2", 2))   # replaces
            got = sorted(await s.retained.load_all(), key=lambda m: m.topic)
            assert got == [RetainedMessage("home/a", b"2", 2), RetainedMessage("home/b", b"\x00\xffbinary", 1)]
            # MQTT 5: forwarded properties and the message expiry deadline kept as given; replaced with the rest
            v5 = RetainedMessage("home/c", b"3", 1, b"\x03\x00\x04text\x00", TS + 60.5)
            await s.retained.put(RetainedMessage("home/c", b"old", 0, b"\x01\x01", TS))
            await s.retained.put(v5)
            await s.retained.put(RetainedMessage("home/d", b"4", 0, None, TS))
            got = sorted(await s.retained.load_all(), key=lambda m: m.topic)
            assert got[2:] == [v5, RetainedMessage("home/d", b"4", 0, None, TS)]
            await s.retained.delete("home/c")
            await s.retained.delete("home/d")
            await s.retained.delete("home/a")
            await s.retained.delete("home/none")   # nothing there: no error
        async with store() as s:
            assert await s.retained.load_all() == [RetainedMessage("home/b", b"\x00\xffbinary", 1)]
    run(main())


# ---- persistent MQTT sessions -----------------------------------------------------------------

@covers("sessions.apply", "sessions.load_sessions", "sessions.save_sessions")
def test_sessions_journal_and_saved_state(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            assert await s.sessions.load_sessions() == []
            payload = b"shared payload" * 10
            await s.sessions.apply([
                SessionUpsert("c1", "alice", "user", {"a/#": 1}, 0.0),
                MessageKept("c1", SavedMessage(1, "a/x", payload, 1)),
                MessageKept("c1", SavedMessage(2, "a/y", b"two", 2, retain=True)),
                SessionUpsert("c2", None, None, {"b": 0}, 0.0),
                MessageKept("c2", SavedMessage(1, "b", payload, 1)),
                # MQTT 5: session expiry, subscription options and identifier, message properties and expiry
                SessionUpsert("c5", "dave", "user", {"v/#": 1}, 0.0, 30.0, {"v/#": (0x05, 7)}),
                MessageKept("c5", SavedMessage(1, "v/x", payload, 1, properties=b"\x01\x01", expires_at=TS + 9.25)),
            ])
            await s.sessions.apply([MessageDone("c1", 1), SessionUpsert("c1", "alice", "user", {"a/#": 2, "z": 0}, TS)])
            by_id = {x.client_id: x for x in await s.sessions.load_sessions()}
            c1, c2 = by_id["c1"], by_id["c2"]
            assert (c1.principal, c1.kind, c1.subscriptions, c1.disconnected_at) == ("alice", "user", {"a/#": 2, "z": 0}, TS)
            assert c1.messages == [SavedMessage(2, "a/y", b"two", 2, retain=True)]
            assert (c2.principal, c2.kind, c2.messages) == (None, None, [SavedMessage(1, "b", payload, 1)])
            assert (c1.expiry, c1.subscription_options, c2.expiry, c2.subscription_options) == (None, {}, None, {})
            c5 = by_id["c5"]
            assert (c5.expiry, c5.subscription_options) == (30.0, {"v/#": (0x05, 7)})
            assert c5.messages == [SavedMessage(1, "v/x", payload, 1, properties=b"\x01\x01", expires_at=TS + 9.25)]
            await s.sessions.apply([SessionUpsert("c5", "dave", "user", {"v/#": 1}, TS, 0xFFFFFFFF, {"v/#": (0x0D, 0)})])
            c5 = {x.client_id: x for x in await s.sessions.load_sessions()}["c5"]
            assert (c5.expiry, c5.subscription_options) == (0xFFFFFFFF, {"v/#": (0x0D, 0)})
            await s.sessions.apply([SessionDrop("c5")])

            await s.sessions.apply([SessionDrop("c2")])
            assert [x.client_id for x in await s.sessions.load_sessions()] == ["c1"]

            # A clean stop replaces everything with the exact state, in-flight ids included.
            exact = [
                SavedSession("c3", "bob", "user", {"t": 1},
                             [SavedMessage(5, "t", b"p", 1, pid=7), SavedMessage(6, "t", b"", 2, pid=8, stage=1),
                              SavedMessage(9, "t", b"q", 2)],
                             [3, 4], 8, TS),
                SavedSession("c4", "carol", "user", {}, [], [], 0, TS + 1),
                SavedSession("c6", "erin", "user", {"e/+": 2, "$share/g/e/#": 1},
                             [SavedMessage(2, "e/1", b"v5", 2, pid=3, properties=b"\x09\x00\x02id", expires_at=TS + 5),
                              SavedMessage(4, "e/2", b"v5q", 1, properties=b"", expires_at=None)],
                             [], 3, TS + 2, 120.0, {"e/+": (0x2A, 268435455), "$share/g/e/#": (0x01, 0)}),
            ]
            await s.sessions.save_sessions(exact)
        async with store() as s:
            assert sorted(await s.sessions.load_sessions(), key=lambda x: x.client_id) == exact
    run(main())


# ---- messaging: sends, numbering, mailboxes -----------------------------------------------------

@covers("messaging.send", "messaging.find_sent", "messaging.sync", "messaging.head")
def test_send_numbers_gap_free_and_a_repeated_cmid_is_a_duplicate(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob")
            assert await s.messaging.head("bob") == 0
            first = await send(s, "alice", "bob", "m1", text="hello")
            assert not first.dup and first.message.seq == 1 and first.message.sender == "alice"
            assert json.loads(first.message.body) == {"type": "text", "text": "hello"}
            for_bob = [e for e in first.events if e.principal == "bob"]
            assert [e.doc["kind"] for e in for_bob] == ["msg", "unread"]
            assert [e.n for e in for_bob] == [1, 2]

            again = await send(s, "alice", "bob", "m1", text="hello again")
            assert again.dup and again.events == [] and again.message == first.message
            found = await s.messaging.find_sent("alice", "m1")
            assert found == first.message
            assert await s.messaging.find_sent("alice", "nope") is None
            assert await s.messaging.find_sent("bob", "m1") is None   # cmids are per sender

            second = await send(s, "bob", "alice", "m1")   # bob's own m1 is new
            assert not second.dup and second.message.seq == 2

            docs = await mailbox(s, "bob")
            assert [d["n"] for d in docs] == list(range(1, len(docs) + 1))
            msg = docs[0]
            assert (msg["kind"], msg["conv"], msg["seq"], msg["from"], msg["cmid"], msg["body"]) == \
                ("msg", "dm:alice:bob", 1, "alice", "m1", {"type": "text", "text": "hello"})
            head = await s.messaging.head("bob")
            assert head == docs[-1]["n"]
            page, last = await s.messaging.sync("bob", 1, 2)
            assert [e.n for e in page] == [2, 3] and last == head
            assert await s.messaging.sync("bob", head, 10) == ([], head)
    run(main())


@covers("messaging.send", "messaging.sync")
def test_concurrent_senders_get_ordered_gap_free_numbers(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob", "carol")
            pairs = [("alice", "bob"), ("bob", "alice"), ("carol", "alice"), ("bob", "carol")]
            outs = await asyncio.gather(*(send(s, a, b, f"{a}-{b}-{i}", now=TS + i)
                                          for i in range(60) for a, b in pairs))
            assert not any(o.dup for o in outs)
            for conv in ("dm:alice:bob", "dm:alice:carol", "dm:bob:carol"):
                seqs = sorted(o.message.seq for o in outs if o.message.conv == conv)
                assert seqs == list(range(1, len(seqs) + 1))
            # each sender's messages keep the order it sent them in
            for a, b in pairs:
                mine = [o.message for o in outs if o.message.sender == a and o.message.cmid.startswith(f"{a}-{b}-")]
                assert [m.seq for m in mine] == sorted(m.seq for m in mine)
            for who in ("alice", "bob", "carol"):
                docs = await mailbox(s, who)
                assert [d["n"] for d in docs] == list(range(1, len(docs) + 1))
                answered = sorted((e for o in outs for e in o.events if e.principal == who), key=lambda e: e.n)
                assert [e.doc for e in answered] == docs   # what was answered is what was stored
            # the same cmids again, concurrently: all duplicates, nothing new stored
            heads = {w: (await s.messaging.sync(w, 0, 0))[1] for w in ("alice", "bob", "carol")}
            dups = await asyncio.gather(*(send(s, a, b, f"{a}-{b}-{i}") for i in range(10) for a, b in pairs))
            assert all(d.dup and not d.events for d in dups)
            assert {w: (await s.messaging.sync(w, 0, 0))[1] for w in heads} == heads
    run(main())


@covers("messaging.client_cursor", "messaging.set_inbox_sub", "messaging.ack")
def test_cursors_acks_and_delivered_receipts(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob")
            await send(s, "alice", "bob", "m1")
            await send(s, "alice", "bob", "m2")
            head = await s.messaging.head("bob")
            assert await s.messaging.client_cursor("bob.phone", "bob") == (0, False, head)
            await s.messaging.set_inbox_sub("bob.phone", "bob", True)
            assert await s.messaging.client_cursor("bob.phone", "bob") == (0, True, head)

            cursor, events = await s.messaging.ack("bob.phone", "bob", 1, TS + 1)
            assert cursor == 1
            delivered = [e for e in events if e.doc["kind"] == "delivered"]
            assert [e.principal for e in delivered] == ["alice"] and delivered[0].doc["seq"] == 1
            cursor, events = await s.messaging.ack("bob.phone", "bob", head, TS + 2)
            assert cursor == head and [e.doc["seq"] for e in events if e.doc["kind"] == "delivered"] == [2]
            # never back; another client's first ack of the same events sends no second receipt
            assert (await s.messaging.ack("bob.phone", "bob", 1, TS + 3))[0] == head
            cursor, events = await s.messaging.ack("bob.laptop", "bob", head, TS + 3)
            assert cursor == head and not [e for e in events if e.doc["kind"] == "delivered"]
            with pytest.raises(ValueError):
                await s.messaging.ack("bob.phone", "bob", head + 100, TS)
            assert await s.messaging.client_cursor("bob.phone", "bob") == (head, True, head)
            await s.messaging.set_inbox_sub("bob.phone", "bob", False)
            assert await s.messaging.client_cursor("bob.phone", "bob") == (head, False, head)
            # a client id taken over by another principal starts again from 0
            await s.messaging.set_inbox_sub("bob.phone", "alice", True)
            assert (await s.messaging.client_cursor("bob.phone", "alice"))[:2] == (0, True)
    run(main())


@covers("messaging.read", "messaging.convs")
def test_read_receipts_unread_counts_and_conversation_list(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob", "carol")
            for i in range(3):
                await send(s, "alice", "bob", f"a{i}", now=TS + i)
            await send(s, "carol", "bob", "c0", now=TS + 10)
            summaries, total = await s.messaging.convs("bob")
            assert total == 4
            assert [c.conv for c in summaries] == ["dm:bob:carol", "dm:alice:bob"]   # most recent first
            ab = summaries[1]
            assert (ab.kind, ab.peer, ab.last_seq, ab.read_seq, ab.unread) == ("dm", "alice", 3, 0, 3)
            assert ab.last is not None and ab.last.cmid == "a2"

            out = await s.messaging.read("bob", "dm:alice:bob", 2, TS + 20)
            assert (out.seq, out.unread, out.total_unread) == (2, 1, 2)
            receipt = [e for e in out.events if e.principal == "alice"]
            assert [e.doc["kind"] for e in receipt] == ["read"] and receipt[0].doc["seq"] == 2
            again = await s.messaging.read("bob", "dm:alice:bob", 1, TS + 21)   # never back
            assert (again.seq, again.unread, again.events) == (2, 1, [])
            with pytest.raises(ValueError):
                await s.messaging.read("bob", "dm:alice:bob", 99, TS)
            with pytest.raises(NotMember):
                await s.messaging.read("carol", "dm:alice:bob", 1, TS)
            assert (await s.messaging.convs("bob"))[1] == 2
            assert await s.messaging.convs("nobody") == ([], 0)
    run(main())


@covers("messaging.history", "messaging.is_member")
def test_history_pages_and_viewer(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob", "carol")
            for i in range(5):
                await send(s, "alice", "bob", f"m{i}", now=TS + i)
            conv = "dm:alice:bob"
            msgs, more = await s.messaging.history(conv, None, 3)
            assert [m.seq for m in msgs] == [3, 4, 5] and more
            msgs, more = await s.messaging.history(conv, 3, 3)
            assert [m.seq for m in msgs] == [1, 2] and not more
            msgs, more = await s.messaging.history(conv, None, 10, viewer="bob")
            assert [m.cmid for m in msgs] == [f"m{i}" for i in range(5)] and not more
            assert await s.messaging.history(conv, None, 10, viewer="carol") == ([], False)
            assert await s.messaging.is_member(conv, "alice")
            assert not await s.messaging.is_member(conv, "carol")
            assert not await s.messaging.is_member("dm:nobody:none", "alice")
    run(main())


@covers("messaging.create_group", "messaging.group_info", "messaging.change_group", "messaging.load_groups",
        "messaging.send", "messaging.history")
def test_groups(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob", "carol", "dave")
            events = await s.messaging.create_group("g:1", "Friends", "alice", ["bob"], TS)
            assert sorted(e.principal for e in events) == ["alice", "bob"]
            assert all(e.doc["kind"] == "group" and e.doc["event"] == "created" for e in events)
            info = await s.messaging.group_info("g:1")
            assert info is not None and (info.name, info.created_by, info.members) == ("Friends", "alice", ["alice", "bob"])
            assert await s.messaging.group_info("g:none") is None

            sent = await s.messaging.send(sender="bob", conv="g:1", dm_members=None, cmid="g1", body=body("hi"), now=TS)
            assert sent.message.seq == 1 and {e.principal for e in sent.events} == {"alice", "bob"}
            with pytest.raises(NotMember):
                await s.messaging.send(sender="carol", conv="g:1", dm_members=None, cmid="x", body=body("x"), now=TS)

            events, members = await s.messaging.change_group("g:1", "alice", add=["carol", "bob"], event="added", now=TS)
            assert members == ["alice", "bob", "carol"]
            added = [e for e in events if e.doc["kind"] == "group"]
            assert sorted(e.principal for e in added) == ["alice", "bob", "carol"]
            assert all(e.doc["members"] == ["carol"] for e in added)
            # a new member of a group sees its history
            assert [m.cmid for m in (await s.messaging.history("g:1", None, 10, viewer="carol"))[0]] == ["g1"]
            assert await s.messaging.change_group("g:1", "alice", add=["bob"], event="added", now=TS) == \
                ([], ["alice", "bob", "carol"])
            with pytest.raises(KeyError):
                await s.messaging.change_group("g:1", "alice", remove=["dave", "bob"], event="removed", now=TS)
            assert (await s.messaging.group_info("g:1")).members == ["alice", "bob", "carol"]   # type: ignore[union-attr]
            with pytest.raises(NotMember):
                await s.messaging.change_group("g:1", "dave", add=["dave"], event="added", now=TS)
            events, members = await s.messaging.change_group("g:1", "bob", remove=["bob"], event="left", now=TS)
            assert members == ["alice", "carol"] and "bob" in {e.principal for e in events}   # the leaver hears of it

            await s.messaging.create_group("g:2", "Solo", "dave", [], TS)
            assert await s.messaging.load_groups() == {"g:1": ["alice", "carol"], "g:2": ["dave"]}
    run(main())


@covers("messaging.forget_principal", "messaging.purge_orphans", "identity.remove_principal")
def test_forgetting_a_principal_and_purging_orphans(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob", "carol")
            await s.messaging.create_group("g:1", "G", "alice", ["bob", "carol"], TS)
            await send(s, "bob", "alice", "b1")
            await send(s, "carol", "alice", "c1")
            assert await s.messaging.purge_orphans(10) == {}

            assert await s.messaging.forget_principal("bob") == ["g:1"]
            assert await mailbox(s, "bob") == [] and await s.messaging.head("bob") == 0
            assert not await s.messaging.is_member("g:1", "bob")
            # what bob sent stays in the conversation
            assert [m.cmid for m in (await s.messaging.history("dm:alice:bob", None, 10))[0]] == ["b1"]

            # removed without the broker hearing of it: an orphan, purged in bounded rounds
            assert await s.identity.remove_principal("carol")
            assert await s.messaging.purge_orphans(10) == {"carol": ["g:1"]}
            assert await s.messaging.purge_orphans(10) == {}
            assert (await s.messaging.group_info("g:1")).members == ["alice"]   # type: ignore[union-attr]
            # the id registered again starts with nothing of the old owner's
            await add_users(s, "carol")
            assert await mailbox(s, "carol") == []
            assert await s.messaging.history("dm:alice:carol", None, 10, viewer="carol") == ([], False)
            fresh = await send(s, "carol", "alice", "c1")   # the old owner's cmid is free again
            assert not fresh.dup
    run(main())


@covers("messaging.needs_prune", "messaging.prune")
def test_pruning_by_size_and_age_is_bounded_and_announced(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob")
            for i in range(10):   # 20 events for bob (msg + unread each)
                await send(s, "alice", "bob", f"m{i}", now=TS + i)
            assert not await s.messaging.needs_prune(now=TS + 10, max_events=100, ttl=3600)
            assert await s.messaging.needs_prune(now=TS + 10, max_events=10, ttl=3600)

            # full: keep the newest max_events, the announcement included; at most max_rows a round
            events, discarded = await s.messaging.prune(now=TS + 10, max_events=10, ttl=3600, max_mailboxes=10,
                                                        max_rows=5)
            assert discarded == 5 and [(e.principal, e.doc["kind"], e.doc["reason"]) for e in events] == \
                [("bob", "dropped", "queue_full")]
            while await s.messaging.needs_prune(now=TS + 10, max_events=10, ttl=3600):
                await s.messaging.prune(now=TS + 10, max_events=10, ttl=3600, max_mailboxes=10, max_rows=5)
            docs = await mailbox(s, "bob")
            assert len(docs) <= 10 and docs[-1]["kind"] == "dropped"
            assert [d["n"] for d in docs] == list(range(docs[0]["n"], docs[-1]["n"] + 1))   # numbers never reused
            assert (await s.messaging.sync("bob", 0, 0))[1] == docs[-1]["n"]

            # old: everything older than ttl goes, announced once
            late = TS + 10000
            assert await s.messaging.needs_prune(now=late, max_events=1000, ttl=3600)
            events, discarded = await s.messaging.prune(now=late, max_events=1000, ttl=3600, max_mailboxes=10,
                                                        max_rows=1000)
            assert discarded > 0 and {e.doc["reason"] for e in events} == {"expired"}
            assert {e.principal for e in events} == {"alice", "bob"}
            assert kinds(await mailbox(s, "bob")) == ["dropped"]
            # an expired `dropped` announcement goes without being announced itself
            much_later = late + 10000
            events, discarded = await s.messaging.prune(now=much_later, max_events=1000, ttl=3600, max_mailboxes=10,
                                                        max_rows=1000)
            assert events == [] and discarded == 2
            assert not await s.messaging.needs_prune(now=much_later, max_events=1000, ttl=3600)
    run(main())


# ---- social: contacts, requests, blocks ----------------------------------------------------------

@covers("social.request", "social.pending", "social.respond", "social.remove", "social.load")
def test_contact_requests_and_contacts(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob", "carol")
            outcome, events = await s.social.request("alice", "bob", "hi bob", TS)
            assert outcome == "requested" and sorted(e.principal for e in events) == ["alice", "bob"]
            assert all(e.doc["kind"] == "contact" and e.doc["event"] == "request" for e in events)
            assert await s.social.request("alice", "bob", "again", TS + 1) == ("pending", [])
            incoming, outgoing = await s.social.pending("bob")
            assert [(r.sender, r.to, r.note) for r in incoming] == [("alice", "bob", "hi bob")] and outgoing == []
            assert [r.to for r in (await s.social.pending("alice"))[1]] == ["bob"]

            events = await s.social.respond("bob", "alice", True, TS + 2)
            assert {e.doc["event"] for e in events} == {"accepted"}
            assert await s.social.request("alice", "bob", "", TS + 3) == ("contact", [])
            with pytest.raises(KeyError):
                await s.social.respond("bob", "alice", True, TS)

            # asking someone who had asked you is agreeing
            await s.social.request("carol", "alice", "", TS)
            outcome, _events = await s.social.request("alice", "carol", "", TS + 1)
            assert outcome == "accepted"
            await s.social.request("bob", "carol", "", TS)
            events = await s.social.respond("carol", "bob", False, TS + 1)
            assert {e.doc["event"] for e in events} == {"rejected"}

            state = await s.social.load()
            assert sorted(state.contacts) == [("alice", "bob"), ("alice", "carol")] and state.requests == []
            events = await s.social.remove("bob", "alice", TS + 5)
            assert {e.doc["event"] for e in events} == {"removed"}
            with pytest.raises(KeyError):
                await s.social.remove("bob", "alice", TS + 6)
            await s.social.request("bob", "carol", "", TS + 7)
            await s.social.remove("carol", "bob", TS + 8)   # a pending request, either way
            state = await s.social.load()
            assert state.contacts == [("alice", "carol")] and state.requests == []
    run(main())


@covers("social.request")
def test_contact_request_limits(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob", "carol", "dave")
            limits = RequestLimits(cooldown=60.0, per_target_hour=2)
            assert (await s.social.request("alice", "bob", "", TS, limits))[0] == "requested"
            await s.social.remove("bob", "alice", TS + 1)
            assert await s.social.request("alice", "bob", "", TS + 30, limits) == ("too_soon", [])
            assert (await s.social.request("alice", "bob", "", TS + 61, limits))[0] == "requested"
            assert await s.social.request("carol", "bob", "", TS + 62, limits) == ("too_many", [])
            assert (await s.social.request("carol", "bob", "", TS + 62))[0] == "requested"   # no limits
            assert (await s.social.request("dave", "bob", "", TS + 3700, limits))[0] == "requested"   # a new hour
    run(main())


@covers("social.block", "social.unblock", "social.load")
def test_blocks(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob")
            await s.social.request("alice", "bob", "", TS)
            await s.social.respond("bob", "alice", True, TS)
            for i in range(2):
                await send(s, "bob", "alice", f"b{i}")
            was_contact, events = await s.social.block("alice", "bob", TS + 1)
            assert was_contact
            seen = {(e.principal, e.doc["kind"], e.doc.get("event")) for e in events}
            assert ("alice", "contact", "blocked") in seen and ("bob", "contact", "removed") in seen
            assert ("alice", "unread", None) in seen   # unread counts leave out the blocked one's messages
            state = await s.social.load()
            assert state.blocks == [("alice", "bob")] and state.contacts == []
            assert (await s.messaging.convs("alice"))[1] == 0
            was_contact, _events = await s.social.block("alice", "bob", TS + 2)   # again: no error, still one block
            assert not was_contact and (await s.social.load()).blocks == [("alice", "bob")]
            events = await s.social.unblock("alice", "bob", TS + 3)
            assert events[0].doc["event"] == "unblocked"
            assert (await s.messaging.convs("alice"))[1] == 2
            with pytest.raises(KeyError):
                await s.social.unblock("alice", "bob", TS + 4)
            assert (await s.social.load()).blocks == []
    run(main())


@covers("social.forget_principal", "social.purge_orphans", "identity.add_principal")
def test_social_forget_and_orphans(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob", "carol")
            await s.social.request("alice", "bob", "", TS)
            await s.social.respond("bob", "alice", True, TS)
            await s.social.request("carol", "alice", "", TS)
            await s.social.block("carol", "bob", TS)
            assert await s.social.purge_orphans(10) == []
            await s.social.forget_principal("bob")
            state = await s.social.load()
            assert state.contacts == [] and state.blocks == [] and len(state.requests) == 1
            assert await s.identity.remove_principal("carol")
            assert await s.social.purge_orphans(10) == ["carol"]
            assert await s.social.purge_orphans(10) == []
            assert (await s.social.load()).requests == []
            # an id registered again inherits nothing of the old owner's
            await s.social.request("alice", "bob", "", TS)
            await s.identity.remove_principal("bob")
            await add_users(s, "bob")
            assert (await s.social.load()).requests == []
    run(main())


# ---- devices, presence, telemetry --------------------------------------------------------------

@covers("devices.put_device_user", "devices.list_device_users", "devices.remove_device_user")
def test_device_claims_and_shares(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob")
            await add_users(s, "lamp", "plug", kind="device")
            assert await s.devices.list_device_users() == []
            await s.devices.put_device_user(DeviceUser("lamp", "alice", "owner", None, TS))        # a claim
            await s.devices.put_device_user(DeviceUser("lamp", "bob", "sharee", "alice", TS + 1))  # a share
            await s.devices.put_device_user(DeviceUser("plug", "bob", "owner", None, TS))
            with pytest.raises(NotFoundError):
                await s.devices.put_device_user(DeviceUser("nolamp", "alice", "owner", None, TS))
            with pytest.raises(NotFoundError):
                await s.devices.put_device_user(DeviceUser("lamp", "nobody", "sharee", "alice", TS))
            await s.devices.put_device_user(DeviceUser("plug", "bob", "sharee", "alice", TS + 2))   # role changes
            rows = await s.devices.list_device_users()
            assert [(d.device, d.principal, d.role) for d in rows] == \
                [("lamp", "alice", "owner"), ("lamp", "bob", "sharee"), ("plug", "bob", "sharee")]
            assert await s.devices.remove_device_user("lamp", "bob")
            assert not await s.devices.remove_device_user("lamp", "bob")
            await s.identity.remove_principal("plug")   # a removed device takes its users along
            assert [(d.device, d.principal) for d in await s.devices.list_device_users()] == [("lamp", "alice")]
    run(main())


@covers("presence.save_presence", "presence.load_presence", "presence.last_alive")
def test_presence_records(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob")
            assert await s.presence.load_presence() == [] and await s.presence.last_alive() is None
            written = await s.presence.save_presence([PresenceRecord("alice", "online", TS, TS),
                                                      PresenceRecord("ghost", "online", TS, TS)], alive_at=TS)
            assert written == 1   # a principal that does not exist is skipped, not an error
            assert await s.presence.save_presence([PresenceRecord("alice", "offline", TS + 5, TS + 5),
                                                   PresenceRecord("bob", "online", TS + 5, TS + 5)]) == 2
            assert await s.presence.last_alive() == TS   # kept when not given
            await s.presence.save_presence([], alive_at=TS + 10)
        async with store() as s:
            assert sorted(await s.presence.load_presence(), key=lambda r: r.principal) == \
                [PresenceRecord("alice", "offline", TS + 5, TS + 5), PresenceRecord("bob", "online", TS + 5, TS + 5)]
            assert await s.presence.last_alive() == TS + 10
    run(main())


@covers("telemetry.put_latest", "telemetry.get_latest", "telemetry.load_latest", "telemetry.delete_latest")
def test_latest_telemetry(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "thermo", "lamp", kind="device")
            assert await s.telemetry.load_latest() == [] and await s.telemetry.get_latest("thermo") is None
            fields: dict[str, float | int | bool | str] = {"temp": 21.5, "on": True, "mode": "heat", "n": 3}
            written = await s.telemetry.put_latest([LatestReading("thermo", TS, fields),
                                                    LatestReading("ghost", TS, {"x": 1})])
            assert written == 1
            await s.telemetry.put_latest([LatestReading("lamp", TS, {"on": False}),
                                          LatestReading("thermo", TS + 1, {"temp": 22.0})])   # replaces
            assert await s.telemetry.get_latest("thermo") == LatestReading("thermo", TS + 1, {"temp": 22.0})
            assert [r.device for r in await s.telemetry.load_latest()] == ["lamp", "thermo"]
            await s.telemetry.delete_latest("thermo")
            await s.telemetry.delete_latest("ghost")
            assert await s.telemetry.load_latest() == [LatestReading("lamp", TS, {"on": False})]
    run(main())


@covers("telemetry.put_history", "telemetry.history")
def test_telemetry_history_is_bounded_per_device_and_by_age(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "thermo", "lamp", kind="device")
            points = [HistoryPoint("thermo", TS + i, {"temp": 20.0 + i, "on": i % 2 == 0}) for i in range(5)]
            written = await s.telemetry.put_history([*points, HistoryPoint("ghost", TS, {"x": 1})],
                                                    keep=3, expire_before=0)
            assert written == 5   # a device that does not exist is skipped
            got = await s.telemetry.history("thermo", metric=None, since=0, limit=100)
            assert got == points[2:]   # the newest `keep`, oldest first
            assert await s.telemetry.history("thermo", metric=None, since=TS + 3, limit=100) == points[4:]
            assert [p.ts for p in await s.telemetry.history("thermo", metric=None, since=0, limit=2)] == [TS + 3, TS + 4]
            await s.telemetry.put_history([HistoryPoint("lamp", TS + 1, {"on": True}),
                                           HistoryPoint("lamp", TS + 2, {"brightness": 50})], keep=10, expire_before=0)
            assert await s.telemetry.history("lamp", metric="on", since=0, limit=10) == \
                [HistoryPoint("lamp", TS + 1, {"on": True})]   # only points with the metric, reduced to it
            await s.telemetry.put_history([HistoryPoint("lamp", TS + 2, {"brightness": 60})], keep=10,
                                          expire_before=TS + 2)   # replaces at the same ts; older ones expire
            assert await s.telemetry.history("lamp", metric=None, since=0, limit=10) == \
                [HistoryPoint("lamp", TS + 2, {"brightness": 60})]
            assert await s.telemetry.history("thermo", metric=None, since=0, limit=10) == points[2:] and \
                await s.telemetry.history("ghost", metric=None, since=0, limit=10) == []
            assert all(p.ts >= TS + 2 for p in await s.telemetry.history("thermo", metric=None, since=0, limit=9))
            await s.identity.remove_principal("thermo")   # a removed device takes its history along
            await add_users(s, "thermo", kind="device")
            assert await s.telemetry.history("thermo", metric=None, since=0, limit=10) == []
    run(main())


# ---- files ----------------------------------------------------------------------

@covers("files.add_upload", "files.get_upload", "files.find", "files.usage", "files.add_conv", "files.convs_of")
def test_file_uploads_quota_dedup_and_conversations(store: OpenStore) -> None:
    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob")
            a = FileRecord("ab" * 32, "alice", "cat.png", 100, "image/png", TS)
            assert await s.files.find(a.id) is None and await s.files.usage("alice") == 0
            assert await s.files.add_upload(a, quota=150)
            assert await s.files.add_upload(FileRecord(a.id, "alice", "again.png", 100, "image/png", TS + 1),
                                            quota=150)   # the same content again: no more quota, first kept
            assert await s.files.usage("alice") == 100
            assert await s.files.get_upload(a.id, "alice") == a
            big = FileRecord("cd" * 32, "alice", "big.bin", 51, "application/octet-stream", TS)
            assert not await s.files.add_upload(big, quota=150)   # over quota: nothing written
            assert await s.files.get_upload(big.id, "alice") is None and await s.files.usage("alice") == 100
            b = FileRecord(a.id, "bob", "dog.png", 100, "image/png", TS + 5)   # bob has the same bytes
            assert await s.files.add_upload(b, quota=100)
            assert await s.files.usage("bob") == 100 and await s.files.find(a.id) == a   # the first upload
            assert await s.files.get_upload(a.id, "carol") is None
            with pytest.raises(NotFoundError):
                await s.files.add_upload(FileRecord(a.id, "nobody", "x", 1, "text/plain", TS), quota=10)
            assert await s.files.convs_of(a.id) == []
            await s.files.add_conv(a.id, "dm:alice:bob")
            await s.files.add_conv(a.id, "dm:alice:bob")
            await s.files.add_conv(a.id, "grp:0123456789abcdef")
            assert await s.files.convs_of(a.id) == ["dm:alice:bob", "grp:0123456789abcdef"]
        async with store() as s:   # kept across a reopen; a removed uploader's quota rows go
            assert await s.files.convs_of(a.id) == ["dm:alice:bob", "grp:0123456789abcdef"]
            await s.identity.remove_principal("alice")
            assert await s.files.usage("alice") == 0 and await s.files.find(a.id) == b
            await s.identity.remove_principal("bob")   # the content stays with the messages that carry it
            assert await s.files.find(a.id) == FileRecord(a.id, "", "", 100, "image/png", TS)
            assert await s.files.find(big.id) is None and await s.files.convs_of(a.id) == ["dm:alice:bob",
                                                                                          "grp:0123456789abcdef"]
    run(main())


@covers("web_sessions.create", "web_sessions.get", "web_sessions.existing", "web_sessions.touch", "web_sessions.delete",
        "web_sessions.delete_principal", "web_sessions.expire", "web_sessions.count")
def test_web_sessions_bounded_least_recently_used_first_and_ended_with_their_principal(store: OpenStore) -> None:
    def rec(key: str, principal: str, at: float, expires_at: float | None = None) -> WebSessionRecord:
        return WebSessionRecord(key * 64, principal, "user", f"csrf-{key}", at, at, expires_at)

    async def main() -> None:
        async with store() as s:
            await add_users(s, "alice", "bob")
            a = rec("a", "alice", TS)
            assert await s.web_sessions.create(a, max_sessions=3) == (1, 0)
            assert await s.web_sessions.get(a.key) == a and await s.web_sessions.get("f" * 64) is None
            with pytest.raises(NotFoundError):
                await s.web_sessions.create(rec("9", "nobody", TS), max_sessions=3)
            assert await s.web_sessions.create(rec("b", "bob", TS + 1), max_sessions=3) == (2, 0)
            assert await s.web_sessions.create(rec("c", "alice", TS + 2), max_sessions=3) == (3, 0)
            await s.web_sessions.touch(a.key, TS + 10)          # a is now the most recently used
            await s.web_sessions.touch(a.key, TS + 5)           # never back in time
            assert (await s.web_sessions.get(a.key)) == WebSessionRecord(a.key, "alice", "user", "csrf-a",
                                                                         TS, TS + 10, None)
            await s.web_sessions.touch("e" * 64, TS)            # a session that is gone: nothing
            assert await s.web_sessions.create(rec("d", "bob", TS + 3), max_sessions=3) == (3, 1)
            assert await s.web_sessions.get("b" * 64) is None   # the least recently used went
            assert await s.web_sessions.count() == 3
            assert await s.web_sessions.existing(["a" * 64, "b" * 64, "d" * 64, "z"]) == {"a" * 64, "d" * 64}
            assert await s.web_sessions.existing([]) == set()
            assert await s.web_sessions.delete("d" * 64) and not await s.web_sessions.delete("d" * 64)
            assert await s.web_sessions.delete_principal("alice") == 2 and await s.web_sessions.count() == 0
        async with store() as s:   # kept across a reopen (another node, a restart); expiry by each rule
            await add_users(s, "carol")
            await s.web_sessions.create(rec("1", "bob", TS), max_sessions=10)           # idle
            await s.web_sessions.create(rec("2", "bob", TS + 100), max_sessions=10)     # too old
            await s.web_sessions.touch("2" * 64, TS + 1000)
            await s.web_sessions.create(rec("3", "carol", TS + 900, expires_at=TS + 950), max_sessions=10)
            await s.web_sessions.create(rec("4", "carol", TS + 900, expires_at=TS + 2000), max_sessions=10)
        async with store() as s:
            assert await s.web_sessions.count() == 4
            assert await s.web_sessions.expire(used_before=TS + 500, created_before=TS + 200, now=TS + 1000) == 3
            assert (await s.web_sessions.get("4" * 64)) is not None
            await s.identity.remove_principal("carol")        # a removed principal's sessions end with it
            assert await s.web_sessions.count() == 0
    run(main())
