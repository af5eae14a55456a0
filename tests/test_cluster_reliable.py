"""Cluster (issue 12, item 4): cross-node publishes are at-least-once
(broker/cluster/reliable.py). A NATS restart in the middle of a QoS 1 stream
loses none of the publishes acknowledged to the publisher on node 1: each
reaches the persistent subscriber on node 2, once, in order. Without the
resend window, what nats-server held when it was killed, and what node 1 sent
after NATS came back before node 2 had resubscribed, was lost.

The window itself (bounded in bytes, overflow counted, the receiver skipping
what was given up; a lost frame resent and delivered once) is checked in
process over an in-memory link that can lose frames."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from broker.cluster.reliable import ENTRY_BYTES, ReliableLinks
from broker.cluster.wire import pub_subject
from broker.config import ConfigError, config_from_dict
from broker.mqtt.hooks import NotAcknowledged
from tests.clients import MqttClient
from tests.harness import RoostProcess
from tests.nats import wait_until
from tests.test_cluster_metrics import start_nodes
from tests.test_cluster_routing import until_routed
from tests.test_metrics import scrape

STREAM = 1000


def reconnects(node: RoostProcess) -> int:
    return node.log_path.read_text(errors="replace").count("cluster: NATS is back")


def test_nats_restart_mid_stream_loses_no_acknowledged_publish(tmp_path, nats_server) -> None:
    nodes = start_nodes(tmp_path, nats_server.url)       # n1, n2 with /metrics
    try:
        far = MqttClient("far", clean_session=False).connect(nodes["n2"].host, nodes["n2"].port)
        far.subscribe("stream/#", qos=1)
        pub = MqttClient("pub")
        pub.paho.max_inflight_messages_set(0)    # a burst: many frames on the way when NATS dies
        pub.connect(nodes["n1"].host, nodes["n1"].port)
        until_routed(pub, far, "stream/probe")
        sent = []
        # two outages: frames in nats-server and on the way are lost when it is killed; once
        # it is back (same port) the nodes reconnect each in its own time, and frames sent
        # before the receiving node resubscribed are lost too
        # (each outage loses something only by chance: four of them, so that it fails without
        # the resend window almost always)
        kills = {STREAM * k // 9: k // 2 for k in (1, 3, 5, 7)}      # at message i: outages before it
        for i in range(STREAM):
            if i in kills:
                wait_until(lambda n=kills[i]: all(reconnects(node) == n for node in nodes.values()),
                           what="both nodes back on NATS")
                nats_server.kill()
            elif i - STREAM // 9 in kills:
                nats_server.start()
            sent.append(pub.paho.publish("stream/data", str(i), qos=1))
        for info in sent:
            info.wait_for_publish(10)
            assert info.is_published()       # PUBACKed: node 1 routed it
        got = [far.wait_message("stream/data", timeout=20).payload for _ in range(STREAM)]
        assert got == [str(i).encode() for i in range(STREAM)]
        assert far.no_message("stream/data", wait=1.5)        # no duplicates, even after a resend
        # reported: what was resent, nothing given up (the window held it all)
        wait_until(lambda: scrape(nodes["n1"])[("roost_cluster_resend_window_bytes", ())] == 0,
                   what="n1's publishes all acknowledged by n2")
        m1, m2 = scrape(nodes["n1"]), scrape(nodes["n2"])
        assert m1[("roost_dropped_total", (("reason", "cluster_resend_full"),))] == 0
        assert ("roost_cluster_publishes_resent_total", ()) in m1
        assert ("roost_cluster_publishes_duplicates_total", ()) in m2
        far.disconnect()
        pub.disconnect()
    finally:
        for node in nodes.values():
            node.kill()


# ---- in process: the window and the resend, over a link that loses what it is told to ----

class _Net:
    """Subjects to handlers, delivered in order when run; `lose(subject, data)`
    True drops a message (as NATS would)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.queue: deque[tuple[str, bytes]] = deque()
        self.lose: Callable[[str, bytes], bool] = lambda subject, data: False

    async def run(self) -> None:
        for _ in range(20):          # acks and resends come in later loop turns: let them come
            while self.queue:
                subject, data = self.queue.popleft()
                handler = self.handlers.get(subject)
                if handler is not None and not self.lose(subject, data):
                    await handler(subject, data)
            await asyncio.sleep(0.03)
            if not self.queue:
                return


