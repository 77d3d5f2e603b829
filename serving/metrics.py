"""Serving metrics (Prometheus). Each server owns a ``CollectorRegistry``, so several servers can
live in one process (tests) without clashing, and ``/metrics`` shows exactly one server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.engine import EngineObserver

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


class ServingMetrics(EngineObserver):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("flywheel_requests", "gRPC requests handled, by method and status code",
                                ["method", "code"], registry=r)
        self.request_duration = Histogram("flywheel_request_duration_seconds",
                                          "end-to-end latency of completion requests", ["method"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("flywheel_time_to_first_token_seconds",
                                             "from request arrival to its first sampled token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("flywheel_generated_tokens", "tokens sampled by the engine", registry=r)
        self.prompt_tokens = Counter("flywheel_prompt_tokens", "prompt tokens prefilled by the engine", registry=r)
        self.batch_sequences = Histogram("flywheel_engine_batch_sequences",
                                         "sequences decoded together in one engine step",
                                         buckets=BATCH_BUCKETS, registry=r)
        self.running_sequences = Gauge("flywheel_engine_running_sequences",
                                       "sequences in the running batch now", registry=r)
        self.queue_depth = Gauge("flywheel_engine_queued_requests", "requests waiting for a batch slot",
                                 registry=r)
        self.step_duration = Histogram("flywheel_engine_step_duration_seconds", "one decode step of the batch",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.prefill_duration = Histogram("flywheel_engine_prefill_duration_seconds", "prefill of one prompt",
                                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                          registry=r)
        self.policy_version = Gauge("flywheel_serving_policy_version", "policy version this server samples from",
                                    registry=r)
        self.group_store_duration = Histogram("flywheel_group_store_duration_seconds",
                                              "storing one served group in Redis for ranking",
                                              buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1),
                                              registry=r)
        self.group_store_failures = Counter("flywheel_group_store_failures",
                                            "served groups that could not be stored (Redis down)", registry=r)
        self.policy_swaps = Counter("flywheel_policy_swaps", "hot-swaps to another policy version", registry=r)
        self.policy_swap_duration = Histogram("flywheel_policy_swap_duration_seconds",
                                              "loading, verifying and swapping in a policy version",
                                              buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.policy_load_failures = Counter("flywheel_policy_load_failures",
                                            "policy versions refused (missing, corrupt, not loadable)", registry=r)
        self.auth_failures = Counter("flywheel_auth_failures",
                                     "RPCs refused by authentication or role (missing_key, invalid_key, forbidden)",
                                     ["reason"], registry=r)
        self.rate_limited = Counter("flywheel_rate_limited_requests",
                                    "RPCs refused with RESOURCE_EXHAUSTED by the per-key rate limit", ["role"],
                                    registry=r)
        self.rate_limiter_errors = Counter("flywheel_rate_limiter_errors",
                                           "rate-limit checks that could not reach Redis (the request went through)",
                                           registry=r)
        self.model_loaded = Gauge("flywheel_serving_model_loaded", "1 once the model is loaded and serving",
                                  registry=r)
        self.policy_pointer_missing = Gauge(
            "flywheel_policy_pointer_missing",
            "1 while the registry's policy pointer is absent (lost); the server keeps serving its version",
            registry=r)
        self.policy_promotion_frozen = Gauge(
            "flywheel_policy_promotion_frozen",
            "1 while a rollback has paused automatic promotion (until `flywheel promote --resume`)", registry=r)

    # EngineObserver
    def on_step(self, batch_sequences: int, seconds: float, new_tokens: int) -> None:
        self.batch_sequences.observe(batch_sequences)
        self.step_duration.observe(seconds)
        self.generated_tokens.inc(new_tokens)

    def on_queue(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running_sequences.set(running)

    def on_prefill(self, prompt_tokens: int, seconds: float, new_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(new_tokens)
        self.prefill_duration.observe(seconds)

    def on_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)
