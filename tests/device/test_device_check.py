"""``bench/device_check.sh`` passes on a machine without a GPU and says so (issue 13)."""

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script runs its benchmarks")
def test_the_device_check_passes_without_a_gpu_and_reports_no_gpu():
    done = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no GPU" in done.stdout.splitlines()[-1]
    assert " passed" in done.stdout  # the device tests' CPU cases ran
