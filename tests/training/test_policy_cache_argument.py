"""Defect 8: the policy's KV-cached generation passes the cache under the keyword its
transformers version reads (``flywheel.models.cache_argument``, the rule serving's engine uses too), not
always ``cache=``."""

from __future__ import annotations

import pytest
import torch

from support.policy import one_thread  # noqa: F401 (fixture)
from training_fixtures import tiny_policy, tiny_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


class Transformers523Body(torch.nn.Module):
    """A decoder body with transformers 5.23's signature: the cache is ``past_key_values`` and any
    other keyword (``cache=`` included) disappears into ``**kwargs``, as TransformersKwargs does."""

    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.inner = body
        self.caches_received: list[object] = []

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        self.caches_received.append(past_key_values)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, **{"cache": past_key_values})


def test_generation_hands_a_transformers_5_23_body_its_cache(tiny_model_dir):
    policy = tiny_policy(tiny_model_dir)
    prompts = tiny_prompts(policy, 3)
    expected = policy.generate(prompts, 6, greedy=True)[2]
    body = policy.body = Transformers523Body(policy.body)
    assert torch.equal(policy.generate(prompts, 6, greedy=True)[2], expected)
    assert len(body.caches_received) == 6
    assert all(cache is body.caches_received[0] is not None for cache in body.caches_received)
