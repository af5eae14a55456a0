"""roost serve's event loop (broker/app.py new_event_loop): uvloop when installed,
the standard library's with ROOST_EVENT_LOOP=asyncio."""

from __future__ import annotations

import asyncio

import pytest

from broker.app import EVENT_LOOP_ENV, new_event_loop

uvloop = pytest.importorskip("uvloop")


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_asyncio_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "asyncio")
    loop = new_event_loop()
    try:
        assert not isinstance(loop, uvloop.Loop)
        assert isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()
