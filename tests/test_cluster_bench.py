"""bench/cluster_bench.py --quick runs each configuration (one node, two clustered nodes with
cross-node and same-node wakes) and saves every figure it promises. Values are not asserted:
tests never assert on speed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

CONFIGS = ("one", "two-cross", "two-same")


@pytest.mark.timeout(200)
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("kamailio", "sipp", "redis-server", "dumpcap", "tshark")),
                    reason="needs kamailio, sipp, redis-server, dumpcap and tshark")
def test_cluster_bench_quick_saves_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    proc = subprocess.run([sys.executable, "bench/cluster_bench.py", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    summary, configs = doc["summary"], doc["configs"]
    for name in CONFIGS:
        s, c = summary[name], configs[name]
        assert s["nodes"] == (1 if name == "one" else 2)
        assert not s["crashed"] and not s["error"], s
        assert isinstance(s["max_calls_per_s_0_failed"], int)
        step = c["steps"][0]
        assert step["calls"] > 0 and step["captured"]
        assert len(step["kamailio_cpu_ms_per_call_by_node"]) == s["nodes"]
        assert len(step["redis_by_node_per_call"]) == s["nodes"]
        for key in ("kamailio_cpu_ms_per_call", "redis_commands_per_call", "redis_cpu_ms_per_call",
                    "redis_in_bytes_per_call", "redis_out_bytes_per_call", "internode_sip_per_call"):
            assert isinstance(step[key], int | float), key
        lat = s["at_latency_rate"]
        assert lat is not None and lat["wake_latency"] is not None
        assert lat["wake_latency"]["count"] > 0
        assert {"p50_ms", "p99_ms"} <= set(lat["wake_latency"])
        reg = s["register"]
        assert reg is not None
        for key in ("kamailio_cpu_ms_per_register", "redis_commands_per_register", "redis_in_bytes_per_register",
                    "redis_out_bytes_per_register", "internode_sip_per_register"):
            assert isinstance(reg[key], int | float), key
    # what scaling is judged by: the clustered configurations compared with one node
    for name in ("two-cross", "two-same"):
        assert "extra_kamailio_cpu_ms_per_register" in summary[f"{name}_over_one"]
    assert "| two-cross | 2 |" in proc.stdout
