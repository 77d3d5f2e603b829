"""The gRPC server: the Inference service over the engine, plus the standard health and
reflection services so stock tools (grpcurl, grpc_health_probe, Kubernetes probes) work.

The server listens at once and reports NOT_SERVING until the model is loaded and (when it follows
the registry) the registry's current policy version is loaded, then SERVING, for the server ("")
and for each service on the port (Inference, and Feedback and Admin where served). Every RPC is
counted and timed by ``serving.metrics.RequestMetricsInterceptor``, the outermost interceptor; the
engine reports per-request figures to ``ServingMetrics`` through its observer.
Shutdown is graceful: health flips to NOT_SERVING, new RPCs are refused, in-flight RPCs get a
grace period to finish, then the engine stops.

The server is ``grpc.aio`` on an event loop of its own thread: an Inference request waiting for
its tokens is a coroutine, not a thread, so as many requests wait as the engine's queue holds
(``max_queued_requests``, RESOURCE_EXHAUSTED beyond), health Watch streams cost nothing that keyed
traffic needs, and only the synchronous services (Feedback, Admin) run in ``grpc_workers``
threads. If the engine fails for good (``Engine.on_fatal``), health turns NOT_SERVING, the gRPC
server stops and ``wait()`` returns with ``engine_failure`` set, so the process exits non-zero and
its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from flywheel.config import FlywheelConfig
from flywheel.contracts.artifacts import POLICY_KIND, registry_folder
from flywheel.contracts.groups import GroupResult
from flywheel.registry import open_registry
from flywheel.tls import server_credentials
from flywheel.v1 import inference_pb2, inference_pb2_grpc
from serving.engine import (
    DoneEvent, Engine, EngineConfig, EngineStoppedError, ErrorEvent, GenerationFailedError, GenerationRequest,
    QueueFullError, TokenEvent,
)
from serving.auth import AioInterceptor, retry_trailers, server_interceptors
from serving.malformed import MalformedRequestInterceptor
from serving.logprobs import scored_tokens
from serving.metrics import RequestMetricsInterceptor, ServingMetrics
from serving.policy_follower import FollowerState, PolicyFollower
from serving.policy_loader import LoadedPolicy, PolicyLoader
from serving.quantize import quantized
from serving.rate_limit import RateLimiter
from serving.validation import InvalidRequest, RequestLimits, ValidatedRequest, validate_request

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


class LoopEvents:
    """A request's event queue that the engine thread fills and a coroutine on ``loop`` drains."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, event) -> None:  # the engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self):
        return await self._queue.get()


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """Async handlers: a request waiting for its tokens holds no thread."""

    def __init__(self, server: "InferenceServer") -> None:
        self.server = server

    async def Complete(self, request, context):
        generation, valid = await self._submit(request, context, stream=False)
        try:
            async for event in self._events(generation, context):
                if isinstance(event, DoneEvent):
                    return await self._finish(event.result, context, valid)
            await self._abort_unfinished(generation, context)
        finally:
            generation.cancel()  # frees the batch slots when the client cancels or the RPC ends for any reason

    async def StreamComplete(self, request, context):
        generation, valid = await self._submit(request, context, stream=True)
        tokenizer = self.server.engine.tokenizer
        try:
            async for event in self._events(generation, context):
                if isinstance(event, TokenEvent):
                    yield inference_pb2.StreamCompleteResponse(delta=token_delta(event, tokenizer, valid.logprobs))
                elif isinstance(event, DoneEvent):
                    yield inference_pb2.StreamCompleteResponse(final=await self._finish(event.result, context,
                                                                                        valid))
                    return
            await self._abort_unfinished(generation, context)
        finally:
            generation.cancel()

    # ---- helpers ----

    async def _submit(self, request, context, stream: bool) -> tuple[GenerationRequest, ValidatedRequest]:
        """The request handed to the engine, and the request as validated (log-probabilities, store)."""
        engine = self.server.engine
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        try:
            valid = validate_request(request, engine.tokenizer, self.server.limits)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        generation = GenerationRequest(valid.prompt, valid.prompt_token_ids, valid.params, deadline=deadline,
                                       stream=stream, top_logprobs=valid.top_logprobs,
                                       events=LoopEvents(asyncio.get_running_loop()))
        context.add_done_callback(lambda _context: generation.cancel())
        try:
            engine.submit(generation)
        except QueueFullError as exc:
            self.server.metrics.queue_full.inc()
            context.set_trailing_metadata(retry_trailers(QUEUE_FULL_RETRY_MS))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineStoppedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _stopped_message(exc))
        return generation, valid

    async def _events(self, generation: GenerationRequest, context):
        """The request's events until it is done; an engine error becomes a status the client can act on:
        ABORTED when this request's generation failed (the server goes on), UNAVAILABLE when the engine
        stopped (shutdown, or a failure it cannot go on from: the process restarts)."""
        while True:
            event = await generation.events.get()
            if isinstance(event, ErrorEvent):
                error = event.error
                if isinstance(error, GenerationFailedError):
                    await context.abort(grpc.StatusCode.ABORTED, str(error))
                if isinstance(error, EngineStoppedError):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, _stopped_message(error))
                log.error("request %s failed in the engine: %r", generation.request_id, error)
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"the engine failed while generating ({type(error).__name__}); retry shortly")
            yield event
            if isinstance(event, DoneEvent):
                return

    async def _finish(self, result: GroupResult, context, valid: ValidatedRequest) -> inference_pb2.CompleteResponse:
        if all(s.finish_reason == "cancelled" for s in result.samples):
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "the deadline passed before generation finished")
            if context.cancelled():
                await context.abort(grpc.StatusCode.CANCELLED, "the request was cancelled")
        if self.server.group_sink is not None and valid.store:  # a Redis write: in a worker thread, never on the loop
            await asyncio.get_running_loop().run_in_executor(self.server.pool, self.server.record_group, result)
        return group_response(result, self.server.engine.tokenizer, valid.logprobs)

    async def _abort_unfinished(self, generation: GenerationRequest, context):
        generation.cancel()
        await context.abort(grpc.StatusCode.CANCELLED, "the request ended before generation finished")


