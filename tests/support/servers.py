"""A serving process for tests, as `flywheel serve` builds it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def serving_process(root: Path, model, **settings):
    """``build_server`` on its own real Redis (under ``root``), gRPC on a free port, the test keys,
    float32; ``settings`` override by setting name. Stops it all on exit."""
    from flywheel.app.serve import build_server
    from flywheel.config import FlywheelConfig
    from flywheel.redis_server import RedisServer

    from support.auth import API_KEYS

    redis_server = RedisServer(root / "redis").start()
    values = {"model": str(model), "grpc_address": "127.0.0.1:0", "metrics_port": 0, "dtype": "float32",
              "data_dir": str(root), "api_keys": API_KEYS, "redis_url": redis_server.url} | settings
    try:
        server, release = build_server(FlywheelConfig.load(values, environ={}))
        server.start(wait_until_ready=True)
        try:
            yield server
        finally:
            server.stop(grace=1)
            release()
    finally:
        redis_server.stop(kill=True)
