"""Channels of the CLI clients: TLS when the settings ask for it, and the API key on every call.

The key travels as the metadata ``authorization: Bearer <key>``, added by a client interceptor so
it works over plaintext channels too (gRPC's own call credentials refuse insecure channels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from flywheel.api_keys import ROLE_CLIENT, client_key
from flywheel.tls import channel_credentials

if TYPE_CHECKING:
    from flywheel.config import FlywheelConfig

AUTHORIZATION = "authorization"


def bearer(key: str) -> tuple[str, str]:
    return AUTHORIZATION, f"Bearer {key}"


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the API key to each call's metadata."""

    def __init__(self, key: str) -> None:
        self.header = bearer(key)

    def _with_key(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_key(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_key(client_call_details), request)


def with_key(channel: grpc.Channel, key: str | None) -> grpc.Channel:
    """``channel`` sending ``key`` on every call (unchanged when there is no key)."""
    return channel if not key else grpc.intercept_channel(channel, _KeyInterceptor(key))


def open_channel(settings: "FlywheelConfig", address: str | None = None, role: str = ROLE_CLIENT) -> grpc.Channel:
    """A channel to ``address`` (default the grpc_address setting) with TLS and the key of ``role``."""
    address = address or settings.grpc_address
    credentials = channel_credentials(settings.client)
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    return with_key(channel, client_key(settings, role))


def retry_after_seconds(error: grpc.RpcError, default: float) -> float:
    """The server's retry hint on a RESOURCE_EXHAUSTED refusal (trailing metadata ``retry-after-ms``),
    in seconds; ``default`` when it names none."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return max(0.0, float(value) / 1000)
            except ValueError:
                break
    return default
