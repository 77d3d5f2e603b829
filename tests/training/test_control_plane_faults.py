"""The registry and the run locks under faults injected into real processes (issue 12, items 1-4):

- an operator rolls back while a run that started from the rolled-back version trains (the worker
  is paused with SIGSTOP at that moment): the run does not promote, promotion stays frozen until
  ``flywheel promote --resume``;
- a worker paused longer than its lock's TTL while another takes the lock: the paused run aborts
  when it resumes and promotes nothing;
- concurrent promotions from several processes: one current version, an audit with every change;
- a Redis reset after a change that died midway: the rebuild restores the pointer from disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.config import FlywheelConfig
from flywheel.contracts.artifacts import REWARD_MODEL_KIND
from flywheel.contracts.keys import RANKINGS_STREAM, REWARD_MODEL_CONSUMER_GROUP, REWARD_MODEL_RUN_LOCK_KEY
from flywheel.registry import CURRENT, ROLLED_BACK, PointerMoved, PromotionFrozen, VersionRegistry, open_registry
from flywheel.run_lock import RunLock
from support.policy import promote_reward_model
from support.rankings import publish_rankings
from support.synthetic import synthetic_rankings
from test_reward_celery import FLYWHEEL, wait_for, worker_env  # noqa: F401 (fixture)
from test_training_faults import Workers, assert_registry_consistent, send_task

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def paused_run_env(worker_env):
    worker_env.update({
        "FLYWHEEL_REWARD_MODEL_CHECK_SECONDS": "0",  # the only run is the task the test sends
        "FLYWHEEL_POLICY_TRAIN_AFTER_REWARD_MODEL": "false",
        "FLYWHEEL_REWARD_MODEL_ACCURACY_MARGIN": "1",  # the gate passes: only the registry may refuse
        "FLYWHEEL_REWARD_MODEL_EPOCHS": "20",  # seconds of training: the SIGSTOP lands before the run ends
    })
    return worker_env


@pytest.fixture
def workers(paused_run_env, tmp_path):
    pool = Workers(paused_run_env, tmp_path)
    yield pool
    pool.stop_all()  # resumes a worker the test left paused


def start_run_and_pause_after_set_up(env, workers, redis_client):
    """A reward-model run on a real worker, stopped (SIGSTOP) once it has read the current version
    and set up its models; returns the worker and the task's result."""
    published = publish_rankings(redis_client, synthetic_rankings(40, seed=7, prefix="p"))
    worker = workers.start()
    result = send_task(env, "training.train_reward_model", {"min_rankings": 1, "who": "fault-test"})
    with workers.log_on_failure(0):
        wait_for(lambda: "reward-model run:" in workers.log(0), 180, "the run to set up", worker)
    os.kill(worker.pid, signal.SIGSTOP)
    return worker, result, published


def test_a_rollback_during_a_run_is_never_undone_by_the_run(paused_run_env, workers, redis_client):
    settings = FlywheelConfig.load(environ=paused_run_env)
    assert promote_reward_model(redis_client, settings) == 1
    registry = open_registry(redis_client, settings.data_dir, REWARD_MODEL_KIND)
    worker, result, _ = start_run_and_pause_after_set_up(paused_run_env, workers, redis_client)

    registry.rollback(0, "alice", "v1 ranks answers badly")  # while the run that started from v1 is paused
    os.kill(worker.pid, signal.SIGCONT)
    with workers.log_on_failure(0):
        report = result.get(timeout=240)

    assert report["outcome"] == "rejected" and "not promoted" in report["reason"], report
    assert registry.pointer() == 0, "the run promoted a child of the version the operator rolled back"
    assert registry.get(1).status == ROLLED_BACK and registry.get(report["version"]).status == "rejected"
    assert registry.frozen()["who"] == "alice"
    assert_registry_consistent(redis_client, REWARD_MODEL_KIND, Path(settings.data_dir) / "reward_models")

    # a run that starts from v0 now passes the compare-and-set, but promotion stays frozen
    with pytest.raises(PromotionFrozen):
        registry.promote(report["version"], "a run", "gate passed", expected_current=0, automatic=True)


def test_a_run_whose_lease_lapsed_aborts_and_promotes_nothing(paused_run_env, workers, redis_client):
    paused_run_env["FLYWHEEL_REWARD_MODEL_LOCK_SECONDS"] = "2"
    settings = FlywheelConfig.load(environ=paused_run_env)
    registry = open_registry(redis_client, settings.data_dir, REWARD_MODEL_KIND)
    worker, result, published = start_run_and_pause_after_set_up(paused_run_env, workers, redis_client)

    second = RunLock(redis_client, REWARD_MODEL_RUN_LOCK_KEY, ttl_seconds=60)
    wait_for(second.acquire, 10, "the paused run's lease to lapse and a second run to take the lock")
    try:
        os.kill(worker.pid, signal.SIGCONT)
        with workers.log_on_failure(0), pytest.raises(Exception, match="lost the lock"):
            result.get(timeout=240)
        assert registry.pointer() == 0 and registry.versions() == [], "the run wrote or promoted after its lease"
        assert redis_client.get(REWARD_MODEL_RUN_LOCK_KEY).decode() == second.token  # not released by the first
        # its rankings stay pending for the run that holds the lock now
        assert int(redis_client.xpending(RANKINGS_STREAM, REWARD_MODEL_CONSUMER_GROUP)["pending"]) == len(published)
        # the worker logs the task's failure just after it stores it: wait for the line
        wait_for(lambda: "lost the lock" in workers.log(0), 30, "the worker to log the lost lease")
    finally:
        second.release()


