"""Fixtures of the application tests."""

from __future__ import annotations

import pytest

from support.servers import serving_process


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """A real serving process (gRPC Inference + Feedback + Admin, its own Redis, the tiny model)."""
    with serving_process(tmp_path_factory.mktemp("tiny-server"), tiny_model_dir) as server:
        yield server
