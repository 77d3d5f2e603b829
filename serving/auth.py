"""Who may call what: API-key authentication, role checks and the per-key rate limit of the server.

One interceptor guards every service on the port (the server is ``grpc.aio``; ``AioInterceptor``
runs these interceptors there). Health and reflection stay open (load balancers and Kubernetes
probe them without keys); at most ``max_open_rpcs`` of them run at once (a Watch stream costs no
thread and no slot that keyed traffic needs; beyond the bound a keyless call is refused with
RESOURCE_EXHAUSTED). Every other RPC needs the metadata ``authorization: Bearer <key>``;
``Admin`` needs an admin key, ``Inference`` and ``Feedback`` a client (or admin) key. The checks
run in a worker thread, never on the event loop, so that a slow Redis under the rate limiter
delays one RPC, not the whole server. The handler then runs with
``flywheel.api_keys.current_caller()`` set to the key's name and role (annotator identity, audit).

Refusals say what to do without echoing the key or naming internals: UNAUTHENTICATED for a
missing, malformed, unknown or revoked key; PERMISSION_DENIED for a client key on Admin;
RESOURCE_EXHAUSTED with ``retry-after-ms`` and ``grpc-retry-pushback-ms`` trailers when the key's
rate is exceeded.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from concurrent import futures
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


class Refusal(Exception):
    """An RPC refused before its handler runs: the status, the message and any trailers."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers

    def abort(self, context) -> None:
        if self.trailers:
            context.set_trailing_metadata(self.trailers)
        context.abort(self.code, self.details)

    async def abort_async(self, context) -> None:
        if self.trailers:
            context.set_trailing_metadata(self.trailers)
        await context.abort(self.code, self.details)


DEFAULT_OPEN_RPCS = 256


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys: KeyStore, metrics: "ServingMetrics", limiter: RateLimiter | None = None,
                 max_open_rpcs: int = DEFAULT_OPEN_RPCS, admission_threads: int = 8) -> None:
        self.keys = keys
        self.metrics = metrics
        self.limiter = limiter
        self.open_rpcs = OpenRpcLimit(max_open_rpcs)
        # the key check and the rate limiter (Redis) of async handlers run here, never on the event loop
        self._pool = futures.ThreadPoolExecutor(max_workers=admission_threads, thread_name_prefix="auth")

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        role = required_role(service_of(handler_call_details.method))
        if role is None:
            return self.open_rpcs.guard(handler)
        return _guarded(handler, lambda context: self.admit(context, role, handler_call_details.method), self._pool)

    def admit(self, context: grpc.ServicerContext, role: str, method: str) -> Caller:
        """The caller, or a ``Refusal`` with the status the client can act on."""
        key = presented_key(context.invocation_metadata())
        if key is None:
            self.metrics.auth_failures.labels("missing_key").inc()
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                          "this server needs an API key: send the metadata 'authorization: Bearer <key>'")
        caller = self.keys.authenticate(key)
        if caller is None:
            self.metrics.auth_failures.labels("invalid_key").inc()
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid (unknown or revoked)")
        if role == ROLE_ADMIN and not caller.is_admin:
            self.metrics.auth_failures.labels("forbidden").inc()
            log.warning("auth: key %r (role %s) refused on %s", caller.name, caller.role, method)
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          f"{service_of(method)} needs an admin key; this key's role is {caller.role}")
        if self.limiter is not None:
            wait = self.limiter.check(caller)
            if wait is not None:
                self.metrics.rate_limited.labels(caller.role).inc()
                ms = retry_after_ms(wait)
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"rate limit of key {caller.name!r} ({self.limiter.rate(caller).describe()}) "
                              f"exceeded; retry in {ms} ms", retry_trailers(ms))
        return caller


