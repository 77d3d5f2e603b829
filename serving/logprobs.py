"""Per-token log-probabilities as the APIs report them: each generated token's id, its text and
the policy's raw log-probability (before temperature and top-p, the figure PPO's ratio uses), plus
the request's top-k alternatives at that position. The gRPC ``Completion.tokens`` and the
OpenAI-compatible ``logprobs`` are both made from these, so the two APIs report the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class TokenChoice:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class ScoredToken:
    token_id: int
    token: str
    logprob: float
    top: list[TokenChoice]


def scored_tokens(tokenizer, token_ids: Sequence[int], logprobs: Sequence[float],
                  top_logprobs: Sequence[Sequence[tuple[int, float]]] = ()) -> list[ScoredToken]:
    """The tokens with their texts, decoded one by one in a single batch (a token that is part of a
    multi-byte character decodes to U+FFFD on its own, as in every OpenAI-compatible server).
    Special tokens decode to "" as they do in the completion's text, so the tokens' texts join to
    the text and ``text_offset`` stays inside it."""
    wanted = sorted({int(t) for t in token_ids} | {int(t) for top in top_logprobs for t, _ in top})
    texts = (dict(zip(wanted, tokenizer.batch_decode([[t] for t in wanted], skip_special_tokens=True)))
             if wanted else {})
    tokens = []
    for position, (token_id, logprob) in enumerate(zip(token_ids, logprobs)):
        top = top_logprobs[position] if position < len(top_logprobs) else ()
        tokens.append(ScoredToken(int(token_id), texts[int(token_id)], float(logprob),
                                  [TokenChoice(int(t), texts[int(t)], float(lp)) for t, lp in top]))
    return tokens
