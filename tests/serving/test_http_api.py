"""The OpenAI-compatible HTTP API of a real serving process (build_server as `flywheel serve` runs
it: real ports, real Redis, tiny model), driven by the official ``openai`` SDK and by curl."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest

from flywheel.contracts.keys import RANKINGS_STREAM
from flywheel.group_store import GroupStore
from flywheel.redis_server import free_port
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc

from support.auth import ADMIN_KEY, CLIENT_KEY, CLIENT_NAME, keyed_channel
from support.servers import serving_process

openai = pytest.importorskip("openai", reason="the dev extra installs the openai SDK")

ADMIN_BURST = 3


@pytest.fixture(scope="module")
def platform(tiny_model_dir, tmp_path_factory):
    # a tight admin budget, so that the 429 test needs few requests
    with serving_process(tmp_path_factory.mktemp("http-api"), tiny_model_dir, http_port=free_port(),
                         admin_requests_per_second=0.2, admin_request_burst=ADMIN_BURST) as server:
        yield server


@pytest.fixture(scope="module")
def base_url(platform) -> str:
    return f"http://127.0.0.1:{platform.http_port}"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key=CLIENT_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def redis_client(platform):
    import redis

    client = redis.Redis.from_url(platform.config.redis_url)
    yield client
    client.close()


def http(base_url, method, path, body=None, key=CLIENT_KEY, headers=None):
    """(status, JSON body, headers) of one plain HTTP call."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null"), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null"), error.headers


def extra(model, name):
    return (model.model_extra or {})[name]


# ---- models and completions ----

def test_models_lists_the_served_model(client, platform, tiny_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_model_dir.name]
    assert client.models.retrieve(tiny_model_dir.name).id == tiny_model_dir.name


def test_chat_n_samples_with_group_and_completion_ids(client, model_id, platform, redis_client):
    response = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Tell me a story"}], n=3, max_tokens=8,
        extra_body={"min_tokens": 8})
    assert len(response.choices) == 3
    assert len({c.message.content for c in response.choices}) == 3
    group_id = extra(response, "group_id")
    assert response.id == f"chatcmpl-{group_id}" and extra(response, "policy_version") == 0
    assert [extra(c, "completion_id") for c in response.choices] == [f"{group_id}-{i}" for i in range(3)]
    assert all(c.finish_reason == "length" and c.message.role == "assistant" for c in response.choices)
    assert response.usage.completion_tokens == 24 and response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + 24
    # stored exactly as a gRPC group is: rankable and trainable
    stored = GroupStore(redis_client).load(group_id)
    assert [c.text for c in stored.completions] == [c.message.content for c in response.choices]
    assert all(len(c.token_ids) == len(c.logprobs) == 8 for c in stored.completions)
    assert "<|im_start|>user\nTell me a story<|im_end|>" in stored.prompt
    assert stored.params["n"] == 3 and stored.params["max_new_tokens"] == 8


def test_store_false_answers_without_keeping_the_group(client, model_id, platform, redis_client, base_url):
    """Evaluation traffic: answered as usual, but no group is kept, so nothing can rank or train on it
    (the demo's before/after questions must stay unseen by PPO, whose prompts are the stored groups')."""
    store = GroupStore(redis_client)
    response = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Unseen"}],
                                              n=2, max_tokens=4, store=False)
    assert len(response.choices) == 2 and store.load(extra(response, "group_id")) is None
    stream = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Unseen"}],
                                            n=2, max_tokens=4, store=False, stream=True)
    streamed_ids = {extra(chunk, "group_id") for chunk in stream}
    assert len(streamed_ids) == 1 and store.load(streamed_ids.pop()) is None
    kept = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Seen"}],
                                          n=2, max_tokens=4, store=True)
    assert store.load(extra(kept, "group_id")) is not None
    with keyed_channel(f"127.0.0.1:{platform.port}") as channel:
        stub = rpc.InferenceStub(channel)
        unstored = stub.Complete(pb.CompleteRequest(prompt="Unseen", n=2, max_new_tokens=4, store=False), timeout=30)
        stored = stub.Complete(pb.CompleteRequest(prompt="Seen", n=2, max_new_tokens=4), timeout=30)
    assert store.load(unstored.group_id) is None and store.load(stored.group_id) is not None
    status, body, _ = http(base_url, "POST", "/v1/chat/completions",
                           {"model": model_id, "messages": [{"role": "user", "content": "x"}], "store": "no"})
    assert status == 400 and body["error"]["param"] == "store" and "store: must be true or false" in body["error"]["message"]


def test_seed_reproduces_the_samples(client, model_id):
    def texts(seed):
        response = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Seeded"}],
                                                  n=2, max_tokens=10, seed=seed, temperature=0.9, top_p=0.95,
                                                  extra_body={"min_tokens": 10})
        return [c.message.content for c in response.choices]

    assert texts(1234) == texts(1234)
    assert texts(99) != texts(1234)


