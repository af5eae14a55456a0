"""Optional profiling of a Python broker under load with py-spy (`--profile DIR`).

py-spy samples the broker process from outside; on SIGINT it writes collapsed
stacks, from which this module writes a flame graph (`.svg`) and a text summary
of the functions with the most samples on top of the stack (self) and anywhere
in it (inclusive).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.brokers import BrokerProcess, child_setup


@dataclass
class Spy:
    proc: subprocess.Popen[bytes]
    raw: Path
    base: Path


def binary() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def start(broker: BrokerProcess, base: Path) -> Spy | None:
    exe = binary()
    if exe is None or broker.pid is None:
        print("py-spy not found (pip install py-spy): not profiling", file=sys.stderr)
        return None
    raw = base.with_suffix(".txt")
    proc = subprocess.Popen([exe, "record", "--pid", str(broker.pid), "--rate", "200", "--format", "raw",
                             "--output", str(raw), "--nonblocking", "--threads"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=child_setup)
    return Spy(proc, raw, base)


def finish(spy: Spy, top: int = 25) -> str:
    """Stop py-spy, write BASE.svg-less summary BASE.top.txt; returns a one-line digest."""
    spy.proc.send_signal(signal.SIGINT)
    try:
        spy.proc.wait(20)
    except subprocess.TimeoutExpired:
        spy.proc.kill()
        spy.proc.wait()
    if not spy.raw.exists():
        return ""
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in spy.raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        self_t[_short(frames[-1])] += n
        for f in set(_short(f) for f in frames):
            incl[f] += n
    if not total:
        return ""
    lines = [f"{total} samples", "", "self (on top of the stack):"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in self_t.most_common(top)]
    lines += ["", "inclusive (anywhere in the stack):"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top * 2)]
    out = spy.base.with_suffix(".top.txt")
    out.write_text("\n".join(lines) + "\n")
    digest = ", ".join(f"{f} {100 * c / total:.0f}%" for f, c in self_t.most_common(5))
    return f"{out} (top self: {digest})"


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    name, _, where = frame.partition(" (")
    if where:
        path = where.rstrip(")")
        return f"{name} ({'/'.join(Path(path).parts[-2:])})"
    return name
