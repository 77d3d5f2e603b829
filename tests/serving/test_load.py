"""Short runs of the load driver (bench/load.py) on a tiny model, auth on and a key per client.

Beyond the queue bound (a small engine queue): every request is answered or refused with
RESOURCE_EXHAUSTED (a full queue or a key's rate limit), nothing else, the server's memory stays
bounded, and every acknowledged ranking is in the stream. Within the bound (the default queue):
the asynchronous server queues every client, so no request is refused as busy although the
clients outnumber the threads the server has for its synchronous services (``--grpc-workers 8``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load(tiny_model_dir, tmp_path, clients: int, *extra: str) -> dict:
    out = tmp_path / f"load-{clients}.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--clients", str(clients), "--seconds", "10", "--n", "2",
         "--tokens", "4", "--model", str(tiny_model_dir), "--dtype", "float32", "--grpc-workers", "8",
         # one torch thread: on a machine shared with other jobs, OpenMP's spin-waits across all cores
         # slow the tiny model's steps twenty-fold (Complete p99 3 s instead of 0.3 s)
         "--torch-threads", "1", "--json", str(out), *extra],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    print(run.stdout)
    report = json.loads(out.read_text())
    assert report["other_errors"] == 0, report["error_examples"]
    assert report["refused"] == report["refused_rate_limited"] + report["refused_busy"]
    assert report["keys"] == "one per client"  # auth on, each client metered by its own key
    assert report["requests"] == report["completes"] + report["rankings"] + report["refused"]
    assert report["rankings_acknowledged"] == report["rankings"] == report["stream_entries_added"]
    growth = report["server_rss_peak_mib"] - report["server_rss_start_mib"]
    assert growth < 400, f"the server grew by {growth} MiB under load"
    return report


def test_beyond_the_queue_bound_requests_are_refused_not_failed(tiny_model_dir, tmp_path):
    # 50 clients, room for 2 waiting + 8 running requests (16 rows / n=2)
    report = load(tiny_model_dir, tmp_path, 50, "--max-queued-requests", "2", "--max-batch-sequences", "16")
    assert not report["below_queue_bound"] and report["queue_bound"] == 10
    assert report["completes"] > 50 and report["rankings"] > 50
    assert report["refused_busy"] > 0  # the bound is exercised


def test_within_the_queue_bound_no_request_is_refused_as_busy(tiny_model_dir, tmp_path):
    # 80 clients, 8 threads for Feedback/Admin: a synchronous server with 8 workers refused most of them
    report = load(tiny_model_dir, tmp_path, 80, "--client-requests-per-second", "0")
    assert report["below_queue_bound"]
    assert report["refused"] == 0 and report["completes"] > 80 and report["rankings"] > 80
    assert report["queue_wait_p50_s"] is not None and report["queue_wait_p99_s"] >= report["queue_wait_p50_s"]
