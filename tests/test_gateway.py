"""The gateway without a broker: real services on a real SQLite store, requests
submitted as a front end would, each answered exactly once through its reply."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from broker.services.base import Caller, Handler
from broker.services.events import PrincipalRemoved
from broker.services.gateway import Gateway, Request
from broker.store.base import StoreUnavailable
from contract.errors import ErrorCode, ProtocolError
from contract.ops import OPS
from tests.messaging_env import Env, FakeClock, close_env, open_env


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


class Replies:
    """A front end's replies, per client id, decoded."""

    def __init__(self) -> None:
        self.by_client: dict[str, list[dict[str, Any]]] = {}

    def to(self, client_id: str):  # noqa: ANN201
        async def reply(payload: bytes) -> None:
            self.by_client.setdefault(client_id, []).append(json.loads(payload))
        return reply

    async def wait(self, client_id: str, count: int) -> list[dict[str, Any]]:
        for _ in range(500):
            if len(self.by_client.get(client_id, [])) >= count:
                return self.by_client[client_id]
            await asyncio.sleep(0.01)
        raise AssertionError(f"{client_id} got {self.by_client.get(client_id)}, wanted {count} replies")


class Probe:
    """A service whose ops fail on demand (in a slot of the container)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def load(self) -> None: ...

    async def start(self, publisher: Any) -> None: ...

    async def stop(self) -> None: ...

    def ops(self) -> dict[str, Handler]:
        return {"probe.store_full": self._store_full, "probe.bug": self._bug, "probe.conflict": self._conflict,
                "probe.wait": self._wait}

    async def _store_full(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        raise StoreUnavailable("database or disk is full\nsecond line")

    async def _bug(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("a bug")

    async def _conflict(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        raise ProtocolError(ErrorCode.CONFLICT, "already there")

    async def _wait(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        await self.release.wait()
        return {"waited": True}


async def gateway_env(tmp_path, limits: dict[str, Any] | None = None,  # noqa: ANN001
                      clock: FakeClock | None = None) -> tuple[Env, Gateway, Replies, Probe]:
    env = await open_env(tmp_path, config={"limits": limits or {}})
    probe = Probe()
    gateway = Gateway(env.services, clock=clock or FakeClock(), registry={*OPS, *probe.ops()})
    env.services.devices = probe  # type: ignore[assignment]
    await gateway.start(env.pub)
    return env, gateway, Replies(), probe


def request(principal: str | None, op: str, rid: str = "r1", label: str = "phone", **params: Any) -> Request:
    return Request(principal=principal, kind="user", client_id=f"{principal or 'anon'}.{label}", id=rid, op=op,
                   params=params)


def test_a_request_runs_its_op_and_is_answered_once(tmp_path):
    async def main() -> None:
        env, gateway, replies, _ = await gateway_env(tmp_path)
        await env.befriend("alice", "bob")
        gateway.submit(request("alice", "send", to="bob", cmid="c1", body={"type": "text", "text": "hi"}),
                       replies.to("alice.phone"))
        (answer,) = await replies.wait("alice.phone", 1)
        assert answer["id"] == "r1" and answer["ok"] is True
        assert answer["result"]["conv"] == "dm:alice:bob" and answer["result"]["seq"] == 1
        await env.settle()
        assert len(replies.by_client["alice.phone"]) == 1
        assert env.services.request_stats.counts()["send"]["ok"] == 1
        await close_env(env)

    run(main())


def test_refusals_before_running_anything(tmp_path):
    async def main() -> None:
        env, gateway, replies, _ = await gateway_env(tmp_path)
        gateway.submit(request(None, "convs"), replies.to("anon.phone"))
        gateway.submit(request("alice", "nope", rid="r2"), replies.to("alice.phone"))
        (anon,) = await replies.wait("anon.phone", 1)
        assert anon == {"id": "r1", "ok": False, "error": {"code": "unauthorized", "message": "not authenticated"}}
        (unknown,) = await replies.wait("alice.phone", 1)
        assert unknown["error"] == {"code": "bad_request", "message": "unknown op 'nope'"}
        await close_env(env)

    run(main())


def test_errors_map_to_codes_and_a_bug_is_logged_once(tmp_path, caplog):
    async def main() -> None:
        env, gateway, replies, _ = await gateway_env(tmp_path)
        reply = replies.to("alice.phone")
        for i, op in enumerate(("probe.conflict", "probe.store_full", "probe.bug")):
            gateway.submit(request("alice", op, rid=f"r{i}"), reply)
        answers = {a["id"]: a["error"] for a in await replies.wait("alice.phone", 3)}
        assert answers["r0"] == {"code": "conflict", "message": "already there"}
        assert answers["r1"] == {"code": "unavailable", "message": "storage cannot take writes now, retry later "
                                                                  "(database or disk is full)"}
        assert answers["r2"] == {"code": "internal", "message": "internal error (logged)"}
        assert gateway.failed_internal == 1 and gateway.answered_unavailable == 1
        tracebacks = [r for r in caplog.records if r.exc_info and "probe.bug" in r.getMessage()]
        assert len(tracebacks) == 1
        counts = env.services.request_stats.counts()
        assert counts["probe.bug"]["internal"] == 1 and counts["probe.store_full"]["unavailable"] == 1
        await close_env(env)

    with caplog.at_level(logging.WARNING, logger="roost.im"):
        run(main())


def test_rate_is_limited_per_principal_across_its_clients(tmp_path):
    async def main() -> None:
        clock = FakeClock(1000.0)
        env, gateway, replies, _ = await gateway_env(tmp_path, {"request_rate": 1, "request_burst": 2}, clock)
        gateway.submit(request("alice", "convs", rid="a", label="phone"), replies.to("alice.phone"))
        gateway.submit(request("alice", "convs", rid="b", label="laptop"), replies.to("alice.laptop"))
        gateway.submit(request("alice", "convs", rid="c", label="tablet"), replies.to("alice.tablet"))
        (refused,) = await replies.wait("alice.tablet", 1)
        assert refused["error"]["code"] == "rate_limited"
        assert refused["error"]["message"] == "more than 1 requests per second from 'alice' (all its clients)"
        assert gateway.rejected_rate == 1
        clock.advance(1.0)                      # one token back
        gateway.submit(request("alice", "convs", rid="d", label="tablet"), replies.to("alice.tablet"))
        assert (await replies.wait("alice.tablet", 2))[1]["ok"] is True
        await close_env(env)

    run(main())


def test_requests_in_progress_are_bounded_per_client(tmp_path):
    async def main() -> None:
        env, gateway, replies, probe = await gateway_env(tmp_path, {"max_pending_requests": 1})
        reply = replies.to("alice.phone")
        gateway.submit(request("alice", "probe.wait", rid="slow"), reply)
        gateway.submit(request("alice", "convs", rid="fast"), reply)
        (refused,) = await replies.wait("alice.phone", 1)
        assert refused["id"] == "fast" and refused["error"]["code"] == "rate_limited"
        probe.release.set()
        answers = await replies.wait("alice.phone", 2)
        assert answers[1] == {"id": "slow", "ok": True, "result": {"waited": True}}
        gateway.submit(request("alice", "convs", rid="after"), reply)
        assert (await replies.wait("alice.phone", 3))[2]["ok"] is True
        await close_env(env)

    run(main())


def test_finish_gives_requests_in_progress_a_grace_then_cancels_them(tmp_path):
    async def main() -> None:
        env, gateway, replies, _ = await gateway_env(tmp_path)
        gateway.submit(request("alice", "probe.wait", rid="stuck"), replies.to("alice.phone"))
        await asyncio.sleep(0)
        await gateway.finish(0.05)
        for _ in range(100):
            if env.services.request_stats.counts().get("probe.wait", {}).get("cancelled"):
                break
            await asyncio.sleep(0.01)
        assert env.services.request_stats.counts()["probe.wait"]["cancelled"] == 1
        assert "alice.phone" not in replies.by_client       # cancelled at shutdown: nobody to answer
        await close_env(env)

    run(main())


def test_ops_lists_every_service_op(tmp_path):
    async def main() -> None:
        env, gateway, _, _ = await gateway_env(tmp_path)
        served = gateway.ops()
        assert served == sorted(served)
        assert {"send", "sync", "contact.request", "probe.bug"} <= set(served)
        await close_env(env)

    run(main())


def test_a_removed_principal_loses_access_and_connections_first(tmp_path):
    async def main() -> None:
        env, gateway, _, _ = await gateway_env(tmp_path)
        await env.befriend("alice", "bob")
        order: list[str] = []

        async def kick(principal: str) -> int:
            order.append(f"kick {principal}")
            return 2
        env.pub.kick_principal = kick  # type: ignore[method-assign]

        async def later(event: PrincipalRemoved) -> None:
            order.append(f"services see {event.principal}, contacts {env.services.relations.contacts_of('alice')}")
        env.services.bus.subscribe(PrincipalRemoved, later)
        refreshes = env.pub.acl_refreshes
        await env.services.bus.publish(PrincipalRemoved("bob"))
        assert order == ["kick bob", "services see bob, contacts set()"]
        assert env.pub.acl_refreshes > refreshes
        await close_env(env)

    run(main())


def test_presence_sessions_leave_transient_clients_out(tmp_path):
    async def main() -> None:
        from broker.services.presence import PresenceService

        env, gateway, _, _ = await gateway_env(tmp_path)
        presence = env.services.presence = PresenceService(env.services, clock=FakeClock(50.0))
        gateway.connection_opened("alice", "alice.phone")
        gateway.connection_opened("alice", "alice.cli-1a2b3c4d")
        gateway.connection_opened(None, "auto-0123")
        assert presence.current("alice") is not None and presence.current("alice")["clients"] == 1
        gateway.connection_closed("alice", "alice.cli-1a2b3c4d", "disconnect", None)
        assert presence.is_online("alice")
        gateway.connection_closed("alice", "alice.phone", "disconnect", None)
        assert not presence.is_online("alice")
        await close_env(env)

    run(main())


def test_envelopes_are_checked_before_they_are_submitted(tmp_path):
    async def main() -> None:
        env, gateway, replies, _ = await gateway_env(tmp_path, {"max_body": 10})
        reply = replies.to("alice.phone")
        too_large = b'{"id": "big", "op": "send", "pad": "' + b"x" * (60 + 64 * 1024) + b'"}'
        gateway.submit_envelope("alice", "user", "alice.phone", too_large, reply)
        gateway.submit_envelope("alice", "user", "alice.phone", b'{"id": "x1", "op": 5}', reply)
        gateway.submit_envelope("alice", "user", "alice.phone", b"[" * 20000 + b"]" * 20000, reply)
        gateway.submit_envelope("alice", "user", "alice.phone", b'{"id": "ok", "op": "convs"}', reply)
        answers = {a["id"]: a for a in await replies.wait("alice.phone", 4)}
        assert answers["big"]["error"] == {"code": "too_large", "message": "request is too large"}
        assert answers["x1"]["error"]["code"] == "bad_request"
        assert answers["ok"]["ok"] is True
        assert answers[None]["error"]["code"] == "bad_request"
        await close_env(env)

    run(main())


def test_an_op_the_contract_registry_lacks_stops_the_start(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path)
        try:
            env.services.devices = Probe()  # type: ignore[assignment]
            with pytest.raises(RuntimeError, match="contract/ops.py lacks"):
                await Gateway(env.services, clock=FakeClock()).start(env.pub)
        finally:
            await close_env(env)

    asyncio.run(main())
