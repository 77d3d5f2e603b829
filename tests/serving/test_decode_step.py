"""The lean decode step (``serving.decode_step``) computes transformers' logits, padded rows and grouped heads included."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flywheel.models import load_model
from serving.decode_step import LeanDecoder, lean_decoder
from serving.model_runner import Batch
from serving.quantize import quantized


def running_batch(model, prompts):
    batch = Batch(model, 0, torch.device("cpu"))
    prefill = batch.prefill([(ids, 1) for ids in prompts])
    batch.add([prefill], list(range(len(prompts))), prefill.logits.argmax(-1), [len(ids) + 8 for ids in prompts])
    return batch


def decode_both_ways(batch, steps=3):
    """Each step's logits by the lean step and by transformers' forward from the same cache, then
    the lean step's greedy token fed to both."""
    out = []
    for _ in range(steps):
        length = batch.cache.length
        ours = batch.forward_step()
        for layer in batch.cache.layers:
            layer.length = length  # the same step again, through transformers
        theirs = batch.transformers_step()
        out.append((ours, theirs))
        batch.last_tokens = ours.argmax(-1, keepdim=True)
    return out


@pytest.mark.parametrize("dtype, scheme", [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int4"),
                                           ("float32", "int8")])
def test_the_lean_step_gives_transformers_logits_for_padded_rows(tiny_model_dir, dtype, scheme):
    model = quantized(load_model(str(tiny_model_dir), tiny_model_dir, dtype).model, scheme)
    decoder = lean_decoder(model)
    assert isinstance(decoder, LeanDecoder) and lean_decoder(model) is decoder  # made once per model
    # a quantized model's q/k/v and gate/up run as one kernel call each; the plain model's as they are
    assert all((qkv is not None and gate_up is not None) == (scheme != "none") for qkv, gate_up in decoder.fused)
    with torch.inference_mode():
        # rows of different lengths: left padding, so the mask is used (and the grouped heads packed)
        batch = running_batch(model, [[5, 17, 42, 9, 11, 3], [8, 1], [77, 3, 4]])
        assert batch.decoder is not None and int(batch.pads.max()) > 0
        for ours, theirs in decode_both_ways(batch):
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
        single = running_batch(model, [[5, 17, 42]])  # one row, no padding: no mask
        for ours, theirs in decode_both_ways(single):
            assert torch.equal(ours, theirs)


def tiny_llama(**overrides):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, **overrides)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("overrides", [{"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"},
                                       {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}])
def test_a_model_the_lean_step_does_not_cover_decodes_through_transformers(overrides):
    model = tiny_llama(**overrides)
    assert lean_decoder(model) is None
    assert Batch(model, 0, torch.device("cpu")).decoder is None
    assert lean_decoder(tiny_llama()) is not None
