"""$SYS topics (issue 15, item 1): Mosquitto's names and meanings, published
retained every sys_interval, readable by service accounts and whoever the ACL
allows, never by anonymous clients or people by default; Roost's own figures
under $SYS/broker/roost/."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest

from broker.services.sysinfo import (
    ListenerFigures,
    LoadAverages,
    Snapshot,
    StoreFigures,
    sys_topics,
)
from broker.sys_publisher import SysPublisher
from tests.clients import ConnectFailed, ImClient, MqttClient

FAST = {"sys_interval": 0.5}


def connect(broker: Any, client_id: str, username: str | None = None, password: str | None = None) -> MqttClient:
    return MqttClient(client_id).connect(broker.host, broker.port, username=username, password=password)


class Figures:
    """The latest $SYS payloads a subscriber has seen, by topic."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.latest: dict[str, str] = {}

    def wait(self, topic: str, ok: Callable[[str], bool] = lambda v: True, timeout: float = 15.0) -> str:
        """Read messages until `topic`'s latest payload satisfies `ok`."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.latest.get(topic)
            if value is not None and ok(value):
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{topic}: still {value!r} after {timeout}s")
            try:
                m = self.client.wait_message("$SYS/#", timeout=left)
            except TimeoutError:
                continue
            self.latest[m.topic] = m.payload.decode()


def at_least(n: int) -> Callable[[str], bool]:
    return lambda v: int(v) >= n


# ---- over MQTT ------------------------------------------------------------------

def test_service_account_reads_mosquitto_figures(roost_factory):
    broker = roost_factory(FAST)
    secret = broker.add_service("ha")
    pw = broker.add_user("alice")
    svc = connect(broker, "ha", "ha", secret)
    assert svc.subscribe("$SYS/#", 0) == [0]
    figures = Figures(svc)
    assert re.fullmatch(r"roost version \S+", figures.wait("$SYS/broker/version"))
    assert re.fullmatch(r"\d+ seconds", figures.wait("$SYS/broker/uptime"))
    alice = connect(broker, "alice", "alice", pw)
    figures.wait("$SYS/broker/clients/connected", lambda v: v == "2")
    figures.wait("$SYS/broker/clients/maximum", at_least(2))
    for i in range(3):
        alice.publish("home/hall/light", f"on {i}", qos=1)
    figures.wait("$SYS/broker/publish/messages/received", at_least(3))
    figures.wait("$SYS/broker/roost/publish/received/qos1", at_least(3))
    # every packet counts in messages/*, PUBLISH only in publish/messages/*
    figures.wait("$SYS/broker/messages/received", at_least(3 + 2 + 1))   # + 2 CONNECTs + a SUBSCRIBE
    figures.wait("$SYS/broker/bytes/received", at_least(1))
    figures.wait("$SYS/broker/subscriptions/count", at_least(1))
    figures.wait("$SYS/broker/retained messages/count", at_least(1))   # the $SYS ones themselves
    for window in ("1min", "5min", "15min"):
        figures.wait(f"$SYS/broker/load/publish/received/{window}", lambda v: float(v) > 0)
    for topic in ("clients/disconnected", "clients/total", "messages/sent", "publish/messages/sent",
                  "publish/messages/dropped", "bytes/sent", "store/messages/count", "messages/inflight"):
        int(figures.wait("$SYS/broker/" + topic))
    # a persistent session whose client went away is "disconnected"
    away = MqttClient("alice.away", clean_session=False).connect(broker.host, broker.port,
                                                                 username="alice", password=pw)
    away.subscribe("home/#", 1)
    away.disconnect()
    figures.wait("$SYS/broker/clients/disconnected", lambda v: v == "1")
    figures.wait("$SYS/broker/clients/total", lambda v: v == "3")


def test_retained_figures_reach_a_late_subscriber_at_once(roost_factory):
    broker = roost_factory(FAST)
    secret = broker.add_service("ha")
    first = connect(broker, "ha.first", "ha", secret)
    first.subscribe("$SYS/broker/version", 0)
    first.wait_message("$SYS/broker/version")      # published at least once
    late = connect(broker, "ha.late", "ha", secret)
    late.subscribe("$SYS/broker/clients/+", 0)
    m = late.wait_message("$SYS/broker/clients/maximum")
    assert m.retain


def test_roost_figures(roost_factory):
    broker = roost_factory(FAST)
    secret = broker.add_service("ha")
    pw = broker.add_user("alice")
    svc = connect(broker, "ha", "ha", secret)
    svc.subscribe("$SYS/broker/roost/#", 0)
    figures = Figures(svc)
    alice = ImClient("alice").open(broker, pw)
    alice.call("convs")
    alice.request("group.info", conv="grp:nosuch")
    figures.wait("$SYS/broker/roost/requests/convs/ok", at_least(1))
    figures.wait("$SYS/broker/roost/requests/group.info/not_found", at_least(1))
    with pytest.raises(ConnectFailed):
        connect(broker, "alice.x", "alice", "wrong password")
    figures.wait("$SYS/broker/roost/logins/refused/bad_credentials", at_least(1))
    figures.wait("$SYS/broker/roost/dropped/queue_full", lambda v: v == "0")
    figures.wait("$SYS/broker/roost/refused/publish_denied", lambda v: v == "0")
    figures.wait("$SYS/broker/roost/listeners/default/connections", lambda v: v == "2")
    figures.wait("$SYS/broker/roost/store/writable", lambda v: v == "1")


def test_people_devices_and_anonymous_clients_are_refused_by_default(roost_factory):
    broker = roost_factory({**FAST, "auth": {"allow_anonymous": True}})
    pw = broker.add_user("alice")
    secret = broker.add_service("ha")
    alice = connect(broker, "alice", "alice", pw)
    anon = connect(broker, "visitor")
    for client in (alice, anon):
        assert client.subscribe("$SYS/#") == [0x80]
        assert client.subscribe("$SYS/broker/uptime") == [0x80]
        assert client.subscribe("#") == [1]      # a wildcard never reaches $ topics (MQTT-4.7.2-1)
    svc = connect(broker, "ha", "ha", secret)
    svc.subscribe("$SYS/broker/uptime", 0)
    svc.wait_message("$SYS/broker/uptime")
    svc.wait_message("$SYS/broker/uptime")     # published again after both subscribed
    for client in (alice, anon):
        client.publish(f"barrier/{client.client_id}", b"x", qos=1)
        client.wait_message(f"barrier/{client.client_id}")
        seen = [m.topic for m in client._kept] + [client.messages.get().topic for _ in range(client.messages.qsize())]
        assert not [t for t in seen if t.startswith("$")]


def test_acl_rules_decide_who_else_reads(roost_factory):
    broker = roost_factory({**FAST, "acl": [
        {"action": "allow", "access": "subscribe", "topic": "$SYS/#", "who": "alice"},
        {"action": "deny", "access": "subscribe", "topic": "$SYS/broker/roost/#", "who": "kind:service"},
    ]})
    apw = broker.add_user("alice")
    bpw = broker.add_user("bob")
    secret = broker.add_service("ha")
    alice = connect(broker, "alice", "alice", apw)
    bob = connect(broker, "bob", "bob", bpw)
    svc = connect(broker, "ha", "ha", secret)
    assert alice.subscribe("$SYS/#", 0) == [0]
    assert bob.subscribe("$SYS/#", 0) == [0x80]
    assert svc.subscribe("$SYS/broker/roost/#", 0) == [0x80]
    assert svc.subscribe("$SYS/broker/version", 0) == [0]
    assert alice.wait_message("$SYS/broker/version").payload.startswith(b"roost version ")
    svc.wait_message("$SYS/broker/version")


def test_clients_cannot_publish_sys_and_nothing_is_stored(roost_factory):
    broker = roost_factory(FAST)
    secret = broker.add_service("ha")
    svc = connect(broker, "ha", "ha", secret)
    svc.subscribe("$SYS/broker/version", 0)
    figures = Figures(svc)
    figures.wait("$SYS/broker/version")
    svc.publish("$SYS/broker/version", b"forged", qos=1, retain=True)
    # the next publication of every figure still says roost (only changes are
    # published: a fresh subscription replays the retained one)
    late = connect(broker, "ha.late", "ha", secret)
    late.subscribe("$SYS/broker/version", 0)
    assert late.wait_message("$SYS/broker/version").payload.startswith(b"roost version ")
    broker.stop()
    with sqlite3.connect(broker.config["storage"]["path"]) as db:
        assert db.execute("SELECT COUNT(*) FROM retained WHERE topic LIKE '$%'").fetchone()[0] == 0


def test_sys_interval_zero_serves_no_sys(roost_factory):
    broker = roost_factory({"sys_interval": 0})
    secret = broker.add_service("ha")
    svc = connect(broker, "ha", "ha", secret)
    assert svc.subscribe("$SYS/#") == [0x80]
    assert svc.subscribe("$share/g/x") == [1]     # shared subscriptions are served (docs/MQTT5.md)


# ---- the pure parts ---------------------------------------------------------------

def _snapshot(**kw: Any) -> Snapshot:
    snap = Snapshot(
        version="1.2.3", now=0.0, uptime=42.9,
        listeners=(ListenerFigures("default", "tcp", False, "127.0.0.1:1883", True, 3),
                   ListenerFigures("web", "http", False, "127.0.0.1:9883", True, 0)),
        clients_connected=3, clients_maximum=5, connections_accepted=9, sessions=4, sessions_disconnected=1,
        subscriptions=7, publish_received=(1, 2, 3), publish_sent=(4, 5, 6), packets_received=20,
        packets_sent=30, bytes_received=100, bytes_sent=200, inflight=2, queued=1, queued_bytes=10,
        stored_messages=11, stored_bytes=111, retained=8, retained_bytes=88, dropped={"queue_full": 2},
        refused={"publish_denied": 1}, logins_refused={"bad_credentials": 4},
        requests={"send": {"ok": 5, "forbidden": 1}}, mailbox_events={"msg": 6}, mailbox_pruned=0,
        telemetry={}, store=StoreFigures("x.db", 1, True, None, 1, 0, 0))
    return dataclasses.replace(snap, **kw)


def test_topic_names_and_formats_follow_mosquitto():
    t = sys_topics(_snapshot())
    assert t["$SYS/broker/version"] == "roost version 1.2.3"
    assert t["$SYS/broker/uptime"] == "42 seconds"
    assert t["$SYS/broker/clients/connected"] == "3"
    assert t["$SYS/broker/clients/disconnected"] == "1"
    assert t["$SYS/broker/clients/total"] == "4"
    assert t["$SYS/broker/clients/maximum"] == "5"
    assert t["$SYS/broker/clients/expired"] == "0"
    assert t["$SYS/broker/messages/received"] == "20"
    assert t["$SYS/broker/publish/messages/received"] == "6"
    assert t["$SYS/broker/publish/messages/sent"] == "15"
    assert t["$SYS/broker/publish/messages/dropped"] == "2"
    assert t["$SYS/broker/retained messages/count"] == "8"
    assert t["$SYS/broker/store/messages/count"] == "11"
    assert t["$SYS/broker/subscriptions/count"] == "7"
    assert t["$SYS/broker/roost/requests/send/forbidden"] == "1"
    assert t["$SYS/broker/roost/logins/refused/bad_credentials"] == "4"
    assert t["$SYS/broker/roost/mailbox/events/msg"] == "6"
    assert t["$SYS/broker/roost/listeners/default/connections"] == "3"
    assert not any("/web/" in k for k in t)           # http listeners carry no MQTT connections
    assert all("+" not in k and "#" not in k for k in t)


def test_load_averages_converge_like_mosquitto():
    loads = LoadAverages()
    total = 0
    loads.update({"publish/received": total}, 0.0)
    for step in range(1, 2000):          # 2 messages a second for ~33 minutes, 1 s apart
        total += 2
        loads.update({"publish/received": total}, float(step))
    avg = loads.values["publish/received"]
    assert avg["1min"] == pytest.approx(120.0, rel=1e-3)
    assert avg["15min"] == pytest.approx(120.0, rel=0.15)
    for _ in range(60):                  # then a quiet minute: the 1 min average falls fastest
        step += 1
        loads.update({"publish/received": total}, float(step))
    assert avg["1min"] < avg["5min"] < avg["15min"]
    assert sys_topics(_snapshot(), loads)["$SYS/broker/load/publish/received/1min"] == f"{avg['1min']:.2f}"


def test_only_changed_figures_are_published_again():
    asyncio.run(_only_changed())


async def _only_changed() -> None:
    sent: list[tuple[str, bytes, int, bool]] = []

    async def publish(topic: str, payload: bytes, qos: int, retain: bool) -> int:
        sent.append((topic, payload, qos, retain))
        return 0

    pub = SysPublisher(publish)
    first = await pub.publish(_snapshot(), 0.0)
    assert first == len(sent) and all(qos == 0 and retain for _t, _p, qos, retain in sent)
    sent.clear()
    await pub.publish(_snapshot(uptime=43.5, clients_connected=4), 10.0)
    topics = {t for t, *_ in sent}
    assert "$SYS/broker/uptime" in topics and "$SYS/broker/clients/connected" in topics
    assert "$SYS/broker/version" not in topics and "$SYS/broker/subscriptions/count" not in topics
