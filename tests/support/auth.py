"""API keys of the tests: fixed keys the servers under test accept, and channels that send them."""

from __future__ import annotations

import grpc

from flywheel.grpc_client import with_key

CLIENT_KEY = "fwk_test-client-0123456789abcdefghijklmnopqrstuv"
ADMIN_KEY = "fwk_test-admin-0123456789abcdefghijklmnopqrstuvw"
CLIENT_NAME = "tester"
ADMIN_NAME = "operator"
# FLYWHEEL_API_KEYS of the servers under test: the shared fixtures run with auth on
API_KEYS = f"{CLIENT_NAME}:client:{CLIENT_KEY},{ADMIN_NAME}:admin:{ADMIN_KEY}"


def keyed_channel(address: str, key: str | None = CLIENT_KEY) -> grpc.Channel:
    """A plaintext channel to ``address`` sending ``key`` on every call."""
    return with_key(grpc.insecure_channel(address), key)
