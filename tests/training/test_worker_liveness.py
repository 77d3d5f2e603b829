"""The liveness probe of a training worker against a real Celery worker (issue 12, item 12).

The Kubernetes probe used to be ``celery inspect ping``, which a ``--pool solo`` worker cannot
answer while it runs a task, so every run longer than the probe's failure window was killed. The
probe is now ``flywheel worker-alive``, which reads the heartbeat file that a thread of the worker
process rewrites, idle or mid-task: it passes throughout a long run, and fails once the process
has been stopped (``SIGSTOP``) for longer than the limit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from flywheel.worker_heartbeat import check
from support.rankings import publish_rankings
from support.synthetic import synthetic_rankings
from test_reward_celery import BIN, FLYWHEEL, wait_for, worker_env  # noqa: F401 (fixture)
from test_training_faults import Workers, send_task

MAX_AGE = 3.0


@pytest.fixture
def probed_env(worker_env, tmp_path):
    worker_env.update({
        "FLYWHEEL_WORKER_HEARTBEAT_FILE": str(tmp_path / "worker.alive"),
        "FLYWHEEL_WORKER_HEARTBEAT_SECONDS": "0.5", "FLYWHEEL_WORKER_ALIVE_MAX_AGE_SECONDS": str(MAX_AGE),
        "FLYWHEEL_REWARD_MODEL_CHECK_SECONDS": "0", "FLYWHEEL_TRAINING_RERUN_CHECK_SECONDS": "0",
        "FLYWHEEL_POLICY_TRAIN_AFTER_REWARD_MODEL": "false",
        "FLYWHEEL_REWARD_MODEL_EPOCHS": "400",  # a run far longer than the probe's limit
    })
    return worker_env


@pytest.fixture
def workers(probed_env, tmp_path):
    pool = Workers(probed_env, tmp_path)
    yield pool
    pool.stop_all(kill=True)  # a solo worker's warm shutdown would wait for the long run to end


def probe(env) -> subprocess.CompletedProcess:
    """The probe exactly as deploy/k8s runs it: the command, its settings from the environment."""
    return subprocess.run([*FLYWHEEL, "worker-alive"], env=env, capture_output=True, text=True, timeout=60)


def test_the_probe_passes_through_a_long_run_and_fails_when_the_worker_is_stopped(
        probed_env, workers, redis_client, tmp_path):
    publish_rankings(redis_client, synthetic_rankings(40, seed=11, prefix="l"))
    worker = workers.start()
    with workers.log_on_failure(0):
        wait_for(lambda: (tmp_path / "worker.alive").exists(), 120, "the heartbeat file", worker)
        idle = probe(probed_env)
        assert idle.returncode == 0 and "idle" in idle.stdout, idle.stdout + idle.stderr

        result = send_task(probed_env, "training.train_reward_model", {"min_rankings": 1, "who": "probe-test"})
        wait_for(lambda: "reward-model run:" in workers.log(0), 120, "the run to be training", worker)
        for _ in range(2):  # across more than the limit: the running task keeps the heartbeat fresh
            alive = probe(probed_env)
            assert alive.returncode == 0, alive.stdout + alive.stderr
            assert f"running training.train_reward_model[{result.id}]" in alive.stdout
            time.sleep(MAX_AGE + 0.5)
        assert result.state == "STARTED"  # still the same run, mid-way

        # the old probe: the solo worker's consumer does not answer a ping while the task runs
        ping = subprocess.run([str(BIN / "celery"), "-A", "flywheel.celery_app", "inspect", "ping", "-d",
                               f"fault-0@{socket.gethostname()}", "--timeout", "2"], env=probed_env,
                              capture_output=True, text=True, timeout=60)
        assert ping.returncode != 0, ping.stdout

        os.kill(worker.pid, signal.SIGSTOP)  # a hung process: nothing of it runs
        time.sleep(MAX_AGE + 1.5)
        stopped = probe(probed_env)
        assert stopped.returncode == 1, stopped.stdout + stopped.stderr
        assert "stopped or hung" in stopped.stderr and "training.train_reward_model" in stopped.stderr
        os.kill(worker.pid, signal.SIGCONT)
        wait_for(lambda: probe(probed_env).returncode == 0, 10, "the probe to pass once the worker runs again")
        assert result.state == "STARTED"


def test_the_check_refuses_a_missing_unreadable_or_stale_file(tmp_path):
    path = tmp_path / "alive"
    assert not check(path, 10).alive and "no heartbeat file" in check(path, 10).message
    path.write_text("{not json")
    assert not check(path, 10).alive and "unreadable" in check(path, 10).message
    path.write_text(json.dumps({"pid": 7, "at": 1000.0, "task": None}))
    assert check(path, 10, now=1005.0).alive and "idle" in check(path, 10, now=1005.0).message
    stale = check(path, 10, now=1011.0)
    assert not stale.alive and "11.0 s ago" in stale.message
    os.utime(path)  # a touched copy: its own time stamp, not the file's mtime, counts
    assert not check(path, 10).alive


def test_worker_alive_without_a_file_configured_says_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_WORKER_HEARTBEAT_FILE"}
    result = subprocess.run([*FLYWHEEL, "worker-alive"], env=env, capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 2 and "FLYWHEEL_WORKER_HEARTBEAT_FILE" in result.stderr
