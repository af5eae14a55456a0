"""Cluster scenarios (issue 12, item 7): point-to-point QoS 1 with sender and
recipient on different nodes of a 2-node cluster (nodes on a private
nats-server, each its own SQLite store), against the same load on one node,
in the same run.

    .venv/bin/python -m bench.cluster            # about 40 s
    .venv/bin/python -m bench.cluster --pairs 20 --rate 1000 --seconds 5 --count 20000
    .venv/bin/python -m bench.cluster --im       # also the IM path on a private PostgreSQL (1 vs 2 nodes)
    .venv/bin/python -m bench.cluster --im --im-count 4000 --json out.json
    .venv/bin/python -m bench.cluster --im-only --profile /tmp/prof   # py-spy each node (IM throughput run)

Each table has a row "2 nodes / 1 node" with the ratios of the two setups'
figures, measured in the same run.

Figures per setup: latency p50/p99 at `--rate` msg/s in all (paced), then
throughput (`--count` messages, 10 un-acked per publisher), lost messages,
and for the cluster the NATS messages per publish (from the nats-server's
/varz: in_msgs over messages published).

With `--im`, the IM path on one private PostgreSQL (pg_stat_statements loaded),
1 node against 2 nodes with sender and recipient on different nodes: send ->
`msg` latency p50/p99 paced at `--im-rate`, then throughput (`--im-count`
sends, 16 unanswered per sender), broker CPU per message, and PostgreSQL's work
per message: write transactions, statements by kind and rows, WAL bytes; for
the cluster, the NATS messages per message (nats-server's /varz in_msgs).
With `--profile DIR`, py-spy records each node during the IM throughput run
(DIR/im-<nodes>node-n<i>.top.txt: the functions with the most samples).
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

    def __init__(self, nodes: int, dsn: str | None = None, users: tuple[str, ...] = ()) -> None:
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
            if dsn is not None:
                config["storage"].update(backend="postgres", dsn=dsn)
                config["messaging"] = {"allow_dm_without_contact": True}
                config["limits"].update(request_rate=100000, request_burst=100000)
            (self.dir / f"n{i}").mkdir()
            path = self.dir / f"n{i}.yaml"
            path.write_text(yaml.safe_dump(config))
            for user in users if i == 0 else ():
                subprocess.run([sys.executable, "-m", "client.cli", "user", "add", user, "--password-stdin"],
                               cwd=str(ROOT), input=f"pw-{user}-123\n", text=True, check=True,
                               capture_output=True, env=dict(os.environ, ROOST_CONFIG=str(path)))
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


class PgWrites:
    """What PostgreSQL did for one database during a phase: write transactions (next
    transaction id: only a transaction that writes takes one), WAL bytes, and per
    statement kind the calls and rows (pg_stat_statements, reset at the start)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.xid0 = 0
        self.lsn0 = 0

    async def _fetch(self, sql: str) -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    async def begin(self) -> None:
        (row,) = await self._fetch(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xid, "
            "pg_current_wal_insert_lsn() - '0/0'::pg_lsn AS lsn")
        await self._fetch("SELECT pg_stat_statements_reset()")
        self.xid0, self.lsn0 = int(row["xid"]), int(row["lsn"])

    async def end(self, messages: int) -> dict[str, float]:
        (row,) = await self._fetch(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xid, "
            "pg_current_wal_insert_lsn() - '0/0'::pg_lsn AS lsn")
        rows = await self._fetch(
            "SELECT upper(substring(query FROM '^\\s*(\\w+)')) AS kind, sum(calls) AS calls, sum(rows) AS rows "
            "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND query NOT LIKE '%pg_stat_statements%' AND query NOT LIKE '%pg_current_snapshot%' GROUP BY 1")
        n = max(1, messages)
        # The probe's own read (begin/end) takes no transaction id: nothing to subtract.
        out = {"write_xacts": (int(row["xid"]) - self.xid0) / n, "wal_bytes": (int(row["lsn"]) - self.lsn0) / n}
        for r in rows:
            kind = r["kind"]
            if kind in ("INSERT", "UPDATE", "DELETE", "SELECT", "COMMIT", "WITH"):
                out[f"{kind.lower()}_statements"] = int(r["calls"]) / n
            if kind in ("INSERT", "UPDATE", "DELETE", "WITH"):
                out[f"{kind.lower()}_rows"] = int(r["rows"]) / n
        return out

    async def statements(self, messages: int, top: int = 12) -> list[tuple[float, float, str]]:
        """The most called statements of the phase: (calls per message, rows per message, text)."""
        rows = await self._fetch(
            "SELECT calls, rows, regexp_replace(query, '\\s+', ' ', 'g') AS q FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND query NOT LIKE '%pg_stat_statements%' AND query NOT LIKE '%pg_current_snapshot%' "
            f"ORDER BY calls DESC LIMIT {int(top)}")
        n = max(1, messages)
        return [(int(r["calls"]) / n, int(r["rows"]) / n, str(r["q"])[:160]) for r in rows]


