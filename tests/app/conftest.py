"""Fixtures of the application tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """A real serving process as `flywheel serve` builds it (gRPC Inference + Feedback + Admin on a
    free port, its own Redis, the tiny model, the test keys)."""
    from flywheel.app.serve import build_server
    from flywheel.config import FlywheelConfig
    from flywheel.redis_server import RedisServer

    from support.auth import API_KEYS

    root = tmp_path_factory.mktemp("tiny-server")
    redis_server = RedisServer(root / "redis").start()
    settings = FlywheelConfig.load({"model": str(tiny_model_dir), "grpc_address": "127.0.0.1:0", "metrics_port": 0,
                                    "dtype": "float32", "data_dir": str(root), "api_keys": API_KEYS,
                                    "redis_url": redis_server.url}, environ={})
    built, release = build_server(settings)
    built.start(wait_until_ready=True)
    yield built
    built.stop(grace=1)
    release()
    redis_server.stop(kill=True)