class _Link:
    def __init__(self, net: _Net) -> None:
        self._net = net
        self.up = True

    def send(self, subject: str, data: bytes) -> bool:
        self._net.queue.append((subject, data))
        return True

    def subscribe(self, subject: str, handler: Any) -> None:
        self._net.handlers[subject] = handler


def _pair(window_bytes: int) -> tuple[_Net, ReliableLinks, ReliableLinks, list[bytes]]:
    net = _Net()
    sender = ReliableLinks(_Link(net), name="n1", inc="aaaa", window_bytes=window_bytes)
    receiver = ReliableLinks(_Link(net), name="n2", inc="bbbb", window_bytes=window_bytes)
    got: list[bytes] = []

    async def deliver(subject: str, frame: bytes) -> None:
        got.append(frame)

    net.handlers[pub_subject("n2")] = receiver.receiving(deliver)
    return net, sender, receiver, got


def test_a_lost_frame_is_resent_and_delivered_once_in_order() -> None:
    async def main() -> None:
        net, sender, receiver, got = _pair(1 << 20)
        frames = [f"m{i:03d}".encode() for i in range(200)]
        # frame 5 lost the first time it is sent, frame 150 the second time (in the resend)
        lose_at = {frames[5]: 1, frames[150]: 2}
        sent: dict[bytes, int] = {}

        def lose(subject: str, data: bytes) -> bool:
            f = data[-4:]
            if subject != pub_subject("n2") or f not in lose_at:
                return False
            sent[f] = sent.get(f, 0) + 1
            return sent[f] == lose_at[f]

        net.lose = lose
        for f in frames:
            sender.send("n2", f)
        await net.run()
        assert sent == {frames[5]: 2, frames[150]: 3}     # each lost once, then resent
        assert got == frames                              # in order, each once
        assert receiver.gaps == 2 and sender.resent > 0 and receiver.duplicates == 0
        assert sender.window_bytes == 0                   # all acknowledged

        # a lost tail (no later frame shows the gap): after RESEND_AFTER without progress the
        # newest frame goes again, the receiver sees the gap and asks for the rest
        tail = [b"tail1", b"tail2", b"tail3"]
        net.lose = lambda subject, data: True
        for f in tail:
            sender.send("n2", f)
        await net.run()
        assert got[-1] == frames[-1] and sender.window_bytes > 0
        net.lose = lambda subject, data: False
        sender.start()
        for _ in range(100):
            await asyncio.sleep(0.05)
            await net.run()
            if got[-1] == tail[-1] and sender.window_bytes == 0:
                break
        await sender.stop()
        assert got == frames + tail and sender.window_bytes == 0 and receiver.gaps == 3

    asyncio.run(main())


def test_the_window_is_bounded_in_bytes_and_its_overflow_counted() -> None:
    async def main() -> None:
        net, sender, receiver, got = _pair(2000)
        first = [b"first-%d" % i for i in range(3)]
        for f in first:
            sender.send("n2", f)
        await net.run()
        assert got == first and sender.window_bytes == 0

        net.lose = lambda subject, data: True          # NATS loses everything: nothing is acked
        frames = [bytes([65 + i % 26]) * 100 for i in range(50)]
        for f in frames:
            sender.send("n2", f)
        kept = 2000 // (100 + ENTRY_BYTES)
        assert sender.window_bytes == kept * (100 + ENTRY_BYTES) <= 2000
        assert (sender.dropped, sender.dropped_bytes) == (50 - kept, (50 - kept) * 100)
        await net.run()

        # NATS is back: the receiver skips what was given up (frames carry the window's
        # start), asks once from there and gets what the window kept, in order, once
        net.lose = lambda subject, data: False
        sender.send("n2", b"last")       # (it may push one more of the oldest out)
        pushed = 1 if kept * (100 + ENTRY_BYTES) + 4 + ENTRY_BYTES > 2000 else 0
        assert sender.dropped == 50 - kept + pushed
        await net.run()
        assert got == first + frames[50 - kept + pushed:] + [b"last"]
        assert receiver.gaps == 1 and sender.window_bytes == 0

        # a dead peer's window goes; numbering goes on, so its receiver takes what follows
        net.lose = lambda subject, data: True
        sender.send("n2", b"unacked")
        assert sender.window_bytes > 0
        sender.forget("n2")
        assert sender.window_bytes == 0
        net.lose = lambda subject, data: False
        sender.send("n2", b"after")
        await net.run()
        assert got[-1] == b"after" and receiver.duplicates == 0

        # n1 restarted (a new incarnation, numbering from 1 again): a new stream for n2
        reborn = ReliableLinks(_Link(net), name="n1", inc="cccc", window_bytes=2000)
        reborn.send("n2", b"reborn")
        await net.run()
        assert got[-1] == b"reborn" and reborn.window_bytes == 0 and receiver.duplicates == 0

    asyncio.run(main())


