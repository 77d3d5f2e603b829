"""API keys without a server: the keys file, FLYWHEEL_API_KEYS, the local keys, Celery over rediss://."""

from __future__ import annotations

import json
import ssl

import pytest

from flywheel.api_keys import (
    ROLE_ADMIN, ROLE_CLIENT, Caller, KeyFile, KeyStore, client_key, create_local_keys, hash_key, parse_keys_spec,
)
from flywheel.config import FlywheelConfig


def test_keys_from_the_environment_plain_or_hashed():
    keys = parse_keys_spec(f"app:client:fwk_one, ops:admin:sha256:{hash_key('fwk_two')}")
    store = KeyStore(keys)
    assert store.authenticate("fwk_one") == Caller("app", ROLE_CLIENT)
    assert store.authenticate("fwk_two") == Caller("ops", ROLE_ADMIN)
    assert store.authenticate("fwk_three") is None
    assert all("fwk_one" not in repr(k) for k in keys)  # only hashes are kept


@pytest.mark.parametrize("spec", ["app:client", "app:root:fwk_secret-value", "app:admin:sha256:abc"])
def test_malformed_key_entries_are_refused_without_echoing_the_secret(spec):
    with pytest.raises(ValueError) as info:
        parse_keys_spec(spec)
    assert "secret-value" not in str(info.value)


def test_the_keys_file_holds_hashes_and_changes_apply_without_a_restart(tmp_path):
    keys_file = KeyFile(tmp_path / "keys.json")
    first = keys_file.create("alice", ROLE_CLIENT)
    store = KeyStore(path=keys_file.path)
    assert store.authenticate(first) == Caller("alice", ROLE_CLIENT)
    second = keys_file.create("bob", ROLE_ADMIN)
    assert store.authenticate(second) == Caller("bob", ROLE_ADMIN)
    text = keys_file.path.read_text()
    assert first not in text and second not in text and hash_key(first) in text
    assert keys_file.path.stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="exists already"):
        keys_file.create("alice", ROLE_CLIENT)
    keys_file.revoke("alice")
    assert store.authenticate(first) is None and store.authenticate(second) is not None
    with pytest.raises(ValueError, match="no key named"):
        keys_file.revoke("alice")


def test_environment_keys_and_the_default_file_work_together(tmp_path):
    settings = FlywheelConfig.load({"data_dir": str(tmp_path), "api_keys": "app:client:fwk_env"}, environ={})
    store = KeyStore.from_settings(settings)
    assert not (tmp_path / "secrets" / "client.key").exists()  # configured keys: no local keys are made
    made = KeyFile(tmp_path / "secrets" / "api_keys.json").create("late", ROLE_CLIENT)
    assert store.authenticate("fwk_env") == Caller("app", ROLE_CLIENT)
    assert store.authenticate(made) == Caller("late", ROLE_CLIENT)


def test_auth_on_with_no_key_at_all_is_an_error(tmp_path):
    KeyFile(tmp_path / "empty.json").write([])
    with pytest.raises(ValueError, match="no API key is configured"):
        KeyStore(path=tmp_path / "empty.json")
    with pytest.raises(FileNotFoundError):
        KeyStore.from_settings(FlywheelConfig.load({"api_keys_file": str(tmp_path / "missing.json")}, environ={}))


def test_local_keys_are_made_once_and_found_by_the_clients(tmp_path):
    settings = FlywheelConfig.load({"data_dir": str(tmp_path)}, environ={})
    store = KeyStore.from_settings(settings)
    client, admin = client_key(settings), client_key(settings, ROLE_ADMIN)
    assert store.authenticate(client) == Caller("local-client", ROLE_CLIENT)
    assert store.authenticate(admin) == Caller("local-admin", ROLE_ADMIN)
    assert create_local_keys(tmp_path) is None  # a second server on the same data dir keeps the first keys
    KeyStore.from_settings(settings)
    assert client_key(settings) == client
    entries = json.loads((tmp_path / "secrets" / "api_keys.json").read_text())["keys"]
    assert {e["name"] for e in entries} == {"local-client", "local-admin"}
    assert client_key(FlywheelConfig.load({"data_dir": str(tmp_path), "api_key": "fwk_x"}, environ={})) == "fwk_x"


def test_celery_takes_tls_options_from_a_rediss_url():
    from flywheel.celery_app import make_celery, redis_ssl_options

    assert redis_ssl_options("redis://:pw@host:6379/0") is None
    url = "rediss://:pw@redis.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem"
    app = make_celery(url)
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem"}
    assert app.conf.redis_backend_use_ssl == app.conf.broker_use_ssl
    assert app.backend.connparams["password"] == "pw"  # builds without connecting
    assert redis_ssl_options("rediss://host:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        redis_ssl_options("rediss://host:6380/0?ssl_cert_reqs=maybe")
