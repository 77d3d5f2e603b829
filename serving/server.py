"""The gRPC server: the Inference service over the engine, plus the standard health and
reflection services so stock tools (grpcurl, grpc_health_probe, Kubernetes probes) work.

The server listens at once and reports NOT_SERVING until the model is loaded and (when it follows
the registry) the registry's current policy version is loaded, then SERVING, for the server ("")
and for each service on the port (Inference, and Feedback and Admin where served). Every RPC is
counted and timed by ``serving.metrics.RequestMetricsInterceptor``, the outermost interceptor; the
engine reports per-request figures to ``ServingMetrics`` through its observer.
Shutdown is graceful: health flips to NOT_SERVING, new RPCs are refused, in-flight RPCs get a
grace period to finish, then the engine stops.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from flywheel.config import FlywheelConfig
from flywheel.contracts.artifacts import POLICY_KIND, registry_folder
from flywheel.contracts.groups import GroupResult
from flywheel.registry import open_registry
from flywheel.tls import server_credentials
from flywheel.v1 import inference_pb2, inference_pb2_grpc
from serving.engine import (
    DoneEvent, Engine, EngineConfig, EngineStoppedError, GenerationRequest, QueueFullError, TokenEvent,
    iter_events,
)
from serving.auth import retry_trailers, server_interceptors
from serving.malformed import MalformedRequestInterceptor
from serving.logprobs import scored_tokens
from serving.metrics import RequestMetricsInterceptor, ServingMetrics
from serving.policy_follower import FollowerState, PolicyFollower
from serving.policy_loader import LoadedPolicy, PolicyLoader
from serving.rate_limit import RateLimiter
from serving.validation import InvalidRequest, RequestLimits, validate_request

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
QUEUE_FULL_RETRY_MS = 1000
FINISH_REASONS = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
}

GroupSink = Callable[[GroupResult], None]


def group_response(result: GroupResult, tokenizer=None, logprobs: bool = False) -> inference_pb2.CompleteResponse:
    """The response of a finished group; with ``logprobs``, every token scored (``tokenizer`` decodes them)."""
    return inference_pb2.CompleteResponse(
        group_id=result.group_id,
        policy_version=result.policy_version,
        prompt_token_count=len(result.prompt_token_ids),
        completions=[
            inference_pb2.Completion(
                completion_id=s.completion_id, index=s.index, text=s.text,
                finish_reason=FINISH_REASONS[s.finish_reason], token_count=len(s.token_ids), logprob=s.logprob,
                tokens=token_logprobs(tokenizer, s.token_ids, s.logprobs, s.top_logprobs) if logprobs else ())
            for s in result.samples
        ],
    )


def token_logprobs(tokenizer, token_ids, logprobs, top_logprobs) -> list[inference_pb2.TokenLogprob]:
    return [inference_pb2.TokenLogprob(
        token_id=t.token_id, token=t.token, logprob=t.logprob,
        top=[inference_pb2.TopLogprob(token_id=c.token_id, token=c.token, logprob=c.logprob) for c in t.top])
        for t in scored_tokens(tokenizer, token_ids, logprobs, top_logprobs)]


def token_delta(event: TokenEvent, tokenizer, logprobs: bool) -> inference_pb2.TokenDelta:
    return inference_pb2.TokenDelta(
        index=event.index, text=event.text, token_count=event.token_count,
        tokens=token_logprobs(tokenizer, event.token_ids, event.logprobs, event.top_logprobs) if logprobs else ())


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, server: "InferenceServer") -> None:
        self.server = server

    def Complete(self, request, context):
        generation, logprobs = self._submit(request, context, stream=False)
        for event in self._events(generation, context):
            if isinstance(event, DoneEvent):
                return self._finish(event.result, context, logprobs)
        return self._abort_unfinished(generation, context)

    def StreamComplete(self, request, context):
        generation, logprobs = self._submit(request, context, stream=True)
        tokenizer = self.server.engine.tokenizer
        for event in self._events(generation, context):
            if isinstance(event, TokenEvent):
                yield inference_pb2.StreamCompleteResponse(delta=token_delta(event, tokenizer, logprobs))
            elif isinstance(event, DoneEvent):
                yield inference_pb2.StreamCompleteResponse(final=self._finish(event.result, context, logprobs))
                return
        self._abort_unfinished(generation, context)

    # ---- helpers ----

    def _submit(self, request, context, stream: bool) -> tuple[GenerationRequest, bool]:
        """The request handed to the engine, and whether the caller asked for log-probabilities."""
        engine = self.server.engine
        if engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        try:
            valid = validate_request(request, engine.tokenizer, self.server.limits)
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        generation = GenerationRequest(valid.prompt, valid.prompt_token_ids, valid.params, deadline=deadline,
                                       stream=stream, top_logprobs=valid.top_logprobs)
        # frees the batch slots when the client cancels or the RPC ends for any reason
        context.add_callback(generation.cancel)
        try:
            engine.submit(generation)
        except QueueFullError as exc:
            self.server.metrics.queue_full.inc()
            context.set_trailing_metadata(retry_trailers(QUEUE_FULL_RETRY_MS))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineStoppedError:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return generation, valid.logprobs

    def _events(self, generation: GenerationRequest, context) -> Iterator:
        try:
            yield from iter_events(generation)
        except EngineStoppedError:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        except Exception:
            log.exception("request %s failed in the engine", generation.request_id)
            context.abort(grpc.StatusCode.INTERNAL, "the engine failed while generating; see the server log")

    def _finish(self, result: GroupResult, context, logprobs: bool = False) -> inference_pb2.CompleteResponse:
        if all(s.finish_reason == "cancelled" for s in result.samples):
            if context.time_remaining() is not None and context.time_remaining() <= 0:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before generation finished")
            if not context.is_active():
                context.abort(grpc.StatusCode.CANCELLED, "the request was cancelled")
        self.server.record_group(result)
        return group_response(result, self.server.engine.tokenizer, logprobs)

    def _abort_unfinished(self, generation: GenerationRequest, context):
        generation.cancel()
        context.abort(grpc.StatusCode.CANCELLED, "the request ended before generation finished")


@dataclass
class InferenceServer:
    """Owns the gRPC server, the engine and the metrics endpoint of one serving process."""

    config: FlywheelConfig
    load: Callable[[], tuple[object, object]] | None = None  # returns (model, tokenizer); None = config.model
    group_sink: GroupSink | None = None  # stores each finished group (the feedback store)
    # more services on the same port: (full service name, function that adds it to a grpc.Server)
    services: list[tuple[str, Callable[[grpc.Server], None]]] = field(default_factory=list)
    # follow the policy registry's pointer and hot-swap to it (None: always serve the base model)
    policy_redis: object | None = None
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    engine: Engine | None = None
    port: int = 0
    metrics_port: int = 0
    limits: RequestLimits = field(default_factory=RequestLimits)
    # the per-key rate limit (in Redis); None = no rate limit (auth still applies)
    rate_limiter: RateLimiter | None = None
    # routes the process adds to the OpenAI-compatible HTTP API (served when serving.http_port is set)
    http_routes: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self._grpc: grpc.Server | None = None
        self._health = health.HealthServicer()
        self._metrics_http = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.follower: PolicyFollower | None = None
        self.http = None  # serving.http_api.HttpFrontEnd, once started
        self._synced = threading.Event()  # the registry's current version was served once
        self._stopping = False

    # ---- lifecycle ----

    def start(self, wait_until_ready: bool = False, timeout: float = 600.0) -> "InferenceServer":
        s = self.config
        credentials = server_credentials(s.security)
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=s.serving.grpc_workers, thread_name_prefix="grpc"),
            # the first interceptor is the outermost: every RPC is counted, refusals included; then the
            # key (and its rate) is checked before anything is said about the request, so a caller
            # without a valid key learns nothing from a malformed one
            interceptors=[RequestMetricsInterceptor(self.metrics),
                          *server_interceptors(s, self.metrics, self.rate_limiter, tls=credentials is not None),
                          MalformedRequestInterceptor()],
            maximum_concurrent_rpcs=s.serving.grpc_workers,
            options=[("grpc.max_receive_message_length", s.serving.grpc_max_receive_message_bytes),
                     ("grpc.max_send_message_length", s.serving.grpc_max_send_message_bytes)],
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        for _, add_service in self.services:
            add_service(self._grpc)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, *(name for name, _ in self.services), health.SERVICE_NAME, reflection.SERVICE_NAME),
            self._grpc)
        if credentials is not None:
            self.port = self._grpc.add_secure_port(s.grpc_address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(s.grpc_address)
        if self.port == 0:
            raise RuntimeError(f"could not bind the gRPC server to {s.grpc_address}")
        self._grpc.start()
        if s.serving.metrics_port:
            host = s.grpc_address.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
            self._metrics_http, _ = start_http_server(s.serving.metrics_port, addr=host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        self._start_http()
        log.info("gRPC (%s) on port %d, metrics on %s; loading the model", "TLS" if credentials else "plaintext",
                 self.port, self.metrics_port or "(off)")
        threading.Thread(target=self._load_and_serve, name="model-loader", daemon=True).start()
        if wait_until_ready:
            self.wait_until_ready(timeout)
        return self

    def _start_http(self) -> None:
        """The OpenAI-compatible HTTP API beside gRPC (``serving.http_api``), when a port is set."""
        if not self.config.serving.http_port:
            return
        from serving.http_api import HttpFrontEnd

        self.http = HttpFrontEnd(self, self.http_routes).start()

    @property
    def http_port(self) -> int:
        return self.http.port if self.http is not None else 0

    def wait_until_ready(self, timeout: float = 600.0) -> None:
        if not self._ready.wait(timeout):
            raise TimeoutError("the model did not load in time")
        if self._load_error is not None:
            raise RuntimeError(f"the model failed to load: {self._load_error}") from self._load_error

    def _load_and_serve(self) -> None:
        try:
            if self.load is not None:
                model, tokenizer = self.load()
            else:
                from flywheel.models import load_model

                loaded = load_model(self.config.model, self.config.data_dir, self.config.dtype)
                model, tokenizer = loaded.model, loaded.tokenizer
            self.limits = RequestLimits(
                max_samples=self.config.serving.max_samples,
                max_new_tokens_limit=self.config.serving.max_new_tokens_limit,
                default_max_new_tokens=self.config.serving.default_max_new_tokens,
                context_window=int(getattr(model.config, "max_position_embeddings", 2048)),
                max_prompt_tokens=self.config.serving.max_prompt_tokens,
            )
            # at least max_samples: ServingConfig refuses a smaller batch at load
            config = EngineConfig(max_batch_sequences=self.config.serving.max_batch_sequences,
                                  max_queued_requests=self.config.serving.max_queued_requests)
            engine = Engine(model, tokenizer, config, observer=self.metrics)
            engine.start()
            self.engine = engine
            self.metrics.policy_version.set(engine.policy_version)
            self.metrics.model_loaded.set(1)
            if self.policy_redis is not None:
                self._follow_registry(model)  # SERVING once the registry's current version is loaded
            else:
                self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("serving policy version %d", engine.policy_version)
        except BaseException as exc:
            log.exception("model load failed")
            self._load_error = exc
        finally:
            self._ready.set()

    def _follow_registry(self, base_model) -> None:
        loader = PolicyLoader(base_model, registry_folder(self.config.data_dir, POLICY_KIND))
        self.follower = PolicyFollower(
            self.policy_redis, loader.load, self.swap_to, lambda: self.engine.policy_version,
            poll_seconds=self.config.serving.policy_poll_seconds,
            on_failure=lambda version, exc: self.metrics.policy_load_failures.inc(), on_state=self._follower_state)
        try:  # start on the registry's current version rather than the base model
            open_registry(self.policy_redis, self.config.data_dir, POLICY_KIND).initialize_if_fresh()
            self.follower.check_once()
        except Exception as exc:  # Redis down at start: NOT_SERVING until the follower has caught up
            log.warning("could not read the policy pointer at start (%s); not SERVING until it is readable", exc)
        self.follower.start()

    def _follower_state(self, state: FollowerState) -> None:
        """Health turns SERVING the first time this replica serves the registry's current version (a
        server that cannot load it at start must not take traffic); afterwards a refused or lost
        pointer keeps the version it serves, with metrics that alert."""
        self.metrics.policy_pointer_missing.set(1 if state.pointer_missing else 0)
        if state.promotion_frozen is not None:
            self.metrics.policy_promotion_frozen.set(1 if state.promotion_frozen else 0)
        if state.in_sync and not self._synced.is_set() and not self._stopping:
            self._synced.set()
            self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def swap_to(self, loaded: LoadedPolicy) -> None:
        """Hand a loaded version to the engine and wait for the step boundary where it takes over."""
        started = time.perf_counter()
        self.engine.swap(loaded.model, loaded.version).wait(60)
        self.metrics.policy_swaps.inc()
        self.metrics.policy_swap_duration.observe(loaded.seconds + time.perf_counter() - started)
        self.metrics.policy_version.set(loaded.version)

    def stop(self, grace: float = 10.0) -> None:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds, then stop the engine."""
        self._stopping = True
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http is not None:
            self.http.stop()
        if self.follower is not None:
            self.follower.stop()
        if self._grpc is not None:
            self._grpc.stop(grace).wait(grace + 5)
        if self.engine is not None:
            self.engine.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def wait(self) -> None:
        if self._grpc is not None:
            self._grpc.wait_for_termination()

    def _set_health(self, status) -> None:
        """The server's status ("") and each service's: Inference, and Feedback and Admin where served."""
        for service in ("", INFERENCE_SERVICE, *(name for name, _ in self.services)):
            self._health.set(service, status)

    # ---- used by the servicer ----

    def record_group(self, result: GroupResult) -> None:
        if self.group_sink is None:
            return
        started = time.perf_counter()
        try:
            self.group_sink(result)
        except Exception as exc:  # serving goes on; the group just cannot be ranked
            self.metrics.group_store_failures.inc()
            log.warning("could not store group %s (it cannot be ranked): %s", result.group_id, exc)
        finally:
            self.metrics.group_store_duration.observe(time.perf_counter() - started)
