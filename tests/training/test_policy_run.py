"""A policy run end to end on a tiny model: prompts from served groups, a version written atomically
with the serving contract's manifest, promoted or rejected by the gate; promote and rollback."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.config import FlywheelConfig
from support.policy import TINY_PPO, one_thread, promote_reward_model, store_served_groups  # noqa: F401
from flywheel.contracts.artifacts import POLICY_KIND
from flywheel.contracts.heldout import judge_trains_on
from flywheel.contracts.keys import POLICY_RUN_LOCK_KEY, registry_channel
from flywheel.policy_admin import promote_policy, rollback_policy
from flywheel.registry import open_registry
from training.policy_model import PolicyWithValueHead
from training.policy_run import run_policy_training
from training.rankings import Ranking
from training.reward_model_run import replay_store

FLYWHEEL = [sys.executable, "-m", "flywheel.app.cli"]  # the `flywheel` command of this checkout


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def settings(tmp_path, tiny_model_dir):
    return FlywheelConfig.load({"data_dir": tmp_path / "data", "model": str(tiny_model_dir)} | TINY_PPO, environ={})


def test_a_run_without_a_reward_model_is_skipped(settings, redis_client):
    assert run_policy_training(settings, redis_client).outcome == "skipped"


def test_a_policy_run_registers_an_atomically_written_version_and_the_gate_decides(
        settings, redis_client, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reward_version = promote_reward_model(redis_client, settings)
    store_served_groups(redis_client, tokenizer, 16)
    # rankings of groups the judge member trains on: the gate's held-out verdict, never PPO's episodes
    judge_groups = [g for g in (f"judged{i}" for i in range(200))
                    if judge_trains_on(g, settings.reward_model.heldout_fraction)][:3]
    replay_store(settings).append([Ranking(f"r-{g}", g, "Tell me about rivers.", ["Rivers flow.", "I do not know."])
                                   for g in judge_groups])
    pubsub = redis_client.pubsub()
    pubsub.subscribe(registry_channel(POLICY_KIND))

    report = run_policy_training(settings, redis_client, who="test")
    assert report.outcome == "promoted", report.reason
    registry = open_registry(redis_client, settings.data_dir, POLICY_KIND)
    assert registry.current_version() == report.version == 1
    folder = registry.path(1)
    assert not list(folder.parent.glob(".tmp-*"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "lora"
    assert manifest["base_model"] == str(tiny_model_dir)
    assert manifest["reward_model_version"] == reward_version
    assert manifest["reward_length"] == "neutral"  # the default: PPO is not paid for length
    assert manifest["parent"] == 0
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert manifest["prompts"]["gate_rankings"] == 3 and manifest["figures"]["users_verdict_rankings"] == 3.0
    assert isinstance(manifest["figures"]["users_verdict_low"], float)
    for figure in ("reward_gain", "kl_to_ref", "perplexity_ratio", "train_policy_loss", "train_value_loss",
                   "train_clipfrac", "train_approx_kl", "train_entropy", "train_mean_reward"):
        assert figure in manifest["figures"]
    events = []
    while (message := pubsub.get_message(timeout=1.0)) is not None:
        if message["type"] == "message":
            events.append(json.loads(message["data"])["action"])
    assert "promote" in events

    # what the server does with it: the base model + the adapter (peft), no pickle anywhere
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(manifest["base_model"])
    served = PeftModel.from_pretrained(base, str(folder))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in served.named_parameters())

    # a second run warm-starts from v1; an impossible reward-gain bar rejects it, with its figures
    strict = FlywheelConfig.load({"data_dir": settings.data_dir, "model": settings.model} | TINY_PPO
                           | {"policy_min_reward_gain": "1000"}, environ={})
    report = run_policy_training(strict, redis_client, who="test")
    assert report.outcome == "rejected" and "reward gain" in report.reason
    rejected = registry.get(2)
    assert rejected.status == "rejected" and rejected.parent == 1 and "reward_gain" in rejected.figures
    assert registry.current_version() == 1
    # the gate judged with the judge member on several paired samples, a seed drawn per run
    for figure in ("reward_gain_low", "reward_gain_high", "policy_member_gain"):
        assert figure in rejected.figures
    assert rejected.manifest["gate"]["samples_per_prompt"] == 4
    assert rejected.manifest["gate"]["seed"] != manifest["gate"]["seed"]
    # the adaptive-KL state of run 1 is where run 2 started
    assert rejected.manifest["kl_controller"]["start"] == manifest["kl_controller"]["end"]


def test_a_run_without_held_out_prompts_is_skipped_not_judged_on_training_prompts(settings, redis_client,
                                                                                  tiny_model_dir):
    from transformers import AutoTokenizer

    promote_reward_model(redis_client, settings)
    store_served_groups(redis_client, AutoTokenizer.from_pretrained(tiny_model_dir), 16)
    none_held = FlywheelConfig.load({"data_dir": settings.data_dir, "model": settings.model} | TINY_PPO
                                    | {"policy_heldout_fraction": "0"}, environ={})
    report = run_policy_training(none_held, redis_client)
    assert report.outcome == "skipped" and "held-out prompts" in report.reason


def test_a_reward_model_without_a_judge_member_is_not_trained_against(settings, redis_client, tiny_model_dir):
    from transformers import AutoTokenizer

    registry = open_registry(redis_client, settings.data_dir, "reward_model")
    promote_reward_model(redis_client, settings)
    record = registry.current()
    record.manifest.pop("members")
    redis_client.hset(registry.versions_key, record.version, json.dumps(record.manifest))
    store_served_groups(redis_client, AutoTokenizer.from_pretrained(tiny_model_dir), 16)
    report = run_policy_training(settings, redis_client)
    assert report.outcome == "skipped" and "judge" in report.reason


def test_a_writer_that_fails_midway_leaves_no_version(settings, redis_client, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    promote_reward_model(redis_client, settings)
    store_served_groups(redis_client, AutoTokenizer.from_pretrained(tiny_model_dir), 12)

    def crash(self, folder):
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(PolicyWithValueHead, "save", crash)
    with pytest.raises(OSError):
        run_policy_training(settings, redis_client)
    registry = open_registry(redis_client, settings.data_dir, POLICY_KIND)
    assert registry.versions() == [] and registry.current_version() == 0
    assert not any(p.name.startswith(("v", ".tmp")) for p in registry.root_dir.iterdir())
    assert not redis_client.exists(POLICY_RUN_LOCK_KEY)


def _version(registry, who="test"):
    record = registry.write_version(lambda folder: (folder / "adapter_model.safetensors").write_bytes(b"x"),
                                    {"format": "lora", "parent": registry.current_version()})
    return record.version


def test_promote_and_rollback_follow_the_previous_good_version_and_are_audited(redis_client, tmp_path):
    registry = open_registry(redis_client, tmp_path, POLICY_KIND)
    v1, v2, v3 = _version(registry), _version(registry), _version(registry)
    promote_policy(registry, v1, "alice", "first")
    promote_policy(registry, v2, "alice", "better")
    registry.reject(v3, "gate", "worse")
    assert [r.status for r in registry.versions()] == ["superseded", "current", "rejected"]

    rollback_policy(registry, None, "bob", "complaints")          # previous good = v1
    assert registry.current_version() == v1
    assert registry.get(v2).status == "rolled_back"
    rollback_policy(registry, None, "bob", "still bad")           # v2 was rolled back: not good → base
    assert registry.current_version() == 0
    assert redis_client.get(registry.current_key) == b"0"  # v0 is stored, not an absent key
    with pytest.raises(ValueError):
        rollback_policy(registry, None, "bob", "nothing left")
    promote_policy(registry, v3, "carol", "try it anyway")         # a rejected version, by hand
    assert registry.current_version() == v3
    with pytest.raises(ValueError):
        promote_policy(registry, 99, "carol", "missing")

    audit = registry.audit()
    assert (audit[0]["action"], audit[0]["who"], audit[0]["to"]) == ("promote", "carol", str(v3))
    assert "overrides the gate" in audit[0]["why"]
    assert [(e["action"], e["who"], e["why"]) for e in audit[1:3]] == [
        ("rollback", "bob", "still bad"), ("rollback", "bob", "complaints")]


def test_the_policy_commands(redis_server, redis_client, tmp_path):
    registry = open_registry(redis_client, tmp_path, POLICY_KIND)
    v1, v2 = _version(registry), _version(registry)
    env = dict(os.environ, REDIS_URL=redis_server.url, FLYWHEEL_DATA_DIR=str(tmp_path), USER="dora")

    def flywheel(*args):
        done = subprocess.run([*FLYWHEEL, *args], env=env, capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout + done.stderr

    assert flywheel("promote", str(v1), "--reason", "ship it")[0] == 0
    assert flywheel("promote", str(v2))[0] == 0
    code, out = flywheel("rollback", "--reason", "regression")
    assert code == 0 and "v1 is current" in out
    code, out = flywheel("policies")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["version", "status", "parent", "reward"]
    assert lines[1].startswith("v0") and lines[2].startswith("v1 *") and "rolled_back" in lines[3]
    assert flywheel("rollback", "--to", "7")[0] == 2
    assert registry.audit()[0]["who"] == "dora" and registry.audit()[0]["why"] == "regression"


def test_a_reward_model_calibrated_without_a_length_fit_is_used_with_its_length_dependence(settings):
    from training.policy_run import reward_length
    from training.reward_model import RewardCalibration

    fitted = RewardCalibration(0.0, 1.0, 8, length_slope=-0.3, length_center=2.0, residual_std=0.9)
    old = RewardCalibration(0.0, 1.0, 8)  # a version written before calibrations fitted length
    assert reward_length(settings.policy, {"policy": fitted, "judge": fitted}, 1) == "neutral"
    assert reward_length(settings.policy, {"policy": fitted, "judge": old}, 1) == "learned"
    learned = FlywheelConfig.load({"data_dir": settings.data_dir, "model": settings.model,
                                   "policy_reward_length": "learned"}, environ={})
    assert reward_length(learned.policy, {"policy": fitted, "judge": fitted}, 1) == "learned"
    with pytest.raises(ValueError, match="reward_length"):
        FlywheelConfig.load({"data_dir": settings.data_dir, "policy_reward_length": "short"}, environ={})
