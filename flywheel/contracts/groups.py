"""The served-group record: what the server hands over when a group finishes, and what is stored.

The engine returns a ``GroupResult`` (every sample's text, token ids and per-token
log-probabilities, plus the request's timings); the server stores it as a ``CompletionGroup``,
one JSON object under ``flywheel:group:{group_id}``:

    {"group_id", "policy_version", "prompt", "prompt_token_ids", "params", "created_at",
     "completions": [{"completion_id", "index", "text", "finish_reason", "token_ids", "logprobs"}]}

``prompt`` is the rendered prompt (chat template applied), which the held-out split of PPO hashes;
``params`` is the request's sampling parameters as JSON. Feedback validates rankings against the
record, the labeler ranks it, the reward model reads its texts and PPO its prompts, all through
``CompletionGroup.from_json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Protocol

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"
"""A completion's ``finish_reason``: it ended (end of sequence or a stop string), it reached
``max_new_tokens``, or it was cancelled (its client went away, the server stopped)."""


class SamplingParamsRecord(Protocol):
    """What a group keeps of its sampling parameters (serving's ``SamplingParams``): their JSON."""

    def to_json(self) -> dict: ...


@dataclass
class SampleResult:
    """One finished completion, with the per-token data that feedback and PPO need later."""

    index: int
    completion_id: str
    text: str
    finish_reason: str
    token_ids: list[int]
    logprobs: list[float]
    # per token, the request's top_logprobs most likely (token id, log-probability) pairs; empty
    # unless asked for, and never stored (only the sampled tokens' log-probabilities are trained on)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class GroupResult:
    group_id: str
    policy_version: int
    prompt: str
    prompt_token_ids: list[int]
    params: SamplingParamsRecord
    samples: list[SampleResult]
    created_at: float
    first_token_at: float | None
    finished_at: float


@dataclass(frozen=True)
class StoredCompletion:
    completion_id: str
    index: int
    text: str
    finish_reason: str
    token_ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class CompletionGroup:
    """One served group as stored: what was asked, by which policy, and every sample."""

    group_id: str
    policy_version: int
    prompt: str
    prompt_token_ids: list[int]
    params: dict
    created_at: float
    completions: list[StoredCompletion]

    @property
    def completion_ids(self) -> list[str]:
        return [c.completion_id for c in self.completions]

    def completion(self, completion_id: str) -> StoredCompletion | None:
        return next((c for c in self.completions if c.completion_id == completion_id), None)

    def to_json(self) -> str:
        # by hand rather than dataclasses.asdict, whose deep copy doubled the cost of a save
        record = {name: getattr(self, name) for name in _GROUP_FIELDS}
        record["completions"] = [{name: getattr(c, name) for name in _COMPLETION_FIELDS} for c in self.completions]
        return json.dumps(record, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "CompletionGroup":
        """Parse a stored record; raises ValueError, KeyError or TypeError on a malformed one."""
        data = json.loads(raw)
        completions = [StoredCompletion(**c) for c in data.pop("completions")]
        return cls(completions=completions, **data)

    @classmethod
    def from_result(cls, result: GroupResult) -> "CompletionGroup":
        return cls(
            group_id=result.group_id,
            policy_version=int(result.policy_version),
            prompt=result.prompt,
            prompt_token_ids=[int(t) for t in result.prompt_token_ids],
            params=result.params.to_json(),
            created_at=float(result.created_at),
            completions=[
                StoredCompletion(s.completion_id, int(s.index), s.text, s.finish_reason,
                                 [int(t) for t in s.token_ids], [float(x) for x in s.logprobs])
                for s in result.samples
            ],
        )


_GROUP_FIELDS = [f.name for f in fields(CompletionGroup) if f.name != "completions"]
_COMPLETION_FIELDS = [f.name for f in fields(StoredCompletion)]
