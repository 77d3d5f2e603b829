"""Fixtures of the feedback tests: stored groups, a real gRPC server with the Feedback service."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from flywheel.group_store import GroupStore
from support.feedback import FeedbackServer, group_result


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


@pytest.fixture(scope="session")
def judge_model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny judge model folder (random weights, real tokenizer and chat template), built once."""
    from support.feedback import build_biased_judge_dir

    return build_biased_judge_dir(tiny_model_dir, tmp_path_factory.mktemp("judge-model"))


@pytest.fixture(scope="session")
def judge(judge_model_dir):
    from feedback.judge import Judge, load_constitution
    from flywheel.models import load_model

    loaded = load_model(str(judge_model_dir), judge_model_dir, "float32")
    constitution = load_constitution()
    return Judge(loaded.model, loaded.tokenizer, constitution, Judge.make_id(loaded.path, constitution))
