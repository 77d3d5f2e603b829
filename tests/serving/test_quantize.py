"""Weight-only quantized decoding (``serving.quantize``) on the tiny model."""

import pytest
import torch

from flywheel.models import load_model
from serving.engine import Engine, EngineConfig, GenerationRequest, run_to_completion
from serving.quantize import QuantizedLinear, quantized
from serving.sampling import SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), tiny_model_dir, "bfloat16")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scheme, tolerance", [("int8", 0.02), ("int4", 0.15)])
def test_small_batches_decode_from_quantized_weights_and_large_ones_from_the_originals(loaded, scheme, tolerance):
    model = loaded.model
    served = quantized(model, scheme, max_rows=4)
    wrapped = [m for m in served.modules() if isinstance(m, QuantizedLinear)]
    assert len(wrapped) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    ids = torch.tensor([[5, 17, 42, 9], [3, 8, 1, 77]])
    with torch.inference_mode():
        full = model(ids).logits
        one_row = served(ids[:1, :1]).logits  # 1 token: the quantized path
        many = served(ids).logits  # 8 tokens > max_rows: the original weights
        assert torch.equal(many, full)
        error = relative_error(one_row, full[:1, :1])
    assert 0 < error < tolerance  # quantized, and close
    # the model the policy loader merges versions into is untouched
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert all(isinstance(m, torch.nn.Linear) for name, m in model.named_modules() if name.endswith("_proj"))


@pytest.mark.parametrize("scheme, tolerance", [("int8", 0.02), ("int4", 0.15)])
def test_a_float32_model_decodes_through_the_bf16_kernels_and_returns_float32(tiny_model_dir, scheme, tolerance):
    # the quantized kernels are 10-30x slower with float32 activations (dtype auto serves float32 on a
    # CPU without native bf16), so the layer casts in and out
    model = load_model(str(tiny_model_dir), tiny_model_dir, "float32").model
    served = quantized(model, scheme)
    assert {m.quantized.scales.dtype for m in served.modules() if isinstance(m, QuantizedLinear)} == {torch.bfloat16}
    ids = torch.tensor([[5, 17, 42]])
    with torch.inference_mode():
        full = model(ids[:, :1]).logits
        one_row = served(ids[:, :1]).logits
    assert one_row.dtype == torch.float32
    assert 0 < relative_error(one_row, full) < tolerance


def test_the_engine_serves_a_quantized_model(loaded):
    tok = loaded.tokenizer
    engine = Engine(quantized(loaded.model, "int8"), tok, EngineConfig(max_batch_sequences=8))
    engine.start()
    try:
        ids = tok("Hello there").input_ids
        result = run_to_completion(engine, GenerationRequest("Hello there", ids, SamplingParams(n=2, max_new_tokens=8,
                                                                                                  min_new_tokens=8)),
                                   timeout=60)
    finally:
        engine.stop()
    assert [len(s.token_ids) for s in result.samples] == [8, 8]
    assert all(s.logprobs and all(lp <= 0 for lp in s.logprobs) for s in result.samples)


def test_an_unknown_scheme_is_refused_by_name(loaded):
    with pytest.raises(ValueError, match="quantize must be one of none, int8, int4"):
        quantized(loaded.model, "int3")
    assert quantized(loaded.model, "none") is loaded.model