PROMOTER = """
import sys, time
import redis
from flywheel.registry import VersionRegistry
registry = VersionRegistry(redis.Redis.from_url(sys.argv[1]), "policy", sys.argv[2])
versions, start = [int(v) for v in sys.argv[3].split(",")], float(sys.argv[4])
while time.time() < start:
    pass
for round in range(15):
    for version in versions:
        registry.promote(version, f"promoter {sys.argv[3]}", f"round {round}")
"""


def test_concurrent_promotions_leave_one_current_and_a_complete_audit(redis_server, redis_client, tmp_path):
    import time

    registry = VersionRegistry(redis_client, "policy", tmp_path / "policies")
    for _ in range(4):
        registry.write_version(lambda folder: (folder / "model.safetensors").write_bytes(b"w"), {})
    start = time.time() + 2
    promoters = [subprocess.Popen([sys.executable, "-c", PROMOTER, redis_server.url, str(tmp_path / "policies"),
                                   versions, str(start)], cwd=REPO) for versions in ("1,2", "3,4", "2,3")]
    assert [p.wait(120) for p in promoters] == [0, 0, 0]

    records = registry.versions()
    assert [r.version for r in records if r.status == CURRENT] == [registry.pointer()]
    on_disk = {v: json.loads((registry.path(v) / "manifest.json").read_text())["status"] for v in range(1, 5)}
    assert on_disk == {r.version: r.status for r in records}
    promotions = [e for e in reversed(registry.audit(1000)) if e["action"] == "promote"]
    assert len(promotions) == 3 * 15 * 2  # every promotion is in the audit
    chain = [e for e in promotions if e["from"] != e["to"]]
    assert all(later["from"] == earlier["to"] for earlier, later in zip(chain, chain[1:])), \
        "the audit misses a change of the pointer"
    assert chain[-1]["to"] == str(registry.pointer())


def test_a_run_promotes_only_from_the_version_it_started_from(redis_client, tmp_path):
    registry = VersionRegistry(redis_client, "policy", tmp_path)
    v1, v2 = (registry.write_version(lambda f: (f / "w.safetensors").write_bytes(b"w"), {}).version for _ in "ab")
    registry.promote(v1, "run", "first", expected_current=0, automatic=True)
    registry.rollback(0, "bob", "bad")  # then an operator resumes, but the pointer is not where the run began
    registry.resume("bob", "fixed")
    with pytest.raises(PointerMoved):
        registry.promote(v2, "run", "child of v1", expected_current=v1, automatic=True)
    assert registry.pointer() == 0
    registry.promote(v2, "run", "started from v0", expected_current=0, automatic=True)
    assert registry.pointer() == v2


def test_the_freeze_shows_in_status_and_promote_resume_lifts_it(redis_server, redis_client, tmp_path):
    data = tmp_path / "data"
    registry = open_registry(redis_client, data, "policy")
    version = registry.write_version(lambda f: (f / "w.safetensors").write_bytes(b"w"), {"format": "lora"}).version
    registry.promote(version, "run", "first", expected_current=0, automatic=True)
    env = dict(os.environ, REDIS_URL=redis_server.url, FLYWHEEL_DATA_DIR=str(data),
               FLYWHEEL_GRPC_ADDRESS="127.0.0.1:1")
    subprocess.run([*FLYWHEEL, "rollback", "--reason", "complaints"], env=env, check=True, cwd=REPO)
    shown = subprocess.run([*FLYWHEEL, "status", "--timeout", "1"], env=env, cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 1, shown.stderr  # no server at 127.0.0.1:1: said, and the registry still shown
    status = shown.stdout
    assert "FROZEN" in status and "complaints" in status
    resumed = subprocess.run([*FLYWHEEL, "promote", "--resume", "--reason", "v1 fixed upstream"], env=env,
                             check=True, cwd=REPO, capture_output=True, text=True).stdout
    assert "resumed" in resumed and registry.frozen() is None
    assert registry.audit(1)[0]["action"] == "resume"


def test_v0_is_stored_and_a_rebuild_after_a_reset_restores_the_pointer(redis_server, redis_client, tmp_path):
    registry = VersionRegistry(redis_client, "policy", tmp_path)
    assert registry.pointer() is None and registry.initialize_if_fresh() and registry.pointer() == 0
    v1, v2 = (registry.write_version(lambda f: (f / "w.safetensors").write_bytes(b"w"), {}).version for _ in "ab")
    registry.promote(v1, "alice", "good")
    registry.rollback(0, "alice", "to the base")
    assert redis_client.get(registry.current_key) == b"0"  # not an absent key: absent means lost
    registry.promote(v2, "alice", "good")
    # a change that died midway left v2's manifest as it was (candidate) and v1's marked current
    for version, status in ((v1, "current"), (v2, "candidate")):
        path = registry.path(version) / "manifest.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"status": status}))
    redis_client.flushall()  # a Redis reset (or a failover to an empty replica)
    assert registry.pointer() is None and not registry.initialize_if_fresh()  # lost, not fresh
    registry.rebuild_from_disk()
    assert registry.pointer() == v2 and registry.get(v2).status == CURRENT and registry.get(v1).status != CURRENT
