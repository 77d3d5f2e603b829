"""Shared fixtures: a real Redis on a free port, tiny models built from a config."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server on a free port, with AOF in a temp dir; tests may stop/restart it."""
    from flywheel.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def redis_client(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=False)
    yield client
    client.close()


def build_tiny_model_dir(path, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A Hugging Face folder with a tiny random Llama and the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flywheel.models import embedded_gguf_path

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny causal LM folder (random weights, real tokenizer and chat template), built once per run."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))
