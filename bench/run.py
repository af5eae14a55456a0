"""Benchmark orchestrator: `python -m bench [--quick] [--only S,...] [--brokers roost,amqtt,mosquitto,floor]`.

Scenario by scenario, every broker in turn gets a freshly started subprocess on a
free loopback port; the load comes from `bench.loadgen` worker processes. The
report (bench/report.py) shows each broker's figures and the ratio against stock
amqtt, plus the CPU the broker, the generator and other processes used, so a
generator-bound figure is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import profile
from bench.brokers import CLK_TCK, BrokerProcess, Mosquitto, Roost, child_setup, make
from bench.loadgen import raise_nofile
from bench.mqtt import now_ns
from bench.report import NPROC, Outcome, machine_info, pct, render_notes, render_table, render_targets, render_targets16, results_md

SCENARIOS = ("fanin_qos0", "fanin_qos1", "p2p", "p2p_v5_alias", "shared_v5", "fanout", "im", "im_paced",
             "rss_start", "hold", "hold_many", "restart")
ROOST_ONLY = {"im", "im_paced", "restart"}
# Issue 16's rows compare Roost with Mosquitto; stock amqtt would spend minutes on 20,000 connects.
# amqtt 0.12.1 speaks MQTT 3.1.1 only: the MQTT 5 rows compare Roost with Mosquitto.
NOT_AMQTT = {"hold_many", "p2p_v5_alias", "shared_v5"}
# The floor relay (bench/floor.py) speaks MQTT 3.1.1 with exact topics and QoS 0/1 and
# stores nothing: it serves these.
FLOOR_SCENARIOS = {"fanin_qos0", "fanin_qos1", "p2p", "fanout", "rss_start", "hold", "hold_many"}


def takes_part(broker: str, scenario: str) -> bool:
    """Whether `broker` runs `scenario` (the sets above)."""
    if broker == "floor":
        return scenario in FLOOR_SCENARIOS
    return (broker == "roost" or scenario not in ROOST_ONLY) and (broker != "amqtt" or scenario not in NOT_AMQTT)


@dataclass(frozen=True)
class Sizes:
    fanin0_per_pub: int
    fanin_per_pub: int
    p2p_pairs: int
    p2p_per_pair: int
    fanout_subs: int
    fanout_msgs: int
    im_pairs: int
    im_per_pair: int
    im_half_s: float
    hold: int
    hold_many: int       # idle authenticated clients of `hold_many` (issue 16: 20,000)
    im_paced_rate: float  # sends/s in all of `im_paced` (issue 16: 100)
    im_paced_s: float
    restart_events: int
    timeout: float       # hard limit of one scenario's load phase, seconds
    idle: float          # a worker stops after this long without progress
    shared_pubs: int = 4         # `shared_v5`: publishers into the 4 members of one shared subscription
    shared_per_pub: int = 10_000
    connect_timeout: float = 10.0   # a client's CONNECT -> CONNACK (`--instructions`: the broker runs under valgrind)


# Sized so that Roost's phases last about a second (CPU shares need that), which
# makes stock amqtt's last up to 40 s each: a full run takes about 4 minutes.
FULL = Sizes(fanin0_per_pub=40_000, fanin_per_pub=16_000, p2p_pairs=50, p2p_per_pair=2000, fanout_subs=100,
             fanout_msgs=4000, im_pairs=8, im_per_pair=2000, im_half_s=5.0, hold=5000, hold_many=20_000,
             im_paced_rate=100.0, im_paced_s=5.0, restart_events=1_000_000,
             timeout=120.0, idle=5.0)
QUICK = Sizes(fanin0_per_pub=300, fanin_per_pub=300, p2p_pairs=50, p2p_per_pair=10, fanout_subs=100, fanout_msgs=20,
              im_pairs=4, im_per_pair=50, im_half_s=1.0, hold=200, hold_many=400,
              im_paced_rate=40.0, im_paced_s=1.0, restart_events=5_000,
              timeout=15.0, idle=3.0, shared_per_pub=200)


# msg/s of the paced point-to-point phase: well below what stock amqtt sustains here
# (about 3,000), so its latency is a broker's own, not a queue's.
P2P_PACED_RATE = 1000.0

HEADLINE = {"fanin_qos0": "msg_s", "fanin_qos1": "msg_s", "p2p": "msg_s", "p2p_v5_alias": "msg_s",
            "shared_v5": "msg_s", "fanout": "deliveries_s",
            "im": "msg_s", "im_paced": "p99_ms", "rss_start": "rss_start_mb", "hold": "connects_per_s",
            "hold_many": "rss_mb", "restart": "serve_s"}


def median_outcome(name: str, outcomes: list[Outcome]) -> Outcome:
    """With --repeat: the run whose headline figure is the median (a failed run wins:
    errors are never averaged away); lost and duplicated are the worst seen."""
    if len(outcomes) == 1:
        return outcomes[0]
    failed = [o for o in outcomes if o.error]
    if failed:
        return failed[0]
    key = HEADLINE[name]
    ranked = sorted(outcomes, key=lambda o: o.metrics.get(key) or 0.0)
    chosen = ranked[len(ranked) // 2]
    for worst in ("lost", "dup"):
        vals = [o.metrics[worst] for o in outcomes if o.metrics.get(worst) is not None]
        if vals:
            chosen.metrics[worst] = max(vals)
    figures = ", ".join(f"{o.metrics.get(key) or 0:,.4g}" for o in outcomes)
    chosen.notes.insert(0, f"median of {len(outcomes)} runs ({key}: {figures})")
    return chosen


def listening(port: int) -> bool:
    """A socket of this host listens on `port` (/proc/net/tcp, state 0A): no connection made."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def kept_history(results_page: Path) -> str:
    """The dated sections of an existing results page (`## 2026-...`: earlier figures,
    profile findings), kept below a refreshed table."""
    try:
        old = results_page.read_text()
    except FileNotFoundError:
        return ""
    at = old.find("\n## 20")
    return "" if at < 0 else "\n" + old[at + 1:]


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    total = sum(fields[:8])    # user nice system idle iowait irq softirq steal
    return (total - fields[3] - fields[4]) / CLK_TCK


