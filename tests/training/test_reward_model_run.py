"""Incremental reward-model runs against a real Redis: learning the rule, warm starts with replay,
acknowledging only after the version is written, the accuracy gate, the run lock."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flywheel.config import FlywheelConfig
from support.rankings import publish_rankings
from flywheel.contracts.artifacts import REWARD_MODEL_KIND
from flywheel.contracts.heldout import is_held_out
from flywheel.contracts.keys import RANKINGS_STREAM, REWARD_MODEL_CONSUMER_GROUP, REWARD_MODEL_RUN_LOCK_KEY, group_key
from flywheel.registry import open_registry
from flywheel.run_lock import RunLock
from training.rankings import ReplayStore
from training.reward_model_run import RewardModelCache, run_reward_model_training
from support.synthetic import synthetic_rankings

HELD_OUT = 0.25


def tiny_settings(tmp_path: Path, model_dir: Path, **overrides) -> FlywheelConfig:
    values = dict(data_dir=tmp_path / "data", model=str(model_dir), reward_model_learning_rate=2e-3,
                  reward_model_trainable_layers=-1, reward_model_autocast="float32", reward_model_max_length=96,
                  reward_model_heldout_fraction=HELD_OUT, reward_model_epochs=2, reward_model_batch_rankings=8,
                  reward_model_accuracy_margin=0.02, reward_model_replay_ratio=1.0)
    values.update(overrides)
    return FlywheelConfig.load(values, environ={})


def pending(client) -> int:
    return int(client.xpending(RANKINGS_STREAM, REWARD_MODEL_CONSUMER_GROUP)["pending"])


@pytest.fixture(scope="module")
def cache():
    return RewardModelCache()


def test_a_run_learns_shorter_wins_then_warm_starts_with_replay_and_a_worse_version_is_not_promoted(
        redis_client, tmp_path, tiny_model_dir, cache):
    settings = tiny_settings(tmp_path, tiny_model_dir)
    publish_rankings(redis_client, synthetic_rankings(96, seed=1))

    first = run_reward_model_training(settings, redis_client, cache=cache, who="test")
    assert first.outcome == "promoted" and first.version == 1
    assert first.figures["heldout_accuracy"] > 0.8, first.figures  # chance is 0.5
    assert pending(redis_client) == 0  # acknowledged after the version was written
    registry = open_registry(redis_client, settings.data_dir, REWARD_MODEL_KIND)
    v1 = registry.get(1)
    used = v1.manifest["rankings"]
    assert used["new"] + used["new_held_out"] == 96 and used["replayed"] == 0 and used["human"] == used["count"]
    assert used["stream"]["entries"] == 96 and used["stream"]["first_id"] < used["stream"]["last_id"]
    assert (registry.path(1) / "model.safetensors").exists() and registry.current_version() == 1
    assert len(ReplayStore(settings.data_dir / "reward_models" / "rankings.jsonl").load()) == 96

    # nothing new: nothing to do
    assert run_reward_model_training(settings, redis_client, cache=cache).outcome == "skipped"

    # new rankings under the opposite rule ("the longer wins"), all in the training slice
    reversed_rankings = [r for r in synthetic_rankings(64, seed=7, reverse=True, prefix="rev")
                         if not is_held_out(r.group_id, HELD_OUT)]
    publish_rankings(redis_client, reversed_rankings)
    worse = run_reward_model_training(tiny_settings(tmp_path, tiny_model_dir, reward_model_epochs=4,
                                                    reward_model_replay_ratio=0.0), redis_client, cache=cache)
    assert worse.outcome == "rejected" and worse.version == 2
    assert registry.current_version() == 1
    v2 = registry.get(2)
    assert v2.status == "rejected" and v2.parent == 1
    assert v2.figures["heldout_accuracy"] < v2.figures["current_heldout_accuracy"] - 0.02
    assert json.loads((registry.path(2) / "manifest.json").read_text())["status"] == "rejected"
    assert pending(redis_client) == 0

    # more rankings under the true rule: warm start from v1 (not the rejected v2), with replay
    publish_rankings(redis_client, synthetic_rankings(24, seed=3, prefix="more"))
    third = run_reward_model_training(tiny_settings(tmp_path, tiny_model_dir, reward_model_accuracy_margin=0.2,
                                                    reward_model_replay_ratio=0.5), redis_client, cache=cache)
    assert third.outcome == "promoted" and third.version == 3, third
    v3 = registry.get(3)
    assert v3.parent == 1 and v3.manifest["rankings"]["replayed"] > 0
    assert registry.get(1).status == "superseded" and registry.current_version() == 3


def test_ai_rankings_count_separately_and_expired_groups_are_skipped(redis_client, tmp_path, tiny_model_dir, cache):
    settings = tiny_settings(tmp_path, tiny_model_dir, reward_model_epochs=1)
    publish_rankings(redis_client, synthetic_rankings(24, seed=4))
    publish_rankings(redis_client, synthetic_rankings(24, seed=5, source="ai", prefix="ai"))
    redis_client.delete(group_key("g4-0"))  # its group record expired before training
    report = run_reward_model_training(settings, redis_client, cache=cache)
    assert report.outcome == "promoted"
    used = open_registry(redis_client, settings.data_dir, REWARD_MODEL_KIND).get(report.version).manifest["rankings"]
    assert used["ai"] > 0 and used["human"] > 0 and used["stream"]["unusable"] == 1
    assert pending(redis_client) == 0


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import redis
    import training.reward_model as reward_model
    from flywheel.config import FlywheelConfig
    from training.reward_model_run import run_reward_model_training

    def save_half_then_die(state, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half a safetensors file")
        os.kill(os.getpid(), signal.SIGKILL)  # the worker dies while writing the version

    reward_model.save_file = save_half_then_die
    settings = FlywheelConfig.load(__import__("json").loads(sys.argv[2]), environ={})
    run_reward_model_training(settings, redis.Redis.from_url(sys.argv[1]), consumer="doomed")
""")


