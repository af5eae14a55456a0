"""Smoke test of the cluster benchmark: `python -m bench.cluster --im` with tiny
counts (real nodes, a private nats-server and PostgreSQL), checking what its user
sees: the p2p and IM tables with the single node and the 2-node cluster (sender
and recipient on different nodes) side by side, latency and throughput figures,
nothing lost or duplicated, no error answered."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CROSS = "2 nodes, sender and recipient on different nodes"


@pytest.mark.timeout(120)
def test_cluster_bench_p2p_and_im_lose_nothing(tmp_path: Path) -> None:
    raw = tmp_path / "cluster.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.cluster", "--pairs", "2", "--rate", "200", "--seconds", "1", "--count", "300",
         "--im", "--im-pairs", "2", "--im-rate", "100", "--im-count", "100", "--json", str(raw)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=110, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert res.returncode == 0, f"bench.cluster failed ({res.returncode}):\n{res.stdout}\n{res.stderr[-4000:]}"
    out = res.stdout
    for label in ("p2p QoS 1", "IM send -> msg", "| 1 node |", "| 1 node (PostgreSQL) |", f"| {CROSS} |",
                  "| 2 nodes / 1 node |", "PostgreSQL per IM message"):
        assert label in out, f"{label!r} missing from:\n{out}"
    doc = json.loads(raw.read_text())
    for part, single in (("p2p", "1 node"), ("im", "1 node (PostgreSQL)")):
        assert set(doc[part]) == {single, CROSS}, doc[part].keys()
        for name, r in doc[part].items():
            for phase in ("paced", "throughput"):
                figures = r[phase]
                assert figures["sent"] > 0 and figures["lost"] == 0, (part, name, phase, figures)
                assert figures.get("dup", 0) == 0, (part, name, phase, figures)
                for key in ("p50_ms", "p99_ms"):
                    assert not math.isnan(figures[key]) and figures[key] > 0, (part, name, phase, key, figures)
            assert r["throughput"]["msg_s"] > 0
            assert not r["throughput"].get("errors"), (part, name, r["throughput"]["errors"])
    assert doc["p2p"][CROSS]["nats_msgs_per_publish"] >= 1
    assert doc["im"][CROSS]["throughput"]["pg_per_msg"]["write_xacts"] > 0
