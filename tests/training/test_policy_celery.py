"""A real Celery worker on the training queue: a promoted reward model enqueues a PPO run that
promotes policy v1, ``flywheel train policy`` runs another on demand, ``/metrics`` reports them."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pytest

from flywheel.contracts.artifacts import POLICY_KIND
from flywheel.contracts.keys import registry_current_key

from support.policy import TINY_PPO, store_served_groups
from support.rankings import publish_rankings
from test_reward_celery import FLYWHEEL, wait_for, worker, worker_env  # noqa: F401 (fixtures)
from support.synthetic import synthetic_rankings


@pytest.fixture
def policy_worker_env(worker_env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write one line about the number {i}."}) + "\n"
                               for i in range(12)))
    worker_env.update({f"FLYWHEEL_{name.upper()}": value for name, value in TINY_PPO.items()})
    worker_env["FLYWHEEL_POLICY_PROMPTS_FILE"] = str(prompts)
    return worker_env


def test_a_promoted_reward_model_triggers_a_policy_run_and_the_cli_runs_one(
        policy_worker_env, worker, redis_client, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    def current_policy():
        raw = redis_client.get(registry_current_key(POLICY_KIND))
        return int(raw) if raw else 0

    store_served_groups(redis_client, AutoTokenizer.from_pretrained(tiny_model_dir), 8, prefix="served")
    publish_rankings(redis_client, synthetic_rankings(24, seed=2, prefix="h"))  # → reward model v1 → PPO
    try:
        wait_for(lambda: current_policy() == 1, 240, "the triggered PPO run to promote policy v1", worker)
    except AssertionError:
        print((tmp_path / "worker.log").read_text()[-6000:])
        raise

    port = policy_worker_env["FLYWHEEL_TRAINING_METRICS_PORT"]

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    # the pointer moves at the promotion; the run's outcome is counted when its task returns, a moment later
    wait_for(lambda: 'flywheel_ppo_runs_total{outcome="promoted"}' in scrape(), 30, "the PPO run to be counted",
             worker)
    metrics = scrape()
    assert "flywheel_policy_current_version 1.0" in metrics
    assert 'flywheel_ppo_runs_total{outcome="promoted"} 1.0' in metrics
    for name in ("flywheel_ppo_mean_reward", "flywheel_ppo_kl_to_ref_nats", "flywheel_ppo_policy_loss",
                 "flywheel_ppo_value_loss", "flywheel_ppo_clip_ratio", "flywheel_ppo_approx_kl_nats",
                 "flywheel_ppo_entropy_nats", "flywheel_ppo_eta_seconds", "flywheel_ppo_episodes_total 8.0"):
        assert name in metrics

    cli = subprocess.run([*FLYWHEEL, "train", "policy"], env=policy_worker_env, capture_output=True,
                         text=True, timeout=240, cwd=tmp_path)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert '"version": 2' in cli.stdout and '"outcome": "promoted"' in cli.stdout

    listing = subprocess.run([*FLYWHEEL, "policies"], env=policy_worker_env, capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = listing.stdout.splitlines()
    assert rows[2].split()[:4] == ["v1", "superseded", "v0", "v1"]  # parent: the base model
    assert rows[3].split()[:5] == ["v2", "*", "current", "v1", "v1"]