def test_a_run_killed_midway_leaves_no_version_and_its_entries_are_read_again(
        redis_server, redis_client, tmp_path, tiny_model_dir, cache):
    settings = tiny_settings(tmp_path, tiny_model_dir, reward_model_epochs=1, reward_model_lock_seconds=1.0)
    publish_rankings(redis_client, synthetic_rankings(32, seed=6))
    settings_json = json.dumps({"data_dir": str(settings.data_dir), "model": settings.model,
                                "reward_model_epochs": 1, "reward_model_lock_seconds": 1.0,
                                "reward_model_autocast": "float32", "reward_model_max_length": 96})
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, redis_server.url, settings_json],
                            cwd=Path(__file__).resolve().parents[1], timeout=120, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    registry = open_registry(redis_client, settings.data_dir, REWARD_MODEL_KIND)
    root = settings.data_dir / "reward_models"
    assert registry.versions() == [] and not list(root.glob("v*"))
    assert pending(redis_client) == 32  # read by the dead run, never acknowledged

    # the dead worker's lock expires by itself (nobody extends it); the next run takes its entries back
    deadline = time.monotonic() + 10
    while redis_client.exists(REWARD_MODEL_RUN_LOCK_KEY) and time.monotonic() < deadline:
        time.sleep(0.1)
    report = run_reward_model_training(settings, redis_client, cache=cache)
    assert report.outcome == "promoted", report
    record = registry.get(report.version)
    assert record.manifest["rankings"]["stream"]["entries"] == 32
    assert pending(redis_client) == 0
    assert not list(root.glob(".tmp-*")) or registry.rebuild_from_disk() == 1
    assert not list(root.glob(".tmp-*"))


def test_only_one_run_at_a_time_and_a_dead_holder_cannot_keep_the_lock(redis_client, tmp_path, tiny_model_dir):
    settings = tiny_settings(tmp_path, tiny_model_dir)
    publish_rankings(redis_client, synthetic_rankings(8, seed=8))
    with RunLock(redis_client, REWARD_MODEL_RUN_LOCK_KEY, ttl_seconds=5) as held:
        assert held
        report = run_reward_model_training(settings, redis_client)
        assert report.outcome == "skipped" and "lock" in report.reason
    # a holder that died: its key has a TTL and nobody extends it
    redis_client.set(REWARD_MODEL_RUN_LOCK_KEY, "dead-worker", px=300)
    assert not RunLock(redis_client, REWARD_MODEL_RUN_LOCK_KEY, 5).acquire()
    time.sleep(0.4)
    lock = RunLock(redis_client, REWARD_MODEL_RUN_LOCK_KEY, 5)
    assert lock.acquire()
    lock.release()
    assert not redis_client.exists(REWARD_MODEL_RUN_LOCK_KEY)