class OpenRpcLimit:
    """At most ``limit`` keyless RPCs (health, reflection) at once; the next is refused at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def _enter(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self.open -= 1

    def _refusal(self) -> Refusal:
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"too many open health/reflection calls ({self.limit}); close some and retry",
                       retry_trailers(1000))

    def guard(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        limit = self

        def unary(behavior):
            def run(request_or_iterator, context):
                if not limit._enter():
                    limit._refusal().abort(context)
                try:
                    return behavior(request_or_iterator, context)
                finally:
                    limit._leave()
            return run

        def streaming(behavior):
            def run(request_or_iterator, context):
                if not limit._enter():
                    limit._refusal().abort(context)
                try:
                    yield from behavior(request_or_iterator, context)
                finally:
                    limit._leave()
            return run

        def unary_async(behavior):
            async def run(request_or_iterator, context):
                if not limit._enter():
                    await limit._refusal().abort_async(context)
                try:
                    return await behavior(request_or_iterator, context)
                finally:
                    limit._leave()
            return run

        def streaming_async(behavior):
            if inspect.iscoroutinefunction(behavior):  # writes with context.write (aio's health Watch)
                return unary_async(behavior)

            async def run(request_or_iterator, context):
                if not limit._enter():
                    await limit._refusal().abort_async(context)
                try:
                    async for item in behavior(request_or_iterator, context):
                        yield item
                finally:
                    limit._leave()
            return run

        return wrap_behavior(handler, unary, streaming, unary_async, streaming_async)


def _enter_caller(caller: Caller) -> None:
    """Set ``current_caller()`` in the running task's own context (each RPC is its own task)."""
    for variable, value in caller_context(caller).items():
        variable.set(value)


def _guarded(handler: grpc.RpcMethodHandler, admit: Callable[[grpc.ServicerContext], Caller],
             pool: futures.Executor) -> grpc.RpcMethodHandler:
    """``handler`` with ``admit`` run first and the behaviour run with the caller set."""

    def admitted(context) -> Caller:
        try:
            return admit(context)
        except Refusal as refusal:
            refusal.abort(context)
            raise

    def unary(behavior):
        def run(request_or_iterator, context):
            return caller_context(admitted(context)).run(behavior, request_or_iterator, context)
        return run

    def streaming(behavior):
        def run(request_or_iterator, context):
            # each step of the response generator runs in the caller's context; the pool thread's
            # own context is never changed, so nothing leaks into the next RPC it handles
            scope = caller_context(admitted(context))
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

    async def admitted_async(context) -> Caller:
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, admit, context)
        except Refusal as refusal:
            await refusal.abort_async(context)
            raise

    def unary_async(behavior):
        async def run(request_or_iterator, context):
            _enter_caller(await admitted_async(context))
            return await behavior(request_or_iterator, context)
        return run

    def streaming_async(behavior):
        if inspect.iscoroutinefunction(behavior):
            return unary_async(behavior)

        async def run(request_or_iterator, context):
            _enter_caller(await admitted_async(context))
            async for item in behavior(request_or_iterator, context):
                yield item
        return run

    return wrap_behavior(handler, unary, streaming, unary_async, streaming_async)


Wrap = Callable[[Callable], Callable]


def is_async(behavior: Callable) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def wrap_behavior(handler: grpc.RpcMethodHandler, unary: Wrap, streaming: Wrap,
                  unary_async: Wrap | None = None, streaming_async: Wrap | None = None) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped: by ``unary`` when it returns one response, by
    ``streaming`` (whose wrapper is a generator) when it streams them; an ``async`` behaviour (an
    asyncio handler of ``grpc.aio``) by ``unary_async`` / ``streaming_async``, which keep it async."""
    if handler.unary_unary is not None:
        kind, behavior, wrap, wrap_async = grpc.unary_unary_rpc_method_handler, handler.unary_unary, unary, unary_async
    elif handler.unary_stream is not None:
        kind, behavior, wrap, wrap_async = (grpc.unary_stream_rpc_method_handler, handler.unary_stream, streaming,
                                            streaming_async)
    elif handler.stream_unary is not None:
        kind, behavior, wrap, wrap_async = (grpc.stream_unary_rpc_method_handler, handler.stream_unary, unary,
                                            unary_async)
    else:
        kind, behavior, wrap, wrap_async = (grpc.stream_stream_rpc_method_handler, handler.stream_stream, streaming,
                                            streaming_async)
    if is_async(behavior):
        if wrap_async is None:
            return handler
        wrap = wrap_async
    return kind(wrap(behavior), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class AioInterceptor(grpc.aio.ServerInterceptor):
    """Runs one of these interceptors (a ``grpc.ServerInterceptor`` whose ``intercept_service``
    wraps the handler with ``wrap_behavior``) on a ``grpc.aio`` server."""

    def __init__(self, inner: grpc.ServerInterceptor) -> None:
        self.inner = inner

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return self.inner.intercept_service(lambda _details: handler, handler_call_details)


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
    return [AuthInterceptor(KeyStore.from_settings(settings), metrics, limiter,
                            max_open_rpcs=settings.serving.grpc_open_rpcs)]
