"""`roost migrate --to postgresql://...` moves a SQLite home into PostgreSQL with
every id, seq, mailbox number, cursor and secret intact (issue 12 item 5).

A real broker on SQLite is filled through the protocol by real clients
(contacts, direct and group messages, reads, acks, a persistent MQTT session
with a queued message, a retained message), stopped, migrated, and a broker on
PostgreSQL is compared with what the first one answered, through the protocol:
sync, history, convs and unread, logins with the same passwords, the queued
message and the retained one, numbering that continues where it stopped.
"""

from __future__ import annotations

import time
from typing import Any

from tests.clients import ConnectFailed, ImClient, MqttClient


def text(t: str) -> dict[str, str]:
    return {"type": "text", "text": t}


def snapshot(clients: dict[str, ImClient]) -> dict[str, Any]:
    """What each person's client is told about their mailbox, conversations and history."""
    out: dict[str, Any] = {}
    for who, c in clients.items():
        convs = c.call("convs")
        box = c.call("sync", after=0, limit=1000)
        out[who] = {
            "sync": box,
            "convs": convs,
            "history": {conv["conv"]: c.call("history", conv=conv["conv"], limit=200)
                        for conv in convs["convs"]},
            "head": box["events"][-1]["n"],
        }
    return out


def test_a_sqlite_home_migrated_to_postgresql_answers_the_same(roost_factory, postgres_databases):  # noqa: ANN001
    home = roost_factory(name="sqlite")
    pw = {p: home.add_user(p) for p in ("alice", "bob", "carol")}
    alice = ImClient("alice", "phone").open(home, pw["alice"])
    bob = ImClient("bob", "phone").open(home, pw["bob"])
    carol = ImClient("carol", "phone").open(home, pw["carol"])
    for friend in (bob, carol):
        alice.call("contact.request", to=friend.principal)
        friend.call("contact.accept", **{"from": "alice"})
    for i in range(3):
        alice.call("send", to="bob", cmid=f"a{i}", body=text(f"hello {i}"))
    bob.call("send", to="alice", cmid="b0", body=text("hi"))
    bob.call("read", conv="dm:alice:bob", seq=2)
    group = alice.call("group.create", name="Dinner", members=["bob", "carol"])["conv"]
    carol.call("send", conv=group, cmid="c0", body=text("pizza?"))
    bob.call("ack", n=bob.call("sync", after=0, limit=1)["last"])
    # carol's firmware-style client (clean_session=0) acked up to n=2: pushes resume after it
    carol_fw = ImClient("carol", "fw", clean_session=False).open(home, pw["carol"])
    assert carol_fw.call("ack", n=2) == {"n": 2}
    carol_fw.disconnect()
    # a persistent MQTT session with a QoS 1 message queued while its client is away, and a retained message
    sub = MqttClient("bob.sub", clean_session=False).connect(home.host, home.port, username="bob", password=pw["bob"])
    assert sub.subscribe("home/+/state", 1) == [1]
    sub.disconnect()
    pub = MqttClient("alice.pub").connect(home.host, home.port, username="alice", password=pw["alice"])
    pub.publish("home/lamp/state", b"queued", qos=1)
    pub.publish("home/door/state", b"closed", qos=1, retain=True)
    pub.disconnect()
    people = {"alice": alice, "bob": bob, "carol": carol}
    before = snapshot(people)
    for c in (alice, bob, carol):
        c.disconnect()
    home.stop()

    dsn = postgres_databases.fresh(migrated=False)
    done = home.cli("migrate", "--to", dsn)
    assert done.stdout.startswith("copied ") and f"to {dsn}" in done.stdout
    again = home.cli("migrate", "--to", dsn, check=False)   # the target has rows now: refused, unchanged
    errors = [line for line in again.stderr.splitlines() if line.startswith("roost: error")]
    assert again.returncode != 0 and len(errors) == 1 and "not empty" in errors[0]

    cluster = roost_factory({"storage": {"backend": "postgres", "dsn": dsn}}, name="pg")
    # the same passwords log in; the same questions get the same answers
    people = {p: ImClient(p, "phone").open(cluster, pw[p]) for p in ("alice", "bob", "carol")}
    assert snapshot(people) == before

    sub = MqttClient("bob.sub", clean_session=False).connect(cluster.host, cluster.port, username="bob",
                                                             password=pw["bob"])
    assert sub.session_present is True
    assert sub.wait_message("home/+/state").payload == b"queued"
    fresh = MqttClient("carol.sub").connect(cluster.host, cluster.port, username="carol", password=pw["carol"])
    fresh.subscribe("home/door/state", 1)
    assert fresh.wait_message("home/door/state").payload == b"closed"

    carol_fw = ImClient("carol", "fw", clean_session=False).open(cluster, pw["carol"])
    assert carol_fw.wait_event()["n"] == 3   # the ack cursor came along

    # admin commands work on the PostgreSQL store, and the running broker applies them (admin log)
    cluster.cli("user", "passwd", "carol", "--password-stdin", input="carol-new\n")
    deadline = time.monotonic() + 10
    while True:
        try:
            ImClient("carol", "tablet").open(cluster, "carol-new").disconnect()
            break
        except ConnectFailed:
            assert time.monotonic() < deadline, "the new password was not taken within 10 s"

    # numbering and idempotence continue where the SQLite store stopped
    alice, bob = people["alice"], people["bob"]
    assert alice.call("send", to="bob", cmid="a0", body=text("hello 0")).get("dup") is True
    sent = alice.call("send", to="bob", cmid="a3", body=text("after the move"))
    assert sent["seq"] == 5 and not sent.get("dup")
    page = bob.call("sync", after=before["bob"]["head"])
    assert [(e["n"], e["kind"]) for e in page["events"]][:1] == [(before["bob"]["head"] + 1, "msg")]
    assert page["events"][0]["seq"] == 5
