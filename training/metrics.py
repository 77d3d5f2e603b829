"""Prometheus metrics of the training workers (``flywheel_`` namespace, base units).

Library code takes a ``CollectorRegistry``; the Celery worker owns one
(``flywheel.metrics_registry.process_registry``) and serves it on ``/metrics``
(``training_metrics_port``). The ``*_current_version`` gauges say what the registry pointed at
after this worker's last look; the live pointer, which a manual rollback moves at once, is what
every server exports (``flywheel_registry_current_version``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RewardModelMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.training_loss = Gauge(
            "flywheel_reward_model_training_loss", "mean K-way ranking loss of the last reward-model run",
            registry=registry)
        self.heldout_accuracy = Gauge(
            "flywheel_reward_model_heldout_accuracy_ratio",
            "held-out pairwise accuracy of the last trained reward-model version", registry=registry)
        self.heldout_loss = Gauge(
            "flywheel_reward_model_heldout_loss", "held-out K-way loss of the last trained reward-model version",
            registry=registry)
        self.rankings_used = Counter(
            "flywheel_reward_model_rankings_used_total", "rankings used by reward-model runs",
            ["split", "source"], registry=registry)
        self.run_rankings = Gauge(
            "flywheel_reward_model_run_rankings", "rankings the last reward-model run trained on (new + replay)",
            registry=registry)
        self.run_duration = Histogram(
            "flywheel_reward_model_run_duration_seconds", "wall time of a reward-model run", registry=registry,
            buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400))
        self.runs = Counter(
            "flywheel_reward_model_runs_total", "reward-model runs by outcome", ["outcome"], registry=registry)
        self.current_version = Gauge(
            "flywheel_reward_model_current_version",
            "the current reward-model version when this worker last looked (0 = none)",
            registry=registry)
        self.ai_weight = Gauge(
            "flywheel_reward_model_ai_weight",
            "weight of an AI ranking (a human one weighs 1) in the last reward-model run: "
            "reward_model_ai_weight x clip(2 x agreement - 1, 0, 1), 0 below the overlap minimum", registry=registry)
        self.ai_agreement = Gauge(
            "flywheel_reward_model_ai_agreement_ratio",
            "AI-human pairwise agreement the last reward-model run weighted AI rankings by", registry=registry)
        self.ai_agreement_groups = Gauge(
            "flywheel_reward_model_ai_agreement_groups",
            "groups ranked by both a person and the AI labeler behind that agreement", registry=registry)
        self.pairs_per_second = Gauge(
            "flywheel_reward_model_training_pairs_per_second", "training throughput of the last run",
            registry=registry)
        self.progress = Gauge(
            "flywheel_reward_model_progress_ratio", "optimizer steps done / steps of the running reward-model run",
            registry=registry)
        self.eta = Gauge(
            "flywheel_reward_model_eta_seconds", "estimated seconds left in the running reward-model run",
            registry=registry)


class PPOMetrics:
    """What a PPO run exports: the objective's figures per iteration, progress, and the gate."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name if name.startswith("flywheel_") else f"flywheel_ppo_{name}", text, registry=registry)

        self.mean_score = gauge("mean_score", "mean reward-model score of the last iteration's responses")
        self.mean_reward = gauge("mean_reward", "mean score − β·KL of the last iteration's responses")
        self.kl_to_ref = gauge("kl_to_ref_nats", "mean KL to the initial policy per response, last iteration")
        self.kl_coef = gauge("kl_coef", "β of the last iteration")
        self.policy_loss = gauge("policy_loss", "clipped surrogate loss, last iteration")
        self.value_loss = gauge("value_loss", "clipped value loss, last iteration")
        self.clipfrac = gauge("clip_ratio", "fraction of tokens whose ratio was clipped, last iteration")
        self.approx_kl = gauge("approx_kl_nats", "approximate KL between the old and the new policy, last iteration")
        self.entropy = gauge("entropy_nats", "mean policy entropy per response token, last iteration")
        self.progress = gauge("progress_ratio", "iterations done / iterations of the running PPO run")
        self.episodes_per_second = gauge("episodes_per_second", "PPO throughput of the running run")
        self.eta = gauge("eta_seconds", "estimated seconds left in the running PPO run")
        self.episodes = Counter("flywheel_ppo_episodes_total", "PPO episodes trained on", registry=registry)
        self.iterations = Counter("flywheel_ppo_iterations_total", "PPO iterations", registry=registry)
        self.runs = Counter("flywheel_ppo_runs_total", "PPO runs by outcome", ["outcome"], registry=registry)
        self.run_duration = Histogram(
            "flywheel_ppo_run_duration_seconds", "wall time of a PPO run", registry=registry,
            buckets=(60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800))
        self.gate_reward_gain = gauge("flywheel_policy_gate_reward_gain",
                                      "held-out gain of the last candidate over the current policy, measured by the "
                                      "judge member (calibrated reward units)")
        self.gate_reward_gain_lower_bound = gauge(
            "flywheel_policy_gate_reward_gain_lower_bound",
            "97.5% lower bound of the judge member's gain of the last candidate (one of the gate's two kinds of "
            "evidence)")
        self.gate_users_verdict_lower_bound = gauge(
            "flywheel_policy_gate_users_verdict_lower_bound",
            "97.5% lower bound of the users' held-out verdict on the last candidate: the share of held-out ranked "
            "pairs it moved towards the users' choice (above 0.5 confirms a gain)")
        self.gate_policy_member_gain = gauge(
            "flywheel_policy_gate_policy_member_gain",
            "held-out gain of the last candidate by the member PPO optimised (far above the judge's: over-optimisation)")
        self.gate_kl_to_ref = gauge("flywheel_policy_gate_kl_to_ref_nats",
                                    "held-out KL to the initial policy of the last candidate")
        self.gate_perplexity_ratio = gauge("flywheel_policy_gate_perplexity_ratio",
                                           "held-out text perplexity of the last candidate / the initial policy's")
        self.current_version = gauge("flywheel_policy_current_version",
                                     "the current policy version when this worker last looked (0 = the base model)")
