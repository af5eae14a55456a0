from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import RoostProcess


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
