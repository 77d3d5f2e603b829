"""The whole loop through ``flywheel up`` (real processes, real Redis, real Celery workers, real gRPC),
driven by the demo's simulated users on a tiny model: rankings in through gRPC, a reward model and
a policy promoted, the server swapped to the new version, a rollback swapped back, metrics scraped
from every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TINY_LOOP = {
    "DTYPE": "float32", "REWARD_MODEL_AUTOCAST": "float32", "REWARD_MODEL_EPOCHS": "1",
    "POLICY_ITERATIONS": "1", "POLICY_BATCH_SIZE": "8", "POLICY_MINI_BATCH_SIZE": "4", "POLICY_PPO_EPOCHS": "2",
    "POLICY_RESPONSE_LENGTH": "4", "POLICY_AUTOCAST": "float32", "POLICY_LORA_RANK": "4",
    # a random tiny model cannot improve; the gates' plumbing is what is tested here
    "REWARD_MODEL_MIN_ACCURACY": "-1", "POLICY_HELDOUT_FRACTION": "0.5", "POLICY_MIN_REWARD_GAIN": "-1000", "POLICY_KL_BUDGET": "1000000", "POLICY_PERPLEXITY_MARGIN": "1000",
}


def clean_environment() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") and k != "REDIS_URL"}


def run_demo(tmp_path, model: str, extra_env: dict, args: list[str], timeout: float) -> tuple[dict, str]:
    env = clean_environment() | {f"FLYWHEEL_{k}": v for k, v in extra_env.items()}
    summary_path = tmp_path / "summary.json"
    out = subprocess.run([sys.executable, "-m", "flywheel.app.demo", "--summary-json", str(summary_path),
                          "--progress-seconds", "5", *(["--model", model] if model else []), *args],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert summary_path.exists(), out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(summary_path.read_text()), out.stdout + out.stderr


def test_the_whole_loop_through_flywheel_up(tiny_model_dir, tmp_path):
    summary, output = run_demo(tmp_path, str(tiny_model_dir), TINY_LOOP,
                               ["--rankings", "16", "--n", "2", "--max-new-tokens", "4", "--budget-minutes", "8"],
                               timeout=600)
    assert summary.get("outcome") == "promoted", output[-4000:]
    assert summary["up_exit_code"] == 0, output[-4000:]
    assert summary["rounds"][0]["rankings"] == 16
    assert summary["promoted_version"] == 1
    assert summary["rollback"] == {"from": 1, "to": 0, "seconds": summary["rollback"]["seconds"]}
    assert summary["repromote"]["to"] == 1
    server, labelling, training = (summary["metrics"][name] for name in ("server", "labelling worker",
                                                                          "training worker"))
    assert server['flywheel_rankings_accepted_total{source="human"}'] == 16
    assert server["flywheel_serving_policy_version"] == 1
    assert server["flywheel_policy_swaps_total"] >= 3  # v0 -> v1, the rollback, the promotion
    assert training['flywheel_reward_model_runs_total{outcome="promoted"}'] == 1
    assert training['flywheel_ppo_runs_total{outcome="promoted"}'] == 1
    assert any(name.startswith("flywheel_labelling_") for name in labelling)
    assert 0.0 <= summary["win_rate"]["rate"] <= 1.0 and summary["eval_questions"] >= 40
    assert summary["win_rate"]["low"] <= summary["win_rate"]["rate"] <= summary["win_rate"]["high"]
    assert summary["preference"] == "no-hedging"
    assert "win rate vs v0" in output and "length-controlled" in output and "operator rollback v1 -> v0" in output
    assert not (tmp_path / ".flywheel" / "demo" / "redis" / "redis.url").exists(), "embedded Redis left running"
