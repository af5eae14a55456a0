from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import RoostProcess
from tests.nats import NatsServer
from tests.postgres import PostgresDatabases, PostgresServer


@pytest.fixture
def roost_factory(tmp_path) -> Iterator[Callable[..., RoostProcess]]:
    started: list[RoostProcess] = []

    def make(extra_config: dict[str, Any] | None = None, *, start: bool = True, name: str = "broker") -> RoostProcess:
        proc = RoostProcess(tmp_path / f"{name}{len(started)}", extra_config)
        started.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in started:
        proc.kill()


@pytest.fixture
def roost(roost_factory) -> RoostProcess:
    return roost_factory()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL server (tests/postgres.py) for the whole session."""
    server = PostgresServer().start()
    yield server
    server.remove()


@pytest.fixture(scope="session")
def postgres_databases(postgres_server: PostgresServer) -> PostgresDatabases:
    return PostgresDatabases(postgres_server)


@pytest.fixture
def postgres_dsn(postgres_databases: PostgresDatabases) -> str:
    """The dsn of a fresh database of its own for this test, Roost's schema migrated."""
    return postgres_databases.fresh()


@pytest.fixture
def nats_server(tmp_path) -> Iterator[NatsServer]:
    """A private nats-server (tests/nats.py) on a free port, for this test alone
    (a test may stop or kill it)."""
    root = tmp_path / "nats"
    root.mkdir()
    server = NatsServer(root).start()
    yield server
    server.remove()
