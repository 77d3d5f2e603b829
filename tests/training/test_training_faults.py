"""Training workers killed with SIGKILL: the run is queued again for the next worker within seconds
of its lock expiring (not after the broker's 6 h visibility timeout), no half-written version
appears, the registry stays consistent, and the rankings the dead run had read are not lost. A
run that outlives the visibility timeout is delivered a second time, and that delivery does
nothing: one run, one version.

The workers are real Celery worker processes on a test Redis; the run locks and the killed-run
check are shortened through settings, the broker's visibility timeout stays at its default.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND, verify_version
from flywheel.contracts.keys import (RANKINGS_STREAM, REWARD_MODEL_CONSUMER_GROUP, REWARD_MODEL_RUN_LOCK_KEY,
                                     registry_current_key)
from flywheel.registry import CONTROL_FILES, CURRENT, VersionRegistry, open_registry
from flywheel.config import FlywheelConfig
from flywheel.redis_server import free_port
from support.policy import TINY_PPO, promote_reward_model, store_served_groups
from support.rankings import publish_rankings
from test_reward_celery import BIN, wait_for, worker_env  # noqa: F401 (fixture)
from training.rankings import ReplayStore
from support.synthetic import synthetic_rankings

FAST_RERUN = {
    "FLYWHEEL_REWARD_MODEL_CHECK_SECONDS": "0",  # no trigger watcher: the only run is the task we send
    "FLYWHEEL_TRAINING_RERUN_CHECK_SECONDS": "0.5",  # a worker looks for a dead worker's run this often
    # a dead worker's lock expires after this: then its run is queued again (long enough that a live
    # worker's heartbeat, every third of it, keeps its lease on a loaded machine)
    "FLYWHEEL_REWARD_MODEL_LOCK_SECONDS": "5",
    "FLYWHEEL_POLICY_LOCK_SECONDS": "5",
}
assert "FLYWHEEL_TASK_VISIBILITY_TIMEOUT_SECONDS" not in FAST_RERUN  # 6 h: a rerun here is the ledger's


class Workers:
    """Starts training workers one after another, each logging to its own file."""

    def __init__(self, env: dict, folder: Path) -> None:
        self.env, self.folder, self.processes = env, folder, []

    def start(self, **env) -> subprocess.Popen:
        """One more worker; ``env`` adds to (or overrides) the pool's environment for it alone."""
        index = len(self.processes)
        log = open(self.folder / f"worker-{index}.log", "w")
        process = subprocess.Popen(
            [str(BIN / "celery"), "-A", "flywheel.app.worker", "worker", "-Q", "training", "--pool", "solo", "-c", "1",
             "--loglevel", "INFO", "-n", f"fault-{index}@%h"],
            env=self.env | env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        log.close()
        self.processes.append(process)
        return process

    def log(self, index: int) -> str:
        return (self.folder / f"worker-{index}.log").read_text()

    @contextlib.contextmanager
    def log_on_failure(self, index: int):
        """Print the tail of a worker's log when the block fails."""
        try:
            yield
        except BaseException:
            print(self.log(index)[-4000:])
            raise

    def stop_all(self, kill: bool = False) -> None:
        """Stop every worker still running (resumed first, if a test paused it): SIGTERM, or SIGKILL
        with ``kill`` (a solo worker's warm shutdown waits for the task it runs)."""
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill() if kill else process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def fault_env(worker_env):
    worker_env.update(FAST_RERUN)
    return worker_env


@pytest.fixture
def workers(fault_env, tmp_path):
    pool = Workers(fault_env, tmp_path)
    yield pool
    pool.stop_all()


def send_task(env: dict, name: str, kwargs: dict, task_id: str | None = None):
    from flywheel.celery_app import make_celery

    app = make_celery(env["REDIS_URL"], FlywheelConfig.load(environ=env))
    return app.send_task(name, kwargs=kwargs, task_id=task_id)


def assert_registry_consistent(client, kind: str, root: Path) -> list[int]:
    """Every registered version has a complete, verified manifest that agrees with Redis; the current
    pointer names a registered version whose status is current; no unregistered version folder."""
    registry = VersionRegistry(client, kind, root)
    versions = registry.versions()
    for record in versions:
        manifest = verify_version(registry.path(record.version))
        assert manifest["version"] == record.version and manifest["status"] == record.status
    on_disk = sorted(int(p.name[1:]) for p in root.glob("v*") if p.is_dir() and p.name[1:].isdigit())
    assert on_disk == [r.version for r in versions], "a version folder on disk that the registry does not know"
    current = registry.current_version()
    if current:
        assert registry.get(current).status == CURRENT
    assert sum(r.status == CURRENT for r in versions) == (1 if current else 0)
    return [r.version for r in versions]


def kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)


