"""The AI judge's method, whatever model answers: position-debiased pairwise comparisons combined
into a ranking (the method is described in ``feedback.judge``'s docstring).

``PairwiseJudge`` owns the method: the judge's question, both orders of every pair, the
combination of the two orders, the soft Borda count and the confidence. A subclass says only
where the log-odds of the verdict letters come from: ``feedback.judge.Judge`` from a causal LM
loaded in this process, ``feedback.remote_judge.RemoteJudge`` from any OpenAI-compatible endpoint
that returns log-probabilities. This module imports no torch, so a labelling worker with a remote
judge loads none.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

CONSTITUTION_PATH = Path(__file__).with_name("constitution.md")
ANSWER_TOKENS = {"A": ("A", " A"), "B": ("B", " B")}  # spellings of each verdict, log-probabilities summed

_INSTRUCTION = (
    "Below are a conversation and two candidate responses from an AI assistant. Following the principles, "
    "decide which response is better.\n\n[Conversation]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Which response is better, A or B? Answer with the single letter A or B."
)
_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S)


def load_constitution(path: str | Path = "") -> str:
    return Path(path or CONSTITUTION_PATH).read_text(encoding="utf-8").strip()


def readable_prompt(prompt: str, special_tokens: list[str]) -> str:
    """A served prompt (rendered with the policy's chat template) as plain text for the judge.

    Special tokens inside the judge's own prompt would be read as structure, so the turns of a
    ChatML prompt become "role: text" lines and any other special token is dropped.
    """
    turns = [(role, content.strip()) for role, content in _CHATML_TURN.findall(prompt)]
    if turns:
        return "\n".join(f"{role}: {content}" for role, content in turns if content)
    for token in special_tokens:
        prompt = prompt.replace(token, " ")
    return prompt.strip()


@dataclass(frozen=True)
class JudgeConfig:
    max_text_tokens: int = 384  # the prompt (its end) and each answer (its start) are cut to this
    batch_size: int = 8  # judge prompts scored in one forward pass (a remote judge: requests in flight)
    combine_orders: str = "log_odds"  # or "probability" (Lee et al. 2023); see feedback.judge's docstring

    def __post_init__(self) -> None:
        if self.combine_orders not in ("log_odds", "probability"):
            raise ValueError(f"combine_orders must be log_odds or probability, got {self.combine_orders!r}")


@dataclass(frozen=True)
class JudgeVerdict:
    completion_ids: list[str]  # best first
    pair_probabilities: list[tuple[str, str, float]]  # (a, b, P(a better than b)), position-debiased
    confidence: float  # 0 = coin flips or contradictions, 1 = every pair certain and consistent
    comparisons: int  # judge prompts scored


class PairwiseJudge:
    """Ranks answers by position-debiased pairwise verdicts; subclasses supply ``log_odds_a``,
    ``render``, ``readable`` and ``_clip``."""

    def __init__(self, constitution: str, judge_id: str, config: JudgeConfig | None = None) -> None:
        self.constitution = constitution
        self.judge_id = judge_id
        self.config = config or JudgeConfig()

    @staticmethod
    def make_id(model: str | Path, constitution: str) -> str:
        """Names the judge by model and constitution, so training can tell judges apart."""
        digest = hashlib.sha256(constitution.encode()).hexdigest()[:8]
        return f"{Path(model).name}@constitution-{digest}"

    # ---- prompts ----

    def messages(self, prompt: str, answer_a: str, answer_b: str) -> list[dict]:
        """The judge's conversation with ``answer_a`` in position A: the constitution, the question."""
        question = _INSTRUCTION.format(prompt=prompt, a=answer_a, b=answer_b)
        return [{"role": "system", "content": self.constitution}, {"role": "user", "content": question}]

    @staticmethod
    def plain_text(messages: list[dict]) -> str:
        """The conversation as one text ending where the verdict letter goes (no chat template)."""
        return "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"

    def render(self, prompt: str, answer_a: str, answer_b: str):
        """One judge prompt, in the form ``log_odds_a`` takes."""
        raise NotImplementedError

    def readable(self, prompt: str) -> str:
        """The served prompt as plain text for the judge's question."""
        raise NotImplementedError

    def _clip(self, text: str, keep_end: bool = False) -> str:
        raise NotImplementedError

    # ---- scoring ----

    def log_odds_a(self, rendered: list) -> list[float]:
        """log P("A") − log P("B") at the verdict position of each rendered judge prompt."""
        raise NotImplementedError

    def probability_a(self, rendered: list) -> list[float]:
        """P(the judge answers "A") for each rendered judge prompt: softmax over the A/B tokens only."""
        return [_sigmoid(x) for x in self.log_odds_a(rendered)]

    def compare(self, prompt: str, pairs: list[tuple[str, str]]) -> list[float]:
        """Position-debiased P(first answer better than second) for each pair of answer texts."""
        prompt = self._clip(self.readable(prompt), keep_end=True)
        rendered = []
        for a, b in pairs:
            a, b = self._clip(a), self._clip(b)
            rendered += [self.render(prompt, a, b), self.render(prompt, b, a)]
        odds = self.log_odds_a(rendered)
        first, swapped = odds[0::2], odds[1::2]
        if self.config.combine_orders == "probability":
            return [(_sigmoid(x) + 1.0 - _sigmoid(y)) / 2.0 for x, y in zip(first, swapped)]
        return [_sigmoid((x - y) / 2.0) for x, y in zip(first, swapped)]

    def rank(self, prompt: str, answers: dict[str, str]) -> JudgeVerdict:
        """Rank answers (completion id -> text) best first, with a confidence."""
        if len(answers) < 2:
            raise ValueError("ranking needs at least two answers")
        ids = sorted(answers)  # a canonical order: the verdict cannot depend on how answers were listed
        pairs = list(itertools.combinations(ids, 2))
        probabilities = self.compare(prompt, [(answers[a], answers[b]) for a, b in pairs])
        better = {}
        for (a, b), p in zip(pairs, probabilities):
            better[(a, b)], better[(b, a)] = p, 1.0 - p
        borda = {cid: sum(better[(cid, other)] for other in ids if other != cid) for cid in ids}
        order = sorted(ids, key=lambda cid: (-borda[cid], cid))
        margins = [2.0 * better[(hi, lo)] - 1.0 for hi, lo in itertools.combinations(order, 2)]
        confidence = min(max(sum(margins) / len(margins), 0.0), 1.0)
        return JudgeVerdict(order, [(a, b, p) for (a, b), p in zip(pairs, probabilities)], confidence,
                            comparisons=2 * len(pairs))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class JudgeUnavailableError(Exception):
    """The judge could not give a verdict now (its endpoint failed, refused or timed out). The group
    is not lost: the labeler puts it back among the candidates and a later pass ranks it."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # a short label for metrics: connection, timeout, auth, rate_limited, ...
