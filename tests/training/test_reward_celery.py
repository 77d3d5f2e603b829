"""A real Celery worker on the training queue: the trigger starts a run when enough rankings have
arrived, ``flywheel train reward-model`` runs one on demand, ``/metrics`` reports it, and
``flywheel reward-models`` lists the versions."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flywheel.redis_server import free_port
from support.rankings import publish_rankings
from flywheel.contracts.artifacts import REWARD_MODEL_KIND
from flywheel.contracts.keys import RANKINGS_STREAM, REWARD_MODEL_CONSUMER_GROUP, registry_current_key
from support.synthetic import synthetic_rankings

BIN = Path(sys.executable).parent
FLYWHEEL = [sys.executable, "-m", "flywheel.app.cli"]  # the `flywheel` command of this checkout


def wait_for(predicate, timeout: float, what: str, worker=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if worker is not None and worker.poll() is not None:
            raise AssertionError(f"worker exited with {worker.returncode} while waiting for {what}")
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def worker_env(redis_server, tmp_path, tiny_model_dir):
    env = dict(os.environ)
    env.update({
        "REDIS_URL": redis_server.url, "FLYWHEEL_DATA_DIR": str(tmp_path / "data"), "FLYWHEEL_MODEL": str(tiny_model_dir),
        "FLYWHEEL_TRAINING_METRICS_PORT": str(free_port()), "FLYWHEEL_REWARD_MODEL_TRIGGER_RANKINGS": "16",
        "FLYWHEEL_REWARD_MODEL_CHECK_SECONDS": "0.5", "FLYWHEEL_REWARD_MODEL_LEARNING_RATE": "0.002",
        "FLYWHEEL_REWARD_MODEL_TRAINABLE_LAYERS": "-1", "FLYWHEEL_REWARD_MODEL_AUTOCAST": "float32",
        "FLYWHEEL_REWARD_MODEL_MAX_LENGTH": "96", "FLYWHEEL_REWARD_MODEL_HELDOUT_FRACTION": "0.25",
    })
    return env


@pytest.fixture
def worker(worker_env, tmp_path):
    log = open(tmp_path / "worker.log", "w")
    process = subprocess.Popen(
        [str(BIN / "celery"), "-A", "flywheel.app.worker", "worker", "-Q", "training", "--pool", "solo", "-c", "1",
         "--loglevel", "INFO", "-n", "rm-test@%h"],
        env=worker_env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    yield process
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()


def test_a_celery_worker_trains_when_enough_rankings_arrived_and_on_demand(
        worker, worker_env, redis_client, tmp_path):
    def current():
        raw = redis_client.get(registry_current_key(REWARD_MODEL_KIND))
        return int(raw) if raw else 0

    publish_rankings(redis_client, synthetic_rankings(8, seed=1))
    time.sleep(2)  # below the trigger threshold of 16: nothing starts
    assert current() == 0
    publish_rankings(redis_client, synthetic_rankings(24, seed=2, prefix="h"))
    try:
        wait_for(lambda: current() == 1, 120, "the triggered run to promote v1", worker)
        # the run acknowledges its entries only after the version is on disk and promoted, so the
        # acknowledgement lands a moment after the pointer moves
        wait_for(lambda: int(redis_client.xpending(RANKINGS_STREAM, REWARD_MODEL_CONSUMER_GROUP)["pending"]) == 0,
                 30, "the promoted run to acknowledge its rankings", worker)
    except AssertionError:
        print((tmp_path / "worker.log").read_text()[-4000:])
        raise

    port = worker_env["FLYWHEEL_TRAINING_METRICS_PORT"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "flywheel_reward_model_current_version 1.0" in metrics
    assert 'flywheel_reward_model_runs_total{outcome="promoted"} 1.0' in metrics
    assert "flywheel_reward_model_heldout_accuracy_ratio" in metrics

    # on demand, below the threshold: `flywheel train reward-model` enqueues a run and waits for it
    publish_rankings(redis_client, synthetic_rankings(6, seed=3, prefix="d"))
    cli = subprocess.run([*FLYWHEEL, "train", "reward-model"], env=worker_env, capture_output=True,
                         text=True, timeout=180, cwd=tmp_path)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert '"version": 2' in cli.stdout

    listing = subprocess.run([*FLYWHEEL, "reward-models"], env=worker_env, capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:3] == ["version", "status", "parent"]
    assert lines[1].startswith("v1 ") and lines[2].startswith("v2")
    assert "held-out acc" in lines[0]
