"""A short run of the load driver (bench/load.py) on a tiny model: 50 clients for 10 seconds against
a server with few gRPC workers, so that some requests are refused. Every request is answered or
refused with RESOURCE_EXHAUSTED (a busy server or a key's rate limit: auth is on and every client
has a key of its own), the server's memory stays bounded, and every acknowledged ranking is in the
stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fifty_clients_for_ten_seconds(tiny_model_dir, tmp_path):
    out = tmp_path / "load.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--clients", "50", "--seconds", "10", "--n", "2",
         "--tokens", "4", "--model", str(tiny_model_dir), "--dtype", "float32", "--grpc-workers", "8",
         # one torch thread: on a machine shared with other jobs, OpenMP's spin-waits across all cores
         # slow the tiny model's steps twenty-fold (Complete p99 3 s instead of 0.3 s)
         "--torch-threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    report = json.loads(out.read_text())
    print(run.stdout)
    assert report["other_errors"] == 0, report["error_examples"]
    assert report["completes"] > 50 and report["rankings"] > 50
    assert report["refused"] > 0  # 50 clients, 8 concurrent RPCs: the limit is exercised
    assert report["refused"] == report["refused_rate_limited"] + report["refused_busy"]
    assert report["keys"] == "one per client"  # auth on, each client metered by its own key
    assert report["requests"] == report["completes"] + report["rankings"] + report["refused"]
    assert report["rankings_acknowledged"] == report["rankings"] == report["stream_entries_added"]
    growth = report["server_rss_peak_mib"] - report["server_rss_start_mib"]
    assert growth < 400, f"the server grew by {growth} MiB under load"