def _stopped_message(error: EngineStoppedError) -> str:
    text = str(error)
    return text if text and text != "the engine is not running" else "the server is shutting down"


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
        self._grpc: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self.pool: futures.ThreadPoolExecutor | None = None  # the synchronous handlers (Feedback, Admin)
        self._health: AsyncHealthServicer | None = None
        self._terminated = threading.Event()
        self._stop_lock = threading.Lock()
        self.engine_failure: BaseException | None = None  # why the engine stopped for good
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
        self.pool = futures.ThreadPoolExecutor(max_workers=s.serving.grpc_workers, thread_name_prefix="grpc")
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._loop_thread.start()
        asyncio.run_coroutine_threadsafe(self._start_grpc(), self._loop).result(60)
        if s.serving.metrics_port:
            host = s.grpc_address.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
            self._metrics_http, _ = start_http_server(s.serving.metrics_port, addr=host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        self._start_http()
        log.info("gRPC (%s) on port %d, metrics on %s; loading the model",
                 "TLS" if self._tls else "plaintext", self.port, self.metrics_port or "(off)")
        threading.Thread(target=self._load_and_serve, name="model-loader", daemon=True).start()
        if wait_until_ready:
            self.wait_until_ready(timeout)
        return self

    async def _start_grpc(self) -> None:
        s = self.config
        credentials = server_credentials(s.security)
        self._tls = credentials is not None
        self._health = AsyncHealthServicer()
        interceptors = [RequestMetricsInterceptor(self.metrics),
                        *server_interceptors(s, self.metrics, self.rate_limiter, tls=credentials is not None),
                        MalformedRequestInterceptor()]
        self._grpc = grpc.aio.server(
            migration_thread_pool=self.pool,
            # the first interceptor is the outermost: every RPC is counted, refusals included; then the
            # key (and its rate) is checked before anything is said about the request, so a caller
            # without a valid key learns nothing from a malformed one
            interceptors=[AioInterceptor(i) for i in interceptors],
            options=[("grpc.max_receive_message_length", s.serving.grpc_max_receive_message_bytes),
                     ("grpc.max_send_message_length", s.serving.grpc_max_send_message_bytes)],
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        for _, add_service in self.services:
            add_service(self._grpc)
        await self._set_health_async(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, *(name for name, _ in self.services), health.SERVICE_NAME, reflection.SERVICE_NAME),
            self._grpc)
        if credentials is not None:
            self.port = self._grpc.add_secure_port(s.grpc_address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(s.grpc_address)
        if self.port == 0:
            raise RuntimeError(f"could not bind the gRPC server to {s.grpc_address}")
        await self._grpc.start()

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

                loaded = load_model(self.config.model, self.config.data_dir, self.config.dtype, self.config.device)
                model, tokenizer = loaded.model, loaded.tokenizer
            # at least max_samples: ServingConfig refuses a smaller batch at load
            config = EngineConfig(max_batch_sequences=self.config.serving.max_batch_sequences,
                                  max_queued_requests=self.config.serving.max_queued_requests,
                                  max_cache_bytes=self.config.serving.max_cache_mib * 2**20,
                                  prefill_chunk_tokens=self.config.serving.prefill_chunk_tokens)
            engine = Engine(quantized(model, self.config.serving.quantize), tokenizer, config, observer=self.metrics,
                            on_fatal=self._engine_failed)
            self.metrics.cache_budget_bytes.set(engine.max_cache_tokens * engine.cache_token_bytes)
            self.limits = RequestLimits(
                max_samples=self.config.serving.max_samples,
                max_new_tokens_limit=self.config.serving.max_new_tokens_limit,
                default_max_new_tokens=self.config.serving.default_max_new_tokens,
                context_window=int(getattr(model.config, "max_position_embeddings", 2048)),
                max_prompt_tokens=self.config.serving.max_prompt_tokens,
                max_cache_tokens=engine.max_cache_tokens,
            )
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
        self.engine.swap(quantized(loaded.model, self.config.serving.quantize), loaded.version).wait(60)
        self.metrics.policy_swaps.inc()
        self.metrics.policy_swap_duration.observe(loaded.seconds + time.perf_counter() - started)
        self.metrics.policy_version.set(loaded.version)

    def _engine_failed(self, error: BaseException) -> None:
        """The engine stopped for good (on its thread): NOT_SERVING at once, then stop so that
        ``wait()`` returns and the process exits non-zero (``flywheel serve`` does)."""
        log.critical("the engine cannot go on (%s: %s): health is NOT_SERVING and the server stops",
                     type(error).__name__, error)
        self.engine_failure = error
        self.metrics.model_loaded.set(0)
        threading.Thread(target=self.stop, kwargs={"grace": 2.0}, name="engine-failed-stop", daemon=True).start()

    def stop(self, grace: float = 10.0) -> None:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds, then stop the engine."""
        with self._stop_lock:
            if self._stopping:
                return
            self._stopping = True
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http is not None:
            self.http.stop()
        if self.follower is not None:
            self.follower.stop()
        if self._grpc is not None and self._loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._grpc.stop(grace), self._loop).result(grace + 5)
            except Exception as exc:  # a timeout: the loop is stopped below anyway
                log.warning("the gRPC server did not stop cleanly: %s", exc)
        if self.engine is not None:
            self.engine.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None and self._loop_thread is not threading.current_thread():
                self._loop_thread.join(10)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self._terminated.set()

    def wait(self) -> None:
        """Until the server has stopped (``stop``, or the engine failed for good)."""
        if self._grpc is not None:
            self._terminated.wait()

    def _set_health(self, status) -> None:
        """The server's status ("") and each service's: Inference, and Feedback and Admin where served
        (from any thread but the event loop's)."""
        if self._loop is None or not self._loop.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(self._set_health_async(status), self._loop)
        if threading.current_thread() is not self._loop_thread:
            try:
                future.result(10)
            except Exception as exc:
                log.warning("could not set the health status: %s", exc)

    async def _set_health_async(self, status) -> None:
        for service in ("", INFERENCE_SERVICE, *(name for name, _ in self.services)):
            await self._health.set(service, status)

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
