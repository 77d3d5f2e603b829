"""``flywheel serve`` and ``flywheel complete``.

``build_server`` is the serving process's wiring: it joins serving (Inference, Admin) with
feedback (the group store and the Feedback service on the same port; with ``http_port`` set, the
rankings routes and the ranking page on the OpenAI-compatible HTTP API), which is why it lives in
the application layer and not in either part."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from serving.server import InferenceServer

from flywheel.config import (ClientConfig, FeedbackConfig, FlywheelConfig, SecurityConfig, ServingConfig,
                             add_config_flags, config_from_args)


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the gRPC server (Inference, Feedback, Admin)",
        description="Serve the policy over gRPC on --grpc-address: Inference, and with store_groups (the default) "
                    "Feedback (rankings) and Admin (registry, promote, rollback) on the same port, plus health and "
                    "reflection; Prometheus metrics on --metrics-port; with --http-port an OpenAI-compatible HTTP "
                    "API and the ranking page. Follows the policy registry and hot-swaps.")
    add_config_flags(serve, FlywheelConfig, ServingConfig, SecurityConfig, FeedbackConfig)
    serve.set_defaults(handler=run_serve)

    complete = subparsers.add_parser(
        "complete", help="ask a running server for completions",
        description="Send one Complete (or StreamComplete with --stream) request to the server at --grpc-address "
                    "and print the samples. Unset sampling flags take the server's defaults.")
    complete.add_argument("prompt", help="the user message (rendered with the chat template) or, with --raw, the prompt")
    complete.add_argument("--address", dest="grpc_address", action=DeprecatedAlias, help=argparse.SUPPRESS)
    complete.add_argument("-n", type=int, default=None, help="samples to draw (server default 1, at most its max_samples, 16)")
    complete.add_argument("--max-new-tokens", type=int, default=None,
                          help="most tokens per sample (at least 1; server default --default-max-new-tokens)")
    complete.add_argument("--temperature", type=float, default=None,
                          help="sampling temperature; 0 = greedy (server default 1.0)")
    complete.add_argument("--top-p", type=float, default=None,
                          help="nucleus sampling: keep the smallest set of tokens of this total probability "
                               "(0 < p <= 1; server default 1.0)")
    complete.add_argument("--seed", type=int, default=None,
                          help="the same seed and request give the same samples (default: a fresh seed)")
    complete.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    complete.add_argument("--raw", action="store_true", help="send PROMPT verbatim instead of as a chat message")
    complete.add_argument("--stream", action="store_true",
                          help="stream: sample 0 is printed as it is decoded, the others when they finish")
    complete.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds (default 120)")
    add_config_flags(complete, FlywheelConfig, ClientConfig)
    complete.set_defaults(handler=run_complete)


class DeprecatedAlias(argparse.Action):
    """A flag kept under its old name (hidden from --help) that warns and sets the new one:
    ``complete --address`` was the one client flag not called ``--grpc-address``."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"flywheel: {option_string} is deprecated; use --grpc-address (the same flag on every command)",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_server(settings) -> tuple["InferenceServer", Callable[[], None]]:
    """The serving process: Inference, plus (with ``store_groups``) the group store and the Feedback
    API on the same port, backed by ``REDIS_URL`` or an embedded redis-server. Returns the server
    and a function that releases what it started besides."""
    from serving.server import InferenceServer

    if not settings.feedback.store_groups:
        return InferenceServer(settings), lambda: None

    from feedback.service import FEEDBACK_SERVICE, FeedbackServicer, add_feedback_service
    from flywheel.contracts.keys import REWARD_MODEL_CONSUMER_GROUP
    from prometheus_client import Counter

    from flywheel.group_store import GroupStore, GroupStoreFull
    from flywheel.redis_server import EmbeddedRedisOptions, open_redis, resolve_redis_url
    from serving.admin import ADMIN_SERVICE, AdminServicer, add_admin_service
    from serving.metrics import RegistryCollector, ServingMetrics
    from serving.rate_limit import RateLimiter

    url, embedded = resolve_redis_url(settings.redis_url, settings.data_dir,
                                      embedded=EmbeddedRedisOptions.of(settings))
    # short timeouts: with Redis down, completions are still served (their groups just cannot be ranked)
    client, _ = open_redis(url, settings.data_dir, socket_connect_timeout=1.0, socket_timeout=2.0,
                           health_check_interval=10)
    # shorter still for the rate limiter, which every RPC waits on (it lets requests through when Redis is down)
    limiter_client, _ = open_redis(url, settings.data_dir, socket_connect_timeout=0.25, socket_timeout=0.25)
    metrics = ServingMetrics()
    metrics.registry.register(RegistryCollector(client, settings.data_dir))  # the pointer the server follows
    feedback = FeedbackServicer(client, group_ttl_seconds=settings.feedback.group_ttl_seconds,
                                registry=metrics.registry)
    limiter = RateLimiter.from_settings(limiter_client, settings.security, on_error=metrics.rate_limiter_errors.inc)
    groups = GroupStore(client, settings.feedback.group_ttl_seconds, settings.feedback.group_max_memory_fraction)
    memory_refusals = Counter("flywheel_group_store_memory_refusals",
                              "served groups not stored because Redis is above the memory share of groups "
                              "(also counted in flywheel_group_store_failures_total)", registry=metrics.registry)

    def store_group(result) -> None:  # the server counts and logs every failure; this names the full ones
        try:
            groups.save(result)
        except GroupStoreFull:
            memory_refusals.inc()
            raise

    server = InferenceServer(settings, metrics=metrics, group_sink=store_group, policy_redis=client,
                             rate_limiter=limiter)

    def serving_status() -> tuple[int, int, int]:
        engine = server.engine
        return (engine.policy_version, engine.running_sequences, engine.queued) if engine else (0, 0, 0)

    admin = AdminServicer(client, settings.data_dir, serving_status,
                          lambda: feedback.stream.waiting_for(REWARD_MODEL_CONSUMER_GROUP))
    server.services = [(FEEDBACK_SERVICE, lambda grpc_server: add_feedback_service(grpc_server, feedback)),
                       (ADMIN_SERVICE, lambda grpc_server: add_admin_service(grpc_server, admin))]
    if settings.serving.http_port:
        from flywheel.app.http_feedback import FeedbackRoutes

        server.http_routes = FeedbackRoutes(feedback.intake).routes()

    def release() -> None:
        client.close()
        limiter_client.close()
        if embedded is not None:
            embedded.stop()

    return server, release


