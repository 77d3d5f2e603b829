"""``make demo``: the whole loop on the embedded defaults, driven by simulated users.

1. ``flywheel up`` starts the platform (embedded Redis, gRPC server, labelling and training
   workers, beat) on the embedded SmolLM2-135M-Instruct, in a fresh demo data directory.
2. Version 0 answers the evaluation questions (ones no user ever asks): the "before".
3. Simulated users (``flywheel.app.simulated_users``) ask the other questions through the public
   gRPC API, get ``n`` answers each and rank them by a stated preference (``--preference``; by
   default one that is not about length, so truncating answers cannot fake the result).
4. The loop moves by itself: enough rankings trigger a reward-model run, a promoted reward model
   triggers a PPO run, the gate decides, a promoted policy reaches the server by hot-swap. If the
   gate rejects a candidate, the users rank another round.
5. The promoted version answers the same questions with the same seeds: the "after". A table
   compares them: win rate against version 0 under the users' preference and its
   length-controlled variant, reward-model accuracy, KL to version 0, time. Then an operator's rollback and re-promotion, timed, and the
   metrics of every process.

Progress is printed every ``--progress-seconds``. ``--summary-json`` writes the figures for scripts
and the whole-loop test (which runs this with a tiny model).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel.api_keys import ROLE_ADMIN, ROLE_CLIENT, KeyFile, default_keys_file
from flywheel.app import simulated_users as simulated
from flywheel.app.preferences import PREFERENCES, WinRate, win_rate
from flywheel.app.tables import format_table, plain_text
from flywheel.grpc_client import with_key
from flywheel.redis_server import free_port, open_redis
from flywheel.config import ENV_PREFIX, FlywheelConfig
from flywheel.tls import channel_credentials
from flywheel.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_PREFERENCE = "no-hedging"  # not about length: a policy cannot win it by talking less

# The loop's settings for the demo, unless the environment sets them: one reward-model run per
# round of rankings, a PPO run long enough to move the policy, and an idle AI labeler (the
# simulated users rank every training group; the judge would only compete for the two cores).
DEMO_DEFAULTS = {
    "REWARD_MODEL_CHECK_SECONDS": "3",
    "REWARD_MODEL_EPOCHS": "2",
    "REWARD_MODEL_LEARNING_RATE": "3e-4",  # one round: ~60 steps from a fresh head (3e-5 learned only length)
    "POLICY_ITERATIONS": "8",
    # 16 prompts x 4 samples an iteration, steps of 16 episodes: at 8 prompts x 4 in steps of 8 the
    # reward model's noise spent the KL stop (score flat over 7 iterations); same data, plain-words:
    # win rate 0.60 -> 0.64, the judge's gain +0.02 -> +0.09, for ~3.5 more minutes a round
    "POLICY_BATCH_SIZE": "64",
    "POLICY_MINI_BATCH_SIZE": "16",
    "POLICY_RESPONSE_LENGTH": "64",
    "POLICY_POLL_SECONDS": "2",
    # the gate: ~60 held-out prompts (of the ~200 distinct ones a round's users ask) x 4 paired samples
    # per policy; at 40 its interval of the judge's gain was about +-0.15, as wide as a round's gains
    "POLICY_HELDOUT_FRACTION": "0.3",
    "POLICY_MAX_HELDOUT": "64",
    "LABELLING_FRACTION": "0",
}
# With --ai-fraction F (RLAIF): the users leave a share F of the groups unranked and the labeler
# ranks them a few seconds after they were served; it also ranks a fifth of the groups the users
# ranked, so that AI-human agreement is measured, and that agreement sets the AI rankings' weight
# in the reward model (training.ai_weight). Its judge is the embedded model unless
# FLYWHEEL_JUDGE_URL names an OpenAI-compatible endpoint.
RLAIF_DEFAULTS = {
    "LABELLING_DELAY_SECONDS": "10",
    "LABELLING_SCHEDULE_SECONDS": "5",
    "LABELLING_FRACTION": "0.2",
}


@dataclass
class DemoConfig:
    data_dir: Path
    model: str
    rankings_per_round: int = 256
    max_rounds: int = 3
    budget_minutes: float = 30.0
    users: int = 4
    preference: str = DEFAULT_PREFERENCE
    plan: simulated.SamplingPlan = field(default_factory=simulated.SamplingPlan)
    progress_seconds: float = 15.0
    summary_json: Path | None = None
    startup_timeout: float = 600.0
    ai_fraction: float = 0.0  # share of the groups the users leave to the AI labeler

    def __post_init__(self) -> None:
        if not 0.0 <= self.ai_fraction < 1.0:
            raise ValueError(f"--ai-fraction must be at least 0 and below 1 (the users rank the rest); got "
                             f"{self.ai_fraction}")


class Platform:
    """``flywheel up`` in a subprocess, with the ports it was given."""

    def __init__(self, config: DemoConfig, operator_key: str) -> None:
        self.grpc_port, self.metrics_port, self.labelling_port, self.training_port = (free_port() for _ in range(4))
        env = dict(os.environ)
        if config.ai_fraction > 0:
            for name, value in RLAIF_DEFAULTS.items():
                env.setdefault(ENV_PREFIX + name, value)
        for name, value in DEMO_DEFAULTS.items():
            env.setdefault(ENV_PREFIX + name, value)
        # a round's run starts once the users' share is in (the labeler's confident rankings add to it)
        env[ENV_PREFIX + "REWARD_MODEL_TRIGGER_RANKINGS"] = env.get(
            ENV_PREFIX + "REWARD_MODEL_TRIGGER_RANKINGS",
            str(max(1, round(config.rankings_per_round * (1.0 - config.ai_fraction)))))
        env[ENV_PREFIX + "DATA_DIR"] = str(config.data_dir)
        if config.model:
            env[ENV_PREFIX + "MODEL"] = config.model
        self.settings = FlywheelConfig.load(environ=env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flywheel.app.cli", "up", "--data-dir", str(config.data_dir),
             "--grpc-address", f"127.0.0.1:{self.grpc_port}", "--metrics-port", str(self.metrics_port),
             "--labelling-metrics-port", str(self.labelling_port), "--training-metrics-port", str(self.training_port)],
            env=env, stdin=subprocess.DEVNULL)
        address = f"127.0.0.1:{self.grpc_port}"
        credentials = channel_credentials(self.settings.client)
        # users send their own keys per call; the operator's channel adds the admin key to each call
        self.channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        self.operator_channel = with_key(self.channel, operator_key)
        self.admin = admin_pb2_grpc.AdminStub(self.operator_channel)

    def wait_until_serving(self, timeout: float) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)  # open without a key, as probes need
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"flywheel up exited with code {self.process.returncode}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not serving after {timeout:.0f} s")
            time.sleep(1.0)

    def status(self) -> admin_pb2.PlatformStatus:
        return self.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)

    def policies(self) -> admin_pb2.ListPoliciesResponse:
        return self.admin.ListPolicies(admin_pb2.ListPoliciesRequest(), timeout=10)

    def metrics(self, port: int) -> dict[str, float]:
        """A process's /metrics as {sample name with labels: value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def training_metrics(self) -> dict[str, float]:
        try:
            return self.metrics(self.training_port)
        except OSError:
            return {}

    def stop(self) -> int:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def runs(metrics: dict[str, float], family: str) -> dict[str, int]:
    """{outcome: count} of a ``*_runs_total{outcome=...}`` counter."""
    prefix = f'{family}{{outcome="'
    return {k[len(prefix):-2]: int(v) for k, v in metrics.items() if k.startswith(prefix)}


