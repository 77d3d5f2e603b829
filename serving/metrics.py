"""Serving metrics (Prometheus). Each server owns a registry (``flywheel.metrics_registry``), so
several servers can live in one process (tests) without clashing, and ``/metrics`` shows exactly
one server, with its process metrics.

Three sources fill it:

- ``RequestMetricsInterceptor`` counts and times every RPC of the port (Inference, Feedback,
  Admin; health and reflection aside, which probes call every few seconds) by service, method and
  final status code, from the outermost interceptor, so refusals by auth or the rate limit count
  too. The duration carries the code, so that 5 ms INVALID_ARGUMENT refusals do not pull the
  latency percentiles of served requests down: query ``code="OK"`` for those.
- The engine's hooks (``EngineObserver``) give what vLLM and TGI report per request: time in the
  queue, time to first token, inter-token latency, end-to-end latency, prompt and generated
  lengths and finish reasons, each labelled with the ``policy_version`` that sampled, so that
  after a hot-swap latency and lengths split by version.
- ``RegistryCollector`` reads the registries in Redis at scrape time: the pointer every server
  should follow, every promotion and rollback with who and why (from the audit stream that the
  process making a change writes in the same call, whichever process that is: a server's Admin
  service, the CLI, a training run), and the gate's figures of each recent version.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time

import grpc
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND
from flywheel.contracts.groups import GroupResult
from flywheel.metrics_registry import process_registry
from flywheel.registry import open_registry
from serving.auth import OPEN_SERVICES, service_of, wrap_behavior
from serving.engine import EngineObserver

log = logging.getLogger(__name__)

# up to ~10 min: 1,000 queued requests wait 80-105 s on 2 cores (bench/load.py), a longer queue minutes
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
VERSION = "policy_version"


class ServingMetrics(EngineObserver):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or process_registry()
        r = self.registry
        # ---- every RPC (RequestMetricsInterceptor) ----
        self.requests = Counter("flywheel_requests", "gRPC requests handled (every service but health and "
                                "reflection), by service, method and final status code",
                                ["service", "method", "code"], registry=r)
        self.request_duration = Histogram("flywheel_request_duration_seconds",
                                          "gRPC request latency, from the call to its last message, by service, "
                                          "method and status code (served requests: code=\"OK\")",
                                          ["service", "method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        # ---- per request, from the engine, by the policy version that sampled ----
        self.queue_time = Histogram("flywheel_request_queue_time_seconds",
                                    "time a request waited in the engine queue for a batch slot",
                                    [VERSION], buckets=QUEUE_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("flywheel_time_to_first_token_seconds",
                                             "from request arrival to its first sampled token", [VERSION],
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("flywheel_inter_token_latency_seconds",
                                             "mean time between a request's tokens after its first (decode "
                                             "time / (tokens - 1) of its longest completion)", [VERSION],
                                             buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.e2e_latency = Histogram("flywheel_e2e_request_latency_seconds",
                                     "from request arrival in the engine to its last token", [VERSION],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("flywheel_request_prompt_tokens", "prompt length of each request",
                                               [VERSION], buckets=TOKEN_BUCKETS, registry=r)
        self.completion_tokens = Histogram("flywheel_completion_generated_tokens",
                                           "tokens generated for each completion (each of a request's n samples)",
                                           [VERSION], buckets=TOKEN_BUCKETS, registry=r)
        self.finished_completions = Counter("flywheel_finished_completions",
                                            "completions finished, by finish reason (stop, length, cancelled)",
                                            ["finish_reason", VERSION], registry=r)
        self.generated_tokens = Counter("flywheel_generated_tokens", "tokens sampled by the engine", [VERSION],
                                        registry=r)
        self.prompt_tokens = Counter("flywheel_prompt_tokens", "prompt tokens prefilled by the engine", [VERSION],
                                     registry=r)
        # ---- the engine ----
        self.batch_sequences = Histogram("flywheel_engine_batch_sequences",
                                         "sequences decoded together in one engine step",
                                         buckets=BATCH_BUCKETS, registry=r)
        self.running_sequences = Gauge("flywheel_engine_running_sequences",
                                       "sequences in the running batch now", registry=r)
        self.queue_depth = Gauge("flywheel_engine_queued_requests", "requests waiting for a batch slot",
                                 registry=r)
        # a long prompt admitted and prefilled a chunk per step is neither waiting nor running yet
        self.prefilling_requests = Gauge("flywheel_engine_prefilling_requests",
                                         "requests admitted whose long prompt is being prefilled in chunks",
                                         registry=r)
        self.cache_bytes = Gauge("flywheel_engine_kv_cache_bytes",
                                 "bytes the running batches' key/value cache buffers take now", registry=r)
        self.cache_budget_bytes = Gauge("flywheel_engine_kv_cache_budget_bytes",
                                        "the key/value cache budget admission keeps the batches within (0 = none)",
                                        registry=r)
        self.queue_full = Counter("flywheel_queue_full_rejections",
                                  "requests refused with RESOURCE_EXHAUSTED because the engine queue was full",
                                  registry=r)
        self.failed_requests = Counter("flywheel_engine_failed_requests",
                                       "requests whose generation failed in the engine (ABORTED), by stage "
                                       "(prefill, decode step); the engine went on serving", ["stage"], registry=r)
        self.prefix_cache_tokens = Counter("flywheel_prefix_cache_tokens",
                                           "prompt tokens taken from the prefix cache (result=hit) or prefilled "
                                           "(result=computed)", ["result"], registry=r)
        self.step_duration = Histogram("flywheel_engine_step_duration_seconds", "one decode step of the batch",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.prefill_chunk_tokens = Counter("flywheel_engine_prefill_chunk_tokens",
                                            "prompt tokens prefilled in the chunks of long prompts (their last "
                                            "part is an ordinary prefill), the running streams decoding between "
                                            "chunks", registry=r)
        self.prefill_duration = Histogram("flywheel_engine_prefill_duration_seconds",
                                          "one prefill forward (of the prompts admitted together, or one chunk of "
                                          "a long prompt)",
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

    def observe_rpc(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """One finished RPC; ``method`` is the full name (``/flywheel.v1.Inference/Complete``)."""
        service, _, name = method.lstrip("/").partition("/")
        self.requests.labels(service, name, code.name).inc()
        self.request_duration.labels(service, name, code.name).observe(seconds)

    # EngineObserver
    def on_step(self, batch_sequences: int, seconds: float, new_tokens: int, policy_version: int) -> None:
        self.batch_sequences.observe(batch_sequences)
        self.step_duration.observe(seconds)
        self.generated_tokens.labels(str(policy_version)).inc(new_tokens)

    def on_queue(self, waiting: int, running: int, prefilling: int) -> None:
        self.queue_depth.set(waiting)
        self.running_sequences.set(running)
        self.prefilling_requests.set(prefilling)

    def on_cache(self, allocated_bytes: int) -> None:
        self.cache_bytes.set(allocated_bytes)

    def on_admit(self, queued_seconds: float, policy_version: int) -> None:
        self.queue_time.labels(str(policy_version)).observe(max(0.0, queued_seconds))

    def on_prefill(self, prompt_tokens: int, seconds: float, new_tokens: int, policy_version: int) -> None:
        version = str(policy_version)
        self.prompt_tokens.labels(version).inc(prompt_tokens)
        self.generated_tokens.labels(version).inc(new_tokens)
        self.prefill_duration.observe(seconds)

    def on_prefill_chunk(self, tokens: int, seconds: float) -> None:
        self.prefill_chunk_tokens.inc(tokens)
        self.prefill_duration.observe(seconds)

    def on_prefix_hit(self, cached_tokens: int, prompt_tokens: int) -> None:
        self.prefix_cache_tokens.labels("hit").inc(cached_tokens)
        self.prefix_cache_tokens.labels("computed").inc(prompt_tokens - cached_tokens)

    def on_group_failed(self, stage: str) -> None:
        self.failed_requests.labels(stage).inc()

    def on_first_token(self, seconds: float, policy_version: int) -> None:
        self.time_to_first_token.labels(str(policy_version)).observe(seconds)

    def on_finished(self, result: GroupResult) -> None:
        version = str(result.policy_version)
        self.request_prompt_tokens.labels(version).observe(len(result.prompt_token_ids))
        for sample in result.samples:
            self.completion_tokens.labels(version).observe(len(sample.token_ids))
            self.finished_completions.labels(sample.finish_reason, version).inc()
        if result.first_token_at is None:  # dropped before it started (cancelled or past its deadline)
            return
        self.e2e_latency.labels(version).observe(result.finished_at - result.created_at)
        longest = max((len(s.token_ids) for s in result.samples), default=0)
        if longest > 1:
            self.inter_token_latency.labels(version).observe((result.finished_at - result.first_token_at) /
                                                             (longest - 1))


class StatusRecorder:
    """A servicer context that remembers the status a handler set or aborted with (the context
    ``grpc.aio`` hands a synchronous handler has no ``code()``), and reports an abort's status
    before the status leaves (``finish``), so the RPC is counted by the time its client hears."""

    def __init__(self, context, finish) -> None:
        self._context = context
        self._finish = finish
        self._code: grpc.StatusCode | None = None

    def __getattr__(self, name):
        return getattr(self._context, name)

    def abort(self, code, details=""):
        self._code = code
        self._finish(code)
        return self._context.abort(code, details)

    def set_code(self, code) -> None:
        self._code = code
        self._context.set_code(code)

    def code(self) -> grpc.StatusCode | None:
        if self._code is not None:
            return self._code
        inner = getattr(self._context, "code", None)
        return inner() if inner is not None else None


class AsyncStatusRecorder(StatusRecorder):
    """``StatusRecorder`` for the context of an asyncio handler (whose ``abort`` is a coroutine)."""

    async def abort(self, code, details=""):
        self._code = code
        self._finish(code)
        await self._context.abort(code, details)


def _once(observe, method: str, started: float):
    """``finish(code)``: observe the RPC once, at its first final status."""
    done = []

    def finish(code) -> None:
        if not done:
            done.append(code)
            observe(method, code, time.perf_counter() - started)
    return finish


class RequestMetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC by its final status code; the outermost interceptor, so what
    the others refuse (a missing key, a rate limit, a malformed message) is counted as well."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or service_of(method) in OPEN_SERVICES:
            return handler
        observe = self.metrics.observe_rpc

        def unary(behavior):
            def run(request_or_iterator, context):
                started = time.perf_counter()
                code = grpc.StatusCode.UNKNOWN
                finish = _once(observe, method, started)
                context = StatusRecorder(context, finish)
                try:
                    response = behavior(request_or_iterator, context)
                    code = context.code() or grpc.StatusCode.OK
                    return response
                except Exception:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    finish(code)
            return run

        def streaming(behavior):
            def run(request_or_iterator, context):
                started = time.perf_counter()
                code = grpc.StatusCode.UNKNOWN
                finish = _once(observe, method, started)
                context = StatusRecorder(context, finish)
                responses = behavior(request_or_iterator, context)
                try:
                    for item in responses:
                        yield item
                    code = context.code() or grpc.StatusCode.OK
                except GeneratorExit:  # the client went away mid-stream
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    close = getattr(responses, "close", None)
                    if close is not None:
                        close()
                    finish(code)
            return run

        def unary_async(behavior):
            async def run(request_or_iterator, context):
                started = time.perf_counter()
                code = grpc.StatusCode.UNKNOWN
                finish = _once(observe, method, started)
                context = AsyncStatusRecorder(context, finish)
                try:
                    response = await behavior(request_or_iterator, context)
                    code = context.code() or grpc.StatusCode.OK
                    return response
                except asyncio.CancelledError:  # the client went away or its deadline passed
                    code = context.code() or grpc.StatusCode.CANCELLED
                    raise
                except Exception:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    finish(code)
            return run

        def streaming_async(behavior):
            if not inspect.isasyncgenfunction(behavior):  # a coroutine that streams with context.write
                return unary_async(behavior)

            async def run(request_or_iterator, context):
                started = time.perf_counter()
                code = grpc.StatusCode.UNKNOWN
                finish = _once(observe, method, started)
                context = AsyncStatusRecorder(context, finish)
                responses = behavior(request_or_iterator, context)
                try:
                    async for item in responses:
                        yield item
                    code = context.code() or grpc.StatusCode.OK
                except (GeneratorExit, asyncio.CancelledError):
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    await responses.aclose()
                    finish(code)
            return run

        return wrap_behavior(handler, unary, streaming, unary_async, streaming_async)


MAX_LABEL_CHARS = 200  # a reason may be 1024 characters; a label value that long helps nobody
AUDIT_ENTRIES_READ = 100  # newest audit entries read per scrape and registry
CHANGES_EXPORTED = 20  # newest promotions and rollbacks exported per registry
VERSIONS_EXPORTED = 20  # newest versions whose figures are exported per registry
CHANGE_ACTIONS = ("promote", "rollback")


class RegistryCollector(Collector):
    """The policy and reward-model registries as they are in Redis now, read at each scrape: every
    server says what the registry points at beside what it serves, so a manual rollback by the CLI
    is seen at once and no alert depends on a gauge only the training worker sets."""

    def __init__(self, client: redis.Redis, data_dir) -> None:
        self.registries = {kind: open_registry(client, data_dir, kind) for kind in (POLICY_KIND, REWARD_MODEL_KIND)}

    def collect(self):
        current = GaugeMetricFamily("flywheel_registry_current_version",
                                    "the version the registry's current pointer names (0 = none: for the policy, "
                                    "the base model), read from Redis at scrape time", labels=["kind"])
        changes = GaugeMetricFamily("flywheel_registry_change_timestamp_seconds",
                                    "Unix time of each recent promotion and rollback, with who made it and why "
                                    "(from the registry's audit stream)",
                                    labels=["kind", "action", "from_version", "to_version", "who", "why"])
        figures = GaugeMetricFamily("flywheel_registry_version_figure",
                                    "the evaluation figures (gate) of each recent version, from its manifest",
                                    labels=["kind", "version", "figure"])
        try:
            for kind, registry in self.registries.items():
                pointer = registry.pointer()
                if pointer is not None:  # a lost pointer is not v0 (flywheel_policy_pointer_missing says it)
                    current.add_metric([kind], pointer)
                seen: set[tuple[str, ...]] = set()
                for entry in registry.audit(AUDIT_ENTRIES_READ):  # newest first
                    labels = (kind, entry.get("action", ""), entry.get("from") or "0", entry.get("to") or "0",
                              entry.get("who", "")[:MAX_LABEL_CHARS], entry.get("why", "")[:MAX_LABEL_CHARS])
                    if labels[1] in CHANGE_ACTIONS and labels not in seen and len(seen) < CHANGES_EXPORTED:
                        seen.add(labels)  # the same change made twice: its newest time
                        changes.add_metric(list(labels), float(entry.get("when") or 0))
                for record in registry.versions()[-VERSIONS_EXPORTED:]:
                    for name, value in sorted(record.figures.items()):
                        if isinstance(value, (int, float)) and not isinstance(value, bool):
                            figures.add_metric([kind, str(record.version), name], float(value))
        except (redis.RedisError, ValueError, KeyError, TypeError) as exc:  # Redis down, a damaged record
            log.warning("cannot read the registries for /metrics: %s", exc)
            return
        yield current
        yield changes
        yield figures
