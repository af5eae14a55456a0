"""PresenceService on a real SQLite store, driven the way the engine's hooks drive it."""

from __future__ import annotations

import asyncio
import json

from broker.config import RoostConfig
from broker.services.identity import IdentityService
from broker.services.presence import PresenceService
from broker.services.runtime import Services
from broker.store.sqlite import SqliteStore


class RecordingPublisher:
    """Stands in for the broker: records what a subscriber to roost/presence/# would get."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict | None, bool]] = []
        self.acl_refreshes = 0

    async def publish(self, topic, payload, qos=0, retain=False):  # noqa: ANN001
        await asyncio.sleep(0)  # a real publish yields; ordering must survive that
        self.published.append((topic, json.loads(payload) if payload else None, retain))
        return 1

    async def deliver(self, client_id, topic, payload, qos=1):  # noqa: ANN001
        return False

    def client_ids_of(self, principal):  # noqa: ANN001
        return []

    async def kick_principal(self, principal):  # noqa: ANN001
        return 0

    def refresh_acl(self) -> None:
        self.acl_refreshes += 1

    def states(self, principal: str) -> list[tuple[str, int]]:
        return [(d["state"], d["clients"]) for t, d, _ in self.published if t == f"roost/presence/{principal}"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def make_services(path) -> Services:  # noqa: ANN001
    store = SqliteStore(path)
    await store.open()
    identity = IdentityService(store.identity)
    await identity.load()
    for pid in ("alice", "bob"):
        await identity.add(pid, "user", secret="pw")
    return Services(config=RoostConfig(), store=store, identity=identity)


async def settle(svc: PresenceService) -> None:
    for _ in range(50):
        await asyncio.sleep(0)
    await svc._drain()


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_online_offline_counts_and_order(tmp_path) -> None:
    async def main() -> None:
        services = await make_services(tmp_path / "r.db")
        clock = Clock()
        svc = PresenceService(services, clock=clock)
        pub = RecordingPublisher()
        await svc.load()
        await svc.start(pub)
        svc.client_connected("alice")
        clock.now += 1
        svc.client_connected("alice")
        clock.now += 1
        svc.client_disconnected("alice", "disconnect")
        clock.now += 1
        svc.client_disconnected("alice", "keepalive")
        await settle(svc)
        assert pub.states("alice") == [("online", 1), ("online", 2), ("online", 1), ("offline", 0)]
        last = pub.published[-1][1]
        assert last == {"state": "offline", "clients": 0, "since": clock.now, "last_seen": clock.now}
        assert all(retain for _, _, retain in pub.published)
        online = pub.published[0][1]
        assert online["since"] == 1_000_000.0
        assert pub.published[2][1]["since"] == 1_000_000.0  # still the same online period
        assert svc.current("alice")["state"] == "offline"
        assert svc.current("bob") is None
        await svc.stop()
        await services.store.close()

    run(main())


def test_take_over_has_no_offline_flicker(tmp_path) -> None:
    async def main() -> None:
        services = await make_services(tmp_path / "r.db")
        svc = PresenceService(services)
        pub = RecordingPublisher()
        await svc.load()
        await svc.start(pub)
        svc.client_connected("bob")
        # the engine: new connection first, then the old one's taken_over
        svc.client_connected("bob")
        svc.client_disconnected("bob", "taken_over")
        await settle(svc)
        assert [s for s, _ in pub.states("bob")] == ["online", "online", "online"]
        assert svc.is_online("bob")
        await svc.stop()
        await services.store.close()

    run(main())


def test_unmatched_disconnect_is_ignored(tmp_path) -> None:
    async def main() -> None:
        services = await make_services(tmp_path / "r.db")
        svc = PresenceService(services)
        pub = RecordingPublisher()
        await svc.load()
        await svc.start(pub)
        svc.client_disconnected("alice", "lost")
        await settle(svc)
        assert pub.published == []
        await svc.stop()
        await services.store.close()

    run(main())


def test_crash_restart_publishes_offline_with_last_seen(tmp_path) -> None:
    """A broker that died with alice online: the next one announces her offline
    with the last_seen it had persisted, before any new state of hers."""
    async def main() -> None:
        services = await make_services(tmp_path / "r.db")
        clock = Clock()
        svc = PresenceService(services, clock=clock, flush_interval=0.01)
        await svc.load()
        await svc.start(RecordingPublisher())
        svc.client_connected("alice")
        connected_at = clock.now
        await asyncio.sleep(0.1)  # the write-behind flush runs
        # SIGKILL: no stop(); just drop the tasks and close the file
        for t in svc._tasks:
            t.cancel()
        await services.store.close()

        services2 = await make_services_reopen(tmp_path / "r.db")
        clock.now += 100
        svc2 = PresenceService(services2, clock=clock)
        await svc2.load()
        pub2 = RecordingPublisher()
        svc2.client_connected("alice")   # she reconnects as soon as the listener is up
        await svc2.start(pub2)
        await settle(svc2)
        assert pub2.states("alice") == [("offline", 0), ("online", 1)]
        offline = pub2.published[0][1]
        assert offline["last_seen"] == connected_at and offline["since"] == connected_at
        await svc2.stop()
        await services2.store.close()

    run(main())


async def make_services_reopen(path) -> Services:  # noqa: ANN001
    store = SqliteStore(path)
    await store.open()
    identity = IdentityService(store.identity)
    await identity.load()
    return Services(config=RoostConfig(), store=store, identity=identity)


def test_clean_stop_records_everyone_offline(tmp_path) -> None:
    async def main() -> None:
        services = await make_services(tmp_path / "r.db")
        clock = Clock()
        svc = PresenceService(services, clock=clock)
        pub = RecordingPublisher()
        await svc.load()
        await svc.start(pub)
        svc.client_connected("alice")
        clock.now += 5
        await svc.stop()
        assert pub.states("alice") == [("online", 1), ("offline", 0)]
        svc.client_disconnected("alice", "shutdown")  # the shutdown's own disconnects change nothing
        recs = {r.principal: r for r in await services.store.presence.load_presence()}
        assert recs["alice"].state == "offline" and recs["alice"].last_seen == clock.now
        await services.store.close()

        services2 = await make_services_reopen(tmp_path / "r.db")
        svc2 = PresenceService(services2, clock=clock)
        await svc2.load()
        pub2 = RecordingPublisher()
        await svc2.start(pub2)
        await settle(svc2)
        assert pub2.published == []        # nothing stale to correct
        assert svc2.current("alice")["last_seen"] == clock.now
        await svc2.stop()
        await services2.store.close()

    run(main())


def test_crash_last_seen_is_when_the_broker_was_last_alive(tmp_path) -> None:
    """bob connected at T and the broker kept running until T+60, then died:
    after the restart bob is offline, last seen at T+60 (not T)."""
    async def main() -> None:
        services = await make_services(tmp_path / "r.db")
        clock = Clock()
        svc = PresenceService(services, clock=clock, flush_interval=0.01, heartbeat=10)
        await svc.load()
        await svc.start(RecordingPublisher())
        svc.client_connected("bob")
        await asyncio.sleep(0.05)
        clock.now += 60
        await asyncio.sleep(0.1)
        for t in svc._tasks:          # SIGKILL
            t.cancel()
        await services.store.close()

        services2 = await make_services_reopen(tmp_path / "r.db")
        svc2 = PresenceService(services2, clock=clock)
        await svc2.load()
        pub2 = RecordingPublisher()
        await svc2.start(pub2)
        await settle(svc2)
        assert pub2.published[0][1] == {"state": "offline", "clients": 0, "since": clock.now, "last_seen": clock.now}
        await svc2.stop()
        await services2.store.close()

    run(main())


def test_overflow_is_counted_and_final_state_still_published(tmp_path) -> None:
    async def main() -> None:
        services = await make_services(tmp_path / "r.db")
        svc = PresenceService(services, queue_max=2)
        pub = RecordingPublisher()
        await svc.load()
        await svc.start(pub)
        for _ in range(5):
            svc.client_connected("alice")
        svc.client_connected("bob")
        await settle(svc)
        assert svc.overflows == 4
        assert pub.states("alice")[-1] == ("online", 5)
        assert pub.states("bob")[-1] == ("online", 1)
        await svc.stop()
        await services.store.close()

    run(main())


def test_forget_clears_retained(tmp_path) -> None:
    async def main() -> None:
        services = await make_services(tmp_path / "r.db")
        svc = PresenceService(services)
        pub = RecordingPublisher()
        await svc.load()
        await svc.start(pub)
        svc.client_connected("alice")
        svc.forget("alice")
        await settle(svc)
        assert pub.published[-1] == ("roost/presence/alice", None, True)
        assert svc.current("alice") is None
        await svc.stop()
        await services.store.close()

    run(main())


def test_retained_online_without_a_record_is_corrected(tmp_path) -> None:
    """SIGKILL before presence's write-behind flushed, after the broker's retained
    writer did: the retained says online, our records say nothing."""
    from broker.store.base import RetainedMessage

    async def main() -> None:
        services = await make_services(tmp_path / "r.db")
        online = {"state": "online", "clients": 1, "since": 500.0, "last_seen": 600.0}
        await services.store.retained.put(RetainedMessage("roost/presence/alice", json.dumps(online).encode(), 1))
        await services.store.retained.put(RetainedMessage("roost/presence/ghost", json.dumps(online).encode(), 1))
        await services.store.retained.put(RetainedMessage(
            "roost/presence/bob", json.dumps({**online, "state": "offline"}).encode(), 1))
        svc = PresenceService(services)
        await svc.load()
        pub = RecordingPublisher()
        await svc.start(pub)
        await settle(svc)
        got = {t: d for t, d, _ in pub.published}
        assert got == {"roost/presence/alice": {"state": "offline", "clients": 0, "since": 600.0, "last_seen": 600.0},
                       "roost/presence/ghost": None}
        await svc.stop()
        await services.store.close()

    run(main())
