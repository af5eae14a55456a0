"""Cluster scenarios (issue 12, item 7): point-to-point QoS 1 with sender and
recipient on different nodes of a 2-node cluster (nodes on a private
nats-server, each its own SQLite store), against the same load on one node,
in the same run.

    .venv/bin/python -m bench.cluster            # about 40 s
    .venv/bin/python -m bench.cluster --pairs 20 --rate 1000 --seconds 5 --count 20000

Figures per setup: latency p50/p99 at `--rate` msg/s in all (paced), then
throughput (`--count` messages, 10 un-acked per publisher), lost messages,
and for the cluster the NATS messages per publish (from the nats-server's
/varz: in_msgs over messages published).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench.mqtt import connect, publish_packet

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


class Setup:
    """nats-server (cluster only) and the broker nodes, in a temp folder."""

    def __init__(self, nodes: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="roost-bench-cluster-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.monitor_port = 0
        nats_url = None
        if nodes > 1:
            port, self.monitor_port = free_port(), free_port()
            nats = shutil.which("nats-server") or "/usr/sbin/nats-server"
            proc = subprocess.Popen([nats, "-a", "127.0.0.1", "-p", str(port), "-m", str(self.monitor_port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(proc)
            wait_port(port, proc)
            nats_url = f"nats://127.0.0.1:{port}"
        for i in range(nodes):
            port = free_port()
            config: dict[str, Any] = {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                "storage": {"path": str(self.dir / f"n{i}" / "roost.db")},
                "auth": {"allow_anonymous": True}, "sys_interval": 0, "log": {"level": "warning"},
                "limits": {"max_connections": 10000}}
            if nats_url is not None:
                config["cluster"] = {"node": f"n{i}", "nats": {"servers": [nats_url]}}
            (self.dir / f"n{i}").mkdir()
            path = self.dir / f"n{i}.yaml"
            path.write_text(yaml.safe_dump(config))
            log = open(self.dir / f"n{i}.log", "wb")
            proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--config", str(path)],
                                    cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)
            log.close()
            self.procs.append(proc)
            wait_port(port, proc)
            self.ports.append(port)

    def broker_cpu_seconds(self) -> float:
        """CPU time (user + system) the broker nodes used so far."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for proc in self.procs[-len(self.ports):]:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def nats_in_msgs(self) -> int:
        if not self.monitor_port:
            return 0
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/varz", timeout=5) as resp:
            return int(json.load(resp)["in_msgs"])

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def pct(values: list[int], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] / 1e6 if values else float("nan")


async def p2p(setup: Setup, pairs: int, rate: float, seconds: float, count: int, tag: str) -> dict[str, Any]:
    pub_port, sub_port = setup.ports[0], setup.ports[-1]
    latencies: list[int] = []
    received = [0]
    target = [1 << 62]
    arrived = asyncio.Event()

    def on_message(topic: bytes, payload: bytes, t: int) -> None:
        received[0] += 1
        latencies.append(t - int(payload[:19]))
        if received[0] >= target[0]:
            arrived.set()

    async def all_arrived(n: int, timeout: float) -> None:
        target[0] = n
        if received[0] < n:
            arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), timeout)

    subs = [await connect("127.0.0.1", sub_port, f"{tag}-r{i}", on_message=on_message) for i in range(pairs)]
    for i, sub in enumerate(subs):
        await sub.subscribe([(f"bench/p2p/{tag}/{i}", 1)])
    inflight = [0] * pairs
    acked = asyncio.Event()

    def on_puback(i: int) -> Any:
        def done(pid: int) -> None:
            inflight[i] -= 1
            acked.set()
        return done

    pubs = [await connect("127.0.0.1", pub_port, f"{tag}-s{i}", on_puback=on_puback(i)) for i in range(pairs)]
    # interest reaches the publishers' node: wait until a probe arrives
    deadline = time.monotonic() + 10
    while received[0] == 0 and time.monotonic() < deadline:
        pubs[0].write(publish_packet(f"bench/p2p/{tag}/0", b"%019d" % time.monotonic_ns(), 0))
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    latencies.clear()
    received[0] = 0

    # paced: `rate` msg/s in all, round-robin over the pairs
    sent = 0
    start = time.monotonic()
    end = start + seconds
    pid = 1
    while time.monotonic() < end:
        due = int((time.monotonic() - start) * rate)
        while sent < due:
            i = sent % pairs
            pubs[i].write(publish_packet(f"bench/p2p/{tag}/{i}", b"%019d" % time.monotonic_ns(), 1, pid))
            inflight[i] += 1
            pid = pid % 65535 + 1
            sent += 1
        await asyncio.sleep(0.001)
    await all_arrived(sent, 10)
    paced = {"sent": sent, "lost": sent - received[0], "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)}

    # throughput: `count` messages, at most 10 un-acked per publisher
    latencies.clear()
    received[0] = 0
    inflight = [0] * pairs
    sent = 0
    cpu_before = setup.broker_cpu_seconds()
    start = time.monotonic()
    while sent < count:
        progressed = False
        for i in range(pairs):
            while inflight[i] < 10 and sent < count:
                pubs[i].write(publish_packet(f"bench/p2p/{tag}/{i}", b"%019d" % time.monotonic_ns(), 1, pid))
                inflight[i] += 1
                pid = pid % 65535 + 1
                sent += 1
                progressed = True
        if not progressed:
            acked.clear()
            try:
                await asyncio.wait_for(acked.wait(), 5)
            except TimeoutError:
                break
    await all_arrived(sent, 20)
    elapsed = time.monotonic() - start
    cpu_us = (setup.broker_cpu_seconds() - cpu_before) * 1e6 / max(1, received[0])
    for conn in (*subs, *pubs):
        conn.close()
    return {"paced": paced, "throughput": {"sent": sent, "lost": sent - received[0],
                                           "msg_s": received[0] / elapsed if elapsed else 0.0,
                                           "broker_cpu_us_per_msg": cpu_us,
                                           "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, nodes in (("1 node", 1), ("2 nodes, sender and recipient on different nodes", 2)):
        setup = Setup(nodes)
        try:
            before = setup.nats_in_msgs()
            result = await p2p(setup, args.pairs, args.rate, args.seconds, args.count, tag=f"x{nodes}")
            published = result["paced"]["sent"] + result["throughput"]["sent"]
            if nodes > 1:
                result["nats_msgs_per_publish"] = (setup.nats_in_msgs() - before) / published
            results[name] = result
        finally:
            setup.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--rate", type=float, default=1000.0, help="paced msg/s in all")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=20000, help="messages of the throughput run")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(f"p2p QoS 1, {args.pairs} pairs, {os.cpu_count()} cores")
    print(f"| setup | p50 ms at {args.rate:.0f} msg/s | p99 ms | lost | throughput msg/s | lost "
          "| broker CPU µs/msg (all nodes) | NATS msgs/publish |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        p, t = r["paced"], r["throughput"]
        nats = f"{r['nats_msgs_per_publish']:.2f}" if "nats_msgs_per_publish" in r else "-"
        print(f"| {name} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['lost']} | {t['msg_s']:.0f} | {t['lost']} "
              f"| {t['broker_cpu_us_per_msg']:.0f} | {nats} |")


if __name__ == "__main__":
    main()
