"""The continuous-batching engine against Hugging Face ``generate`` on the same tiny model."""

import threading
import time

import pytest
import torch

from flywheel.models import load_model
from serving.engine import (FAULTS_ENV, DoneEvent, Engine, EngineConfig, EngineObserver, GenerationFailedError,
                            GenerationRequest, QueueFullError, iter_events, run_to_completion)
from serving.model_runner import Batch
from serving.sampling import SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), tiny_model_dir, "float32")


@pytest.fixture
def engine(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_sequences=16))
    engine.start()
    yield engine
    engine.stop()


def request(tokenizer, text, **params):
    return GenerationRequest(text, tokenizer(text).input_ids, SamplingParams(**params))


PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog and", "A much longer prompt " * 6, "x y z"]


def test_greedy_batched_decoding_equals_generate_per_prompt(loaded, engine):
    """Rows of different lengths joining one batch must decode exactly as they would alone."""
    tok, model = loaded.tokenizer, loaded.model
    requests = [request(tok, p, n=2, max_new_tokens=12, min_new_tokens=12, temperature=0.0) for p in PROMPTS]
    for r in requests:
        engine.submit(r)
    results = [next(e for e in iter_events(r) if isinstance(e, DoneEvent)).result for r in requests]
    for prompt, result in zip(PROMPTS, results):
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.inference_mode():
            expected = model.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                      pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        for sample in result.samples:
            assert sample.token_ids == expected
            assert sample.finish_reason == "length"


