"""The event bus: delivery rules of InProcessBus, and the services' events on a
real SQLite store (no broker)."""

from __future__ import annotations

import asyncio
import logging

from broker.services.admin_log import AdminLogWatcher
from broker.services.events import (
    ContactChanged,
    InProcessBus,
    MailboxAppended,
    PrincipalAdded,
    PrincipalRemoved,
    SecretChanged,
)
from broker.services.identity import IdentityService
from tests.messaging_env import close_env, open_env


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_handlers_run_in_subscription_order_sync_and_async():
    async def main() -> None:
        bus = InProcessBus()
        seen: list[str] = []

        async def second(event: PrincipalAdded) -> None:
            await asyncio.sleep(0)
            seen.append(f"second {event.principal}")

        bus.subscribe(PrincipalAdded, lambda event: seen.append(f"first {event.principal}"))
        bus.subscribe(PrincipalAdded, second)
        bus.subscribe(PrincipalRemoved, lambda event: seen.append("not this one"))
        await bus.publish(PrincipalAdded("alice"))
        assert seen == ["first alice", "second alice"]

    run(main())


def test_synchronous_handlers_do_not_make_the_publisher_yield():
    async def main() -> None:
        bus = InProcessBus()
        seen: list[int] = []
        bus.subscribe(MailboxAppended, lambda event: seen.append(len(event.events)))
        other = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        await bus.publish(MailboxAppended(()))
        assert seen == [0] and not other.done()      # nothing else ran in between
        await other

    run(main())


def test_a_failing_handler_is_logged_and_the_others_still_run(caplog):
    async def main() -> None:
        bus = InProcessBus()
        seen: list[str] = []

        def broken(event: ContactChanged) -> None:
            raise RuntimeError("consumer bug")

        async def broken_later(event: ContactChanged) -> None:
            raise RuntimeError("async consumer bug")

        bus.subscribe(ContactChanged, broken)
        bus.subscribe(ContactChanged, broken_later)
        bus.subscribe(ContactChanged, lambda event: seen.append(event.a))
        await bus.publish(ContactChanged("alice", "bob", True))
        bus.publish_nowait(ContactChanged("carol", "bob", True))
        await bus.drain()
        assert seen == ["alice", "carol"]
        assert bus.failures == 4

    with caplog.at_level(logging.ERROR, logger="roost.events"):
        run(main())
    assert sum("consumer bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info) == 4


def test_publish_nowait_schedules_coroutines_and_is_bounded():
    async def main() -> None:
        bus = InProcessBus(max_pending=2)
        release = asyncio.Event()
        done: list[str] = []

        async def slow(event: PrincipalAdded) -> None:
            await release.wait()
            done.append(event.principal)

        bus.subscribe(PrincipalAdded, slow)
        for name in ("a", "b", "c"):
            bus.publish_nowait(PrincipalAdded(name))
        assert bus.dropped == 1
        release.set()
        await bus.drain()
        assert sorted(done) == ["a", "b"]

    run(main())


def test_committed_mailbox_events_are_published_once_in_order(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        appended: list[MailboxAppended] = []
        contacts: list[ContactChanged] = []
        env.services.bus.subscribe(MailboxAppended, appended.append)
        env.services.bus.subscribe(ContactChanged, contacts.append)
        await env.befriend("alice", "bob")
        assert contacts == [ContactChanged("bob", "alice", True)]
        appended.clear()
        await env.call("alice", "send", to="bob", cmid="c1", body={"type": "text", "text": "hi"})
        (event,) = appended
        for_bob = [e.doc for e in event.events if e.principal == "bob"]
        stored = await env.mailbox("bob")
        assert for_bob and stored[-len(for_bob):] == for_bob
        await close_env(env)

    run(main())


def test_admin_changes_of_another_process_arrive_as_events(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        seen: list[object] = []
        bus = env.services.bus
        for kind in (PrincipalAdded, PrincipalRemoved, SecretChanged):
            bus.subscribe(kind, seen.append)
        watcher = AdminLogWatcher(env.services.identity, bus, interval=0.01)
        await watcher.start()
        admin = IdentityService(env.services.store.identity)    # as `roost user ...` would
        await admin.add("dave", "user", secret="pw")
        await admin.set_secret("dave", "pw2")
        await admin.remove("carol")
        for _ in range(300):
            if len(seen) >= 3:
                break
            await asyncio.sleep(0.01)
        await watcher.stop()
        assert seen == [PrincipalAdded("dave"), SecretChanged("dave", "password"), PrincipalRemoved("carol")]
        assert env.services.identity.get_cached("dave") is not None      # the directory followed
        assert env.services.identity.get_cached("carol") is None
        await close_env(env)

    run(main())


def test_a_retained_change_is_told_only_after_its_write_committed(tmp_path):
    """broker/server.py puts these on the bus as RetainedChanged: a consumer (another
    node, a front end) must find the change in the store when it hears of it."""
    from broker.config import LimitsConfig, StorageConfig
    from broker.mqtt.figures import new_stats
    from broker.mqtt.retained import RetainedMessages
    from broker.store.factory import open_store

    async def main() -> None:
        store = await open_store(StorageConfig(path=str(tmp_path / "roost.db")))
        told: list[tuple[str, bytes, list[str]]] = []
        pending: list[asyncio.Task[None]] = []

        def on_stored(topic: str, payload: bytes) -> None:
            async def look() -> None:
                told.append((topic, payload, [m.topic for m in await store.retained.load_all()]))
            pending.append(asyncio.get_running_loop().create_task(look()))

        try:
            retained = RetainedMessages(limits=LimitsConfig(), store=store.retained, stats=new_stats(),
                                        on_stored=on_stored)
            retained.set("home/a", b"1", 1)
            retained.set("home/a", b"2", 1)          # coalesces with the first: one write, the latest
            assert told == []                        # nothing is told before it is written
            assert await retained.flush()
            await asyncio.gather(*pending)           # the store as it was when told
            retained.set("home/a", b"", 0)           # cleared
            assert await retained.flush()
            await asyncio.gather(*pending)
            assert told == [("home/a", b"2", ["home/a"]), ("home/a", b"", [])]
        finally:
            await store.close()

    run(main())


def test_a_retained_change_replaced_during_its_write_is_not_told(tmp_path):
    """Of two changes of one topic, the first already being written when the second
    comes, only the second is told: the event says the topic's current value (a
    cluster node sends what it is told to its peers as this node's change)."""
    from broker.config import LimitsConfig, StorageConfig
    from broker.mqtt.figures import new_stats
    from broker.mqtt.retained import RetainedMessages
    from broker.store.factory import open_store

    async def main() -> None:
        store = await open_store(StorageConfig(path=str(tmp_path / "roost.db")))
        told: list[tuple[str, bytes]] = []
        try:
            retained = RetainedMessages(limits=LimitsConfig(), store=store.retained, stats=new_stats(),
                                        on_stored=lambda topic, payload: told.append((topic, payload)))
            retained.set("home/a", b"1", 1)
            writing = asyncio.get_running_loop().create_task(retained.flush())
            await asyncio.sleep(0)                   # the flush's first step: it takes "1" and awaits its write
            assert retained._lock.locked()
            retained.set("home/a", b"2", 1)
            assert await writing
            assert told == [("home/a", b"2")]
        finally:
            await store.close()

    run(main())
