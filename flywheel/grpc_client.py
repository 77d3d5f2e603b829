"""Channels of the CLI clients: TLS when the settings ask for it, the API key on every call, a
retry policy, and errors that tell a person at a terminal what to fix.

The key travels as the metadata ``authorization: Bearer <key>``, added by a client interceptor so
it works over plaintext channels too (gRPC's own call credentials refuse insecure channels).

The channel carries a service config with a retry policy (gRFC A6): a refusal with
UNAVAILABLE (the server is starting or draining) or RESOURCE_EXHAUSTED (a full queue, a key over
its rate) is retried after the server's ``grpc-retry-pushback-ms`` hint, or with backoff where it
sent none. Only calls that are safe to repeat are retried: Inference (a retried completion is a
new group), Feedback (rankings carry an idempotency key) and Admin's reads; a promotion or a
rollback is never repeated behind an operator's back.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import grpc

from flywheel.api_keys import ROLE_ADMIN, ROLE_CLIENT, find_client_key
from flywheel.tls import channel_credentials
from flywheel.v1 import admin_pb2, feedback_pb2, inference_pb2

if TYPE_CHECKING:
    from flywheel.config import FlywheelConfig

AUTHORIZATION = "authorization"
RETRY_AFTER_MS = "retry-after-ms"

_INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
_FEEDBACK = feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name
_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.25s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}
SERVICE_CONFIG = {"methodConfig": [{
    "name": [{"service": _INFERENCE}, {"service": _FEEDBACK},
             {"service": _ADMIN, "method": "ListPolicies"}, {"service": _ADMIN, "method": "GetStatus"}],
    "retryPolicy": RETRY_POLICY,
}]}
CHANNEL_OPTIONS = (("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(SERVICE_CONFIG)))


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
    """A channel to ``address`` (default the grpc_address setting) with TLS, the retry policy and
    the key of ``role``."""
    address = address or settings.grpc_address
    credentials = channel_credentials(settings.client)
    if credentials:
        channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return with_key(channel, find_client_key(settings, role).key)


def retry_after_seconds(error: grpc.RpcError, default: float) -> float:
    """The server's retry hint on a RESOURCE_EXHAUSTED refusal (trailing metadata ``retry-after-ms``),
    in seconds; ``default`` when it names none."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_MS:
            try:
                return max(0.0, float(value) / 1000)
            except ValueError:
                break
    return default


START_A_SERVER = ("start one with `flywheel serve` (or the whole platform with `flywheel up`), or pass the "
                  "address of a running one with --grpc-address HOST:PORT (env FLYWHEEL_GRPC_ADDRESS)")


def explain_rpc_error(error: grpc.RpcError, settings: "FlywheelConfig", role: str = ROLE_CLIENT,
                      address: str | None = None) -> str:
    """What went wrong and how to fix it, for a CLI user: which address was tried, which key file
    was looked for (the server's own message speaks to programs: "send the metadata ...")."""
    address = address or settings.grpc_address
    code, details = error.code(), error.details() or ""
    found = find_client_key(settings, role)
    if code == grpc.StatusCode.UNAUTHENTICATED and found.key is None:
        return (f"the server at {address} needs an API key and none was found (looked in "
                f"{', '.join(found.looked_in)}). Set FLYWHEEL_API_KEY to a key of that server, or pass "
                f"--data-dir DIR of the server's data directory, whose secrets/ folder holds the keys it "
                f"generated; `flywheel keys create` makes new ones")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"the server at {address} refused the API key from {found.source} ({details}); use a key that "
                f"server accepts (`flywheel keys list` on its data directory) in FLYWHEEL_API_KEY")
    if code == grpc.StatusCode.PERMISSION_DENIED and role == ROLE_ADMIN:
        return (f"{details}: the key from {found.source} is not an admin key; set FLYWHEEL_API_KEY to an admin "
                f"key (the server's DATA_DIR/secrets/admin.key, or `flywheel keys create --role admin`)")
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        return f"no Flywheel server answers at {address} ({details}); {START_A_SERVER}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (f"the server at {address} does not offer this service ({details}): Feedback and Admin run only on "
                f"a server that stores groups (FLYWHEEL_STORE_GROUPS, on by default); is --grpc-address the "
                f"Flywheel server?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (f"no answer from {address} before the deadline: is a server running there (it may still be "
                f"loading its model)? {START_A_SERVER[0].upper()}{START_A_SERVER[1:]}, or raise --timeout")
    return f"{code.name}: {details} (server {address})"
