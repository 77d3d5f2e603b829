"""Security of a real serving process (gRPC on a real port, real Redis, tiny model): API keys and
roles, the annotator bound to the key, limits on prompts and messages, the per-key rate limit,
TLS with and without client certificates, and Redis with a password."""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel.api_keys import KeyFile
from flywheel.app.cli import main as flywheel_main
from flywheel.app.serve import build_server
from flywheel.contracts.keys import RANKINGS_STREAM
from flywheel.grpc_client import open_channel
from flywheel.redis_server import RedisServer, free_port
from flywheel.config import FlywheelConfig
from flywheel.v1 import admin_pb2, admin_pb2_grpc, feedback_pb2, feedback_pb2_grpc
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc
from serving.server import InferenceServer

from support.auth import ADMIN_KEY, API_KEYS, CLIENT_KEY, CLIENT_NAME, keyed_channel

MAX_PROMPT_TOKENS = 40
MAX_MESSAGE_BYTES = 64 * 1024


def settings_for(model_dir, data_dir, **overrides) -> FlywheelConfig:
    values = {"model": str(model_dir), "grpc_address": "127.0.0.1:0", "metrics_port": 0, "dtype": "float32",
              "data_dir": str(data_dir), "api_keys": API_KEYS, "max_prompt_tokens": MAX_PROMPT_TOKENS,
              "grpc_max_receive_message_bytes": MAX_MESSAGE_BYTES}
    values.update(overrides)
    return FlywheelConfig.load(values, environ={})


def code_of(call) -> tuple[grpc.StatusCode, str, dict]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    return error.code(), error.details(), dict(error.trailing_metadata() or ())


@pytest.fixture(scope="module")
def platform(tiny_model_dir, tmp_path_factory):
    """build_server as `flywheel serve` runs it, with the test keys plus a keys file for `flywheel keys`."""
    root = tmp_path_factory.mktemp("secured")
    redis_server = RedisServer(root / "redis").start()
    keys_file = root / "keys.json"
    KeyFile(keys_file).write([])
    settings = settings_for(tiny_model_dir, root, redis_url=redis_server.url, api_keys_file=str(keys_file))
    server, release = build_server(settings)
    server.start(wait_until_ready=True)
    yield server, keys_file
    server.stop(grace=1)
    release()
    redis_server.stop(kill=True)


def address(server) -> str:
    return f"127.0.0.1:{server.port}"


def complete(channel, prompt="Hello", n=1, **kw):
    return rpc.InferenceStub(channel).Complete(pb.CompleteRequest(prompt=prompt, n=n, max_new_tokens=3, **kw),
                                               timeout=30)


def metric(server, name, **labels) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


# ---- keys and roles ----

