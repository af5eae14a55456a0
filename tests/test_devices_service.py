"""DeviceService on a real SQLite store: claim, share, unshare, devices, rate limits."""

from __future__ import annotations

import asyncio

import pytest

from broker.config import RoostConfig
from broker.services.base import Caller
from broker.services.devices import ClaimLimits, DeviceService
from broker.services.identity import IdentityService
from broker.services.presence import PresenceService
from broker.services.runtime import Services
from broker.store.sqlite import SqliteStore
from contract.errors import ErrorCode, ProtocolError
from tests.test_presence_service import RecordingPublisher


class Telemetry:
    def __init__(self) -> None:
        self.readings: dict[str, dict] = {}

    def latest(self, device: str) -> dict | None:
        return self.readings.get(device)


def user(pid: str) -> Caller:
    return Caller(pid, "user", f"{pid}.phone")


async def setup(path, limits: ClaimLimits | None = None):  # noqa: ANN001, ANN201
    store = SqliteStore(path)
    await store.open()
    identity = IdentityService(store.identity)
    await identity.load()
    services = Services(config=RoostConfig(), store=store, identity=identity)
    codes = {}
    if await identity.get("alice") is None:
        for pid in ("alice", "bob", "carol"):
            await identity.add(pid, "user", secret="pw")
        codes["lamp"] = (await identity.add("lamp", "device", device_kind="light", room="hall")).pairing_code
        codes["thermo"] = (await identity.add("thermo", "device", device_kind="thermostat")).pairing_code
    services.presence = PresenceService(services)
    services.telemetry = Telemetry()
    svc = DeviceService(services, limits=limits or ClaimLimits())
    services.devices = svc
    await services.presence.load()
    await svc.load()
    pub = RecordingPublisher()
    await services.presence.start(pub)
    await svc.start(pub)
    return services, svc, pub, codes


async def teardown(services) -> None:  # noqa: ANN001
    await services.devices.stop()
    await services.presence.stop()
    await services.store.close()


async def expect_error(code: ErrorCode, coro) -> ProtocolError:  # noqa: ANN001
    with pytest.raises(ProtocolError) as info:
        await coro
    assert info.value.code == code, info.value
    return info.value


def test_claim_right_and_wrong_code(tmp_path) -> None:
    async def main() -> None:
        services, svc, pub, codes = await setup(tmp_path / "r.db")
        wrong = "00000000" if codes["lamp"] != "00000000" else "11111111"
        await expect_error(ErrorCode.FORBIDDEN, svc.claim(user("bob"), {"device": "lamp", "code": wrong}))
        assert not services.relations.may_use_device("bob", "lamp")
        await expect_error(ErrorCode.NOT_FOUND, svc.claim(user("bob"), {"device": "nosuch", "code": wrong}))
        await expect_error(ErrorCode.NOT_FOUND, svc.claim(user("bob"), {"device": "alice", "code": wrong}))
        await expect_error(ErrorCode.BAD_REQUEST, svc.claim(user("bob"), {"device": "lamp"}))
        await expect_error(ErrorCode.BAD_REQUEST, svc.claim(user("bob"), {"device": "Bad Id", "code": "1"}))
        await expect_error(ErrorCode.FORBIDDEN, svc.claim(Caller("thermo", "device", "thermo"),
                                                          {"device": "lamp", "code": codes["lamp"]}))
        before = pub.acl_refreshes
        res = await svc.claim(user("alice"), {"device": "lamp", "code": codes["lamp"]})
        assert res["device"] == "lamp" and res["role"] == "owner"
        assert services.relations.may_use_device("alice", "lamp")
        assert pub.acl_refreshes == before + 1
        # claiming again is harmless
        await svc.claim(user("alice"), {"device": "lamp", "code": codes["lamp"]})
        # a second person with the code becomes a second owner (spaces and dashes do not matter)
        spaced = codes["lamp"][:4] + " - " + codes["lamp"][4:]
        await svc.claim(user("carol"), {"device": "lamp", "code": spaced})
        assert svc.owners("lamp") == ["alice", "carol"]
        await teardown(services)

    asyncio.run(main())


def test_guessing_is_rate_limited(tmp_path) -> None:
    async def main() -> None:
        services, svc, pub, codes = await setup(tmp_path / "r.db", ClaimLimits(per_caller=3, per_device=5))
        wrong = "00000000" if codes["lamp"] != "00000000" else "11111111"
        for _ in range(3):
            await expect_error(ErrorCode.FORBIDDEN, svc.claim(user("bob"), {"device": "lamp", "code": wrong}))
        # now even the right code is refused for bob for a while
        await expect_error(ErrorCode.RATE_LIMITED, svc.claim(user("bob"), {"device": "lamp", "code": codes["lamp"]}))
        assert not services.relations.may_use_device("bob", "lamp")
        # other callers keep going until the device's own limit
        for _ in range(2):
            await expect_error(ErrorCode.FORBIDDEN, svc.claim(user("carol"), {"device": "lamp", "code": wrong}))
        await expect_error(ErrorCode.RATE_LIMITED, svc.claim(user("alice"), {"device": "lamp", "code": wrong}))
        # another device is unaffected for alice
        await svc.claim(user("alice"), {"device": "thermo", "code": codes["thermo"]})
        await teardown(services)

    asyncio.run(main())


