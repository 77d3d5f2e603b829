"""Prometheus metrics of the training workers (``flywheel_`` namespace, base units).

Library code takes a ``CollectorRegistry``; the Celery worker owns one and serves it on
``/metrics`` (``training_metrics_port``)."""

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
            "flywheel_reward_model_current_version", "the current reward-model version (0 = none)",
            registry=registry)
        self.pairs_per_second = Gauge(
            "flywheel_reward_model_training_pairs_per_second", "training throughput of the last run",
            registry=registry)
