"""`python -m bench --instructions`: Roost's instructions per message, under callgrind.

Wall-clock figures on a shared machine move by 25 % between runs of the same code
(and CPU seconds per message by as much), far more than most changes to a hot
path. The instructions a broker executes for a given load do not: valgrind's
callgrind counts them, the same to about 0.2 % run after run. So a change is
measured here, and its effect on rates confirmed in the ordinary runs.

Per scenario, one broker runs under `valgrind --tool=callgrind`, instrumentation
off until the load starts (start-up runs at valgrind's plain speed, about 5
times slower than native; instrumented code about 50 times). A first load phase
warms caches and code paths; the counters are zeroed; a second phase is counted,
and its instructions (every thread: event loop, SQLite writer, and the rest) are
divided by its messages. The counts are smaller than a full run's, and the
clients wait longer for a CONNACK: the broker is that much slower.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.brokers import Roost
from bench.run import FULL, Runner

DEFAULT = ("fanin_qos1", "p2p", "shared_v5", "fanout", "im")
SUPPORTED = ("fanin_qos0", *DEFAULT)

# Each counted phase: 10,000-40,000 messages (a minute or less under callgrind).
# p2p with 10 pairs, not 50: 100 CONNECTs at once under valgrind outlast the
# broker's 10 s CONNECT timeout.
SIZES = dataclasses.replace(FULL, fanin0_per_pub=4000, fanin_per_pub=2000, p2p_pairs=10, p2p_per_pair=1000,
                            fanout_msgs=200, im_per_pair=500, shared_per_pub=2000, timeout=900.0, idle=120.0,
                            connect_timeout=300.0)

# --quick: a smoke test's counts (tests/test_bench_smoke.py), seconds per scenario
QUICK_SIZES = dataclasses.replace(SIZES, fanin0_per_pub=250, fanin_per_pub=250, p2p_pairs=10, p2p_per_pair=20,
                                  fanout_subs=10, fanout_msgs=20, im_pairs=2, im_per_pair=25, shared_per_pub=250)

_TOTAL = re.compile(r"^totals:\s+(\d+)", re.M)   # the last line: the dump is complete


async def _phase(runner: Runner, broker: Roost, scenario: str) -> int:
    """Run one load phase of `scenario`; the messages it moved (deliveries for fanout)."""
    s = runner.sizes
    if scenario in ("fanin_qos0", "fanin_qos1"):
        qos = 1 if scenario == "fanin_qos1" else 0
        await runner.fanin(broker, qos)
        return 8 * (s.fanin_per_pub if qos else s.fanin0_per_pub)
    if scenario == "p2p":      # the saturated phase only (the paced one is latency)
        await runner.run_workers(broker, runner.p2p_specs(broker, s.p2p_per_pair, 0.0), "p2p")
        return s.p2p_pairs * s.p2p_per_pair
    if scenario == "shared_v5":
        await runner.shared(broker)
        return s.shared_pubs * s.shared_per_pub
    if scenario == "fanout":
        await runner.fanout(broker)
        return s.fanout_msgs * s.fanout_subs
    if scenario == "im":       # the saturated phase: send -> msg -> ack, every send committed
        await runner.im_phase(broker, s.im_per_pair, 0.0, "full")
        return s.im_pairs * s.im_per_pair
    raise ValueError(scenario)


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


async def measure(runner: Runner, broker: Roost, scenario: str, out_dir: Path) -> float:
    """Instructions per message of `scenario` (a fresh broker under callgrind)."""
    broker.callgrind_out = out_dir / f"{scenario}.%p"
    await broker.start(timeout=300)
    try:
        pid = str(broker.pid)
        _control("--instr=on", pid)
        await _phase(runner, broker, scenario)            # warm-up, not counted
        _control("--zero", pid)
        messages = await _phase(runner, broker, scenario)
        _control("--dump", pid)
        total = await _dumped_total(out_dir, scenario)
    finally:
        broker.stop(timeout=120)
    return total / messages


async def _dumped_total(out_dir: Path, scenario: str, wait: float = 60.0) -> int:
    """The instruction total of the dump just requested (callgrind writes it from
    the broker process, as its own next step)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        for dump in out_dir.glob(f"{scenario}.*.1"):     # the first dump of that broker process
            found = _TOTAL.search(dump.read_text(errors="replace"))
            if found is not None:
                return int(found.group(1))
        if loop.time() > deadline:
            raise RuntimeError(f"callgrind wrote no totals for {scenario} into {out_dir} within {wait:.0f}s")
        await asyncio.sleep(0.2)


async def run(scenarios: list[str], markdown: str = "", quick: bool = False) -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install -y valgrind): --instructions needs it", file=sys.stderr)
        return 2
    chosen = scenarios or list(DEFAULT)
    unsupported = [s for s in chosen if s not in SUPPORTED]
    if unsupported:
        print(f"--instructions measures {', '.join(SUPPORTED)}; not {', '.join(unsupported)}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="roost-instructions-"))
    runner = Runner(QUICK_SIZES if quick else SIZES, workdir)
    broker = Roost(workdir / "roost")
    rows: list[tuple[str, float | None, str]] = []
    try:
        await broker.prepare({"principals": runner.principals()})
        for scenario in chosen:
            runner.log(f"roost: {scenario} under callgrind ...")
            try:
                per = await measure(runner, broker, scenario, workdir)
                rows.append((scenario, per, ""))
                runner.log(f"roost: {scenario}: {per:,.0f} instructions per message")
            except Exception as exc:  # noqa: BLE001 - reported in the table, the others go on
                rows.append((scenario, None, f"{type(exc).__name__}: {exc}"))
                runner.log(f"roost: {scenario} failed: {exc}\n{broker.log_tail(15)}")
                broker.kill()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lines = ["| scenario | instructions per message |", "|---|---:|"]
    lines += [f"| {name} | {per:,.0f} |" if per is not None else f"| {name} | failed: {err} |"
              for name, per, err in rows]
    table = "\n".join(lines)
    print(table)
    if markdown:
        Path(markdown).write_text(table + "\n")
    return 1 if any(per is None for _n, per, _e in rows) else 0


def main(scenarios: list[str], markdown: str = "", quick: bool = False) -> int:
    return asyncio.run(run(scenarios, markdown, quick))