def run_serve(args: argparse.Namespace) -> int:
    import torch

    settings = config_from_args(args)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    server, release = build_server(settings)
    server.start()
    stopping = threading.Event()

    def shutdown(signum, frame):
        if not stopping.is_set():
            stopping.set()
            print("flywheel: shutting down (in-flight requests get 10 s to finish)", file=sys.stderr)
            threading.Thread(target=server.stop, kwargs={"grace": 10.0}, daemon=True).start()

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    try:
        server.wait()
    finally:
        release()
    if server.engine_failure is not None:  # a supervisor (flywheel up, Kubernetes, systemd) restarts us
        print(f"flywheel: the engine failed and cannot go on ({type(server.engine_failure).__name__}: "
              f"{server.engine_failure}); exiting with status {ENGINE_FAILED_EXIT}", file=sys.stderr)
        return ENGINE_FAILED_EXIT
    return 0


ENGINE_FAILED_EXIT = 70  # EX_SOFTWARE


def build_request(args: argparse.Namespace):
    from flywheel.v1 import inference_pb2

    request = inference_pb2.CompleteRequest(stop=args.stop)
    if args.raw:
        request.prompt = args.prompt
    else:
        request.messages.add(role="user", content=args.prompt)
    for name in ("n", "max_new_tokens", "temperature", "top_p", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(request, name, value)
    return request


def run_complete(args: argparse.Namespace) -> int:
    import grpc

    from flywheel.grpc_client import explain_rpc_error, open_channel
    from flywheel.v1 import inference_pb2_grpc

    settings = config_from_args(args)
    request = build_request(args)
    with open_channel(settings) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            if args.stream:
                response = stream_completion(stub, request, args.timeout)
            else:
                response = stub.Complete(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"\nflywheel complete: {explain_rpc_error(exc, settings)}" if args.stream else
                  f"flywheel complete: {explain_rpc_error(exc, settings)}", file=sys.stderr)
            return 1
    print_response(response, streamed=0 if args.stream else None)
    return 0


def stream_completion(stub, request, timeout: float):
    """StreamComplete, with sample 0 printed as it grows (the others arrive with the final message,
    where ``print_response`` shows them). Returns the final response."""
    print("--- #0 (streaming)", flush=True)
    for message in stub.StreamComplete(request, timeout=timeout):
        if message.HasField("final"):
            print(flush=True)
            return message.final
        if message.delta.index == 0:
            print(message.delta.text, end="", flush=True)
    raise RuntimeError("the stream ended without its final message")


def print_response(response, streamed: int | None = None) -> None:
    """The group and every sample; the text of sample ``streamed`` was printed already."""
    from flywheel.v1 import inference_pb2

    print(f"group {response.group_id}  policy v{response.policy_version}  prompt {response.prompt_token_count} tokens")
    for c in response.completions:
        reason = inference_pb2.FinishReason.Name(c.finish_reason).removeprefix("FINISH_REASON_").lower()
        shown = "  (text above)" if c.index == streamed else ""
        print(f"\n--- #{c.index} {c.completion_id}  {c.token_count} tokens  {reason}  logprob {c.logprob:.2f}{shown}")
        if c.index != streamed:
            print(c.text)
