"""The AI judge: a causal LM that ranks the completions of a group under a written constitution.

Following Lee et al. (2023, "RLAIF"), the judge does not generate a verdict. It reads the
constitution, the prompt and two responses labelled A and B, and the soft preference is the
softmax over its next-token log-probabilities of "A" and "B". LMs favour one position, so every
pair is scored in both orders and the two estimates are averaged. Lee et al. average the
probabilities, P(a > b) = (P(A | a first) + 1 - P(A | b first)) / 2 (``combine_orders =
"probability"``). Small judges saturate, though: the embedded 135M model says "A" with
P ≈ 0.98 whichever answer comes first, which squashes averaged probabilities to within 0.005 of
0.5. The default therefore averages in log-odds, where a position bias is an additive term that
cancels exactly (a Bradley–Terry model with a position effect): P(a > b) =
σ((logit P(A | a first) − logit P(A | b first)) / 2); on the same group it keeps about four
times the margin. Both are exactly antisymmetric, so swapping the samples cannot change the
verdict. The pairwise preferences are combined by soft Borda count (each completion scores the
sum of its win probabilities) into a ranking, whose confidence is how decisively the pairs agree
with it: the mean of 2·P(higher beats lower) − 1 over all pairs, clipped to [0, 1]. A caller
skips rankings below its confidence threshold instead of guessing.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

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
    batch_size: int = 8  # judge prompts scored in one forward pass
    combine_orders: str = "log_odds"  # or "probability" (Lee et al. 2023); see the module docstring

    def __post_init__(self) -> None:
        if self.combine_orders not in ("log_odds", "probability"):
            raise ValueError(f"combine_orders must be log_odds or probability, got {self.combine_orders!r}")


@dataclass(frozen=True)
class JudgeVerdict:
    completion_ids: list[str]  # best first
    pair_probabilities: list[tuple[str, str, float]]  # (a, b, P(a better than b)), position-debiased
    confidence: float  # 0 = coin flips or contradictions, 1 = every pair certain and consistent
    comparisons: int  # judge prompts scored


class Judge:
    """Scores pairs of answers with a causal LM; keep one per process, the model stays loaded."""

    def __init__(self, model: torch.nn.Module, tokenizer, constitution: str, judge_id: str,
                 config: JudgeConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.constitution = constitution
        self.judge_id = judge_id
        self.config = config or JudgeConfig()
        self.device = next(model.parameters()).device
        self._answer_ids = {verdict: self._token_ids(spellings) for verdict, spellings in ANSWER_TOKENS.items()}
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @staticmethod
    def make_id(model_path: str | Path, constitution: str) -> str:
        """Names the judge by model and constitution, so training can tell judges apart."""
        digest = hashlib.sha256(constitution.encode()).hexdigest()[:8]
        return f"{Path(model_path).name}@constitution-{digest}"

    def _token_ids(self, spellings: tuple[str, ...]) -> list[int]:
        ids = set()
        for spelling in spellings:
            encoded = self.tokenizer.encode(spelling, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
        if not ids:
            raise ValueError(f"the judge's tokenizer has no single token for any of {spellings}")
        return sorted(ids)

    # ---- prompts ----

    def _clip(self, text: str, keep_end: bool = False) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        limit = self.config.max_text_tokens
        if len(ids) <= limit:
            return text
        return self.tokenizer.decode(ids[-limit:] if keep_end else ids[:limit])

    def render(self, prompt: str, answer_a: str, answer_b: str) -> str:
        """The judge prompt with ``answer_a`` in position A, ending where the verdict letter goes."""
        question = _INSTRUCTION.format(prompt=prompt, a=answer_a, b=answer_b)
        messages = [{"role": "system", "content": self.constitution}, {"role": "user", "content": question}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{self.constitution}\n\n{question}\n\nAnswer:"

    # ---- scoring ----

    def probability_a(self, rendered: list[str]) -> list[float]:
        """P(the judge answers "A") for each rendered judge prompt: softmax over the A/B tokens only."""
        return [_sigmoid(x) for x in self.log_odds_a(rendered)]

    @torch.inference_mode()
    def log_odds_a(self, rendered: list[str]) -> list[float]:
        """log P("A") − log P("B") at the verdict position of each rendered judge prompt."""
        out: list[float] = []
        for start in range(0, len(rendered), self.config.batch_size):
            chunk = [self.tokenizer.encode(text, add_special_tokens=False)
                     for text in rendered[start:start + self.config.batch_size]]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), self._pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):  # left padding: every row's last token is its verdict position
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                position_ids=positions.to(self.device), use_cache=False,
                                logits_to_keep=1).logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            score_a = torch.logsumexp(logprobs[:, self._answer_ids["A"]], dim=-1)
            score_b = torch.logsumexp(logprobs[:, self._answer_ids["B"]], dim=-1)
            out += (score_a - score_b).tolist()
        return out

    def compare(self, prompt: str, pairs: list[tuple[str, str]]) -> list[float]:
        """Position-debiased P(first answer better than second) for each pair of answer texts."""
        prompt = self._clip(readable_prompt(prompt, list(self.tokenizer.all_special_tokens)), keep_end=True)
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
