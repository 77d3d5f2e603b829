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

The method lives in ``feedback.pairwise`` (``PairwiseJudge``, no torch); this module is where its
log-probabilities come from a causal LM loaded in this process (``Judge``).
``feedback.remote_judge.RemoteJudge`` takes them from an OpenAI-compatible endpoint instead.
"""

from __future__ import annotations

import torch

from feedback.pairwise import (ANSWER_TOKENS, CONSTITUTION_PATH, JudgeConfig, JudgeVerdict,  # noqa: F401 (re-exported)
                               PairwiseJudge, load_constitution, readable_prompt)


class Judge(PairwiseJudge):
    """Scores pairs of answers with a causal LM; keep one per process, the model stays loaded."""

    def __init__(self, model: torch.nn.Module, tokenizer, constitution: str, judge_id: str,
                 config: JudgeConfig | None = None) -> None:
        super().__init__(constitution, judge_id, config)
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self._answer_ids = {verdict: self._token_ids(spellings) for verdict, spellings in ANSWER_TOKENS.items()}
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

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

    def readable(self, prompt: str) -> str:
        return readable_prompt(prompt, list(self.tokenizer.all_special_tokens))

    def _clip(self, text: str, keep_end: bool = False) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        limit = self.config.max_text_tokens
        if len(ids) <= limit:
            return text
        return self.tokenizer.decode(ids[-limit:] if keep_end else ids[:limit])

    def render(self, prompt: str, answer_a: str, answer_b: str) -> str:
        """The judge prompt with ``answer_a`` in position A, ending where the verdict letter goes."""
        messages = self.messages(prompt, answer_a, answer_b)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.plain_text(messages)

    # ---- scoring ----

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
