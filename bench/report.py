"""What the benchmark reports: outcomes, the table with ratios against stock amqtt,
issue 7's targets as PASS/FAIL, notes, and the results page (bench/RESULTS.md)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.brokers import Mosquitto

NPROC = os.cpu_count() or 1


@dataclass
class Outcome:
    """One scenario on one broker: named metrics plus notes on who was the bottleneck."""
    metrics: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    saturated: bool = False     # the generator (or the machine) may have been the limit


def pct(values: list[int], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return float(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))])


@dataclass(frozen=True)
class Row:
    scenario: str
    label: str
    metric: str
    higher_is_better: bool = True
    fmt: str = "{:,.0f}"


NO_RATIO = {"lost", "dup", "connected", "events", "paced_msg_s", "half_rate", "rss_idle_mb", "members_used",
            "busiest_share"}

def p2p_rows(scenario: str, title: str) -> list[Row]:
    """The rows of a p2p load (saturated, then paced), the same for every protocol version."""
    return [
        Row(scenario, title, "msg_s"),
        Row(scenario, "  p50 ms", "p50_ms", False, "{:,.1f}"),
        Row(scenario, "  p99 ms", "p99_ms", False, "{:,.1f}"),
        Row(scenario, "  paced at 1,000 msg/s: achieved", "paced_msg_s"),
        # Two decimals: at a paced load the brokers differ by tens of microseconds.
        Row(scenario, "  paced: p50 ms", "paced_p50_ms", False, "{:,.2f}"),
        Row(scenario, "  paced: p99 ms", "paced_p99_ms", False, "{:,.2f}"),
        Row(scenario, "  lost", "lost", False),
    ]


ROWS = [
    Row("fanin_qos0", "fan-in QoS 0 (8 -> 1)", "msg_s"),
    Row("fanin_qos0", "  lost", "lost", False),
    Row("fanin_qos1", "fan-in QoS 1 (8 -> 1)", "msg_s"),
    Row("fanin_qos1", "  lost", "lost", False),
    *p2p_rows("p2p", "p2p QoS 1 (pairs)"),
    *p2p_rows("p2p_v5_alias", "p2p QoS 1, MQTT 5 + topic alias"),
    Row("p2p_v5_alias", "  duplicated", "dup", False),
    Row("shared_v5", "shared sub fan-in, MQTT 5 (4 pubs -> 4 workers)", "msg_s"),
    Row("shared_v5", "  p50 ms", "p50_ms", False, "{:,.1f}"),
    Row("shared_v5", "  p99 ms", "p99_ms", False, "{:,.1f}"),
    Row("shared_v5", "  workers that got messages", "members_used"),
    Row("shared_v5", "  busiest worker's share", "busiest_share", False, "{:.0%}"),
    Row("shared_v5", "  lost", "lost", False),
    Row("shared_v5", "  duplicated (reached 2 workers)", "dup", False),
    Row("fanout", "fan-out QoS 1 deliveries/s", "deliveries_s"),
    Row("fanout", "  lost", "lost", False),
    Row("im", "IM send->msg->ack msg/s", "msg_s"),
    Row("im", "  p50 ms", "p50_ms", False, "{:,.1f}"),
    Row("im", "  p99 ms", "p99_ms", False, "{:,.1f}"),
    Row("im", "  send answered ok p50 ms", "answer_p50_ms", False, "{:,.1f}"),
    Row("im", "  send answered ok p99 ms", "answer_p99_ms", False, "{:,.1f}"),
    Row("im", "  at half load: msg/s", "half_rate"),
    Row("im", "  at half load: p99 ms", "half_p99_ms", False, "{:,.1f}"),
    Row("im", "  at half load: answered p99 ms", "half_answer_p99_ms", False, "{:,.1f}"),
    Row("im", "  lost", "lost", False),
    Row("im", "  duplicated", "dup", False),
    Row("im_paced", "IM send->msg at 100 sends/s, paced: p50 ms", "p50_ms", False, "{:,.2f}"),
    Row("im_paced", "  p99 ms", "p99_ms", False, "{:,.2f}"),
    Row("im_paced", "  send answered ok p99 ms", "answer_p99_ms", False, "{:,.2f}"),
    Row("im_paced", "  achieved msg/s", "msg_s"),
    Row("im_paced", "  lost", "lost", False),
    Row("rss_start", "RSS before the first client, MB", "rss_start_mb", False, "{:,.1f}"),
    Row("rss_start", "  peak (VmHWM) MB", "hwm_start_mb", False, "{:,.1f}"),
    Row("rss_start", "  start to listening s", "listen_s", False, "{:,.2f}"),
    Row("hold", "hold: connects/s", "connects_per_s"),
    Row("hold", "  clients held", "connected"),
    Row("hold", "  broker RSS MB", "rss_mb", False, "{:,.1f}"),
    Row("hold", "  broker RSS before, MB", "rss_idle_mb", False, "{:,.1f}"),
    Row("hold", "  KB per client", "kb_per_client", False, "{:,.1f}"),
    Row("hold_many", "hold many: clients held", "connected"),
    Row("hold_many", "  connects/s", "connects_per_s"),
    Row("hold_many", "  broker RSS MB", "rss_mb", False, "{:,.1f}"),
    Row("hold_many", "  broker RSS before, MB", "rss_idle_mb", False, "{:,.1f}"),
    Row("hold_many", "  KB per client", "kb_per_client", False, "{:,.1f}"),
    Row("restart", "restart: mailbox events", "events"),
    Row("restart", "  time to serve s", "serve_s", False, "{:,.2f}"),
    Row("restart", "  after SIGKILL: time to serve s", "serve_after_kill_s", False, "{:,.2f}"),
]


def render_table(brokers: list[str], results: dict[str, dict[str, Outcome]], markdown: bool) -> str:
    cols = ["scenario / metric", *brokers]
    ratio_cols = [b for b in brokers if b != "amqtt"] if "amqtt" in brokers else []
    cols += [f"{b}/amqtt" for b in ratio_cols]
    # Issue 16's targets are against Mosquitto in the same run.
    vs_mosquitto = "roost" in brokers and "mosquitto" in brokers
    if vs_mosquitto:
        cols.append("roost/mosquitto")
    lines: list[list[str]] = []
    for row in ROWS:
        if not any(row.scenario in results.get(b, {}) for b in brokers):
            continue
        vals: dict[str, float | None] = {}
        # Markdown collapses leading spaces: mark sub-rows there with an arrow.
        cells = ["↳ " + row.label.strip() if markdown and row.label.startswith("  ") else row.label]
        for b in brokers:
            o = results.get(b, {}).get(row.scenario)
            if o is None:
                cells.append("-")
                continue
            if o.error:
                cells.append("error")
                continue
            v = o.metrics.get(row.metric)
            vals[b] = v
            mark = "*" if o.saturated and not row.label.startswith("  ") and v is not None else ""
            cells.append("-" if v is None else row.fmt.format(v) + mark)
        for b in ratio_cols:
            base, v = vals.get("amqtt"), vals.get(b)
            if row.metric in NO_RATIO or base in (None, 0) or v is None:
                cells.append("")
            else:
                r = v / base if row.higher_is_better else base / v if v else float("inf")
                cells.append(f"{r:.2f}x")
        if vs_mosquitto:
            base, v = vals.get("mosquitto"), vals.get("roost")
            if row.metric in NO_RATIO or base in (None, 0) or v is None:
                cells.append("")
            else:
                r = v / base if row.higher_is_better else base / v if v else float("inf")
                cells.append(f"{r:.2f}x")
        lines.append(cells)
    widths = [max(len(c[i]) for c in [cols, *lines]) for i in range(len(cols))]
    out = []
    if markdown:
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
        out += ["| " + " | ".join(c) + " |" for c in lines]
    else:
        out.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cols)))
        out.append("  ".join("-" * w for w in widths))
        out += ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(line))
                for line in lines]
    out.append("")
    out.append("Ratios: broker / stock amqtt (and roost / mosquitto), oriented so that > 1 is better "
               "(for latency, RSS and time: the other's value / broker's).")
    if any(o.saturated for r in results.values() for o in r.values()):
        out.append("* a lower bound for that broker: the generator or all cores were busy, or the broker was "
                   "not CPU-bound (see notes).")
    return "\n".join(out)


def render_targets(results: dict[str, dict[str, Outcome]]) -> str:
    """Issue 7's targets for Roost, checked against this run's figures."""
    roost, stock = results.get("roost", {}), results.get("amqtt", {})

    def m(res: dict[str, Outcome], scenario: str, metric: str) -> float | None:
        o = res.get(scenario)
        return None if o is None or o.error else o.metrics.get(metric)

    lines = []

    def check(what: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a " if ok is None else "PASS" if ok else "FAIL"
        lines.append(f"  {verdict}  {what}: {detail}")

    for scen, label in (("fanin_qos0", "plain QoS 0 fan-in >= 4x stock"),
                        ("fanin_qos1", "plain QoS 1 fan-in >= 4x stock, nothing lost"),
                        ("p2p", "point-to-point QoS 1 >= 4x stock, nothing lost")):
        r, b, lost = m(roost, scen, "msg_s"), m(stock, scen, "msg_s"), m(roost, scen, "lost")
        if r is None or not b:
            check(label, None, "not measured")
        else:
            check(label, r / b >= 4 and not lost, f"{r / b:.1f}x, lost {lost or 0:,.0f}")
    im, base = m(roost, "im", "msg_s"), m(stock, "fanin_qos1", "msg_s")
    if im is None or not base:
        check("IM durable rate >= stock plain QoS 1 fan-in", None, "not measured")
    else:
        check("IM durable rate >= stock plain QoS 1 fan-in", im >= base, f"{im:,.0f} vs {base:,.0f} msg/s")
    p99 = m(roost, "im", "half_p99_ms")
    lost, dup = m(roost, "im", "lost"), m(roost, "im", "dup")
    check("IM p99 <= 50 ms at half load", None if p99 is None else p99 <= 50,
          "not measured" if p99 is None else f"{p99:.1f} ms")
    check("IM nothing lost or duplicated", None if lost is None else not lost and not dup,
          "not measured" if lost is None else f"lost {lost:,.0f}, duplicated {dup or 0:,.0f}")
    rss, held = m(roost, "hold", "rss_mb"), m(roost, "hold", "connected")
    check("5,000 idle clients with RSS <= 150 MB", None if rss is None else rss <= 150 and (held or 0) >= 5000,
          "not measured" if rss is None else f"{held or 0:,.0f} held, {rss:.0f} MB")
    t, n = m(roost, "restart", "serve_s"), m(roost, "restart", "events")
    tk = m(roost, "restart", "serve_after_kill_s")
    if t is not None and tk is not None:
        t = max(t, tk)
    check("serving within 3 s after restart with 1,000,000 mailbox events",
          None if t is None else t <= 3 and (n or 0) >= 1_000_000,
          "not measured" if t is None else f"{t:.2f} s with {n or 0:,.0f} events")
    return "\n".join(lines)


def render_targets16(results: dict[str, dict[str, Outcome]]) -> str:
    """Issue 16's targets for Roost, checked against this run's figures (Mosquitto's where a ratio)."""
    roost, mosq, floor = results.get("roost", {}), results.get("mosquitto", {}), results.get("floor", {})

    def m(res: dict[str, Outcome], scenario: str, metric: str) -> float | None:
        o = res.get(scenario)
        return None if o is None or o.error else o.metrics.get(metric)

    lines = []

    def check(what: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a " if ok is None else "PASS" if ok else "FAIL"
        lines.append(f"  {verdict}  {what}: {detail}")

    def floor_said(scenario: str, metric: str, fmt: str) -> str:
        """The floor relay's figure (bench/floor.py), when it ran: what no Python broker undercuts."""
        f = m(floor, scenario, metric)
        return "" if f is None else f" (floor relay: {fmt.format(f)})"

    for metric, label in (("paced_p50_ms", "p50"), ("paced_p99_ms", "p99")):
        r, b = m(roost, "p2p", metric), m(mosq, "p2p", metric)
        check(f"paced p2p QoS 1 at 1,000 msg/s {label} <= Mosquitto's", None if r is None or b is None else r <= b,
              ("not measured" if r is None or b is None else f"{r:.2f} vs {b:.2f} ms")
              + floor_said("p2p", metric, "{:.2f} ms"))
    p99, lost = m(roost, "im_paced", "p99_ms"), m(roost, "im_paced", "lost")
    check("IM send->msg at 100 sends/s p99 <= 5 ms", None if p99 is None else p99 <= 5 and not lost,
          "not measured" if p99 is None else f"{p99:.2f} ms, lost {lost or 0:,.0f}")
    rate, half, lost, dup = (m(roost, "im", "msg_s"), m(roost, "im", "half_p99_ms"), m(roost, "im", "lost"),
                             m(roost, "im", "dup"))
    check("durable IM >= 10,000 msg/s, nothing lost or duplicated",
          None if rate is None else rate >= 10_000 and not lost and not dup,
          "not measured" if rate is None else f"{rate:,.0f} msg/s, lost {lost or 0:,.0f}, dup {dup or 0:,.0f}")
    check("durable IM p99 <= 50 ms at half load", None if half is None else half <= 50,
          "not measured" if half is None else f"{half:.1f} ms")
    rss = m(roost, "rss_start", "rss_start_mb")
    check("RSS before the first client <= 40 MB", None if rss is None else rss <= 40,
          "not measured" if rss is None else f"{rss:.1f} MB")
    r, b, held = m(roost, "hold_many", "rss_mb"), m(mosq, "hold_many", "rss_mb"), m(roost, "hold_many", "connected")
    check("20,000 idle clients held, RSS <= 1.5 x Mosquitto's",
          None if r is None or b is None else r <= 1.5 * b and (held or 0) >= 20_000,
          ("not measured" if r is None or b is None else f"{held or 0:,.0f} held, {r:.0f} vs {b:.0f} MB")
          + floor_said("hold_many", "rss_mb", "{:.0f} MB"))
    worst = None
    for scen, metric in (("fanin_qos0", "msg_s"), ("fanin_qos1", "msg_s"), ("p2p", "msg_s"),
                         ("fanout", "deliveries_s")):
        r, b = m(roost, scen, metric), m(mosq, scen, metric)
        if r is not None and b:
            worst = min(worst, r / b) if worst is not None else r / b
    check("every throughput row >= 2 x Mosquitto's", None if worst is None else worst >= 2,
          "not measured" if worst is None else f"lowest ratio {worst:.2f}x")
    t, tk, n = m(roost, "restart", "serve_s"), m(roost, "restart", "serve_after_kill_s"), m(roost, "restart", "events")
    if t is not None and tk is not None:
        t = max(t, tk)
    check("startup with 1,000,000 mailbox events < 1 s", None if t is None else t < 1 and (n or 0) >= 1_000_000,
          "not measured" if t is None else f"{t:.2f} s with {n or 0:,.0f} events")
    return "\n".join(lines)


def render_notes(brokers: list[str], results: dict[str, dict[str, Outcome]]) -> str:
    out = []
    for b in brokers:
        for name, o in results.get(b, {}).items():
            msgs = ([f"ERROR {o.error}"] if o.error else []) + o.notes
            if msgs:
                out.append(f"- {b} {name}: " + "; ".join(msgs))
    return "\n".join(out)


def machine_info() -> dict[str, str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    mosq = Mosquitto.binary()
    mosq_v = "not installed"
    if mosq:
        r = subprocess.run([mosq, "-h"], capture_output=True, text=True)
        mosq_v = (r.stdout or r.stderr).splitlines()[0] if (r.stdout or r.stderr) else "?"
    uv = v("uvloop")
    return {"nproc": str(NPROC), "cpu": model, "python": platform.python_version(),
            "generator_loop": f"uvloop {uv}" if uv != "not installed" else "asyncio (pip install uvloop: cheaper)",
            "amqtt": v("amqtt"), "paho-mqtt": v("paho-mqtt"), "mosquitto": mosq_v,
            "kernel": platform.release()}


def results_md(info: dict[str, str], cmd: str, quick: bool, elapsed: float, table: str, targets: str,
               notes: str, targets16: str = "") -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    git = "?"
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=str(Path(__file__).parent.parent)).stdout.strip() or "?"
    except OSError:
        pass
    return f"""# Benchmark results

Written by `{cmd}` on {when} (commit {git}, {'quick' if quick else 'full'} run, {elapsed:.0f} s).
How to run it and what each scenario does: [README.md](README.md).

Machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, Python {info['python']};
amqtt {info['amqtt']}, paho-mqtt {info['paho-mqtt']} (tests only: the generator is raw asyncio,
event loop: {info['generator_loop']}), {info['mosquitto']}. The machine is shared: other work
running at the same time moves absolute figures from run to run; the ratios come from one
run and move less.

{table}

Issue 7 targets (Roost, this run):

```
{targets}
```

Issue 16 targets (Roost, this run):

```
{targets16}
```

Notes (broker and generator CPU during each measured phase; the generator is not the
bottleneck unless a note says GENERATOR SATURATED):

{notes}
"""