class Progress:
    """One line every few seconds: where the loop is, with rate and figures."""

    def __init__(self, platform: Platform, started: float, every: float) -> None:
        self.platform, self.started, self.every = platform, started, every
        self.rankings_target = 0
        self.tally: simulated.UserTally | None = None
        self.phase = "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="demo progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started (a failed start must not hide its own error)
            self._thread.join(timeout=5)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        parts = [f"[{int(elapsed // 60):2d}:{int(elapsed % 60):02d}] {self.phase}"]
        if self.tally is not None and self.phase.startswith("users ranking"):
            parts.append(f"rankings {self.tally.rankings}/{self.rankings_target}")
        try:
            status = self.platform.status()
            parts.append(f"serving v{status.serving_policy_version}, reward model v{status.reward_model_version}, "
                         f"{status.rankings_waiting} rankings waiting")
        except grpc.RpcError:
            pass
        m = self.platform.training_metrics()
        if runs(m, "flywheel_reward_model_runs_total") or m.get("flywheel_reward_model_heldout_accuracy_ratio"):
            parts.append(f"RM acc {m.get('flywheel_reward_model_heldout_accuracy_ratio', float('nan')):.3f}")
        if 0 < m.get("flywheel_reward_model_progress_ratio", 0) < 1:
            parts.append(f"reward model training {m['flywheel_reward_model_progress_ratio']:.0%} "
                         f"(ETA {m.get('flywheel_reward_model_eta_seconds', 0):.0f} s)")
        if 0 < m.get("flywheel_ppo_progress_ratio", 0) < 1:
            parts.append(f"PPO {m['flywheel_ppo_progress_ratio']:.0%} (score {m.get('flywheel_ppo_mean_score', 0):+.3f}, "
                         f"KL {m.get('flywheel_ppo_kl_to_ref_nats', 0):.2f}, ETA {m.get('flywheel_ppo_eta_seconds', 0):.0f} s)")
        return " | ".join(parts)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            print(self.line(), flush=True)