class Runner:
    def __init__(self, sizes: Sizes, workdir: Path, profile_dir: Path | None = None) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.profile_dir = profile_dir
        self.cprofile_dir: Path | None = None
        self.run_id = f"{int(time.time())}"
        self.phases = 0     # IM phases so far: every phase's cmids are new (--repeat included)

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # ---- workers ------------------------------------------------------------------------
    async def run_workers(self, broker: BrokerProcess, specs: list[dict[str, Any]], name: str,
                          hold_hook: Callable[[list[dict[str, Any]]], Awaitable[None]] | None = None
                          ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Start one worker per spec, wait until all are ready, say go, collect results.

        Returns (results, usage) where usage has the broker's CPU seconds and the
        wall time of the measured phase.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        procs: list[asyncio.subprocess.Process] = []
        spy: profile.Spy | None = None
        timeout = self.sizes.timeout
        try:
            for i, spec in enumerate(specs):
                spec = dict(spec, host=broker.host, port=broker.port, timeout=timeout, idle=self.sizes.idle,
                            connect_timeout=self.sizes.connect_timeout)
                path = self.workdir / f"{broker.name}-{name}-{i}.json"
                path.write_text(json.dumps(spec))
                err = open(self.workdir / f"{broker.name}-{name}-{i}.err", "wb")
                procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.loadgen", str(path), cwd=str(Path(__file__).parent.parent),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                    limit=1 << 26, preexec_fn=child_setup))
                err.close()
            ready = await asyncio.wait_for(asyncio.gather(*(self._event(p, "ready") for p in procs)), 120)
            for r in ready:
                if r.get("error_count"):
                    raise RuntimeError(f"{r['error_count']} clients failed to connect: {r}")
            if self.profile_dir is not None and broker.name in ("roost", "amqtt"):
                # Only the measured phase: connects (argon2) would crowd the profile.
                spy = profile.start(broker, self.profile_dir / f"{broker.name}-{name}")
            cpu0, machine0, mono0 = broker.cpu_s(), machine_busy_s(), time.monotonic()
            t0 = now_ns() + 100_000_000
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(f"go {t0}\n".encode())
                await p.stdin.drain()
            if hold_hook is not None:
                connected = await asyncio.wait_for(
                    asyncio.gather(*(self._event(p, "connected") for p in procs)), timeout + 30)
                await hold_hook(connected)
                for p in procs:
                    assert p.stdin is not None
                    p.stdin.write(b"stop\n")
                    await p.stdin.drain()
            results = await asyncio.wait_for(
                asyncio.gather(*(self._event(p, "result") for p in procs)), timeout + 30)
            wall = max((max(r.get("last_recv", 0), r.get("last_ack", 0)) - t0) / 1e9 for r in results)
            interval = time.monotonic() - mono0
            return results, {"broker_cpu_s": broker.cpu_s() - cpu0, "machine_cpu_s": machine_busy_s() - machine0,
                             "wall_s": max(wall, 1e-9), "interval_s": max(interval, 1e-9)}
        finally:
            if spy is not None:
                summary = profile.finish(spy)
                if summary:
                    self.log(f"profile of {broker.name} {name}: {summary}")
            for p in procs:
                if p.returncode is None:
                    try:
                        p.kill()
                    except ProcessLookupError:
                        pass
                    await p.wait()

    async def _event(self, proc: asyncio.subprocess.Process, kind: str) -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                await proc.wait()
                errs = sorted(self.workdir.glob("*.err"), key=lambda p: p.stat().st_mtime)
                tail = errs[-1].read_text(errors="replace").strip().splitlines()[-3:] if errs else []
                raise RuntimeError(f"load generator exited ({proc.returncode}) before '{kind}': "
                                   + " | ".join(tail))
            doc = json.loads(line)
            if doc.get("event") == kind:
                return doc

    @staticmethod
    def usage_notes(results: list[dict[str, Any]], usage: dict[str, float], out: Outcome) -> None:
        # CPU is read from /proc just before "go" and after the results: shares are of
        # that interval. A worker that finished early (a QoS 0 publisher filling socket
        # buffers) was not the limit, so every worker's CPU is set against all of it.
        wall = usage["interval_s"]
        broker_util = usage["broker_cpu_s"] / wall
        gen = [r.get("cpu_s", 0.0) / wall for r in results]
        gen_total = sum(r.get("cpu_s", 0.0) for r in results) / wall
        others = max(0.0, usage["machine_cpu_s"] / wall - broker_util - gen_total)
        out.metrics["broker_cpu"] = broker_util
        out.metrics["gen_cpu"] = gen_total
        out.metrics["other_cpu"] = others
        out.notes.append(f"broker cpu {broker_util:.0%}, generator cpu {gen_total:.0%} "
                         f"(max worker {max(gen, default=0):.0%}), other processes {others:.0%}")
        if wall < 1.0:
            # /proc CPU times tick at 100 Hz: too coarse to judge a short phase.
            out.notes.append("phase under 1 s: CPU shares are rough")
            return
        if max(gen, default=0) > 0.9 or gen_total > 0.9 * max(1, NPROC - 1):
            out.notes.append("GENERATOR SATURATED: figure is a lower bound")
            out.saturated = True
        elif broker_util + gen_total + others > 0.9 * NPROC:
            out.notes.append("ALL CORES BUSY (broker + generator + other processes): figure may be a lower bound")
            out.saturated = True
        elif broker_util < 0.8:
            # A single-threaded broker below 80% of a core was waiting for its clients.
            out.notes.append("BROKER NOT CPU-BOUND (< 80%): limited by the generator's side or round "
                             "trips, figure is a lower bound")
            out.saturated = True

    @staticmethod
    def delivery(results: list[dict[str, Any]], out: Outcome, rate_key: str, t_key: str = "last_recv") -> None:
        received = sum(r["received"] for r in results)
        expected = sum(r["expected"] for r in results)
        t0 = results[0]["t0"]
        last = max(r[t_key] for r in results)
        secs = (last - t0) / 1e9 if last else 0
        lat = [x for r in results for x in r["lat_us"]]
        out.metrics[rate_key] = received / secs if secs > 0 else 0.0
        out.metrics["p50_ms"] = (pct(lat, 0.50) or 0) / 1000 if lat else None
        out.metrics["p99_ms"] = (pct(lat, 0.99) or 0) / 1000 if lat else None
        out.metrics["lost"] = float(max(0, expected - received))
        out.metrics["dup"] = float(sum(r["dups"] for r in results))
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r.get("errors", {}).items():
                errors[k] = errors.get(k, 0) + v
        if errors:
            out.notes.append(f"errors: {errors}")
        if any(r.get("timed_out") for r in results):
            out.notes.append("TIMED OUT")

    # ---- plain MQTT scenarios -------------------------------------------------------------
    async def fanin(self, broker: BrokerProcess, qos: int) -> Outcome:
        s = self.sizes
        n, pubs = (s.fanin_per_pub if qos else s.fanin0_per_pub), 8
        topic = "bench/fanin"
        sub = broker.plain_client("fanin-sub")
        sub_spec = {"mode": "mqtt", "clients": [
            {"cid": sub.client_id, "user": sub.username, "pw": sub.password, "subs": [[topic, qos]],
             "expect": n * pubs, "seq_space": n}]}
        pub_clients = []
        for i in range(pubs):
            c = broker.plain_client(f"fanin-pub{i}")
            pub_clients.append({"cid": c.client_id, "user": c.username, "pw": c.password,
                                "pub": {"topic": topic, "qos": qos, "count": n, "window": 64, "index": i}})
        results, usage = await self.run_workers(broker, [sub_spec, {"mode": "mqtt", "clients": pub_clients}],
                                                f"fanin{qos}")
        out = Outcome()
        self.delivery(results, out, "msg_s")
        self.usage_notes(results, usage, out)
        return out

    def p2p_specs(self, broker: BrokerProcess, per_pair: int, rate: float, v5: bool = False) -> list[dict[str, Any]]:
        """`v5`: every client speaks MQTT 5 and the publishers use a topic alias after their
        first publish (when the broker's CONNACK allows one)."""
        subs, pubs = [], []
        for i in range(self.sizes.p2p_pairs):
            # Two people per pair: the sender publishes on the recipient's own topic.
            topic = f"bench/p2p/p2pr{i}"
            a = broker.user_client(f"p2pr{i}", "sub")
            b = broker.user_client(f"p2ps{i}", "pub")
            subs.append({"cid": a.client_id, "user": a.username, "pw": a.password, "subs": [[topic, 1]],
                         "expect": per_pair, "seq_space": per_pair, "v5": v5})
            pubs.append({"cid": b.client_id, "user": b.username, "pw": b.password, "v5": v5,
                         "pub": {"topic": topic, "qos": 1, "count": per_pair, "window": 10, "index": i,
                                 "rate": rate, "phase": i / (rate * self.sizes.p2p_pairs) if rate else 0.0,
                                 "alias": v5}})
        return [{"mode": "mqtt", "clients": subs}, {"mode": "mqtt", "clients": pubs}]

    async def p2p(self, broker: BrokerProcess, v5: bool = False) -> Outcome:
        s = self.sizes
        name = "p2p5" if v5 else "p2p"
        results, usage = await self.run_workers(broker, self.p2p_specs(broker, s.p2p_per_pair, 0.0, v5), name)
        out = Outcome()
        self.delivery(results, out, "msg_s")
        self.usage_notes(results, usage, out)
        # The same pairs at a fixed, modest rate every broker sustains: comparable latency.
        await asyncio.sleep(1.0)
        per_pair_rate = P2P_PACED_RATE / s.p2p_pairs
        per_pair = max(1, int(per_pair_rate * s.im_half_s))
        results2, _ = await self.run_workers(broker, self.p2p_specs(broker, per_pair, per_pair_rate, v5),
                                             f"{name}-paced")
        paced = Outcome()
        self.delivery(results2, paced, "msg_s")
        out.metrics["paced_msg_s"] = paced.metrics["msg_s"]
        out.metrics["paced_p50_ms"] = paced.metrics["p50_ms"]
        out.metrics["paced_p99_ms"] = paced.metrics["p99_ms"]
        out.metrics["lost"] = (out.metrics["lost"] or 0) + (paced.metrics["lost"] or 0)
        out.metrics["dup"] = (out.metrics["dup"] or 0) + (paced.metrics["dup"] or 0)
        out.notes.extend(f"paced: {n}" for n in paced.notes)
        if v5:
            self.counters(results + results2, out)
        return out

    @staticmethod
    def counters(results: list[dict[str, Any]], out: Outcome) -> dict[str, int]:
        extra: dict[str, int] = {}
        for r in results:
            for k, v in r.get("extra", {}).items():
                extra[k] = extra.get(k, 0) + v
        out.notes.append(f"counters {extra}")
        return extra

    async def shared(self, broker: BrokerProcess) -> Outcome:
        """MQTT 5 shared subscription: 4 members of `$share/workers/bench/jobs/#` in one
        group, `shared_pubs` publishers on `bench/jobs/<i>`, QoS 1. Every message must
        reach exactly one member: the members share one record of what arrived, so a
        message given to two members counts as duplicated, one given to none as lost."""
        s = self.sizes
        members = []
        for k in range(4):
            c = broker.plain_client(f"shared-w{k}")
            members.append({"cid": c.client_id, "user": c.username, "pw": c.password, "v5": True,
                            "subs": [["$share/workers/bench/jobs/#", 1]], "group": "workers",
                            "group_member": f"w{k}", "expect": s.shared_pubs * s.shared_per_pub,
                            "seq_space": s.shared_per_pub})
        pubs = []
        for i in range(s.shared_pubs):
            c = broker.plain_client(f"shared-p{i}")
            pubs.append({"cid": c.client_id, "user": c.username, "pw": c.password, "v5": True,
                         "pub": {"topic": f"bench/jobs/{i}", "qos": 1, "count": s.shared_per_pub,
                                 "window": 64, "index": i}})
        results, usage = await self.run_workers(broker, [{"mode": "mqtt", "clients": members},
                                                         {"mode": "mqtt", "clients": pubs}], "shared5")
        out = Outcome()
        self.delivery(results, out, "msg_s")
        self.usage_notes(results, usage, out)
        extra = self.counters(results, out)
        shares = [extra.get(f"received_by_w{k}", 0) for k in range(4)]
        out.metrics["members_used"] = float(sum(1 for n in shares if n))
        total = sum(shares)
        out.metrics["busiest_share"] = max(shares) / total if total else None
        return out

    async def fanout(self, broker: BrokerProcess) -> Outcome:
        s = self.sizes
        topic = "bench/fanout"
        halves: list[list[dict[str, Any]]] = [[], []]
        for i in range(s.fanout_subs):
            c = broker.plain_client(f"fanout-sub{i}")
            halves[i % 2].append({"cid": c.client_id, "user": c.username, "pw": c.password,
                                  "subs": [[topic, 1]], "expect": s.fanout_msgs, "seq_space": s.fanout_msgs})
        p = broker.plain_client("fanout-pub")
        halves[0].append({"cid": p.client_id, "user": p.username, "pw": p.password,
                          "pub": {"topic": topic, "qos": 1, "count": s.fanout_msgs, "window": 16, "index": 0}})
        results, usage = await self.run_workers(broker, [{"mode": "mqtt", "clients": h} for h in halves], "fanout")
        out = Outcome()
        self.delivery(results, out, "deliveries_s")
        self.usage_notes(results, usage, out)
        return out

    # ---- Roost IM -------------------------------------------------------------------------
    def principals(self) -> list[str]:
        """Users Roost needs registered: IM pairs and point-to-point pairs."""
        k, p = self.sizes.im_pairs, self.sizes.p2p_pairs
        return ([f"ims{i}" for i in range(k)] + [f"imr{i}" for i in range(k)]
                + [f"p2ps{i}" for i in range(p)] + [f"p2pr{i}" for i in range(p)])

    async def im_phase(self, broker: Roost, per_sender: int, rate: float, phase: str) -> tuple[
            list[dict[str, Any]], dict[str, float]]:
        k = self.sizes.im_pairs
        self.phases += 1
        tag = f"{self.run_id}-{self.phases}{phase}"
        senders, recipients = [], []
        for i in range(k):
            a = broker.im_client(f"ims{i}")
            b = broker.im_client(f"imr{i}")
            senders.append({"cid": a.client_id, "user": a.username, "pw": a.password, "role": "sender",
                            "to": f"imr{i}", "count": per_sender, "window": 16 if rate == 0 else 10_000,
                            "rate": rate, "phase": i / (rate * k) if rate else 0.0, "tag": tag})
            recipients.append({"cid": b.client_id, "user": b.username, "pw": b.password, "role": "recipient",
                               "expect": per_sender, "tag": tag})
        return await self.run_workers(
            broker, [{"mode": "im", "clients": recipients}, {"mode": "im", "clients": senders}], f"im-{phase}")

    async def im(self, broker: BrokerProcess) -> Outcome:
        assert isinstance(broker, Roost)
        s = self.sizes
        out = Outcome()
        results, usage = await self.im_phase(broker, s.im_per_pair, 0.0, "full")
        self.delivery(results, out, "msg_s")
        ok = sum(r["acked"] for r in results)
        out.metrics["lost"] = float(max(0, ok - sum(r["received"] for r in results))
                                    + sum(r["sent"] - r["acked"] for r in results))
        self.usage_notes(results, usage, out)
        extra: dict[str, int] = {}
        for r in results:
            for k, v in r.get("extra", {}).items():
                extra[k] = extra.get(k, 0) + v
        out.notes.append(f"counters {extra}")
        answers = [x for r in results for x in r.get("answer_us", [])]
        out.metrics["answer_p50_ms"] = (pct(answers, 0.5) or 0) / 1000 if answers else None
        out.metrics["answer_p99_ms"] = (pct(answers, 0.99) or 0) / 1000 if answers else None
        rate = out.metrics["msg_s"] or 0.0
        if rate <= 0:
            out.notes.append("no throughput: half-load phase skipped")
            return out
        await asyncio.sleep(1.0)  # let the broker finish the full phase's acks and receipts
        half_total = rate / 2
        per_sender_rate = half_total / s.im_pairs
        per_sender = max(1, int(per_sender_rate * s.im_half_s))
        results2, _ = await self.im_phase(broker, per_sender, per_sender_rate, "half")
        half = Outcome()
        self.delivery(results2, half, "msg_s")
        out.metrics["half_rate"] = half_total
        out.metrics["half_p50_ms"] = half.metrics["p50_ms"]
        out.metrics["half_p99_ms"] = half.metrics["p99_ms"]
        answers = [x for r in results2 for x in r.get("answer_us", [])]
        out.metrics["half_answer_p99_ms"] = (pct(answers, 0.99) or 0) / 1000 if answers else None
        ok2 = sum(r["acked"] for r in results2)
        out.metrics["lost"] = (out.metrics["lost"] or 0) + max(0, ok2 - sum(r["received"] for r in results2)) \
            + sum(r["sent"] - r["acked"] for r in results2)
        out.metrics["dup"] = (out.metrics["dup"] or 0) + (half.metrics["dup"] or 0)
        out.notes.extend(f"half load: {n}" for n in half.notes)
        return out

    # ---- IM at a light, paced load ------------------------------------------------------
    async def im_paced(self, broker: BrokerProcess) -> Outcome:
        """Issue 16: `send` -> the recipient's `msg` event at 100 sends/s in all, paced.
        Every `ok` follows the send's commit (the broker's guarantee, nothing to relax here)."""
        assert isinstance(broker, Roost)
        s = self.sizes
        per_sender_rate = s.im_paced_rate / s.im_pairs
        per_sender = max(1, int(per_sender_rate * s.im_paced_s))
        results, usage = await self.im_phase(broker, per_sender, per_sender_rate, "paced")
        out = Outcome()
        self.delivery(results, out, "msg_s")
        ok = sum(r["acked"] for r in results)
        out.metrics["lost"] = float(max(0, ok - sum(r["received"] for r in results))
                                    + sum(r["sent"] - r["acked"] for r in results))
        answers = [x for r in results for x in r.get("answer_us", [])]
        out.metrics["answer_p50_ms"] = (pct(answers, 0.5) or 0) / 1000 if answers else None
        out.metrics["answer_p99_ms"] = (pct(answers, 0.99) or 0) / 1000 if answers else None
        out.notes.append(f"{s.im_paced_rate:,.0f} sends/s over {s.im_pairs} pairs for {s.im_paced_s:.0f} s; "
                         f"broker cpu {usage['broker_cpu_s'] / usage['interval_s']:.0%}")
        return out

    # ---- memory before the first client ---------------------------------------------------
    async def rss_start(self, broker: BrokerProcess) -> Outcome:
        """RSS of a broker that has started and listens, before any client connected:
        `scenario()` started it with an MQTT probe, so this one starts it again and
        waits only for its listening socket (/proc/net/tcp), never connecting."""
        out = Outcome()
        broker.stop()
        broker.spawn()
        deadline = time.monotonic() + 30.0
        while not listening(broker.port):
            if time.monotonic() > deadline or broker.proc is None or broker.proc.poll() is not None:
                raise RuntimeError(f"{broker.name} not listening:\n{broker.log_tail()}")
            await asyncio.sleep(0.02)
        out.metrics["listen_s"] = time.monotonic() - broker.started_at
        await asyncio.sleep(1.0)     # whatever it does right after listening (loads, timers) is done
        out.metrics["rss_start_mb"] = broker.rss_mb()
        out.metrics["hwm_start_mb"] = broker.status_mb("VmHWM")
        return out

    # ---- connection hold ------------------------------------------------------------------
    async def hold(self, broker: BrokerProcess) -> Outcome:
        return await self.hold_clients(broker, self.sizes.hold, "hold", [broker.host])

    async def hold_many(self, broker: BrokerProcess) -> Outcome:
        """Issue 16: 20,000 idle authenticated clients. Their source addresses are spread
        over 127.0.0.2-9 (ephemeral ports are per source address), and the count is
        capped below the broker's RLIMIT_NOFILE (its hard limit is all this machine allows)."""
        n = self.sizes.hold_many
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        cap = hard - 64 if hard != resource.RLIM_INFINITY else n
        out_notes = []
        if n > cap:
            out_notes.append(f"LIMITED: {n:,} wanted, {cap:,} held at most (RLIMIT_NOFILE hard limit {hard:,})")
            n = cap
        out = await self.hold_clients(broker, n, "hold_many", [f"127.0.0.{i}" for i in range(2, 10)])
        out.notes[:0] = out_notes
        return out

    async def hold_clients(self, broker: BrokerProcess, count: int, name: str, sources: list[str]) -> Outcome:
        halves: list[list[dict[str, Any]]] = [[], []]
        for i in range(count):
            c = broker.plain_client(f"c{i}")
            halves[i % 2].append({"cid": c.client_id, "user": c.username, "pw": c.password,
                                  "src": sources[i % len(sources)]})
        out = Outcome()
        await asyncio.sleep(0.5)
        out.metrics["rss_idle_mb"] = broker.rss_mb()

        async def measure(connected: list[dict[str, Any]]) -> None:
            total = sum(c["connected"] for c in connected)
            secs = max(c["connect_s"] for c in connected)
            out.metrics["connected"] = float(total)
            out.metrics["connects_per_s"] = total / secs if secs > 0 else None
            errs = sum(c["error_count"] for c in connected)
            if errs:
                out.notes.append(f"{errs} connects failed, e.g. {connected[0]['errors'][:2]}")
            await asyncio.sleep(2.0)  # idle: let the broker settle
            rss = broker.rss_mb()
            out.metrics["rss_mb"] = rss
            before = out.metrics["rss_idle_mb"]
            if rss is not None and before is not None and total:
                out.metrics["kb_per_client"] = (rss - before) * 1024 / total
            gen = sum(c["cpu_s"] for c in connected) / max(secs, 1e-9)
            out.notes.append(f"generator cpu while connecting {gen:.0%}")
            if gen > 0.9 * max(1, NPROC - 1):
                out.notes.append("GENERATOR SATURATED: connect rate is a lower bound")
                out.saturated = True

        results, _ = await self.run_workers(
            broker, [{"mode": "hold", "clients": h, "concurrency": 32} for h in halves], name, measure)
        alive = sum(r.get("alive", 0) for r in results)
        if alive < (out.metrics.get("connected") or 0):
            out.notes.append(f"only {alive} still connected after the hold")
        return out

    # ---- restart recovery -----------------------------------------------------------------
    async def restart(self, broker: BrokerProcess) -> Outcome:
        from bench import fill

        assert isinstance(broker, Roost)
        out = Outcome()
        broker.stop()
        t = time.monotonic()
        stored = await fill.fill_mailbox(broker, self.sizes.restart_events)
        out.notes.append(f"filled {stored:,} mailbox events in {time.monotonic() - t:.1f}s")
        out.metrics["events"] = float(stored)
        secs = await fill.time_to_serve(broker, timeout=max(30.0, self.sizes.timeout))
        out.metrics["serve_s"] = secs
        # And after a crash: SIGKILL (no clean close of the store), then start again.
        broker.kill()
        out.metrics["serve_after_kill_s"] = await fill.time_to_serve(broker, timeout=max(30.0, self.sizes.timeout))
        broker.stop()
        kept = await fill.count_events(broker)
        out.notes.append(f"{kept:,} mailbox events still stored after both restarts")
        if kept < stored:
            out.metrics["events"] = float(kept)   # the target is about what was kept
        return out

    # ---- driver ---------------------------------------------------------------------------
    async def scenario(self, broker: BrokerProcess, name: str) -> Outcome:
        if isinstance(broker, Roost) and self.cprofile_dir is not None:
            broker.cprofile_dir, broker.cprofile_label = self.cprofile_dir, f"roost-{name}"
        await broker.start()
        try:
            if name == "fanin_qos0":
                return await self.fanin(broker, 0)
            if name == "fanin_qos1":
                return await self.fanin(broker, 1)
            if name == "p2p":
                return await self.p2p(broker)
            if name == "p2p_v5_alias":
                return await self.p2p(broker, v5=True)
            if name == "shared_v5":
                return await self.shared(broker)
            if name == "fanout":
                return await self.fanout(broker)
            if name == "im":
                return await self.im(broker)
            if name == "im_paced":
                return await self.im_paced(broker)
            if name == "rss_start":
                return await self.rss_start(broker)
            if name == "hold":
                return await self.hold(broker)
            if name == "hold_many":
                return await self.hold_many(broker)
            if name == "restart":
                return await self.restart(broker)
            raise ValueError(name)
        finally:
            broker.stop()


# ---- table ----------------------------------------------------------------------------------

async def amain(args: argparse.Namespace, argv_used: list[str]) -> int:
    raise_nofile()
    # SIGTERM ends the run like Ctrl-C: every `finally` stops what it started.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    sizes = QUICK if args.quick else FULL
    scenarios = [s.strip() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    for s in scenarios:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r} (known: {', '.join(SCENARIOS)})")
    brokers = [b.strip() for b in args.brokers.split(",")]
    if "mosquitto" in brokers and Mosquitto.binary() is None:
        print("mosquitto is not installed: skipped (apt-get install -y mosquitto)", file=sys.stderr)
        brokers.remove("mosquitto")
    workdir = Path(tempfile.mkdtemp(prefix="roost-bench-"))
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(sizes, workdir, profile_dir)
    if args.cprofile:
        runner.cprofile_dir = Path(args.cprofile).resolve()
        runner.cprofile_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Outcome]] = {}
    started = time.monotonic()
    try:
        # Scenario by scenario, every broker in turn: whatever else the machine is doing
        # then weighs on all brokers of a row alike, so the ratios hold up.
        ready: dict[str, BrokerProcess] = {}
        for bname in brokers:
            broker = make(bname, workdir)
            results[bname] = {}
            try:
                await broker.prepare({"principals": runner.principals()})
                ready[bname] = broker
            except Exception as exc:  # noqa: BLE001 - report it in the table, go on with others
                runner.log(f"{bname}: set-up failed: {exc}")
                for name in scenarios:
                    results[bname][name] = Outcome(error=f"set-up failed: {exc}")
        runs: dict[tuple[str, str], list[Outcome]] = {}
        for name in scenarios:
            for rep in range(args.repeat):
                for bname, broker in ready.items():
                    if not takes_part(bname, name):
                        continue
                    runner.log(f"{bname}: {name}{f' (run {rep + 1}/{args.repeat})' if args.repeat > 1 else ''} ...")
                    t = time.monotonic()
                    load_before = os.getloadavg()[0]
                    try:
                        o = await runner.scenario(broker, name)
                    except Exception as exc:  # noqa: BLE001
                        o = Outcome(error=f"{type(exc).__name__}: {exc}")
                        runner.log(f"{bname}: {name} failed: {exc}\n{broker.log_tail(15)}")
                        broker.kill()
                    # Other work on the machine takes CPU from the broker: say how busy it was.
                    o.notes.append(f"load avg {load_before:.1f}")
                    runs.setdefault((bname, name), []).append(o)
                    runner.log(f"{bname}: {name} done in {time.monotonic() - t:.1f}s: "
                               + ", ".join(f"{k}={v:.4g}" for k, v in o.metrics.items() if v is not None))
        for (bname, name), outcomes in runs.items():
            results[bname][name] = median_outcome(name, outcomes)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    table = render_table(brokers, results, markdown=False)
    notes = render_notes(brokers, results)
    info = machine_info()
    print()
    when = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    print(f"Roost benchmark ({'quick' if args.quick else 'full'}), {when}, "
          f"{info['nproc']} cpu {info['cpu']}, python {info['python']}, amqtt {info['amqtt']}, "
          f"{info['mosquitto']}; generator loop {info['generator_loop']}; took {elapsed:.0f}s")
    print(table)
    def measured(lines: str) -> str:
        """Targets none of whose scenarios ran are left out (a `--scenarios` run)."""
        return lines if any(not ln.strip().startswith("n/a") for ln in lines.splitlines()) else ""

    targets = measured(render_targets(results)) if "roost" in results and not args.quick else ""
    if targets:
        print("Issue 7 targets (Roost, this run):")
        print(targets)
    targets16 = measured(render_targets16(results)) if "roost" in results and not args.quick else ""
    if targets16:
        print("Issue 16 targets (Roost, this run):")
        print(targets16)
    if notes:
        print("Notes:")
        print(notes)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "info": info, "sizes": sizes.__dict__, "quick": args.quick, "elapsed_s": elapsed,
            "results": {b: {s: o.__dict__ for s, o in r.items()} for b, r in results.items()}}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(
            render_table(brokers, results, markdown=True) + "\n\nNotes:\n" + notes + "\n")
    if args.results:
        cmd = "python -m bench " + " ".join(argv_used)
        page = results_md(info, cmd.strip(), args.quick, elapsed, render_table(brokers, results, markdown=True),
                          targets, notes, targets16)
        Path(args.results).write_text(page + kept_history(Path(args.results)))
    failed = any(o.error for r in results.values() for o in r.values())
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke test (< 60 s)")
    ap.add_argument("--only", "--scenarios", dest="only", default="",
                    help=f"comma-separated scenarios ({', '.join(SCENARIOS)})")
    ap.add_argument("--brokers", default="roost,amqtt,mosquitto",
                    help="comma-separated: roost,amqtt,mosquitto,floor (bench/floor.py: the least a "
                         "Python broker on uvloop can do, a reference column)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run every scenario N times per broker and show the median run (shared machines)")
    ap.add_argument("--json", default="", help="also write the raw results as JSON to this file")
    ap.add_argument("--markdown", default="", help="also write the table as Markdown to this file")
    ap.add_argument("--profile", default="", metavar="DIR",
                    help="py-spy record the Python brokers during each scenario into DIR "
                         "(flame graph + top functions; py-spy takes CPU too, so figures drop)")
    ap.add_argument("--cprofile", default="", metavar="DIR",
                    help="run Roost under cProfile, one DIR/roost-<scenario>-<ms>.prof per broker start "
                         "(call counts and shares; no py-spy needed; figures drop)")
    ap.add_argument("--instructions", action="store_true",
                    help="Roost only: instructions per message under valgrind's callgrind, for --only's "
                         "throughput scenarios (default fanin_qos1,p2p,shared_v5,fanout,im); exact to "
                         "about 0.2 %% where wall-clock rates move by 25 %%: compare commits with it")
    ap.add_argument("--results", default="", metavar="FILE",
                    help="write a results page (machine, versions, command, table) to FILE, "
                         "e.g. bench/RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (configs, logs, specs)")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if args.instructions:
        from bench import instructions  # (it builds on this module's Runner)

        return instructions.main([s.strip() for s in args.only.split(",")] if args.only else [], args.markdown,
                                 args.quick)
    return asyncio.run(amain(args, argv))


if __name__ == "__main__":
    sys.exit(main())
