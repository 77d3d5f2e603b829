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


# Top-p looks for its nucleus among the most likely tokens first: a full sort of a 49k vocabulary
# costs ~17 ms per row on a 2-core CPU (as much as the 135M model's whole decode step), a top-k of
# 1,024 ~0.5 ms. A row whose 1,024 best tokens hold less than top_p of the mass is sorted in full.
TOP_P_CANDIDATES = 1024


def sample_tokens(
    logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, uniforms: torch.Tensor,
    blocked: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; return (tokens, raw log-probabilities of those tokens).

    ``logits``: [rows, vocab]; the others: [rows]. ``blocked`` = (row indices, token indices) that
    may not be picked (end of sequence before ``min_new_tokens``). The log-probability reported is
    the policy's own (log-softmax of the unscaled, unblocked logits): what PPO's ratio and KL need.
    Greedy rows (temperature 0) take the argmax and cost no distribution at all.
    """
    raw = logits.float()
    logits = raw if blocked is None else raw.index_put(blocked, torch.tensor(float("-inf")))
    tokens = logits.argmax(dim=-1)
    sampled = (temperatures > 0).nonzero().squeeze(1)
    if sampled.numel():
        probs = torch.softmax(logits[sampled] / temperatures[sampled].unsqueeze(1), dim=-1)
        targets = uniforms[sampled].clamp(0.0, 1.0 - 1e-7).unsqueeze(1)
        tokens[sampled] = _inverse_cdf(probs, top_ps[sampled], targets)
    logprobs = raw.gather(1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(raw, dim=-1)
    return tokens, logprobs


def _inverse_cdf(probs: torch.Tensor, top_ps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's token at quantile ``targets`` of its distribution, truncated to its top-p nucleus
    (the smallest prefix, by probability, whose mass reaches top_p; the first token always stays)."""
    tokens = torch.empty(probs.shape[0], dtype=torch.long)
    whole = (top_ps >= 1.0).nonzero().squeeze(1)
    if whole.numel():
        cumulative = probs[whole].cumsum(dim=-1)
        picks = torch.searchsorted(cumulative, targets[whole] * cumulative[:, -1:], right=True)
        tokens[whole] = picks.clamp_(max=probs.shape[1] - 1).squeeze(1)
    nucleus = (top_ps < 1.0).nonzero().squeeze(1)
    if nucleus.numel():
        candidates, order = torch.topk(probs[nucleus], min(TOP_P_CANDIDATES, probs.shape[1]), dim=-1)
        # the nucleus lies inside the candidates when their mass reaches top_p (a token is outside
        # once the mass before it does); the rest, flat distributions, are sorted in full
        short = (candidates.cumsum(dim=-1)[:, -1] < top_ps[nucleus]).nonzero().squeeze(1)
        picked = nucleus_pick(candidates, order, top_ps[nucleus], targets[nucleus])
        if short.numel():
            rows = nucleus[short]
            ranked, ranked_order = torch.sort(probs[rows], dim=-1, descending=True)
            picked[short] = nucleus_pick(ranked, ranked_order, top_ps[rows], targets[rows])
        tokens[nucleus] = picked
    return tokens


def nucleus_pick(ranked: torch.Tensor, order: torch.Tensor, top_ps: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF pick among probabilities sorted descending (``order``: their token ids)."""
    cumulative = ranked.cumsum(dim=-1)
    ranked = ranked.masked_fill((cumulative - ranked) >= top_ps.unsqueeze(1), 0.0)
    cumulative = ranked.cumsum(dim=-1)
    picks = torch.searchsorted(cumulative, targets * cumulative[:, -1:], right=True)
    return order.gather(1, picks.clamp_(max=ranked.shape[1] - 1)).squeeze(1)