def spy_nodes(setup: Setup, profile: Path | None, label: str) -> list[Any]:
    """py-spy on each broker node of `setup` (bench/profile.py), files under `profile`."""
    if profile is None:
        return []
    from bench import profile as spy

    exe = spy.binary()
    if exe is None:
        print("py-spy not found (pip install py-spy): not profiling", file=sys.stderr)
        return []
    profile.mkdir(parents=True, exist_ok=True)
    spies = []
    for i, proc in enumerate(setup.procs[-len(setup.ports):]):
        base = profile / f"{label}-n{i}"
        raw = base.with_suffix(".txt")
        rec = subprocess.Popen([exe, "record", "--pid", str(proc.pid), "--rate", "200", "--format", "raw",
                                "--output", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spies.append(spy.Spy(rec, raw, base))
    return spies


async def im_path(setup: Setup, pairs: int, rate: float, seconds: float, count: int,
                  pg: PgWrites | None = None, profile: Path | None = None) -> dict[str, Any]:
    """`send` from s<i> (first node) to r<i> (last node): paced at `rate` in all for
    `seconds` (send -> `msg` event on the recipient's inbox, p50/p99), then `count`
    sends with 16 unanswered per sender (throughput, and PostgreSQL's work per message).
    Recipients do not `ack`: the figures are of the send and its push alone."""
    latencies: list[int] = []
    seen: set[str] = set()
    dups = [0]
    answered = [0]
    errors: dict[str, int] = {}
    last_msg = [0]
    outstanding = [0] * pairs
    wake = asyncio.Event()

    def on_event(topic: bytes, payload: bytes, t: int) -> None:
        doc = json.loads(payload)
        if doc.get("kind") == "msg":
            if doc.get("cmid") in seen:
                dups[0] += 1
                return
            seen.add(doc.get("cmid"))
            last_msg[0] = t
            latencies.append(t - int(doc["body"]["text"]))

    def on_answer(i: int) -> Any:
        def answer(topic: bytes, payload: bytes, t: int) -> None:
            doc = json.loads(payload)
            answered[0] += 1
            outstanding[i] -= 1
            if not doc.get("ok"):
                code = str(doc.get("error", {}).get("code"))
                errors[code] = errors.get(code, 0) + 1
            wake.set()
        return answer

    recv = []
    for i in range(pairs):
        c = await connect("127.0.0.1", setup.ports[-1], f"r{i}.b", f"r{i}", f"pw-r{i}-123", on_message=on_event)
        await c.subscribe([(f"roost/inbox/r{i}", 1)])
        recv.append(c)
    senders = []
    for i in range(pairs):
        c = await connect("127.0.0.1", setup.ports[0], f"s{i}.b", f"s{i}", f"pw-s{i}-123", on_message=on_answer(i))
        await c.subscribe([(f"roost/resp/s{i}.b", 1)])
        senders.append(c)
    await asyncio.sleep(1.0)      # the sender's node knows the recipients' pushers (targeted mailbox events)
    sent = 0

    def send(i: int, k: int) -> None:
        req = {"id": f"q{k}", "op": "send", "to": f"r{i}", "cmid": f"c{k}",
               "body": {"type": "text", "text": str(time.monotonic_ns())}}
        senders[i].write(publish_packet(f"roost/req/s{i}.b", json.dumps(req).encode(), 0))
        outstanding[i] += 1

    async def all_arrived(n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(seen) < n and time.monotonic() < deadline:  # noqa: ASYNC110 - the end of a run, polled
            await asyncio.sleep(0.05)

    start = time.monotonic()
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * rate)
        while sent < due:
            send(sent % pairs, sent)
            sent += 1
        await asyncio.sleep(0.001)
    await all_arrived(sent, 15)
    paced = {"sent": sent, "lost": sent - len(seen), "dup": dups[0],
             "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)}

    # throughput: `count` more sends, 16 unanswered per sender at most
    await asyncio.sleep(0.5)
    latencies.clear()
    got_before, first = len(seen), sent
    if pg is not None:
        await pg.begin()
    spies = spy_nodes(setup, profile, f"im-{len(setup.ports)}node")
    nats_before = setup.nats_in_msgs()
    cpu_before = setup.broker_cpu_seconds()
    start = time.monotonic()
    t0 = time.monotonic_ns()
    while sent < first + count:
        progressed = False
        for i in range(pairs):
            while outstanding[i] < 16 and sent < first + count:
                send(i, sent)
                sent += 1
                progressed = True
        if not progressed:
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), 5)
            except TimeoutError:
                break
    await all_arrived(sent, 30)
    got = len(seen) - got_before
    elapsed = (last_msg[0] - t0) / 1e9 if got else 0.0
    cpu_us = (setup.broker_cpu_seconds() - cpu_before) * 1e6 / max(1, got)
    nats_per_msg = (setup.nats_in_msgs() - nats_before) / max(1, got)
    if spies:
        from bench import profile as spy

        for s in spies:
            print(f"profile: {spy.finish(s)}", file=sys.stderr)
    throughput: dict[str, Any] = {
        "sent": sent - first, "lost": sent - first - got, "dup": dups[0] - paced["dup"],
        "msg_s": got / elapsed if elapsed > 0 else 0.0, "broker_cpu_us_per_msg": cpu_us,
        "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99), "errors": errors,
        "nats_msgs_per_msg": nats_per_msg}
    if pg is not None:
        throughput["pg_per_msg"] = await pg.end(got)
        throughput["pg_statements"] = await pg.statements(got)
    for c in (*recv, *senders):
        c.close()
    return {"paced": paced, "throughput": throughput}


async def run_im(args: argparse.Namespace) -> dict[str, Any]:
    from tests.postgres import PostgresServer

    pg = PostgresServer().start()
    results: dict[str, Any] = {}
    users = tuple(f"{k}{i}" for i in range(args.im_pairs) for k in ("s", "r"))
    try:
        # pg_stat_statements counts the statements per message (loaded at server start).
        pg.psql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        pg.restart()
        for name, nodes in (("1 node (PostgreSQL)", 1), ("2 nodes, sender and recipient on different nodes", 2)):
            db = f"bench{nodes}"
            pg.create_database(db)
            pg.psql("CREATE EXTENSION pg_stat_statements", db)
            setup = Setup(nodes, pg.dsn(db), users)
            try:
                results[name] = await im_path(setup, args.im_pairs, args.im_rate, args.seconds, args.im_count,
                                              PgWrites(pg.dsn(db)), Path(args.profile) if args.profile else None)
            finally:
                setup.close()
    finally:
        pg.remove()
    return results


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


def ratio_row(results: dict[str, Any], cells: list[tuple[str, str]]) -> str | None:
    """`| 2 nodes / 1 node | ... |`: the cluster's figure over the single node's,
    for each (phase, figure) in `cells`; None unless both setups ran."""
    if len(results) != 2:
        return None
    one, two = results.values()

    def fmt(phase: str, key: str) -> str:
        a, b = one[phase].get(key), two[phase].get(key)
        return f"{b / a:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "-"

    return "| 2 nodes / 1 node | " + " | ".join(fmt(phase, key) for phase, key in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--rate", type=float, default=1000.0, help="paced msg/s in all")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=20000, help="messages of the throughput run")
    parser.add_argument("--im", action="store_true", help="also the IM path on PostgreSQL (1 node, 2 nodes)")
    parser.add_argument("--im-pairs", type=int, default=8)
    # 200, not --rate's 1,000: one PostgreSQL, the nodes and the load generator on 2 cores
    # take ~800 durable sends/s at most, and a pace above that measures a backlog
    parser.add_argument("--im-rate", type=float, default=200.0, help="paced sends/s in all")
    parser.add_argument("--im-count", type=int, default=4000, help="sends of the IM throughput run")
    parser.add_argument("--im-only", action="store_true", help="only the IM path (implies --im)")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="py-spy-record each node during the IM throughput run (DIR/im-<n>node-n<i>.top.txt)")
    parser.add_argument("--json", default="", help="also write the raw results as JSON to this file")
    args = parser.parse_args()
    args.im = args.im or args.im_only
    results = {} if args.im_only else asyncio.run(run(args))
    if results:
        print(f"p2p QoS 1, {args.pairs} pairs, {os.cpu_count()} cores")
        print(f"| setup | p50 ms at {args.rate:.0f} msg/s | p99 ms | lost | throughput msg/s | lost "
              "| broker CPU µs/msg (all nodes) | NATS msgs/publish |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in results.items():
            p, t = r["paced"], r["throughput"]
            nats = f"{r['nats_msgs_per_publish']:.2f}" if "nats_msgs_per_publish" in r else "-"
            print(f"| {name} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['lost']} | {t['msg_s']:.0f} | {t['lost']} "
                  f"| {t['broker_cpu_us_per_msg']:.0f} | {nats} |")
        row = ratio_row(results, [("paced", "p50_ms"), ("paced", "p99_ms"), ("paced", "-"), ("throughput", "msg_s"),
                                  ("throughput", "-"), ("throughput", "broker_cpu_us_per_msg"), ("throughput", "-")])
        if row:
            print(row)

    im_results: dict[str, Any] = {}
    if args.im:
        im_results = asyncio.run(run_im(args))
        print(f"\nIM send -> msg, {args.im_pairs} pairs: paced at {args.im_rate:.0f} sends/s for {args.seconds:.0f} s, "
              f"then {args.im_count} sends with 16 unanswered per sender (recipients do not ack)")
        print("| setup | paced p50 ms | paced p99 ms | lost | throughput sends/s | p50 ms | p99 ms | lost | dup "
              "| broker CPU µs/msg (all nodes) | NATS msgs/msg |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, r in im_results.items():
            p, t = r["paced"], r["throughput"]
            print(f"| {name} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['lost']} | {t['msg_s']:.0f} "
                  f"| {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | {t['lost']} | {t['dup'] + p['dup']} "
                  f"| {t['broker_cpu_us_per_msg']:.0f} | {t['nats_msgs_per_msg']:.2f} |")
            if t["errors"]:
                print(f"  errors answered: {t['errors']}")
        row = ratio_row(im_results, [("paced", "p50_ms"), ("paced", "p99_ms"), ("paced", "-"),
                                     ("throughput", "msg_s"), ("throughput", "p50_ms"), ("throughput", "p99_ms"),
                                     ("throughput", "-"), ("throughput", "-"),
                                     ("throughput", "broker_cpu_us_per_msg"), ("throughput", "-")])
        if row:
            print(row)
        print("\nPostgreSQL per IM message (throughput run; write transactions from transaction ids, "
              "statements from pg_stat_statements, WAL from the insert LSN)")
        keys = sorted({k for r in im_results.values() for k in r["throughput"].get("pg_per_msg", {})})
        print("| setup | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for name, r in im_results.items():
            per = r["throughput"].get("pg_per_msg", {})
            print(f"| {name} | " + " | ".join(f"{per[k]:.2f}" if k in per else "-" for k in keys) + " |")
        for name, r in im_results.items():
            print(f"\nMost called statements per IM message, {name} (calls/msg, rows/msg, statement):")
            for calls, rows, text in r["throughput"].get("pg_statements", []):
                print(f"  {calls:5.2f} {rows:5.2f}  {text}")
    if args.json:
        Path(args.json).write_text(json.dumps({"p2p": results, "im": im_results}, indent=1))


if __name__ == "__main__":
    main()