def run_counts(platform: Platform) -> tuple[dict[str, int], dict[str, int]]:
    """({outcome: reward-model runs}, {outcome: PPO runs}) so far, from the training worker."""
    m = platform.training_metrics()
    return runs(m, "flywheel_reward_model_runs_total"), runs(m, "flywheel_ppo_runs_total")


def wait_for_round(platform: Platform, before: tuple[dict[str, int], dict[str, int]], deadline: float) -> str:
    """Wait until the round's PPO run has ended, or its reward model was rejected; the outcome."""
    reward_before, ppo_before = before
    while time.monotonic() < deadline:
        if platform.process.poll() is not None:
            raise RuntimeError(f"flywheel up exited with code {platform.process.returncode}")
        reward, ppo = run_counts(platform)
        new_ppo = [k for k, v in ppo.items() if v > ppo_before.get(k, 0) and k != "skipped"]
        if new_ppo:
            return "promoted" if "promoted" in new_ppo and _newest_is_current(platform) else new_ppo[0]
        if reward.get("rejected", 0) > reward_before.get("rejected", 0):
            return "reward model rejected"
        time.sleep(2.0)
    return "out of time"


def gate_evidence(platform: Platform) -> dict[str, float]:
    """The gate's figures of the newest policy version (the round's candidate)."""
    listing = platform.policies()
    if not listing.policies:
        return {}
    newest = max(listing.policies, key=lambda p: p.version)
    return {name: newest.gate_metrics[name] for name in GATE_EVIDENCE if name in newest.gate_metrics}


GATE_EVIDENCE = ("reward_gain", "reward_gain_low", "users_verdict", "users_verdict_low", "policy_member_gain",
                 "kl_to_ref")


def describe_evidence(figures: dict[str, float]) -> str:
    if "reward_gain" not in figures:
        return ""
    text = f"judge gain {figures['reward_gain']:+.2f} (low {figures.get('reward_gain_low', float('nan')):+.2f})"
    if math.isfinite(figures.get("users_verdict", float("nan"))):
        text += f", users' held-out verdict {figures['users_verdict']:.3f} (low {figures['users_verdict_low']:.3f})"
    return text + f", PPO member gain {figures.get('policy_member_gain', float('nan')):+.2f}"


def _newest_is_current(platform: Platform) -> bool:
    listing = platform.policies()
    return bool(listing.policies) and listing.current_version == max(p.version for p in listing.policies)