def test_share_only_by_owner_with_contact(tmp_path) -> None:
    async def main() -> None:
        services, svc, pub, codes = await setup(tmp_path / "r.db")
        await svc.claim(user("alice"), {"device": "lamp", "code": codes["lamp"]})
        # bob is not a contact of alice yet
        await expect_error(ErrorCode.FORBIDDEN, svc.share(user("alice"), {"device": "lamp", "with": "bob"}))
        services.relations.set_contact("alice", "bob", True)
        # carol is not an owner, nor may she know of the lamp: not found (issue 15)
        await expect_error(ErrorCode.NOT_FOUND, svc.share(user("carol"), {"device": "lamp", "with": "bob"}))
        await expect_error(ErrorCode.NOT_FOUND, svc.share(user("alice"), {"device": "nolamp", "with": "bob"}))
        await expect_error(ErrorCode.BAD_REQUEST, svc.share(user("alice"), {"device": "lamp"}))
        res = await svc.share(user("alice"), {"device": "lamp", "with": "bob"})
        assert res["role"] == "sharee"
        assert services.relations.may_use_device("bob", "lamp")
        assert services.relations.device_users("lamp") == {"alice", "bob"}
        # a sharee cannot share further
        services.relations.set_contact("bob", "carol", True)
        await expect_error(ErrorCode.FORBIDDEN, svc.share(user("bob"), {"device": "lamp", "with": "carol"}))
        # take it back
        await svc.unshare(user("alice"), {"device": "lamp", "with": "bob"})
        assert not services.relations.may_use_device("bob", "lamp")
        await teardown(services)

    asyncio.run(main())


def test_ownership_survives_restart(tmp_path) -> None:
    async def main() -> None:
        services, svc, pub, codes = await setup(tmp_path / "r.db")
        await svc.claim(user("alice"), {"device": "lamp", "code": codes["lamp"]})
        services.relations.set_contact("alice", "bob", True)
        await svc.share(user("alice"), {"device": "lamp", "with": "bob"})
        await teardown(services)

        services2, svc2, _, _ = await setup(tmp_path / "r.db")
        assert services2.relations.device_users("lamp") == {"alice", "bob"}
        assert svc2.role("lamp", "alice") == "owner" and svc2.role("lamp", "bob") == "sharee"
        assert services2.relations.devices_of("bob") == {"lamp"}
        await teardown(services2)

    asyncio.run(main())


def test_devices_lists_yours_with_presence_and_telemetry(tmp_path) -> None:
    async def main() -> None:
        services, svc, pub, codes = await setup(tmp_path / "r.db")
        await svc.claim(user("alice"), {"device": "lamp", "code": codes["lamp"]})
        await svc.claim(user("alice"), {"device": "thermo", "code": codes["thermo"]})
        services.presence.client_connected("lamp")
        services.telemetry.readings["lamp"] = {"ts": 5.0, "on": True, "brightness": 40}
        res = await svc.list_devices(user("alice"), {})
        by_id = {d["id"]: d for d in res["devices"]}
        assert set(by_id) == {"lamp", "thermo"}
        lamp = by_id["lamp"]
        assert lamp["kind"] == "light" and lamp["name"] == "lamp" and lamp["room"] == "hall"
        assert lamp["presence"]["state"] == "online" and lamp["presence"]["clients"] == 1
        assert lamp["last_telemetry"] == {"ts": 5.0, "on": True, "brightness": 40}
        assert lamp["role"] == "owner" and lamp["owners"] == ["alice"]
        assert by_id["thermo"]["presence"]["state"] == "offline"
        assert by_id["thermo"]["last_telemetry"] is None
        assert (await svc.list_devices(user("bob"), {})) == {"devices": []}
        # the device itself sees its people
        me = await svc.list_devices(Caller("lamp", "device", "lamp"), {})
        assert [d["id"] for d in me["devices"]] == ["lamp"] and me["devices"][0]["owners"] == ["alice"]
        # without a telemetry service the listing still works
        services.telemetry = None
        res = await svc.list_devices(user("alice"), {})
        assert all(d["last_telemetry"] is None for d in res["devices"])
        await teardown(services)

    asyncio.run(main())


def test_principal_removed_drops_its_rows(tmp_path) -> None:
    async def main() -> None:
        services, svc, pub, codes = await setup(tmp_path / "r.db")
        await svc.claim(user("alice"), {"device": "lamp", "code": codes["lamp"]})
        await services.identity.remove("alice")
        await svc.principal_removed("alice")
        assert not services.relations.may_use_device("alice", "lamp")
        assert await services.store.devices.list_device_users() == []
        await teardown(services)

    asyncio.run(main())