def test_a_version_has_two_calibrated_members_each_judged_on_rankings_it_never_trained_on(
        redis_client, tmp_path, tiny_model_dir, cache):
    import torch
    from safetensors.torch import load_file

    from flywheel.contracts.heldout import reward_model_member
    from training.policy_reward import RewardModelScorer
    from training.reward_model import RewardCalibration

    settings = tiny_settings(tmp_path, tiny_model_dir)
    rankings = synthetic_rankings(96, seed=11)
    publish_rankings(redis_client, rankings)
    report = run_reward_model_training(settings, redis_client, cache=cache, who="test")
    assert report.outcome == "promoted", report.reason
    registry = open_registry(redis_client, settings.data_dir, REWARD_MODEL_KIND)
    manifest = registry.get(1).manifest
    folder = registry.path(1)
    assert set(manifest["members"]) == {"policy", "judge"}
    policy_weights, judge_weights = (load_file(str(folder / f)) for f in ("model.safetensors", "judge.safetensors"))
    assert any(not torch.equal(policy_weights[k], judge_weights[k]) for k in policy_weights)  # two models
    train = [r for r in rankings if not is_held_out(r.group_id, HELD_OUT)]
    for member, entry in manifest["members"].items():
        assert entry["trained_on"] == sum(reward_model_member(r.group_id) == member for r in train)
        # evaluated on the held-out groups plus the other member's half: more than the trained-on half
        assert entry["evaluated_on"] == len(rankings) - entry["trained_on"]
        assert entry["heldout"]["low"] > 0.5 and entry["heldout"]["judged_on"] == "human"
        assert manifest["figures"][f"{member}_accuracy_low"] == entry["heldout"]["low"]

    # the calibration maps the served completions' scores to mean 0, std 1
    from training.reward_model import RewardModel, RewardModelConfig
    from transformers import AutoTokenizer
    stored = manifest["model"]
    model = RewardModel.from_backbone(RewardModelConfig(backbone=stored["backbone"],
                                                        trainable_layers=stored["trainable_layers"],
                                                        max_length=stored["max_length"], autocast_dtype="float32",
                                                        pooling=stored["pooling"]))
    model.load_stored(folder / "judge.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(stored["backbone"])
    calibration = RewardCalibration.from_dict(manifest["members"]["judge"]["calibration"])
    scorer = RewardModelScorer(model, eos_id=tokenizer.eos_token_id, calibration=calibration)
    pairs = [(r.prompt, c) for r in rankings for c in r.completions]
    scores = scorer([tokenizer(p, add_special_tokens=False).input_ids for p, _ in pairs],
                    [tokenizer(c, add_special_tokens=False).input_ids for _, c in pairs])
    assert abs(float(scores.mean())) < 0.2 and 0.8 < float(scores.std()) < 1.2
    from training.reward_model_run import CALIBRATION_COMPLETIONS
    assert abs(calibration.mean) > 0 and calibration.count == min(len(pairs), CALIBRATION_COMPLETIONS)


def test_random_rankings_never_give_a_reward_model(redis_client, tmp_path, tiny_model_dir, cache):
    """The null control: users who rank at random teach nothing, and the gate must know it. Over
    20 independent runs on random rankings at most one (5%) may pass; the same runs on a rule
    (shorter wins) pass, so the gate is not simply shut."""
    from support.synthetic import random_rankings

    promoted = []
    for trial in range(20):
        redis_client.flushall()
        settings = tiny_settings(tmp_path / f"trial{trial}", tiny_model_dir, reward_model_epochs=1)
        publish_rankings(redis_client, random_rankings(64, seed=100 + trial))
        report = run_reward_model_training(settings, redis_client, cache=cache, who="null-control")
        assert report.outcome in ("promoted", "rejected"), report.reason
        promoted.append(report.outcome == "promoted")
        if report.outcome == "rejected":
            assert "is not above 0.5" in report.reason
    assert sum(promoted) <= 1, f"{sum(promoted)} of 20 random-ranking runs promoted a reward model"

    redis_client.flushall()
    settings = tiny_settings(tmp_path / "rule", tiny_model_dir, reward_model_epochs=1)
    publish_rankings(redis_client, synthetic_rankings(64, seed=200))
    assert run_reward_model_training(settings, redis_client, cache=cache).outcome == "promoted"
