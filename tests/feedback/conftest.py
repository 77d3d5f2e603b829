"""Fixtures of the feedback tests: stored groups, a real gRPC server with the Feedback service."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from feedback.groups import GroupStore
from feedback_testing import FeedbackServer, group_result


@pytest.fixture
def group_store(redis_client):
    return GroupStore(redis_client, ttl_seconds=3600)


@pytest.fixture
def saved_group(group_store):
    """A served group of four completions, stored as the server stores it."""
    result = group_result("g1", ["Four.", "2 + 2 = 4", "Five.", "I like turtles."])
    group_store.save(result)
    return result


@pytest.fixture
def feedback_server(redis_client):
    """A real gRPC server on a free port serving only the Feedback service, on the test Redis."""
    server = FeedbackServer(redis_client, CollectorRegistry())
    yield server
    server.close()