def test_a_reward_model_run_killed_midway_runs_again_and_loses_no_ranking(
        fault_env, workers, redis_client, tmp_path):
    fault_env["FLYWHEEL_POLICY_TRAIN_AFTER_REWARD_MODEL"] = "false"
    data = Path(fault_env["FLYWHEEL_DATA_DIR"])
    published = publish_rankings(redis_client, synthetic_rankings(40, seed=5, prefix="k"))
    first = workers.start()
    result = send_task(fault_env, "training.train_reward_model", {"min_rankings": 1, "who": "fault-test"})

    def reading():  # the run holds its lock and has read (not acknowledged) the rankings
        pending = redis_client.xpending(RANKINGS_STREAM, REWARD_MODEL_CONSUMER_GROUP)["pending"] \
            if redis_client.exists(RANKINGS_STREAM) and redis_client.xinfo_groups(RANKINGS_STREAM) else 0
        return redis_client.exists(REWARD_MODEL_RUN_LOCK_KEY) and int(pending) == len(published)

    with workers.log_on_failure(0):
        wait_for(reading, 120, "the reward-model run to start", first)
    kill(first)

    assert redis_client.get(registry_current_key(REWARD_MODEL_KIND)) in (None, b"0")
    assert not list((data / "reward_models").glob("v*")), "a version appeared from a killed run"
    assert int(redis_client.xpending(RANKINGS_STREAM, REWARD_MODEL_CONSUMER_GROUP)["pending"]) == len(published)

    second = workers.start()
    with workers.log_on_failure(1):
        report = result.get(timeout=180)
    assert report["outcome"] == "promoted" and report["version"] == 1
    received = f"Task training.train_reward_model[{result.id}] received"
    assert received in workers.log(0) and received in workers.log(1)  # the same task, queued again
    assert f"run {result.id} (training.train_reward_model) lost its worker" in workers.log(1)
    assert second.poll() is None

    assert assert_registry_consistent(redis_client, "reward_model", data / "reward_models") == [1]
    manifest = json.loads((data / "reward_models" / "v1" / "manifest.json").read_text())
    assert manifest["rankings"]["stream"]["entries"] == len(published)  # the dead run's rankings were re-read
    assert int(redis_client.xpending(RANKINGS_STREAM, REWARD_MODEL_CONSUMER_GROUP)["pending"]) == 0
    assert redis_client.xlen(RANKINGS_STREAM) == len(published)
    lines = [line for line in (data / "reward_models" / "rankings.jsonl").read_text().splitlines() if line.strip()]
    assert len(lines) == len(ReplayStore(data / "reward_models" / "rankings.jsonl").load()) == len(published)


