"""The continuous-batching engine against Hugging Face ``generate`` on the same tiny model."""

import threading
import time

import pytest
import torch

from flywheel.models import load_model
from serving.engine import DoneEvent, Engine, EngineConfig, GenerationRequest, QueueFullError, iter_events, run_to_completion
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