def test_streaming_equals_non_streaming(client, model_id):
    asked = dict(model=model_id, messages=[{"role": "user", "content": "Hi!"}], n=2, max_tokens=15, seed=5)
    whole = client.chat.completions.create(**asked)
    deltas = {0: "", 1: ""}
    finish = {}
    group_ids = set()
    usage = None
    for chunk in client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}):
        group_ids.add(extra(chunk, "group_id"))
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            deltas[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert [deltas[0], deltas[1]] == [c.message.content for c in whole.choices]
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert len(group_ids) == 1 and group_ids != {extra(whole, "group_id")}  # a group of its own
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_curl_reads_the_event_stream(base_url, model_id):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 6, "min_tokens": 6, "seed": 3,
            "stream": True}
    out = subprocess.run([curl, "-sN", "--fail-with-body", base_url + "/v1/completions", "-H",
                          f"Authorization: Bearer {CLIENT_KEY}", "-H", "Content-Type: application/json",
                          "-d", json.dumps(body)], capture_output=True, text=True, timeout=60, check=True).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["group_id"] for c in chunks)
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    status, whole, _ = http(base_url, "POST", "/v1/completions", body | {"stream": False})
    assert status == 200 and streamed == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_logprobs_equal_the_grpc_ones(client, model_id, platform):
    messages = [{"role": "user", "content": "Name a colour"}]
    response = client.chat.completions.create(model=model_id, messages=messages, n=2, max_tokens=6, seed=21,
                                              temperature=0.8, logprobs=True, top_logprobs=3,
                                              extra_body={"min_tokens": 6})
    with keyed_channel(f"127.0.0.1:{platform.port}") as channel:
        grpc_response = rpc.InferenceStub(channel).Complete(pb.CompleteRequest(
            messages=[pb.ChatMessage(**m) for m in messages], n=2, max_new_tokens=6, min_new_tokens=6, seed=21,
            temperature=0.8, logprobs=True, top_logprobs=3), timeout=30)
    for choice, completion in zip(response.choices, grpc_response.completions):
        assert choice.message.content == completion.text
        content = choice.logprobs.content
        assert [t.token for t in content] == [t.token for t in completion.tokens]
        assert [t.logprob for t in content] == pytest.approx([t.logprob for t in completion.tokens], abs=1e-5)
        assert sum(t.logprob for t in content) == pytest.approx(completion.logprob, abs=1e-4)
        for token, grpc_token in zip(content, completion.tokens):
            assert len(token.top_logprobs) == 3
            top = [t.logprob for t in token.top_logprobs]
            assert top == sorted(top, reverse=True) and token.logprob <= top[0] + 1e-6
            assert [t.token for t in token.top_logprobs] == [t.token for t in grpc_token.top]
            assert bytes(token.bytes) == token.token.encode()


def test_grpc_stream_deltas_carry_the_same_logprobs(platform):
    request = pb.CompleteRequest(prompt="Count:", n=1, max_new_tokens=8, seed=4, logprobs=True)
    with keyed_channel(f"127.0.0.1:{platform.port}") as channel:
        stub = rpc.InferenceStub(channel)
        whole = stub.Complete(request, timeout=30)
        streamed, final = [], None
        for message in stub.StreamComplete(request, timeout=30):
            if message.HasField("delta"):
                streamed.extend(message.delta.tokens)
            else:
                final = message.final
        plain = stub.Complete(pb.CompleteRequest(prompt="Count:", n=1, max_new_tokens=8, seed=4), timeout=30)
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole.completions[0].tokens])
    assert [t.token_id for t in final.completions[0].tokens] == [t.token_id for t in whole.completions[0].tokens]
    assert len(whole.completions[0].tokens) == whole.completions[0].token_count
    assert not plain.completions[0].tokens  # only on request


def test_legacy_completions_logprobs(base_url, model_id):
    status, body, _ = http(base_url, "POST", "/v1/completions",
                           {"model": model_id, "prompt": "Hello", "max_tokens": 4, "min_tokens": 4, "logprobs": 2})
    assert status == 200
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 4
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"][0] == 0 and body["object"] == "text_completion"
    assert choice["completion_id"] == body["group_id"] + "-0"


# ---- errors ----

