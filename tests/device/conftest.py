"""The device tests: each runs on the CPU and, where CUDA sees a GPU, on the GPU too (the GPU
cases skip elsewhere: ``support.devices.DEVICES``). Their tiny model is self-contained (a byte-level BPE trained here, a random
Llama), so ``bench/device_check.sh`` can run them on a GPU machine without the embedded model's
package or a model hub."""

from __future__ import annotations

import pytest
import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Tell me about the sea, the sky and the mountains.",
          "Name a red fruit. An apple is a red fruit.", "Say something short about numbers one two three.",
          "You are a careful assistant who answers in one short sentence."] * 20


def small_tokenizer():
    """A byte-level BPE of ~400 tokens with ChatML's special tokens and template (SmolLM2's layout:
    <|im_end|> ends a turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory):
    """A Hugging Face folder: a random 2-layer Llama (grouped heads, tied embeddings) and the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("small-model")
    tokenizer = small_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than a random init's: greedy choices that rounding cannot flip
        model.model.embed_tokens.weight.mul_(8.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
