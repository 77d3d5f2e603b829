"""Requests whose bytes do not parse get INVALID_ARGUMENT, not INTERNAL.

grpcio answers a request it cannot deserialize with ``INTERNAL: Exception deserializing request!``,
which tells a client that the server is broken when the client is, and trips the alerts on server
errors. This interceptor wraps the deserializer of every unary-request method: a request that does
not parse reaches the handler as a marker, and the handler is replaced by a refusal that names the
expected message type.
"""

from __future__ import annotations

import inspect
import logging

import grpc

log = logging.getLogger(__name__)


class _Malformed:
    """What a request that did not parse becomes (grpcio treats None as its own failure)."""


_MALFORMED = _Malformed()


def _refuse(context: grpc.ServicerContext, method: str) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {method} request message")


async def _refuse_async(context, method: str) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {method} request message")


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def safe_deserialize(raw: bytes):
            try:
                return deserialize(raw)
            except Exception as exc:  # DecodeError, invalid UTF-8 in a string field, ...
                log.info("%s: malformed request (%s)", handler_call_details.method, exc)
                return _MALFORMED

        def refusing_coroutine(behavior):
            async def run(request, context):
                if request is _MALFORMED:
                    await _refuse_async(context, method)
                return await behavior(request, context)
            return run

        if handler.response_streaming:
            behavior = handler.unary_stream
            if inspect.isasyncgenfunction(behavior):
                async def unary_stream(request, context):
                    if request is _MALFORMED:
                        await _refuse_async(context, method)
                    async for item in behavior(request, context):
                        yield item
            elif inspect.iscoroutinefunction(behavior):  # streams with context.write
                unary_stream = refusing_coroutine(behavior)
            else:
                def unary_stream(request, context):
                    if request is _MALFORMED:
                        _refuse(context, method)
                    yield from behavior(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, request_deserializer=safe_deserialize,
                                                        response_serializer=handler.response_serializer)
        behavior = handler.unary_unary
        if inspect.iscoroutinefunction(behavior):
            unary_unary = refusing_coroutine(behavior)
        else:
            def unary_unary(request, context):
                if request is _MALFORMED:
                    _refuse(context, method)
                return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, request_deserializer=safe_deserialize,
                                                   response_serializer=handler.response_serializer)
