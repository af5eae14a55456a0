"""Cluster (issue 12, item 3): the IM protocol across nodes on one PostgreSQL
and one nats-server: a person's phone on node 1 and laptop on node 2 see the
same thread, unread counts and receipts; a retry on another node is `dup`;
`sync` from any node returns the same events; 8 senders on 3 nodes into one
group get gap-free seqs."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from tests.clients import ImClient
from tests.harness import RoostProcess, free_port
from tests.nats import wait_until
from tests.test_cluster_routing import node_config, wait_until_formed
from tests.test_metrics import base_url, get


def pg_nodes(root: Path, nats_url: str, dsn: str, names: list[str],
             users: tuple[str, ...] = ("alice", "bob", *[f"s{i}" for i in range(8)]),
             dm_without_contact: bool = True) -> dict[str, RoostProcess]:
    nodes = {}
    for name in names:
        cfg: dict[str, Any] = node_config(name, nats_url)
        cfg["storage"] = {"backend": "postgres", "dsn": dsn, "path": str(root / name / "roost.db")}
        cfg["messaging"] = {"allow_dm_without_contact": dm_without_contact}
        nodes[name] = RoostProcess(root / name, cfg)
    first = next(iter(nodes.values()))
    for user in users:
        first.cli("user", "add", user, "--password-stdin", input=f"pw-{user}-123\n")
    for node in nodes.values():
        node.start()
    wait_until_formed(nodes)
    return nodes


def im(node: RoostProcess, principal: str, label: str) -> ImClient:
    return ImClient(principal, label).open(node, f"pw-{principal}-123")


def test_im_across_nodes(tmp_path, nats_server, postgres_dsn) -> None:
    nodes = pg_nodes(tmp_path, nats_server.url, postgres_dsn, ["n1", "n2", "n3"])
    try:
        phone, laptop = im(nodes["n1"], "alice", "phone"), im(nodes["n2"], "alice", "laptop")
        bob = im(nodes["n3"], "bob", "tv")
        sent = bob.call("send", to="alice", cmid="c1", body={"type": "text", "text": "hi"})
        for c in (phone, laptop):
            ev = c.wait_event("msg", conv=sent["conv"])
            assert ev["seq"] == sent["seq"]
        # the retry on another node is dup
        bob2 = im(nodes["n1"], "bob", "phone")
        again = bob2.call("send", to="alice", cmid="c1", body={"type": "text", "text": "hi"})
        assert again["dup"] and again["seq"] == sent["seq"]
        # the same unread numbers on both of alice's nodes; reading on one clears it for the other
        assert phone.call("convs")["total_unread"] == laptop.call("convs")["total_unread"] == 1
        phone.call("read", conv=sent["conv"], seq=sent["seq"])
        assert laptop.call("convs")["total_unread"] == 0
        bob.wait_event("read", conv=sent["conv"])          # bob (on n3) hears alice read it (on n1)
        laptop.wait_event("unread", conv=sent["conv"])     # and her laptop (on n2) that it is read
        # sync from any node returns the same events
        s1 = phone.call("sync", after=0)
        s3 = im(nodes["n3"], "alice", "tablet").call("sync", after=0)
        assert s1["events"] == s3["events"]
        # 8 senders on 3 nodes into one group: gap-free seqs
        names = list(nodes)
        senders = [im(nodes[names[i % 3]], f"s{i}", "x") for i in range(8)]
        conv = senders[0].call("group.create", name="g", members=[f"s{i}" for i in range(1, 8)])["conv"]
        seqs: list[int] = []
        lock = threading.Lock()

        def run(c: ImClient, i: int) -> None:
            for k in range(10):
                r = c.call("send", conv=conv, cmid=f"{i}-{k}", body={"type": "text", "text": str(k)})
                with lock:
                    seqs.append(r["seq"])

        threads = [threading.Thread(target=run, args=(c, i)) for i, c in enumerate(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(seqs) == list(range(min(seqs), min(seqs) + 80))
    finally:
        for node in nodes.values():
            node.kill()


def figures(node: RoostProcess) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(get(base_url(node) + "/status.json")[1])["cluster"]
    return doc


def msg_seqs(events: list[dict[str, Any]], conv: str) -> list[int]:
    return [e["seq"] for e in events if e.get("kind") == "msg" and e.get("conv") == conv]


def web_pg_nodes(root: Path, nats_url: str, dsn: str, names: list[str]) -> dict[str, RoostProcess]:
    """Nodes on one PostgreSQL with an HTTP listener each (their figures in /status.json)."""
    nodes = {}
    for name in names:
        cfg: dict[str, Any] = node_config(name, nats_url)
        cfg["storage"] = {"backend": "postgres", "dsn": dsn, "path": str(root / name / "roost.db")}
        cfg["messaging"] = {"allow_dm_without_contact": True}
        cfg["listeners"] = {"web": {"type": "http", "bind": f"127.0.0.1:{free_port()}"}}
        nodes[name] = RoostProcess(root / name, cfg)
    for user in ("alice", "bob", "carol"):
        nodes[names[0]].cli("user", "add", user, "--password-stdin", input=f"pw-{user}-123\n")
    for node in nodes.values():
        node.start()
    wait_until_formed(nodes)
    return nodes


def test_mailbox_events_only_to_nodes_with_the_principals_clients(tmp_path, nats_server, postgres_dsn) -> None:
    """Mailbox events go only to the nodes holding the recipients' clients, and a
    client connecting on a node while messages stream to its principal misses
    none (what its node was not yet sent, its node reads from the store once
    every node knows of it)."""
    nodes = web_pg_nodes(tmp_path, nats_server.url, postgres_dsn, ["n1", "n2", "n3"])
    try:
        bob = im(nodes["n1"], "bob", "phone")
        laptop = im(nodes["n2"], "alice", "laptop")
        carol = im(nodes["n3"], "carol", "tv")      # n3 holds clients, none of alice's or bob's
        conv = bob.call("send", to="alice", cmid="m1", body={"type": "text", "text": "1"})["conv"]
        for k in range(2, 21):
            bob.call("send", conv=conv, cmid=f"m{k}", body={"type": "text", "text": str(k)})
        assert msg_seqs([laptop.wait_event("msg", conv=conv, seq=20)], conv) == [20]
        assert msg_seqs(laptop.events, conv) == list(range(1, 21))     # every one, in order
        assert figures(nodes["n3"])["mailbox_received"] == 0
        assert figures(nodes["n2"])["mailbox_received"] >= 20
        assert figures(nodes["n1"])["mailbox_sent"] == figures(nodes["n2"])["mailbox_received"]
        carol.disconnect()

        # a phone connecting on n3 while bob's messages stream to alice
        total, started = 160, threading.Event()
        failures: list[BaseException] = []

        def stream() -> None:
            try:
                for k in range(21, total + 1):
                    bob.call("send", conv=conv, cmid=f"m{k}", body={"type": "text", "text": str(k)})
                    if k == 60:
                        started.set()
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                failures.append(exc)
                started.set()

        sender = threading.Thread(target=stream)
        sender.start()
        assert started.wait(30)
        phone = im(nodes["n3"], "alice", "phone")
        synced: list[dict[str, Any]] = []
        after = 0
        while True:
            page = phone.call("sync", after=after)
            synced += page["events"]
            after = page["last"]
            if not page["more"]:
                break
        sender.join(60)
        assert not failures, failures
        phone.wait_event("msg", conv=conv, seq=total, timeout=15)
        pushed = msg_seqs(phone.events, conv)
        assert pushed == sorted(pushed), "pushed out of order"
        seen = set(msg_seqs(synced, conv)) | set(pushed)
        assert seen == set(range(1, total + 1)), sorted(set(range(1, total + 1)) - seen)
        laptop.wait_event("msg", conv=conv, seq=total)
        assert msg_seqs(laptop.events, conv) == list(range(1, total + 1))
        assert figures(nodes["n3"])["mailbox_received"] > 0     # alice is watched there now
    finally:
        for node in nodes.values():
            node.kill()


def test_a_client_connecting_during_a_nats_outage_is_pushed_what_was_committed_meanwhile(
        tmp_path, nats_server, postgres_dsn) -> None:
    """The catch-up, in the one window wide enough to test: alice's phone connects
    on n2 while NATS is down (n1 cannot hear of it) and bob's message is committed
    on n1 after the phone's sync. Once NATS is back every node has applied n2's
    announcement, and n2's pusher reads the store again: the message is pushed,
    though nothing was sent to n2 for it and no later message follows."""
    nodes = web_pg_nodes(tmp_path, nats_server.url, postgres_dsn, ["n1", "n2"])
    try:
        bob = im(nodes["n1"], "bob", "phone")
        conv = bob.call("send", to="alice", cmid="m1", body={"type": "text", "text": "1"})["conv"]
        nats_server.kill()
        for node in nodes.values():
            wait_until(lambda node=node: figures(node)["nats_connected"] is False, what="NATS gone")
        phone = im(nodes["n2"], "alice", "phone")
        assert msg_seqs(phone.call("sync", after=0)["events"], conv) == [1]
        assert bob.call("send", conv=conv, cmid="m2", body={"type": "text", "text": "2"})["seq"] == 2
        nats_server.start()
        assert phone.wait_event("msg", conv=conv, seq=2, timeout=20)["cmid"] == "m2"
    finally:
        for node in nodes.values():
            node.kill()
