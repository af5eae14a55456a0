"""What only the PostgreSQL store has to get right (tests/test_store_contract.py
covers what every engine must do): migrations run once when several nodes start
together, counters allocated in the database across nodes, a newer schema
refused, and an outage of the server (SIGKILL) answered with StoreUnavailable and
recovered from by itself once the server is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import asyncpg
import pytest

from broker.config import StorageConfig
from broker.store.base import Principal, StoreCannotOpen, StoreUnavailable
from broker.store.factory import open_store
from broker.store.postgres import PgStore
from broker.store.postgres_db import PgDatabase
from broker.store.postgres_schema import MIGRATIONS, migrate
from tests.postgres import PostgresDatabases, PostgresServer

T = TypeVar("T")
TS = 1764000000.0


def user(pid: str) -> Principal:
    return Principal(pid, "user", pid.capitalize(), "", "hash", TS)


async def eventually(fn: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """fn()'s result once it stops raising StoreUnavailable (re-raised after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await fn()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_three_nodes_starting_together_migrate_once(postgres_databases: PostgresDatabases) -> None:
    dsn = postgres_databases.fresh(migrated=False)
    expected = [v for v, _name, sql in MIGRATIONS if sql.strip()]

    async def main() -> None:
        dbs = [PgDatabase(dsn, pool_size=2) for _ in range(3)]
        await asyncio.gather(*(db.open() for db in dbs))
        try:
            applied = await asyncio.gather(*(migrate(db) for db in dbs))
            assert sorted(applied, key=len) == [[], [], expected]   # one applied everything, the others nothing
            rows = await dbs[0].pool.fetch("SELECT version FROM schema_migrations ORDER BY version")
            assert [r[0] for r in rows] == expected
        finally:
            await asyncio.gather(*(db.close() for db in dbs))
        # whole stores opening together on the migrated database: nothing more to do, no error
        stores = [PgStore(dsn, pool_size=2) for _ in range(3)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            await stores[0].identity.add_principal(user("alice"))
            assert (await stores[2].identity.get_principal("alice")) is not None
        finally:
            await asyncio.gather(*(s.close() for s in stores))
    asyncio.run(main())


def test_admin_log_seqs_from_three_nodes_are_gap_free(postgres_dsn: str) -> None:
    async def main() -> None:
        stores = [PgStore(postgres_dsn, pool_size=4) for _ in range(3)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            await asyncio.gather(*(s.identity.log_admin(f"p{i}-{j}", "added")
                                   for i, s in enumerate(stores) for j in range(20)))
            rows = await stores[1].identity.admin_log_after(0)
            assert [seq for seq, _p, _a in rows] == list(range(1, 61))
            assert {p for _s, p, _a in rows} == {f"p{i}-{j}" for i in range(3) for j in range(20)}
            assert await stores[2].identity.admin_log_head() == 60
        finally:
            await asyncio.gather(*(s.close() for s in stores))
    asyncio.run(main())


def test_a_newer_schema_and_an_unreachable_server_are_refused_in_one_line(
        postgres_dsn: str, postgres_server: PostgresServer) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute("INSERT INTO schema_migrations(version, name, applied_at) VALUES (999, 'future', 0)")
        await conn.close()
        with pytest.raises(StoreCannotOpen) as info:
            await open_store(StorageConfig(backend="postgres", dsn=postgres_dsn))
        assert "999" in str(info.value) and "\n" not in str(info.value)

        dead = f"postgresql://roost:s3cret@127.0.0.1:{_closed_port()}/roost"
        with pytest.raises(StoreCannotOpen) as info:
            await open_store(StorageConfig(backend="postgres", dsn=dead))
        text = str(info.value)
        assert text.startswith("cannot connect to postgresql://roost@127.0.0.1:") and "s3cret" not in text
        assert "\n" not in text
    asyncio.run(main())


def _closed_port() -> int:
    from tests.postgres import free_port

    return free_port()   # nothing listens there once the probe socket is closed


@pytest.fixture
def outage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A server of this test's own, to be killed (fsync on: what was committed survives)."""
    server = PostgresServer(fsync=True).start()
    yield server
    server.remove()


def test_server_killed_answers_unavailable_then_recovers_by_itself(outage_server: PostgresServer) -> None:
    dsn = PostgresDatabases(outage_server).fresh()

    async def main() -> None:
        store = PgStore(dsn, pool_size=3)
        await store.open()
        try:
            await store.identity.add_principal(user("alice"))
            outage_server.kill()
            with pytest.raises(StoreUnavailable):
                await store.identity.add_principal(user("bob"))
            with pytest.raises(StoreUnavailable):
                await store.identity.get_principal("alice")
            assert store.health.unavailable_since is not None and store.health.write_failures > 0
            outage_server.start()
            await eventually(lambda: store.identity.add_principal(user("bob")))
            assert store.health.unavailable_since is None
            assert [p.id for p in await store.identity.list_principals()] == ["alice", "bob"]   # nothing lost
        finally:
            await store.close()
    asyncio.run(main())


def test_sessions_journaled_by_two_nodes_at_once_share_payloads_exactly(postgres_dsn: str) -> None:
    """Two nodes queue the same payload for their own sessions and acknowledge it,
    all at once: every message is kept and the shared payload's reference count
    ends where it must (nothing leaks, nothing is freed while referred to)."""
    from broker.store.base import MessageDone, MessageKept, SavedMessage, SessionUpsert

    payload = b"the same reading" * 8

    async def main() -> None:
        nodes = [PgStore(postgres_dsn, pool_size=4) for _ in range(2)]
        await asyncio.gather(*(s.open() for s in nodes))
        try:
            clients = [[f"n{i}-c{j}" for j in range(10)] for i in range(2)]
            await asyncio.gather(*(s.sessions.apply([SessionUpsert(c, None, None, {"t": 1}, 0.0) for c in cs])
                                   for s, cs in zip(nodes, clients)))
            await asyncio.gather(*(s.sessions.apply([MessageKept(c, SavedMessage(seq, "t", payload, 1))])
                                   for s, cs in zip(nodes, clients) for c in cs for seq in (1, 2, 3)))
            saved = await nodes[0].sessions.load_sessions()
            assert len(saved) == 20 and all([m.seq for m in s.messages] == [1, 2, 3] for s in saved)
            assert all(m.payload == payload for s in saved for m in s.messages)
            refs = await nodes[0].db.pool.fetchval("SELECT refs FROM mqtt_payloads")
            assert refs == 60
            await asyncio.gather(*(s.sessions.apply([MessageDone(c, seq)])
                                   for s, cs in zip(nodes, clients) for c in cs for seq in (1, 2)))
            assert await nodes[1].db.pool.fetchval("SELECT refs FROM mqtt_payloads") == 20
            await asyncio.gather(*(s.sessions.apply([MessageDone(c, 3)]) for s, cs in zip(nodes, clients) for c in cs))
            assert await nodes[1].db.pool.fetchval("SELECT count(*) FROM mqtt_payloads") == 0
        finally:
            await asyncio.gather(*(s.close() for s in nodes))
    asyncio.run(main())


@pytest.mark.parametrize(("storage", "where", "says"), [
    ({"backend": "postgres"}, "storage.dsn", "required when storage.backend is postgres"),
    ({"backend": "postgres", "dsn": "mysql://x/y"}, "storage.dsn", "postgresql://"),
    ({"backend": "postgres", "dsn": "postgresql://h/db", "pool_size": 0}, "storage.pool_size", "at least 1"),
    ({"backend": "oracle"}, "storage.backend", "must be one of sqlite, postgres"),
])
def test_storage_config_errors_are_one_line(storage: dict[str, object], where: str, says: str) -> None:
    from broker.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as info:
        config_from_dict({"storage": storage})
    text = str(info.value)
    assert where in text and says in text and "\n" not in text


def test_storage_config_selects_the_engine(postgres_dsn: str) -> None:
    from broker.config import config_from_dict
    from broker.store.factory import create_store
    from broker.store.sqlite import SqliteStore

    assert isinstance(create_store(config_from_dict({}).storage), SqliteStore)   # the default, as before
    cfg = config_from_dict({"storage": {"backend": "postgres", "dsn": postgres_dsn, "pool_size": 3}})
    store = create_store(cfg.storage)
    assert isinstance(store, PgStore) and store.db.pool_size == 3