def metric(port: str, name: str) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_a_ppo_run_killed_midway_runs_again_and_leaves_no_half_version(
        fault_env, workers, redis_client, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {i}."}) + "\n" for i in range(12)))
    fault_env.update({f"FLYWHEEL_{name.upper()}": value for name, value in TINY_PPO.items()})
    fault_env.update({"FLYWHEEL_POLICY_PROMPTS_FILE": str(prompts), "FLYWHEEL_POLICY_ITERATIONS": "3",
                      "FLYWHEEL_POLICY_RESPONSE_LENGTH": "8"})
    data = Path(fault_env["FLYWHEEL_DATA_DIR"])
    settings = FlywheelConfig.load(environ=fault_env)
    promote_reward_model(redis_client, settings)
    store_served_groups(redis_client, AutoTokenizer.from_pretrained(tiny_model_dir), 8, prefix="served")

    first = workers.start()
    result = send_task(fault_env, "training.train_policy", {"who": "fault-test"})
    port = fault_env["FLYWHEEL_TRAINING_METRICS_PORT"]
    with workers.log_on_failure(0):  # a PPO iteration is done: the run is in its middle (2 more, then the write)
        wait_for(lambda: metric(port, "flywheel_ppo_iterations_total") >= 1, 180, "a PPO iteration", first)
    kill(first)
    assert redis_client.get(registry_current_key(POLICY_KIND)) in (None, b"0")
    assert not list((data / "policies").glob("v*")), "a version appeared from a killed run"

    workers.start()
    with workers.log_on_failure(1):
        report = result.get(timeout=240)
    assert report["outcome"] == "promoted" and report["version"] == 1
    received = f"Task training.train_policy[{result.id}] received"
    assert received in workers.log(0) and received in workers.log(1)
    assert f"run {result.id} (training.train_policy) lost its worker" in workers.log(1)
    assert assert_registry_consistent(redis_client, "policy", data / "policies") == [1]
    assert assert_registry_consistent(redis_client, "reward_model", data / "reward_models") == [1]
    assert metric(port, "flywheel_ppo_iterations_total") == 3  # the new worker ran the whole run again


def test_a_run_longer_than_the_visibility_timeout_runs_once(fault_env, workers, redis_client):
    fault_env.update({"FLYWHEEL_TASK_VISIBILITY_TIMEOUT_SECONDS": "3",  # the run lasts longer than this
                      "FLYWHEEL_TASK_RESTORE_INTERVAL_SECONDS": "0.5", "FLYWHEEL_REWARD_MODEL_EPOCHS": "60",
                      "FLYWHEEL_POLICY_TRAIN_AFTER_REWARD_MODEL": "false"})
    data = Path(fault_env["FLYWHEEL_DATA_DIR"])
    publish_rankings(redis_client, synthetic_rankings(40, seed=6, prefix="v"))
    workers.start(), workers.start(FLYWHEEL_TRAINING_METRICS_PORT=str(free_port()))  # one /metrics port each
    result = send_task(fault_env, "training.train_reward_model", {"min_rankings": 1, "who": "fault-test"})
    received = f"Task training.train_reward_model[{result.id}] received"
    logs = lambda: workers.log(0) + workers.log(1)  # noqa: E731
    with workers.log_on_failure(0), workers.log_on_failure(1):
        # the broker hands the unacknowledged task to the idle worker while the first still runs it
        wait_for(lambda: logs().count(received) >= 2 and "is running already" in logs(), 180,
                 "the second delivery of the running run")
        report = result.get(timeout=240)
    assert report["outcome"] == "promoted" and report["version"] == 1  # the run's own result, not the no-op's
    assert assert_registry_consistent(redis_client, "reward_model", data / "reward_models") == [1]
    assert logs().count("reward-model run promoted") == 1

    # a delivery of the finished run (the broker's, hours later) does nothing either
    send_task(fault_env, "training.train_reward_model", {"min_rankings": 1, "who": "fault-test"}, task_id=result.id)
    wait_for(lambda: "has finished already" in logs(), 60, "the late delivery to be refused")
    assert result.get(timeout=10) == report
    assert assert_registry_consistent(redis_client, "reward_model", data / "reward_models") == [1]


WRITER = """
import sys, time
import redis
from flywheel.registry import VersionRegistry

def write(folder):
    (folder / "model.safetensors").write_bytes(b"x" * 100000)
    (folder / "half.safetensors").write_bytes(b"y" * 1000)
    print("writing", flush=True)
    time.sleep(60)

VersionRegistry(redis.Redis.from_url(sys.argv[1]), "reward_model", sys.argv[2]).write_version(write, {})
"""


def test_a_writer_killed_while_writing_leaves_no_version(redis_server, redis_client, tmp_path):
    root = tmp_path / "reward_models"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, redis_server.url, str(root)], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[2])
    assert writer.stdout.readline().strip() == "writing"
    kill(writer)
    writer.stdout.close()
    assert [p.name for p in root.iterdir() if not p.name.startswith(".tmp-v1-") and p.name not in CONTROL_FILES] == []
    registry = VersionRegistry(redis_client, "reward_model", root)
    assert registry.versions() == [] and registry.current_version() == 0
    record = registry.write_version(lambda folder: (folder / "model.safetensors").write_bytes(b"ok"), {})
    assert record.version == 2  # the number the dead writer had taken is not reused
    assert assert_registry_consistent(redis_client, "reward_model", root) == [2]
    registry.rebuild_from_disk()  # sweeps the dead writer's temporary folder
    assert [p.name for p in root.iterdir() if p.name not in CONTROL_FILES] == ["v2"]
    assert assert_registry_consistent(redis_client, "reward_model", root) == [2]


def test_a_registry_rebuild_skips_garbage_manifests(redis_client, tmp_path):
    registry = VersionRegistry(redis_client, "reward_model", tmp_path)
    registry.write_version(lambda folder: (folder / "model.safetensors").write_bytes(b"a"), {})
    registry.write_version(lambda folder: (folder / "model.safetensors").write_bytes(b"b"), {})
    (tmp_path / "v2" / "manifest.json").write_text("[1, 2]")
    assert registry.rebuild_from_disk() == 1
    assert [r.version for r in registry.versions()] == [1]



@pytest.mark.parametrize("damage", ["truncate", "garbage-manifest", "checksum-mismatch"])
def test_a_damaged_reward_model_is_refused_for_training(redis_client, tmp_path, tiny_model_dir, damage):
    from flywheel.contracts.artifacts import ArtifactError
    from training.policy_run import PolicyModelCache
    from training.reward_model_run import _parent, reward_model_config

    settings = FlywheelConfig.load({"model": str(tiny_model_dir), "data_dir": str(tmp_path)}, environ={})
    promote_reward_model(redis_client, settings)
    registry = open_registry(redis_client, settings.data_dir, REWARD_MODEL_KIND)
    weights, manifest = registry.path(1) / "model.safetensors", registry.path(1) / "manifest.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "garbage-manifest":
        manifest.write_text("{]")
    else:
        data = json.loads(manifest.read_text())
        data["files"]["model.safetensors"] = "f" * 64
        manifest.write_text(json.dumps(data))
    current = registry.current()
    with pytest.raises(ArtifactError, match="v1"):  # PPO does not train against it
        PolicyModelCache().reward_model(current, registry.path(1))
    with pytest.raises(ArtifactError, match="v1"):  # the next reward-model run does not warm-start from it
        _parent(registry, current, reward_model_config(settings))
