"""Who may call what: API-key authentication, role checks and the per-key rate limit of the server.

One ``grpc.ServerInterceptor`` guards every service on the port. Health and reflection stay open
(load balancers and Kubernetes probe them without keys). Every other RPC needs the metadata
``authorization: Bearer <key>``; ``Admin`` needs an admin key, ``Inference`` and ``Feedback`` a
client (or admin) key. The checks run inside the handler's thread, not in the interceptor itself
(which runs on gRPC's single polling thread), so that a slow Redis under the rate limiter delays
one RPC, not the whole server. The handler then runs with ``flywheel.api_keys.current_caller()``
set to the key's name and role (annotator identity, audit).

Refusals say what to do without echoing the key or naming internals: UNAUTHENTICATED for a
missing, malformed, unknown or revoked key; PERMISSION_DENIED for a client key on Admin;
RESOURCE_EXHAUSTED with ``retry-after-ms`` and ``grpc-retry-pushback-ms`` trailers when the key's
rate is exceeded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from flywheel.api_keys import ROLE_ADMIN, ROLE_CLIENT, Caller, KeyStore, caller_context
from serving.admin import ADMIN_SERVICE
from serving.rate_limit import RateLimiter, retry_after_ms

if TYPE_CHECKING:
    from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

OPEN_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"})
BEARER = "bearer "


def service_of(method: str) -> str:
    """``/flywheel.v1.Admin/Promote`` -> ``flywheel.v1.Admin``."""
    return method.lstrip("/").split("/", 1)[0]


def required_role(service: str) -> str | None:
    """The least role that may call ``service``; None = open to anyone."""
    if service in OPEN_SERVICES:
        return None
    return ROLE_ADMIN if service == ADMIN_SERVICE else ROLE_CLIENT


def presented_key(metadata) -> str | None:
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str) and value[:len(BEARER)].lower() == BEARER:
            return value[len(BEARER):].strip() or None
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys: KeyStore, metrics: "ServingMetrics", limiter: RateLimiter | None = None) -> None:
        self.keys = keys
        self.metrics = metrics
        self.limiter = limiter

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        role = required_role(service_of(handler_call_details.method))
        if role is None:
            return handler
        return _guarded(handler, lambda context: self.admit(context, role, handler_call_details.method))

    def admit(self, context: grpc.ServicerContext, role: str, method: str) -> Caller:
        """The caller, or an abort with the status the client can act on."""
        key = presented_key(context.invocation_metadata())
        if key is None:
            self.metrics.auth_failures.labels("missing_key").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "this server needs an API key: send the metadata 'authorization: Bearer <key>'")
        caller = self.keys.authenticate(key)
        if caller is None:
            self.metrics.auth_failures.labels("invalid_key").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid (unknown or revoked)")
        if role == ROLE_ADMIN and not caller.is_admin:
            self.metrics.auth_failures.labels("forbidden").inc()
            log.warning("auth: key %r (role %s) refused on %s", caller.name, caller.role, method)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{service_of(method)} needs an admin key; this key's role is {caller.role}")
        if self.limiter is not None:
            wait = self.limiter.check(caller)
            if wait is not None:
                self.metrics.rate_limited.labels(caller.role).inc()
                ms = retry_after_ms(wait)
                context.set_trailing_metadata(retry_trailers(ms))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"rate limit of key {caller.name!r} ({self.limiter.rate(caller).describe()}) "
                              f"exceeded; retry in {ms} ms")
        return caller


def _guarded(handler: grpc.RpcMethodHandler, admit: Callable[[grpc.ServicerContext], Caller]) -> grpc.RpcMethodHandler:
    """``handler`` with ``admit`` run first and the behaviour run with the caller set."""

    def unary(behavior):
        def run(request_or_iterator, context):
            return caller_context(admit(context)).run(behavior, request_or_iterator, context)
        return run

    def streaming(behavior):
        def run(request_or_iterator, context):
            # each step of the response generator runs in the caller's context; the pool thread's
            # own context is never changed, so nothing leaks into the next RPC it handles
            scope = caller_context(admit(context))
            responses = scope.run(behavior, request_or_iterator, context)
            try:
                while True:
                    try:
                        item = scope.run(next, responses)
                    except StopIteration:
                        return
                    yield item
            finally:
                close = getattr(responses, "close", None)
                if close is not None:
                    scope.run(close)
        return run

    return wrap_behavior(handler, unary, streaming)


Wrap = Callable[[Callable], Callable]


def wrap_behavior(handler: grpc.RpcMethodHandler, unary: Wrap, streaming: Wrap) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped: by ``unary`` when it returns one response, by
    ``streaming`` (whose wrapper is a generator) when it streams them."""
    if handler.unary_unary is not None:
        kind, behavior, wrap = grpc.unary_unary_rpc_method_handler, handler.unary_unary, unary
    elif handler.unary_stream is not None:
        kind, behavior, wrap = grpc.unary_stream_rpc_method_handler, handler.unary_stream, streaming
    elif handler.stream_unary is not None:
        kind, behavior, wrap = grpc.stream_unary_rpc_method_handler, handler.stream_unary, unary
    else:
        kind, behavior, wrap = grpc.stream_stream_rpc_method_handler, handler.stream_stream, streaming
    return kind(wrap(behavior), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def retry_trailers(ms: int) -> tuple[tuple[str, str], ...]:
    """The retry hint of a RESOURCE_EXHAUSTED refusal: Flywheel's ``retry-after-ms`` and gRPC's
    standard ``grpc-retry-pushback-ms`` (gRFC A6), which a stock client's retry policy waits for."""
    return (("retry-after-ms", str(ms)), ("grpc-retry-pushback-ms", str(ms)))


AUTH_MODES = ("on", "off")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def server_interceptors(settings, metrics: "ServingMetrics", limiter: RateLimiter | None,
                        tls: bool) -> list[grpc.ServerInterceptor]:
    """The interceptors ``settings`` ask for; with auth off, none, and a warning nobody can miss."""
    if settings.security.auth not in AUTH_MODES:
        raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}; got {settings.security.auth!r}")
    if settings.security.auth == "off":
        log.warning("*** AUTH IS OFF: anyone who can reach %s may call every RPC, Admin included (promote, "
                    "rollback), with no rate limit. Only for a trusted network; unset FLYWHEEL_AUTH to turn "
                    "it back on. ***", settings.grpc_address)
        return []
    host = settings.grpc_address.rsplit(":", 1)[0]
    if not tls and host not in LOOPBACK_HOSTS:
        log.warning("gRPC on %s without TLS: API keys cross the network in plaintext (set tls_cert and tls_key, "
                    "or terminate TLS in front of the server)", settings.grpc_address)
    return [AuthInterceptor(KeyStore.from_settings(settings), metrics, limiter)]