def test_missing_wrong_and_revoked_keys_are_unauthenticated(platform, capsys):
    server, keys_file = platform
    with grpc.insecure_channel(address(server)) as bare:
        code, details, _ = code_of(lambda: complete(bare))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in details
    wrong = "fwk_not-a-key-of-this-server"
    with keyed_channel(address(server), wrong) as channel:
        code, details, _ = code_of(lambda: complete(channel))
    assert code == grpc.StatusCode.UNAUTHENTICATED and wrong not in details
    # a key made with the CLI works at once (no restart), then stops working once revoked
    assert flywheel_main(["keys", "create", "--name", "temp", "--role", "client", "--api-keys-file",
                          str(keys_file)]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("fwk_") and key not in keys_file.read_text()  # the file holds its hash only
    with keyed_channel(address(server), key) as channel:
        assert complete(channel).completions
        assert flywheel_main(["keys", "revoke", "temp", "--api-keys-file", str(keys_file)]) == 0
        code, details, _ = code_of(lambda: complete(channel))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details and key not in details
    assert metric(server, "flywheel_auth_failures_total", reason="missing_key") >= 1
    assert metric(server, "flywheel_auth_failures_total", reason="invalid_key") >= 2


def test_a_client_key_may_not_call_admin_and_an_admin_key_may(platform):
    server, _ = platform
    with keyed_channel(address(server), CLIENT_KEY) as channel:
        code, details, _ = code_of(lambda: admin_pb2_grpc.AdminStub(channel).GetStatus(
            admin_pb2.GetStatusRequest(), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "admin key" in details
        assert feedback_pb2_grpc.FeedbackStub(channel).GetFeedbackStats(
            feedback_pb2.GetFeedbackStatsRequest(), timeout=10) is not None
    with keyed_channel(address(server), ADMIN_KEY) as channel:
        status = admin_pb2_grpc.AdminStub(channel).GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        assert status.serving_policy_version == 0
        assert complete(channel).completions  # admin includes the client role
    assert metric(server, "flywheel_auth_failures_total", reason="forbidden") >= 1


def test_health_and_reflection_stay_open(platform):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server, _ = platform
    with grpc.insecure_channel(address(server)) as bare:
        assert health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(bare).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "flywheel.v1.Admin" in names


# ---- rankings: bound to the key, one per annotator per group ----

def test_one_ranking_per_annotator_per_group_bound_to_the_key(platform):
    server, _ = platform
    with keyed_channel(address(server), CLIENT_KEY) as client, keyed_channel(address(server), ADMIN_KEY) as admin:
        group = complete(client, prompt="Rank us", n=3, seed=1)
        ids = [c.completion_id for c in group.completions]
        feedback = feedback_pb2_grpc.FeedbackStub(client)

        def rank(order, key, stub=feedback, **kw):
            return stub.SubmitRanking(feedback_pb2.SubmitRankingRequest(
                group_id=group.group_id, completion_ids=order, idempotency_key=key, **kw), timeout=10)

        code, details, _ = code_of(lambda: rank(ids, "k0", annotator_id="someone-else"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and CLIENT_NAME in details
        first = rank(ids, "k1")  # ranks as the key's name
        code, details, _ = code_of(lambda: rank(ids[::-1], "k2"))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "one ranking per annotator" in details
        replay = rank(ids, "k1")  # a retry of the first submission still gets its acknowledgement
        assert replay.duplicate and replay.ranking_id == first.ranking_id
        # an admin key (a labelling front end) may rank on behalf of named people, once each
        rank(ids, "k3", stub=feedback_pb2_grpc.FeedbackStub(admin), annotator_id="carol")
        code, _, _ = code_of(lambda: rank(ids, "k4", stub=feedback_pb2_grpc.FeedbackStub(admin),
                                          annotator_id="carol"))
        assert code == grpc.StatusCode.ALREADY_EXISTS
    annotators = [fields[b"annotator_id"] for _, fields in server.policy_redis.xrange(RANKINGS_STREAM)
                  if fields[b"group_id"].decode() == group.group_id]
    assert annotators == [CLIENT_NAME.encode(), b"carol"]


# ---- limits ----

def test_too_long_prompts_and_oversized_messages_are_refused(platform):
    server, _ = platform
    with keyed_channel(address(server)) as channel:
        code, details, _ = code_of(lambda: complete(channel, prompt="word " * (MAX_PROMPT_TOKENS + 10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"limit is {MAX_PROMPT_TOKENS}" in details
        code, _, _ = code_of(lambda: complete(channel, prompt="x" * (MAX_MESSAGE_BYTES + 1000)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert complete(channel).completions  # the server is fine


def test_rate_limit_refuses_with_a_retry_hint_recovers_and_fails_open(tiny_model_dir, tmp_path):
    redis_server = RedisServer(tmp_path / "redis").start()
    settings = settings_for(tiny_model_dir, tmp_path, redis_url=redis_server.url, client_requests_per_second=2,
                            client_request_burst=2)
    server, release = build_server(settings)
    server.start(wait_until_ready=True)
    try:
        with keyed_channel(address(server)) as channel:
            stats = feedback_pb2_grpc.FeedbackStub(channel).GetFeedbackStats

            def call():
                return stats(feedback_pb2.GetFeedbackStatsRequest(), timeout=10)

            call(), call()  # the burst
            code, details, trailers = code_of(call)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            wait_ms = int(trailers["retry-after-ms"])
            assert 0 < wait_ms <= 500 and f"retry in {wait_ms} ms" in details and CLIENT_NAME in details
            assert metric(server, "flywheel_rate_limited_requests_total", role="client") == 1
            time.sleep(wait_ms / 1000 + 0.05)
            call()  # the window moved on
            # the admin key has its own budget
            with keyed_channel(address(server), ADMIN_KEY) as admin:
                feedback_pb2_grpc.FeedbackStub(admin).GetFeedbackStats(feedback_pb2.GetFeedbackStatsRequest(),
                                                                       timeout=10)
            # Redis down: completions are still served, unmetered, and the failure is counted
            redis_server.stop(kill=True)
            for _ in range(4):
                assert complete(channel).completions
            assert metric(server, "flywheel_rate_limiter_errors_total") >= 4
    finally:
        server.stop(grace=1)
        release()
        redis_server.stop(kill=True)


# ---- auth off ----

def test_auth_off_takes_an_explicit_setting_and_says_so_loudly(tiny_model_dir, tmp_path, caplog):
    with pytest.raises(ValueError, match="auth must be one of"):
        InferenceServer(settings_for(tiny_model_dir, tmp_path, auth="no")).start()
    caplog.set_level(logging.WARNING)
    server = InferenceServer(settings_for(tiny_model_dir, tmp_path, auth="off", api_keys="")).start(
        wait_until_ready=True)
    try:
        assert any("AUTH IS OFF" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        with grpc.insecure_channel(address(server)) as bare:
            assert complete(bare).completions
    finally:
        server.stop(grace=1)
    assert not (tmp_path / "secrets").exists()  # no keys were made for a server that needs none


def test_without_configured_keys_the_server_makes_local_ones_for_the_cli(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    server = InferenceServer(settings_for(tiny_model_dir, tmp_path, api_keys="")).start(wait_until_ready=True)
    try:
        secrets = tmp_path / "secrets"
        client_key = (secrets / "client.key").read_text().strip()
        for name in ("client.key", "admin.key", "api_keys.json"):
            assert (secrets / name).stat().st_mode & 0o077 == 0, name
        assert client_key not in (secrets / "api_keys.json").read_text()
        monkeypatch.delenv("FLYWHEEL_API_KEY", raising=False)
        assert flywheel_main(["complete", "Hi", "--raw", "--address", address(server), "--max-new-tokens", "2",
                              "--data-dir", str(tmp_path)]) == 0
        assert "policy v0" in capsys.readouterr().out
        assert flywheel_main(["keys", "list", "--data-dir", str(tmp_path)]) == 0
        listing = capsys.readouterr().out
        assert "local-client" in listing and "local-admin" in listing and client_key not in listing
    finally:
        server.stop(grace=1)


# ---- TLS ----

def write_pki(folder):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer_cert, issuer_key, ca=False, sans=()):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer_cert.subject if issuer_cert else subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return cert, key

    ca_cert, ca_key = make("ca", None, None, ca=True)
    make("server", ca_cert, ca_key, sans=[x509.DNSName("localhost"),
                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    make("client", ca_cert, ca_key)
    return folder


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


def client_settings(pki, **values) -> FlywheelConfig:
    return FlywheelConfig.load({"api_key": CLIENT_KEY, "tls_ca": str(pki / "ca.pem"), **values}, environ={})


def test_tls_serves_encrypted_and_refuses_plaintext(tiny_model_dir, tmp_path, pki):
    server = InferenceServer(settings_for(tiny_model_dir, tmp_path, tls_cert=str(pki / "server.pem"),
                                          tls_key=str(pki / "server.key"))).start(wait_until_ready=True)
    try:
        with open_channel(client_settings(pki), address(server)) as channel:
            assert complete(channel).completions
        with keyed_channel(address(server)) as plaintext:
            code, _, _ = code_of(lambda: complete(plaintext))
            assert code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ValueError, match="tls_client_cert"):
            open_channel(FlywheelConfig.load({"tls_client_cert": str(pki / "client.pem"),
                                        "tls_client_key": str(pki / "client.key")}, environ={}))
    finally:
        server.stop(grace=1)


def test_tls_with_required_client_certificates(tiny_model_dir, tmp_path, pki):
    server = InferenceServer(settings_for(tiny_model_dir, tmp_path, tls_cert=str(pki / "server.pem"),
                                          tls_key=str(pki / "server.key"), tls_client_ca=str(pki / "ca.pem"))
                             ).start(wait_until_ready=True)
    try:
        with open_channel(client_settings(pki), address(server)) as no_certificate:
            code, _, _ = code_of(lambda: complete(no_certificate))
            assert code == grpc.StatusCode.UNAVAILABLE
        with open_channel(client_settings(pki, tls_client_cert=str(pki / "client.pem"),
                                          tls_client_key=str(pki / "client.key")), address(server)) as channel:
            assert complete(channel).completions
    finally:
        server.stop(grace=1)


# ---- Redis with a password ----

def test_redis_with_a_password_through_the_url(tiny_model_dir, tmp_path):
    import redis

    from flywheel.celery_app import make_celery

    redis_server = RedisServer(tmp_path / "redis", password="s3cret-pass").start()
    try:
        assert redis_server.url.startswith("redis://:s3cret-pass@")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=redis_server.port).ping()
        server, release = build_server(settings_for(tiny_model_dir, tmp_path, redis_url=redis_server.url))
        server.start(wait_until_ready=True)
        try:
            with keyed_channel(address(server)) as channel:
                group = complete(channel, n=2)
                ack = feedback_pb2_grpc.FeedbackStub(channel).SubmitRanking(feedback_pb2.SubmitRankingRequest(
                    group_id=group.group_id, completion_ids=[c.completion_id for c in group.completions]),
                    timeout=10)
            assert ack.stream_entry_id and server.metrics.group_store_failures._value.get() == 0
        finally:
            server.stop(grace=1)
            release()
        # the Celery broker and result backend take the same URL
        app = make_celery(redis_server.url)
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
        app.backend.client.ping()
    finally:
        redis_server.stop(kill=True)


# ---- keyless streams and the slots keyed traffic needs (issue 12, item 11) ----

def test_open_keyless_watch_streams_do_not_block_keyed_calls(tiny_model_dir, tmp_path):
    """16 keyless Health/Watch streams on a server with 8 worker threads: an authenticated Complete
    and a Feedback call (a synchronous service, on those threads) are still answered at once; keyless
    calls beyond their own bound are refused, keyed calls never are."""
    redis_server = RedisServer(tmp_path / "redis").start()
    settings = settings_for(tiny_model_dir, tmp_path, redis_url=redis_server.url, grpc_workers=8, grpc_open_rpcs=16)
    server, release = build_server(settings)
    server.start(wait_until_ready=True)
    bare = grpc.insecure_channel(address(server))
    watches = [health_pb2_grpc.HealthStub(bare).Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(16)]
    try:
        for watch in watches:  # every stream is open and has said SERVING
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with keyed_channel(address(server)) as channel:
            started = time.monotonic()
            assert complete(channel).completions
            assert feedback_pb2_grpc.FeedbackStub(channel).GetFeedbackStats(
                feedback_pb2.GetFeedbackStatsRequest(), timeout=10) is not None
            assert time.monotonic() - started < 10
        code, details, _ = code_of(lambda: health_pb2_grpc.HealthStub(bare).Check(
            health_pb2.HealthCheckRequest(), timeout=5))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "health/reflection" in details
    finally:
        for watch in watches:
            watch.cancel()
        bare.close()
        server.stop(grace=1)
        release()
        redis_server.stop(kill=True)
