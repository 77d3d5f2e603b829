"""Sampling parameters and one vectorized sampling step for a whole batch.

Every sequence owns a ``torch.Generator`` seeded from (request seed, sample index) and draws one
uniform number per step; the token is found by inverse-CDF lookup in its (temperature-scaled,
top-p-truncated) distribution. So a seeded request gives the same samples whatever else shares
the batch, and the n samples of one request differ from each other.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_new_tokens: int = 0  # end-of-sequence and stop strings only count from here on

    def to_json(self) -> dict:
        return {"n": self.n, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "stop": list(self.stop), "min_new_tokens": self.min_new_tokens}


def sample_generator(seed: int | None, sample_index: int) -> torch.Generator:
    """An independent stream per (seed, sample); an unseeded request gets a random seed."""
    if seed is None:
        seed = secrets.randbits(63)
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def sample_tokens(
    logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, uniforms: torch.Tensor,
    blocked: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; return (tokens, raw log-probabilities of those tokens).

    ``logits``: [rows, vocab]; the others: [rows]. ``blocked`` = (row indices, token indices) that
    may not be picked (end of sequence before ``min_new_tokens``). The log-probability reported is
    the policy's own (log-softmax of the unscaled, unblocked logits): what PPO's ratio and KL need.
    """
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    if blocked is not None:
        logits = logits.index_put(blocked, torch.tensor(float("-inf")))
    greedy = temperatures <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperatures), temperatures).unsqueeze(1)
    probs = torch.softmax(scaled, dim=-1)
    targets = (uniforms.clamp(0.0, 1.0 - 1e-7)).unsqueeze(1)
    if bool((top_ps < 1.0).any()):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = (cumulative - sorted_probs) >= top_ps.unsqueeze(1)
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        cumulative = sorted_probs.cumsum(dim=-1)
        picks = torch.searchsorted(cumulative, targets * cumulative[:, -1:], right=True)
        picks = picks.clamp_(max=probs.shape[1] - 1)
        tokens = order.gather(1, picks).squeeze(1)
    else:
        cumulative = probs.cumsum(dim=-1)
        picks = torch.searchsorted(cumulative, targets * cumulative[:, -1:], right=True)
        tokens = picks.clamp_(max=probs.shape[1] - 1).squeeze(1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens, raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