def test_logprobs_are_the_models_own(loaded, engine):
    tok, model = loaded.tokenizer, loaded.model
    result = run_to_completion(engine, request(tok, "Hello there", n=1, max_new_tokens=6, seed=3), timeout=60)
    sample = result.samples[0]
    ids = torch.tensor([result.prompt_token_ids + sample.token_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    start = len(result.prompt_token_ids)
    expected = [logprobs[start - 1 + i, t].item() for i, t in enumerate(sample.token_ids)]
    assert sample.logprobs == pytest.approx(expected, abs=1e-4)


def test_samples_differ_and_a_seed_reproduces_them_whatever_shares_the_batch(loaded, engine):
    tok = loaded.tokenizer
    alone = run_to_completion(engine, request(tok, "Once upon a time", n=4, max_new_tokens=16, seed=11), timeout=60)
    texts = [s.token_ids for s in alone.samples]
    assert len({tuple(t) for t in texts}) == 4, "the n samples of one prompt should differ"
    # the same seeded request again, this time while other requests run in the same batch
    noise = [request(tok, p, n=3, max_new_tokens=24) for p in PROMPTS]
    for r in noise:
        engine.submit(r)
    again = run_to_completion(engine, request(tok, "Once upon a time", n=4, max_new_tokens=16, seed=11), timeout=60)
    assert [s.token_ids for s in again.samples] == texts


def test_cancelled_request_frees_its_slots(loaded, engine):
    tok = loaded.tokenizer
    long = request(tok, "Tell me everything", n=4, max_new_tokens=400, min_new_tokens=400)
    engine.submit(long)
    deadline = time.monotonic() + 10
    while engine.running_sequences < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    long.cancel()
    result = next(e for e in iter_events(long) if isinstance(e, DoneEvent)).result
    assert {s.finish_reason for s in result.samples} == {"cancelled"}
    assert all(len(s.token_ids) < 400 for s in result.samples)
    assert engine.running_sequences == 0


def test_deadline_cancels_a_request(loaded, engine):
    r = request(loaded.tokenizer, "Go on", n=2, max_new_tokens=500, min_new_tokens=500)
    r.deadline = time.monotonic() + 0.3
    result = run_to_completion(engine, r, timeout=30)
    assert {s.finish_reason for s in result.samples} == {"cancelled"}


def test_full_queue_is_refused(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_sequences=2, max_queued_requests=1))
    engine.start()
    try:
        blocker = engine.submit(request(loaded.tokenizer, "a", n=2, max_new_tokens=300, min_new_tokens=300))
        while engine.running_sequences < 2:
            time.sleep(0.01)
        engine.submit(request(loaded.tokenizer, "b", n=2, max_new_tokens=2))  # waits: batch is full
        with pytest.raises(QueueFullError):
            engine.submit(request(loaded.tokenizer, "c", n=1, max_new_tokens=2))
        blocker.cancel()
    finally:
        engine.stop()


def test_min_new_tokens_blocks_the_end_of_sequence_token(loaded, engine):
    """Make end-of-sequence the greedy choice (a hook on the LM head), then check min_new_tokens overrides it."""
    tok, model = loaded.tokenizer, loaded.model
    eos = tok.eos_token_id

    def favour_eos(module, inputs, output):
        output[..., eos] += 100.0
        return output

    hook = model.lm_head.register_forward_hook(favour_eos)
    try:
        free = run_to_completion(engine, request(tok, "stop soon", n=2, max_new_tokens=30, temperature=0.0), timeout=60)
        held = run_to_completion(engine, request(tok, "stop soon", n=2, max_new_tokens=30, temperature=0.0,
                                                 min_new_tokens=30), timeout=60)
    finally:
        hook.remove()
    assert [(s.token_ids, s.finish_reason) for s in free.samples] == [([eos], "stop")] * 2
    assert all(len(s.token_ids) == 30 and eos not in s.token_ids for s in held.samples)
    assert {s.finish_reason for s in held.samples} == {"length"}


def test_prompts_sharing_a_prefix_reuse_its_prefill_and_decode_as_alone(loaded):
    """The second prompt's first 32 tokens come from the prefix cache; its greedy tokens are still
    exactly generate's, and a prompt that only shares part of a block prefills that block itself."""
    tok, model = loaded.tokenizer, loaded.model
    engine = Engine(model, tok, EngineConfig(max_batch_sequences=16))
    engine.start()
    try:
        shared = "You are a careful assistant who answers in one short sentence. " * 3
        prompts = [shared + "What is the sea?", shared + "Name a red fruit.", shared[:20] + "Other."]
        results = [run_to_completion(engine, request(tok, p, n=2, max_new_tokens=10, min_new_tokens=10,
                                                     temperature=0.0), timeout=60) for p in prompts]
        batch = engine.runner.current
        assert batch.prefixes.hit_tokens >= 32 and len(batch.prefixes) >= 1
    finally:
        engine.stop()
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.inference_mode():
            expected = model.generate(ids, do_sample=False, max_new_tokens=10, min_new_tokens=10,
                                      pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert all(sample.token_ids == expected for sample in result.samples)


def generated(loaded, prompt: str, tokens: int) -> list[int]:
    tok = loaded.tokenizer
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.inference_mode():
        out = loaded.model.generate(ids, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                                    pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


SHARED = "You are a careful assistant who answers in one short sentence. " * 3


def test_prompts_prefilled_together_get_each_prompts_own_logits(loaded):
    """One left-padded forward for prompts of different lengths, some starting from the prefix
    cache: each row's last logits are the prompt's alone, and the rows decode on as alone."""
    tok, model = loaded.tokenizer, loaded.model
    batch = Batch(model, 0, torch.device("cpu"))
    with torch.inference_mode():
        batch.prefill([(tok(SHARED + "Warm up.").input_ids, 1)])  # fills the prefix cache
        prompts = [SHARED + "What is the sea?", "Hi", "The quick brown fox jumps over the lazy dog and",
                   SHARED + "A red fruit, please, and a yellow one too, if you know one."]
        ids = [tok(p).input_ids for p in prompts]
        prefill = batch.prefill([(i, n) for i, n in zip(ids, (2, 1, 1, 3))])
        assert prefill.prefix_hits[0] >= 32 and prefill.prefix_hits[3] >= 32 and prefill.prefix_hits[1] == 0
        alone = torch.cat([model(torch.tensor([i])).logits[:, -1].expand(n, -1) for i, n in zip(ids, (2, 1, 1, 3))])
        assert torch.allclose(prefill.logits, alone, atol=1e-4)
        first = prefill.logits.argmax(-1)
        batch.add([prefill], list(range(7)), first, [len(i) + 8 for i in [ids[0]] * 2 + ids[1:3] + [ids[3]] * 3])
        following = batch.forward_step()
        expected = torch.cat([model(torch.tensor([i + [t]])).logits[:, -1] for i, t in
                              zip([ids[0]] * 2 + [ids[1], ids[2]] + [ids[3]] * 3, first.tolist())])
        assert torch.allclose(following, expected, atol=1e-4)


class PrefillLog(EngineObserver):
    def __init__(self):
        self.prefills: list[int] = []  # prompt tokens of each prefill forward

    def on_prefill(self, prompt_tokens, seconds, new_tokens, policy_version):
        self.prefills.append(prompt_tokens)


def admitted_together(engine, model, requests):
    """Submit ``requests`` while the engine is held inside a prefill, so one step admits them all."""
    gate, held = threading.Event(), threading.Event()

    def hold(module, args):
        if not gate.is_set():
            held.set()
            gate.wait(30)

    hook = model.register_forward_pre_hook(hold)
    try:
        engine.submit(request(engine.tokenizer, "block", n=1, max_new_tokens=1))
        assert held.wait(30)
        for r in requests:
            engine.submit(r)
    finally:
        gate.set()
        hook.remove()
    outcomes = []
    for r in requests:
        try:
            outcomes.append(next(e for e in iter_events(r, time.monotonic() + 60) if isinstance(e, DoneEvent)).result)
        except GenerationFailedError:
            outcomes.append(None)
    return outcomes


def test_requests_admitted_in_one_step_are_prefilled_together_and_decode_as_alone(loaded, monkeypatch):
    """Greedy completions of different-length prompts (with and without a prefix hit) prefilled
    in one forward equal generate's for each prompt alone; when a prompt's prefill fails, the
    others of its step are prefilled one by one and served."""
    monkeypatch.setenv(FAULTS_ENV, "1")
    tok, model = loaded.tokenizer, loaded.model
    observer = PrefillLog()
    engine = Engine(model, tok, EngineConfig(max_batch_sequences=16), observer=observer)
    engine.start()
    try:
        run_to_completion(engine, request(tok, SHARED + "Warm up.", n=1, max_new_tokens=1), timeout=60)
        prompts = [SHARED + "What is the sea?", "Hi", "The quick brown fox jumps over the lazy dog and",
                   SHARED + "Name a red fruit."]
        make = [lambda p=p: request(tok, p, n=2, max_new_tokens=8, min_new_tokens=8, temperature=0.0)
                for p in prompts]
        before = len(observer.prefills)
        together = admitted_together(engine, model, [m() for m in make])
        assert observer.prefills[before + 1] == sum(len(tok(p).input_ids) for p in prompts)  # after the blocker's
        faulty = request(tok, "x <<flywheel-fault:prefill>>", n=2, max_new_tokens=8)
        with_fault = admitted_together(engine, model, [m() for m in make[:2]] + [faulty] + [m() for m in make[2:]])
        assert engine.failure is None
    finally:
        engine.stop()
    assert with_fault[2] is None
    for prompt, a, b in zip(prompts, together, with_fault[:2] + with_fault[3:]):
        expected = generated(loaded, prompt, 8)
        assert [s.token_ids for s in a.samples] == [expected] * 2, prompt
        assert [s.token_ids for s in b.samples] == [expected] * 2, prompt


class CacheLog(EngineObserver):
    def __init__(self):
        self.largest = 0  # the most bytes the running batches' cache buffers took at once

    def on_cache(self, allocated_bytes):
        self.largest = max(self.largest, allocated_bytes)


def test_the_cache_stays_within_its_budget_and_a_long_request_waits_its_turn(loaded):
    """A budget of 400 tokens of keys and values: the long request (2 rows x 200 columns) takes it
    all, so the short ones behind it wait until it is done instead of padding to its width; the
    buffers never pass the budget (without it, they passed it by a third), and greedy
    decoding is still exactly HF's."""
    from serving.kv_cache import kv_bytes_per_token
    from serving.validation import InvalidRequest, RequestLimits, validate_request
    from flywheel.v1 import inference_pb2

    tok, model = loaded.tokenizer, loaded.model
    per_token = kv_bytes_per_token(model)
    assert per_token == 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x head dim 16 x float32
    log = CacheLog()
    engine = Engine(model, tok, EngineConfig(max_batch_sequences=16, max_cache_bytes=400 * per_token), observer=log)
    engine.start()
    try:
        long_prompt = "A much longer prompt about the sea and the sky and the wind " * 2
        long_ids = tok(long_prompt).input_ids
        long = request(tok, long_prompt, n=2, max_new_tokens=200 - len(long_ids), min_new_tokens=200 - len(long_ids),
                       temperature=0.0)
        short = [request(tok, p, n=2, max_new_tokens=20, min_new_tokens=20, temperature=0.0) for p in PROMPTS[:2]]
        for r in [long] + short:
            engine.submit(r)
        results = [next(e for e in iter_events(r) if isinstance(e, DoneEvent)).result for r in [long] + short]
    finally:
        engine.stop()
    assert 0 < log.largest <= 400 * per_token
    # the short ones arrived while the long one ran, and started only once it was done
    assert all(r.created_at < results[0].finished_at <= r.first_token_at for r in results[1:])
    for r, (text, tokens) in zip(results, [(long_prompt, 200 - len(long_ids)), (PROMPTS[0], 20), (PROMPTS[1], 20)]):
        assert all(s.token_ids == generated(loaded, text, tokens) for s in r.samples)
    # a request whose own rows could never fit the budget is refused up front, naming the field
    limits = RequestLimits(context_window=512, max_cache_tokens=engine.max_cache_tokens)
    with pytest.raises(InvalidRequest) as info:
        validate_request(inference_pb2.CompleteRequest(prompt="hi", n=4, max_new_tokens=120), tok, limits)
    assert info.value.field == "max_new_tokens" and "400" in str(info.value)
    assert validate_request(inference_pb2.CompleteRequest(prompt="hi", n=2, max_new_tokens=120), tok, limits)


class StepLog(EngineObserver):
    """The order of the engine's forwards: ("chunk", tokens) and ("step", rows), and the queue
    hook's (waiting, running, prefilling) after each loop."""

    def __init__(self):
        self.events = []
        self.queues = []

    def on_queue(self, waiting, running, prefilling):
        self.queues.append((waiting, running, prefilling))

    def on_prefill_chunk(self, tokens, seconds):
        self.events.append(("chunk", tokens))

    def on_step(self, batch_sequences, seconds, new_tokens, policy_version):
        self.events.append(("step", batch_sequences))


def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_stream_decodes(loaded):
    """Chunks of 32 tokens: the long prompt's prefill is split over several steps with the running
    request decoding between them (without chunks, none between: the whole prompt in one forward),
    its greedy tokens are still exactly generate's, the chunks compute the prompt once, and the
    prefix cache keeps one entry for it, not one per chunk."""
    tok, model = loaded.tokenizer, loaded.model
    steps = StepLog()
    engine = Engine(model, tok, EngineConfig(max_batch_sequences=16, prefill_chunk_tokens=32), observer=steps)
    engine.start()
    try:
        running = request(tok, "Hello", n=1, max_new_tokens=200, min_new_tokens=200, temperature=0.0)
        running.stream = True
        engine.submit(running)
        first = next(iter_events(running, time.monotonic() + 60))  # it decodes before the long one arrives
        assert not isinstance(first, DoneEvent)
        long_prompt = "A much longer prompt about the sea and the sky and the wind " * 12
        long_ids = tok(long_prompt).input_ids
        assert len(long_ids) > 4 * 32
        long = request(tok, long_prompt, n=2, max_new_tokens=8, min_new_tokens=8, temperature=0.0)
        result = run_to_completion(engine, long, timeout=60)
        next(e for e in iter_events(running, time.monotonic() + 60) if isinstance(e, DoneEvent))
        prefixes = engine.runner.current.prefixes
    finally:
        engine.stop()
    chunks = [i for i, (kind, _) in enumerate(steps.events) if kind == "chunk"]
    assert len(chunks) >= 3
    # between two chunks, the running stream's decode step
    assert all(any(kind == "step" for kind, _ in steps.events[a + 1:b]) for a, b in zip(chunks, chunks[1:]))
    assert sum(steps.events[i][1] for i in chunks) <= len(long_ids)  # no chunk recomputes another's tokens
    # while its chunks ran the long request was neither waiting nor running: the gauge of prefilling requests
    prefilling = [q for q in steps.queues if q[2] == 1]
    assert len(prefilling) >= 2 and all(q == (0, 1, 1) for q in prefilling)
    assert steps.queues[-1][2] == 0
    assert all(s.token_ids == generated(loaded, long_prompt, 8) for s in result.samples)
    long_entries = [e for e in prefixes._entries.values() if e.tokens == tuple(long_ids[:len(e.tokens)])]
    assert len(long_entries) == 1


def test_an_abandoned_request_stops_its_chunks(loaded):
    """A long prompt cancelled while its chunks run finishes as cancelled, and the engine goes on."""
    tok, model = loaded.tokenizer, loaded.model
    engine = Engine(model, tok, EngineConfig(max_batch_sequences=16, prefill_chunk_tokens=32))
    engine.start()
    try:
        long_prompt = "A much longer prompt about the sea and the sky and the wind " * 12
        long = request(tok, long_prompt, n=1, max_new_tokens=8)
        long.cancel()
        result = run_to_completion(engine, long, timeout=60)
        assert [s.finish_reason for s in result.samples] == ["cancelled"]
        after = run_to_completion(engine, request(tok, "Hello", n=1, max_new_tokens=4, min_new_tokens=4), timeout=60)
        assert len(after.samples[0].token_ids) == 4
    finally:
        engine.stop()


def test_a_hot_swap_between_chunks_restarts_the_prompt_on_the_new_version(loaded, tiny_model_dir):
    """The swap lands after the first chunk: the prompt's chunks start again on the new version's
    batch (the old version's prefix cache holds the old model's keys), and its samples come from
    the new version alone, token for token what that model generates."""
    tok, model = loaded.tokenizer, loaded.model
    other = load_model(str(tiny_model_dir), tiny_model_dir, "float32").model
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)  # another policy: its greedy tokens differ from the first one's
    swapped = []

    class SwapAfterFirstChunk(StepLog):
        def on_prefill_chunk(self, tokens, seconds):
            super().on_prefill_chunk(tokens, seconds)
            if not swapped:
                swapped.append(engine.swap(other, 1))

    steps = SwapAfterFirstChunk()
    engine = Engine(model, tok, EngineConfig(max_batch_sequences=16, prefill_chunk_tokens=32), observer=steps)
    engine.start()
    try:
        long_prompt = "A much longer prompt about the sea and the sky and the wind " * 12
        result = run_to_completion(engine, request(tok, long_prompt, n=2, max_new_tokens=8, min_new_tokens=8,
                                                   temperature=0.0), timeout=60)
    finally:
        engine.stop()
    assert swapped and swapped[0].is_set() and result.policy_version == 1
    ids = torch.tensor([tok(long_prompt).input_ids])
    with torch.inference_mode():
        expected = other.generate(ids, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                  pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    assert expected != generated(loaded, long_prompt, 8)
    assert all(s.token_ids == expected for s in result.samples)
    # one chunk more than the same prompt takes without a swap: the first one, again on the new version
    plain = StepLog()
    engine = Engine(model, tok, EngineConfig(max_batch_sequences=16, prefill_chunk_tokens=32), observer=plain)
    engine.start()
    try:
        run_to_completion(engine, request(tok, long_prompt, n=1, max_new_tokens=1), timeout=60)
    finally:
        engine.stop()
    chunks = lambda log: sum(kind == "chunk" for kind, _ in log.events)  # noqa: E731
    assert chunks(plain) >= 3 and chunks(steps) == chunks(plain) + 1