def test_the_window_bound_is_configured_and_checked() -> None:
    cluster = {"node": "n1", "nats": {"servers": ["nats://127.0.0.1:4222"]}}
    assert config_from_dict({"cluster": cluster}).cluster.resend_buffer_bytes == 8 * 1024 * 1024
    assert config_from_dict({"cluster": {**cluster, "resend_buffer_bytes": 65536}}).cluster.resend_buffer_bytes == 65536
    with pytest.raises(ConfigError, match="cluster.resend_buffer_bytes"):
        config_from_dict({"cluster": {**cluster, "resend_buffer_bytes": 100}})


def test_a_publisher_waits_for_the_nodes_it_went_to_and_for_their_commit() -> None:
    """The confirmation a publisher's PUBACK waits on (publish.py `Message.remote`):
    done once every destination acked the frame; a receiver acks a frame whose
    handler left something to commit only after that commit, and the frames
    behind it with it. NATS down, a dead node or a full window end the wait,
    counted as unconfirmed."""
    async def main() -> None:
        net = _Net()
        sender = ReliableLinks(_Link(net), name="n1", inc="aaaa", window_bytes=1 << 20)
        receivers = {n: ReliableLinks(_Link(net), name=n, inc=n * 2, window_bytes=1 << 20) for n in ("n2", "n3")}
        commit: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        got: list[bytes] = []

        async def deliver(subject: str, frame: bytes) -> asyncio.Future[None] | None:
            got.append(frame)
            return commit if frame == b"kept" else None    # "kept": left for a persistent session

        for n, r in receivers.items():
            net.handlers[pub_subject(n)] = r.receiving(deliver)

        both = sender.confirmation([("n2", sender.send("n2", b"a")), ("n3", sender.send("n3", b"a"))])
        assert both is not None and not both.done()
        await net.run()
        assert both.done() and sender.window_bytes == 0

        kept = sender.confirmation([("n2", sender.send("n2", b"kept"))])
        after = sender.confirmation([("n2", sender.send("n2", b"after"))])
        assert kept is not None and after is not None
        await net.run()
        assert got[-2:] == [b"kept", b"after"]
        assert not kept.done() and not after.done()        # routed there, not committed yet
        commit.set_result(None)
        await net.run()
        assert kept.done() and after.done() and sender.unconfirmed == 0

        # what cannot be waited for: NATS down (acknowledged, counted); the node dead or
        # the frame given up (not acknowledged: its publisher is closed and resends)
        net.lose = lambda subject, data: True
        waiting = sender.confirmation([("n2", sender.send("n2", b"lost"))])
        assert waiting is not None and not waiting.done()
        sender.release_all()                               # NATS lost
        assert waiting.done() and sender.unconfirmed == 1
        sender._link.up = False                            # type: ignore[attr-defined]
        assert sender.confirmation([("n2", sender.send("n2", b"down"))]) is None and sender.unconfirmed == 2
        sender._link.up = True                             # type: ignore[attr-defined]
        waiting = sender.confirmation([("n3", sender.send("n3", b"dead"))])
        assert waiting is not None
        sender.forget("n3")
        assert isinstance(waiting.exception(), NotAcknowledged) and sender.unconfirmed == 2
        small = ReliableLinks(_Link(net), name="n1", inc="dddd", window_bytes=300)
        first = small.confirmation([("n2", small.send("n2", b"x" * 100))])
        small.send("n2", b"y" * 200)            # pushes the first out of the window
        assert first is not None and isinstance(first.exception(), NotAcknowledged)

    asyncio.run(main())
