"""The embedded redis-server of a data directory is closed to anyone without the data directory:
a password generated into DATA_DIR/secrets (never in argv or in the URL file), CONFIG/DEBUG/ACL/
MODULE refused to every client, its files 0600 in 0700 folders; durable at acknowledgement
(appendfsync always) and bounded (maxmemory, noeviction). Real redis-server processes throughout."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis

from flywheel.contracts.artifacts import POLICY_KIND
from flywheel.contracts.keys import registry_current_key
from flywheel.redis_server import (DENIED_COMMANDS, EmbeddedRedisOptions, RedisServer, embedded_redis_password_file,
                                   redacted, resolve_redis_url, with_password, without_password)


POINTER = registry_current_key(POLICY_KIND)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def embedded(tmp_path):
    data_dir = tmp_path / "data"
    url, server = resolve_redis_url("", data_dir, embedded=EmbeddedRedisOptions(max_memory_mb=64))
    yield data_dir, url, server
    server.stop()


def test_a_client_without_the_password_is_refused(embedded):
    data_dir, url, server = embedded
    password = embedded_redis_password_file(data_dir).read_text().strip()
    assert len(password) == 64 and url == server.url and password in url
    for intruder in (redis.Redis(host="127.0.0.1", port=server.port),
                     redis.Redis.from_url(with_password(url, "guessed"))):
        with pytest.raises(redis.AuthenticationError):
            intruder.set(POINTER, "0")
        intruder.close()
    assert redis.Redis.from_url(url).ping()


def test_no_client_may_reconfigure_the_server(embedded):
    _, url, _ = embedded
    client = redis.Redis.from_url(url)
    # CONFIG SET dir + dbfilename + SAVE is how a Redis client writes files as the server's user
    for command in (("CONFIG", "SET", "dir", "/tmp"), ("CONFIG", "GET", "*"), ("DEBUG", "SLEEP", "0"),
                    ("ACL", "SETUSER", "default", "+config"), ("MODULE", "LOAD", "/tmp/x.so"),
                    ("REPLICAOF", "127.0.0.1", "1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    assert {c.split()[0].lower() for c in ["config", "debug", "acl", "module", "replicaof"]} <= set(DENIED_COMMANDS)
    client.set("still", "works")  # what Flywheel uses stays open
    assert client.get("still") == b"works"


def test_files_and_folders_are_the_owners_only(embedded):
    data_dir, url, server = embedded
    redis.Redis.from_url(url).set("k", "v")  # the AOF exists once written
    secrets = embedded_redis_password_file(data_dir)
    assert mode(secrets) == 0o600 and mode(secrets.parent) == 0o700
    assert mode(data_dir) == 0o700 and mode(server.data_dir) == 0o700
    files = list(server.data_dir.iterdir())
    assert any(f.name.startswith("appendonly") for f in files) and any(f.name == "redis.log" for f in files)
    for path in files:
        assert mode(path) == 0o600, path


def test_the_password_is_in_neither_argv_nor_the_url_file(embedded):
    data_dir, url, server = embedded
    password = embedded_redis_password_file(data_dir).read_text().strip()
    argv = list(server.process.args)  # what ps showed before redis-server retitled itself
    assert password not in " ".join(argv)
    assert password.encode() not in Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
    assert password not in (server.data_dir / "redis.url").read_text()
    # and it is durable at acknowledgement and bounded, as configured
    assert argv[argv.index("--appendfsync") + 1] == "always"
    info = redis.Redis.from_url(url).info("memory")
    assert (info["maxmemory"], info["maxmemory_policy"]) == (64 * 2**20, "noeviction")
    assert redacted(url) == url.replace(password, "***") and without_password(url) == url.replace(f":{password}@", "")


def test_every_process_on_the_data_dir_finds_the_server_with_its_password(embedded):
    data_dir, url, _ = embedded
    again, started = resolve_redis_url("", data_dir)  # another process: the URL file plus the password file
    assert (again, started) == (url, None)
    assert redis.Redis.from_url(again).ping()


def test_an_older_servers_world_readable_files_are_closed_at_start(tmp_path):
    folder = tmp_path / "redis"
    folder.mkdir(mode=0o755)
    old = folder / "appendonly.aof"
    old.write_bytes(b"*1\r\n$4\r\nPING\r\n")
    old.chmod(0o644)
    with RedisServer(folder) as server:
        assert mode(old) == 0o600 and mode(folder) == 0o700
        assert redis.Redis.from_url(server.url).ping()


def test_a_full_redis_refuses_writes_and_evicts_nothing(tmp_path):
    with RedisServer(tmp_path / "redis", max_memory_bytes=2 * 2**20) as server:
        client = redis.Redis.from_url(server.url)
        client.set(POINTER, "3")
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(10_000):
                client.set(f"filler:{i}", b"x" * 4096)
        assert client.get(POINTER) == b"3"  # noeviction: nothing was dropped
        client.delete(*[f"filler:{j}" for j in range(i)])  # deletes work at the bound and free memory
        client.set("after", "ok")