def wait_for_serving(platform: Platform, version: int, timeout: float) -> float:
    """Seconds until this server samples from ``version``."""
    started = time.monotonic()
    while platform.status().serving_policy_version != version:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the server did not swap to v{version} within {timeout:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - started


def describe(rate: WinRate | None) -> str:
    return "n/a (control)" if rate is None else rate.describe()


def as_dict(rate: WinRate | None) -> dict | None:
    return None if rate is None else {"rate": rate.rate, "low": rate.low, "high": rate.high, "pairs": rate.pairs,
                                      "questions": rate.questions}


def length_figures(answers: dict[str, list[str]]) -> tuple[float, int]:
    texts = [t for ts in answers.values() for t in ts]
    return statistics.median(len(t.strip()) for t in texts), sum(not t.strip() for t in texts)


def reward_model_accuracy(platform: Platform, config: DemoConfig) -> float:
    from flywheel.contracts.artifacts import REWARD_MODEL_KIND
    from flywheel.registry import open_registry

    client, _ = open_redis(platform.settings.redis_url, config.data_dir)  # the platform's, running
    try:
        current = open_registry(client, platform.settings.data_dir, REWARD_MODEL_KIND).current()
        accuracy = current.figures.get("heldout_accuracy") if current else None
        return math.nan if accuracy is None else float(accuracy)  # None: no held-out rankings yet
    finally:
        client.close()


def rlaif_figures(platform: Platform, config: DemoConfig) -> dict:
    """What RLAIF did: rankings by source, the AI-human agreement the stream counted, and the AI
    weight the newest reward-model version trained with (its manifest)."""
    from flywheel.contracts.artifacts import REWARD_MODEL_KIND
    from flywheel.rankings_stream import RankingStream
    from flywheel.registry import open_registry

    client, _ = open_redis(platform.settings.redis_url, config.data_dir)  # the platform's, running
    try:
        stats = RankingStream(client).stats()
        registry = open_registry(client, platform.settings.data_dir, REWARD_MODEL_KIND)
        versions = registry.versions()
        newest = versions[-1] if versions else None
        return {
            "ai_fraction": config.ai_fraction, "rankings": stats.rankings,
            "agreement": stats.agreement.ratio if stats.agreement.pairs else None,
            "agreement_pairs": stats.agreement.pairs, "agreement_groups": stats.agreement_groups,
            "reward_model_version": newest.version if newest else None,
            "ai_weight": (newest.manifest.get("ai_weight") if newest else None),
        }
    finally:
        client.close()


def print_rlaif(figures: dict) -> None:
    rankings, weight = figures["rankings"], figures["ai_weight"]
    agreement = ("not measured yet (no group ranked by both)" if figures["agreement"] is None else
                 f"{figures['agreement']:.3f} over {figures['agreement_pairs']} pairs in "
                 f"{figures['agreement_groups']} groups")
    used = ("no reward model trained yet" if weight is None else
            f"AI weight {weight['weight']:.3f} in reward model v{figures['reward_model_version']} ({weight['why']})")
    print(f"== RLAIF (--ai-fraction {figures['ai_fraction']:g}): {rankings.get('human', 0)} human and "
          f"{rankings.get('ai', 0)} AI rankings; AI-human agreement {agreement}; {used}", flush=True)


def run_demo(config: DemoConfig) -> dict:
    from transformers import AutoTokenizer

    from flywheel.models import resolve_model_path

    started = time.monotonic()
    model_path = resolve_model_path(config.model, config.data_dir.parent)
    config.model = str(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if config.data_dir.exists():
        print(f"== removing the previous demo run in {config.data_dir}")
        shutil.rmtree(config.data_dir)
    # the operator and each simulated user get their own API key (hashed in the demo's keys file)
    keys = KeyFile(default_keys_file(config.data_dir))
    operator_key = keys.create("demo-operator", ROLE_ADMIN)
    evaluator = simulated.SimulatedUser("demo-evaluator", keys.create("demo-evaluator", ROLE_CLIENT))
    simulated_users = [simulated.SimulatedUser(name, keys.create(name, ROLE_CLIENT))
                       for name in (f"simulated-user-{i}" for i in range(config.users))]
    preference = PREFERENCES[config.preference]
    platform = Platform(config, operator_key)
    summary: dict = {"preference": preference.name, "preference_description": preference.description, "rounds": []}
    progress = Progress(platform, started, config.progress_seconds)
    try:
        train_questions, eval_questions = simulated.evaluation_split(simulated.question_pool())
        summary["eval_questions"] = len(eval_questions)
        print(f"== simulated users' preference: {preference.description}")
        print(f"== {len(train_questions)} questions the users ask, {len(eval_questions)} they never ask for the "
              f"before/after comparison")
        platform.wait_until_serving(config.startup_timeout)
        print(f"== platform up after {time.monotonic() - started:.0f} s (data dir {config.data_dir})", flush=True)
        progress.start()
        progress.phase = "version 0 answers the evaluation questions"
        before, versions = simulated.sample_answers(platform.channel, eval_questions, config.plan,
                                                      metadata=evaluator.metadata)
        assert versions == {0}, f"expected version 0 to answer, got {versions}"
        loop_started = time.monotonic()
        deadline = started + config.budget_minutes * 60
        outcome = "not started"
        for round_number in range(1, config.max_rounds + 1):
            counts_before = run_counts(platform)
            progress.phase, progress.rankings_target = f"users ranking (round {round_number})", config.rankings_per_round
            progress.tally = tally = simulated.UserTally()
            simulated.rank_rounds(platform.channel, train_questions, config.rankings_per_round, simulated_users,
                                  preference=preference, plan=config.plan, seed=round_number, tally=tally,
                                  ai_fraction=config.ai_fraction)
            if tally.errors:
                print(f"== {len(tally.errors)} user requests failed, e.g. {tally.errors[0]}")
            progress.phase = f"training (round {round_number})"
            outcome = wait_for_round(platform, counts_before, deadline)
            evidence = gate_evidence(platform) if outcome in ("promoted", "rejected") else {}
            summary["rounds"].append({"round": round_number, "rankings": tally.rankings, "outcome": outcome,
                                      "left_to_ai": tally.left_to_ai, "seconds": time.monotonic() - loop_started,
                                      "gate": evidence})
            print(f"== round {round_number}: {tally.rankings} rankings"
                  + (f" ({tally.left_to_ai} groups left to the AI labeler)" if config.ai_fraction else "")
                  + f" -> {outcome}" + (f": {describe_evidence(evidence)}" if evidence else ""), flush=True)
            if outcome == "promoted" or time.monotonic() > deadline:
                break
        if config.ai_fraction:
            summary["rlaif"] = rlaif_figures(platform, config)
            print_rlaif(summary["rlaif"])
        if outcome != "promoted":
            print(f"== no policy was promoted ({outcome}); nothing to compare", flush=True)
            summary["outcome"] = outcome
            return summary
        listing = platform.policies()
        promoted = listing.current_version
        swap_seconds = wait_for_serving(platform, promoted, 120)
        loop_seconds = time.monotonic() - loop_started
        progress.phase = f"v{promoted} answers the evaluation questions"
        after, versions = simulated.sample_answers(platform.channel, eval_questions, config.plan,
                                                      metadata=evaluator.metadata)
        progress.stop()
        assert versions == {promoted}, f"expected v{promoted} to answer, got {versions}"
        record = next(p for p in listing.policies if p.version == promoted)
        rate = win_rate(after, before, preference)
        length_controlled = win_rate(after, before, preference, length_tolerance=0.2)
        before_len, before_empty = length_figures(before)
        after_len, after_empty = length_figures(after)
        rm_accuracy = reward_model_accuracy(platform, config)
        kl = record.gate_metrics.get("kl_to_ref", math.nan)
        print()
        print(format_table(
            ("policy", "win rate vs v0 (95% CI)", "length-controlled", "median answer chars", "empty answers",
             "RM held-out acc", "KL to v0 (nats)", "time"),
            [("v0 (base)", "0.50", "0.50", f"{before_len:.0f}", str(before_empty), "-", "0", "-"),
             (f"v{promoted} (promoted)", describe(rate), describe(length_controlled), f"{after_len:.0f}",
              str(after_empty), f"{rm_accuracy:.3f}", f"{kl:.2f}", f"{loop_seconds / 60:.1f} min")]))
        print(f"\n{len(eval_questions)} questions no user asked x {config.plan.n} answers per version, every pair of "
              f"answers compared under the preference ({preference.description}); ties count half. "
              f"Length-controlled: only pairs whose lengths differ by at most 20%"
              f" ({length_controlled.pairs if length_controlled else 0} of {rate.pairs if rate else 0} pairs).")
        print_examples(before, after, promoted)
        summary.update({
            "outcome": outcome, "promoted_version": promoted, "win_rate": as_dict(rate),
            "length_controlled_win_rate": as_dict(length_controlled),
            "median_chars": {"before": before_len, "after": after_len},
            "empty_answers": {"before": before_empty, "after": after_empty}, "reward_model_accuracy": rm_accuracy,
            "kl_to_v0": kl, "loop_seconds": loop_seconds, "swap_seconds": swap_seconds,
            "gate": dict(record.gate_metrics),
        })
        summary.update(operator_checks(platform, promoted))
        summary["metrics"] = scrape_every_process(platform)
        return summary
    finally:
        progress.stop()
        code = platform.stop()
        summary["up_exit_code"] = code
        summary["total_seconds"] = time.monotonic() - started
        if config.summary_json is not None:
            config.summary_json.write_text(json.dumps(summary, indent=2))


def print_examples(before: dict[str, list[str]], after: dict[str, list[str]], promoted: int, count: int = 4) -> None:
    """A few held-out questions with the first answer of each version (the same seed), so a reader
    sees what the win rate means (and would see a policy that games the preference)."""
    print("\nexamples (held-out questions, first sample of each version, same seed):")
    for question in list(before)[:count]:
        print(f"  Q: {question}")
        for label, answers in (("v0", before), (f"v{promoted}", after)):
            text = " ".join(answers[question][0].split())
            print(f"    {label:>4}: {text[:160]}{'…' if len(text) > 160 else ''}")


def operator_checks(platform: Platform, promoted: int) -> dict:
    """What an operator would do next: roll back (the servers return to v0), then promote again."""
    change = platform.admin.Rollback(admin_pb2.RollbackRequest(reason="demo: operator rollback"), timeout=30)
    rollback_seconds = wait_for_serving(platform, change.to_version, 120)
    print(f"== operator rollback v{change.from_version} -> v{change.to_version}: the server swapped in "
          f"{rollback_seconds:.2f} s")
    again = platform.admin.Promote(admin_pb2.PromoteRequest(version=promoted, reason="demo: promote again"), timeout=60)
    promote_seconds = wait_for_serving(platform, promoted, 120)
    print(f"== operator promote v{again.from_version} -> v{again.to_version}: the server swapped in "
          f"{promote_seconds:.2f} s")
    return {"rollback": {"from": change.from_version, "to": change.to_version, "seconds": rollback_seconds},
            "repromote": {"to": again.to_version, "seconds": promote_seconds}}


SHOWN_METRICS = {
    "server": ("flywheel_requests_total", "flywheel_generated_tokens_total", "flywheel_serving_policy_version",
               "flywheel_policy_swaps_total", "flywheel_rankings_accepted_total"),
    "labelling worker": ("flywheel_labelling_",),
    "training worker": ("flywheel_reward_model_heldout_accuracy_ratio", "flywheel_reward_model_runs_total",
                        "flywheel_ppo_runs_total", "flywheel_ppo_kl_to_ref_nats", "flywheel_policy_gate_reward_gain"),
}


def scrape_every_process(platform: Platform) -> dict[str, dict[str, float]]:
    scraped = {}
    for name, port in (("server", platform.metrics_port), ("labelling worker", platform.labelling_port),
                       ("training worker", platform.training_port)):
        samples = platform.metrics(port)
        scraped[name] = {k: v for k, v in samples.items() if k.startswith("flywheel_")}
        shown = [f"{k} {v:g}" for k, v in samples.items()
                 if k.startswith(SHOWN_METRICS[name]) and "_bucket" not in k and "_created" not in k][:8]
        print(f"== {name} /metrics (:{port}): {len(scraped[name])} flywheel samples, e.g.")
        for line in shown:
            print("   " + line)
    return scraped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flywheel.app.demo", description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = FlywheelConfig.load()
    parser.add_argument("--data-dir", type=Path, default=Path(defaults.data_dir) / "demo",
                        help="the demo's own data directory (removed and recreated); the model is converted once "
                             "into its parent")
    parser.add_argument("--model", default=defaults.model, help="HF causal-LM folder; empty = the embedded model")
    parser.add_argument("--rankings", type=int, default=256, help="rankings the users submit per round")
    parser.add_argument("--rounds", type=int, default=3, help="most rounds (a round ends with a PPO run)")
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="give up after this long")
    parser.add_argument("--users", type=int, default=4, help="simulated users ranking at once")
    parser.add_argument("--preference", choices=sorted(PREFERENCES), default=DEFAULT_PREFERENCE,
                        help="how the simulated users rank (random = the null control); default %(default)s")
    parser.add_argument("--n", type=int, default=4, help="answers per question")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="most tokens per answer, for the users' and the evaluation questions; default "
                             "%(default)s")
    parser.add_argument("--progress-seconds", type=float, default=15.0,
                        help="print a progress line this often; default %(default)s")
    parser.add_argument("--summary-json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--ai-fraction", type=float, default=0.0,
                        help="RLAIF: the users rank only 1 - F of the groups and the AI labeler the rest (and a "
                             "sample of the users' groups, for agreement); the summary reports the agreement and "
                             "the AI weight used. Default %(default)s: the users rank every group")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.ai_fraction < 1.0:
        parser.error(f"--ai-fraction must be at least 0 and below 1; got {args.ai_fraction}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = DemoConfig(data_dir=args.data_dir.resolve(), model=args.model, rankings_per_round=args.rankings,
                        max_rounds=args.rounds, budget_minutes=args.budget_minutes, users=args.users,
                        preference=args.preference,
                        plan=simulated.SamplingPlan(n=args.n, max_new_tokens=args.max_new_tokens),
                        progress_seconds=args.progress_seconds, summary_json=args.summary_json,
                        ai_fraction=args.ai_fraction)
    summary = run_demo(config)
    return 0 if summary.get("outcome") == "promoted" else 1


if __name__ == "__main__":
    sys.exit(main())