@pytest.mark.parametrize("change, param", [
    ({"n": 0}, "n"),
    ({"n": "three"}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 10 ** 6}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"stop": [""]}, "stop[0]"),
    ({"tools": [{"type": "function"}]}, "tools"),
])
def test_bad_input_is_400_naming_the_field(base_url, model_id, change, param):
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | change
    status, error, _ = http(base_url, "POST", "/v1/chat/completions", body)
    assert status == 400, error
    assert error["error"]["param"] == param and error["error"]["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["error"]["message"]


def test_the_sdk_raises_its_own_errors(client, model_id):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], n=99)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_body_that_is_not_json_is_400(base_url):
    status, error, _ = http(base_url, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in error["error"]["message"]


def test_bad_or_missing_key_is_401(base_url, model_id):
    bad = openai.OpenAI(base_url=base_url + "/v1", api_key="fwk_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    status, error, _ = http(base_url, "GET", "/v1/models", key=None)
    assert status == 401 and error["error"]["type"] == "authentication_error"
    assert http(base_url, "GET", "/health", key=None)[0] == 200  # probes need no key


def test_client_key_on_admin_routes_is_403_and_admin_rate_is_429(base_url):
    status, error, _ = http(base_url, "GET", "/v1/admin/status")
    assert status == 403 and error["error"]["type"] == "permission_error"
    statuses = [http(base_url, "GET", "/v1/admin/status", key=ADMIN_KEY) for _ in range(ADMIN_BURST + 1)]
    assert [s for s, _, _ in statuses[:ADMIN_BURST]] == [200] * ADMIN_BURST
    assert statuses[0][1]["policy_version"] == 0
    status, error, headers = statuses[-1]
    assert status == 429 and error["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["Retry-After"]) >= 1 and int(headers["retry-after-ms"]) > 0


def test_unknown_route_is_404(base_url):
    status, error, _ = http(base_url, "GET", "/v1/nothing-here")
    assert status == 404 and error["error"]["code"] == "unknown_url"


# ---- rankings ----

def served_group(client, model_id, n=3):
    response = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Rank me"}],
                                              n=n, max_tokens=4)
    return extra(response, "group_id"), [extra(c, "completion_id") for c in response.choices]


def test_rankings_follow_the_feedback_rules(client, model_id, base_url, redis_client):
    group_id, ids = served_group(client, model_id)
    ranking = {"group_id": group_id, "completion_ids": ids[::-1], "idempotency_key": "page-1", "comment": "ok"}
    status, ack, _ = http(base_url, "POST", "/v1/rankings", ranking)
    assert status == 200 and not ack["duplicate"] and ack["stream_entry_id"]
    entries = redis_client.xrange(RANKINGS_STREAM, ack["stream_entry_id"], ack["stream_entry_id"])
    fields = {k.decode(): v.decode() for k, v in entries[0][1].items()}
    assert fields["group_id"] == group_id and fields["source"] == "human" and fields["annotator_id"] == CLIENT_NAME
    assert json.loads(fields["completion_ids"]) == ids[::-1]
    # a retry with the same key gets the first acknowledgement back
    status, again, _ = http(base_url, "POST", "/v1/rankings", ranking)
    assert status == 200 and again["duplicate"] and again["ranking_id"] == ack["ranking_id"]
    # a second ranking of the group by the same annotator is refused
    status, error, _ = http(base_url, "POST", "/v1/rankings", ranking | {"idempotency_key": "page-2"})
    assert status == 409 and error["error"]["code"] == "already_ranked"


@pytest.mark.parametrize("change, status, param", [
    ({"completion_ids": ["nope-0", "nope-1"]}, 400, "completion_ids"),
    ({"group_id": "0" * 32}, 404, "group_id"),
    ({"annotator_id": "someone-else"}, 403, "annotator_id"),
    ({"annotator_id": "ai:judge"}, 403, "annotator_id"),
    ({"completion_ids": "abc"}, 400, "completion_ids"),
    ({"group_id": ""}, 400, "group_id"),
])
def test_bad_rankings_are_refused_naming_the_field(client, model_id, base_url, change, status, param):
    group_id, ids = served_group(client, model_id, n=2)
    got, error, _ = http(base_url, "POST", "/v1/rankings", {"group_id": group_id, "completion_ids": ids} | change)
    assert got == status, error
    assert error["error"]["param"] == param


def test_next_group_is_one_the_annotator_has_not_ranked(client, model_id, base_url):
    group_id, ids = served_group(client, model_id)
    status, body, _ = http(base_url, "GET", "/v1/rankings/next")
    assert status == 200 and body["annotator_id"] == CLIENT_NAME
    assert body["group"]["group_id"] == group_id  # the newest
    assert [c["completion_id"] for c in body["group"]["completions"]] == ids
    assert http(base_url, "POST", "/v1/rankings", {"group_id": group_id, "completion_ids": ids})[0] == 200
    status, body, _ = http(base_url, "GET", "/v1/rankings/next")
    assert body["group"] is None or body["group"]["group_id"] != group_id


def test_http_requests_are_counted_like_rpcs(client, model_id, platform, base_url):
    registry = platform.metrics.registry

    def count(method, code):
        return registry.get_sample_value("flywheel_requests_total",
                                         {"service": "http", "method": method, "code": code}) or 0.0

    served, refused, lost = (count("POST /v1/chat/completions", "200"), count("POST /v1/chat/completions", "400"),
                             count("unmatched", "404"))
    client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Count me"}], max_tokens=2)
    assert http(base_url, "POST", "/v1/chat/completions", {"model": model_id, "messages": []})[0] == 400
    assert http(base_url, "GET", "/v1/no-such-route")[0] == 404
    assert http(base_url, "GET", "/health", key=None)[0] == 200  # probes are not counted, as gRPC health is not
    assert count("POST /v1/chat/completions", "200") == served + 1
    assert count("POST /v1/chat/completions", "400") == refused + 1
    assert count("unmatched", "404") == lost + 1
    assert registry.get_sample_value("flywheel_request_duration_seconds_count", {
        "service": "http", "method": "POST /v1/chat/completions", "code": "200"}) >= 1
    assert not [s for m in registry.collect() for s in m.samples
                if s.labels.get("service") == "http" and "/health" in s.labels.get("method", "")]
