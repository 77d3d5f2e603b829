"""Where the commands that work on the platform's existing state (``policies``, ``reward-models``,
``promote``, ``rollback``, ``status``, ``feedback trim|schedule``) find it, and their refusal to
invent it.

``flywheel serve`` and ``flywheel up`` start an embedded redis-server in the data directory when
no Redis URL is set: right for a first start. A command that only reads or edits what is there
must not: run in the wrong folder, it would start a throwaway Redis and print an empty registry
as if all were well. These commands connect only to a configured Redis or to the embedded Redis
of a data directory that has one (started for the command if it is not running), and otherwise
stop with a message that names the data directory and the Redis they looked at.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import redis

from flywheel.redis_server import (EmbeddedRedisOptions, embedded_redis_folder, embedded_redis_has_data, redacted,
                                   redis_connection)

POINT_ELSEWHERE = ("run the command in the folder where `flywheel up` or `flywheel serve` ran, or pass "
                   "--data-dir DIR (env FLYWHEEL_DATA_DIR) or --redis-url redis://HOST:PORT/0 (env FLYWHEEL_REDIS_URL)")


class StateNotFound(Exception):
    """No existing state where the command looked; the message says where, and how to point it."""


@dataclass(frozen=True)
class StateLocation:
    """The data directory and the Redis a command works on, as a person should read them."""

    data_dir: Path
    redis: str

    def describe(self) -> str:
        return f"{self.redis}, data dir {self.data_dir}"


@contextlib.contextmanager
def existing_state(settings, allow_new_redis: bool = False) -> Iterator[tuple[redis.Redis, StateLocation]]:
    """A client of the platform's Redis and where it is; ``StateNotFound`` when there is none.
    ``allow_new_redis``: the command may start a fresh embedded Redis (``--rebuild`` from the
    manifests on disk)."""
    data_dir = Path(settings.data_dir).resolve()
    url = settings.redis_url or os.environ.get("REDIS_URL", "")
    if url:
        where = StateLocation(data_dir, f"Redis {redacted(url)}")
    else:
        where = StateLocation(data_dir, f"the embedded Redis in {embedded_redis_folder(data_dir)}")
        if not allow_new_redis and not embedded_redis_has_data(data_dir):
            raise StateNotFound(
                f"no Flywheel state in {data_dir}: no Redis URL is set (FLYWHEEL_REDIS_URL, REDIS_URL) and "
                f"{embedded_redis_folder(data_dir)} holds no embedded Redis data. Nothing was started; "
                f"{POINT_ELSEWHERE}")
    with redis_connection(settings.redis_url, settings.data_dir, embedded=EmbeddedRedisOptions.of(settings),
                          socket_connect_timeout=2,
                          socket_timeout=5) as client:
        try:
            client.ping()
        except redis.RedisError as exc:
            raise StateNotFound(f"cannot reach {where.redis} ({exc}); check that it runs, or {POINT_ELSEWHERE}") from exc
        yield client, where
