"""``RewardModelTrainer``: trains a ``RewardModel`` on rankings with the K-way ranking loss.

A batch is ``batch_rankings`` rankings; all their completions (Σ K) are tokenized as
prompt + completion + EOS, right-padded into one tensor and run through the model in one forward;
the loss is computed over the C(K,2) pairs of each ranking from those rewards
(``k_way_ranking_loss``). Rankings are grouped by length before batching, so a batch pads little.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch

from training.evidence import Interval, clustered_accuracy
from training.linear_probe import ProbeFit, fit_probe_over_blocks
from training.rankings import Ranking
from training.reward_model import PairIndex, RewardModel, k_way_ranking_loss, pairwise_accuracy_counts, scored_sequence

log = logging.getLogger(__name__)


@dataclass
class RewardTrainingConfig:
    """How a run trains (TRL-style typed config)."""

    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    batch_rankings: int = 8
    """Rankings per optimizer step; each contributes all its K completions to one forward."""
    epochs: int = 1
    ai_weight: float = 0.5
    """Weight of an AI-labelled ranking relative to a human one (1.0)."""
    max_grad_norm: float = 1.0
    eval_batch_rankings: int = 16
    linear_probe: bool = True
    """Fit the head first by cross-validated L2 logistic regression on the frozen features
    (``training.linear_probe``), then fine-tune for ``epochs`` from there (LP-FT)."""
    probe_folds: int = 5
    seed: int = 0
    log_every_seconds: float = 10.0


@dataclass
class TrainStats:
    loss: float
    rankings: int
    pairs: int
    sequences: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    probe: ProbeFit | None = None

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RankingOutcome:
    """How one held-out ranking came out: its pairs ordered as labelled, of its decided pairs."""

    correct: int
    pairs: int
    human: bool


@dataclass
class EvalStats:
    accuracy: float | None
    loss: float | None
    pairs: int
    rankings: int
    human_accuracy: float | None = None
    per_ranking: list[RankingOutcome] = field(default_factory=list)

    def accuracy_interval(self) -> Interval:
        """Pairwise accuracy with its 95% interval over rankings (the independent unit): over the
        human rankings when there are any, since people's preference is what the model must learn
        and AI labels are only its stand-in."""
        human = [u for u in self.per_ranking if u.human and u.pairs]
        units = human or [u for u in self.per_ranking if u.pairs]
        return clustered_accuracy([u.correct for u in units], [u.pairs for u in units])

    @property
    def judged_on(self) -> str:
        return "human" if any(u.human and u.pairs for u in self.per_ranking) else "all"


@dataclass
class RankingBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pairs: PairIndex
    is_human: torch.Tensor
    """[pairs] whether each pair comes from a human ranking."""
    completion_lengths: torch.Tensor | None = None
    """[sequences] how many of each sequence's last tokens are its completion (with the EOS)."""


class RankingCollator:
    """Tokenizes rankings into one right-padded batch of all their completions plus the pair index."""

    def __init__(self, tokenizer, max_length: int, ai_weight: float = 0.5) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.ai_weight = ai_weight
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self._prompt_cache: dict[str, list[int]] = {}

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(self._prompt_cache) > 4096:
                self._prompt_cache.clear()
            self._prompt_cache[prompt] = ids
        return ids

    def encode(self, prompt: str, completion: str) -> list[int]:
        """prompt + completion + EOS, cut from the left to ``max_length`` (the end is what is scored)."""
        return self.encode_with_length(prompt, completion)[0]

    def encode_with_length(self, prompt: str, completion: str) -> tuple[list[int], int]:
        """``encode``'s ids and how many of the last of them are the completion (with its EOS)."""
        completion_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        return scored_sequence(self._prompt_ids(prompt), completion_ids, self.eos_id, self.max_length)

    def length(self, ranking: Ranking) -> int:
        """Rough padded cost of a ranking, for grouping by length (characters, no tokenizing)."""
        return len(ranking.prompt) + max(len(c) for c in ranking.completions)

    def __call__(self, rankings: list[Ranking]) -> RankingBatch:
        sequences: list[list[int]] = []
        completion_lengths: list[int] = []
        winner, loser, target, weight, owner, human = [], [], [], [], [], []
        for r_index, ranking in enumerate(rankings):
            base = len(sequences)
            for completion in ranking.completions:
                ids, completion_length = self.encode_with_length(ranking.prompt, completion)
                sequences.append(ids)
                completion_lengths.append(completion_length)
            if ranking.source == "ai" and ranking.pair_probabilities:
                pairs = [(a, b, p) for a, b, p in ranking.pair_probabilities]
            else:  # completions are best first: every (i < j) pair is (winner, loser)
                pairs = [(i, j, 1.0) for i in range(ranking.k) for j in range(i + 1, ranking.k)]
            w = (self.ai_weight if ranking.source == "ai" else 1.0) / max(len(pairs), 1)
            for a, b, p in pairs:
                winner.append(base + a)
                loser.append(base + b)
                target.append(p)
                weight.append(w)
                owner.append(r_index)
                human.append(ranking.source != "ai")
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        pairs = PairIndex(
            winner=torch.tensor(winner, dtype=torch.long), loser=torch.tensor(loser, dtype=torch.long),
            target=torch.tensor(target, dtype=torch.float32), weight=torch.tensor(weight, dtype=torch.float32),
            ranking=torch.tensor(owner, dtype=torch.long), n_rankings=len(rankings),
        )
        return RankingBatch(input_ids, attention_mask, pairs, torch.tensor(human, dtype=torch.bool),
                            torch.tensor(completion_lengths, dtype=torch.long))


def length_grouped_batches(rankings: list[Ranking], batch_size: int, length, rng: random.Random) -> list[list[Ranking]]:
    """Shuffled batches of rankings of similar length (sorted within chunks of 16 batches), so
    padding stays small while the order stays random."""
    order = list(rankings)
    rng.shuffle(order)
    chunk = batch_size * 16
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=length)
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


class RewardModelTrainer:
    """Trains and evaluates a ``RewardModel`` on ``Ranking``s."""

    def __init__(self, model: RewardModel, tokenizer, config: RewardTrainingConfig | None = None) -> None:
        self.model = model
        self.config = config or RewardTrainingConfig()
        self.collator = RankingCollator(tokenizer, model.config.max_length, self.config.ai_weight)

    def _batches(self, rankings: list[Ranking], size: int, rng: random.Random | None) -> list[list[Ranking]]:
        if rng is None:
            ordered = sorted(rankings, key=self.collator.length)
            return [ordered[i:i + size] for i in range(0, len(ordered), size)]
        return length_grouped_batches(rankings, size, self.collator.length, rng)

    @torch.inference_mode()
    def _features(self, rankings: list[Ranking]) -> tuple[torch.Tensor, PairIndex]:
        """The head's inputs for every completion of ``rankings`` and their pairs (one PairIndex)."""
        self.model.eval()
        features, pair_parts, offset = [], [], 0
        size = self.config.eval_batch_rankings
        for start in range(0, len(rankings), size):
            batch = self.collator(rankings[start:start + size])
            features.append(self.model.features(batch.input_ids, batch.attention_mask, batch.completion_lengths))
            pair_parts.append((batch.pairs, offset, start))
            offset += batch.input_ids.shape[0]
        return torch.cat(features), PairIndex.concat(pair_parts)

    def fit_head(self, rankings: list[Ranking]) -> ProbeFit | None:
        """Set the head to the cross-validated linear probe of the current features on ``rankings``
        (folds by a hash of the group id, so a group's rankings stay together); None, head
        untouched, with fewer rankings than two per fold."""
        rankings = [r for r in rankings if r.k >= 2]
        folds = self.config.probe_folds
        if len(rankings) < 2 * folds:
            log.info("reward model: %d rankings, too few for a %d-fold probe; the head is left as it is",
                     len(rankings), folds)
            return None
        started = time.monotonic()
        features, pairs = self._features(rankings)
        fold_of = torch.tensor([_fold(r.group_id, folds) for r in rankings])
        names = ["last token"] + [f"mean of depth {d}" for d in self.model.mean_depths]
        fit = fit_probe_over_blocks(features, pairs, fold_of, dict(zip(names, self.model.head_blocks())))
        head = self.model.reward_head
        with torch.no_grad():
            head.weight.copy_(fit.weight.to(head.weight.dtype).unsqueeze(0))
            head.bias.fill_(fit.bias)
        log.info("reward model: linear probe on %d rankings (%d pairs) in %.1f s: reads %s, L2 %.3g, cross-validated "
                 "accuracy %.3f, loss %.4f (0.6931 = a head of zero)", len(rankings), pairs.n_pairs,
                 time.monotonic() - started, fit.features, fit.l2, fit.cv_accuracy, fit.cv_loss)
        return fit

    def train(self, rankings: list[Ranking], progress=None) -> TrainStats:
        """The linear probe (if configured), then ``epochs`` passes over ``rankings``; returns the
        mean loss and throughput."""
        config = self.config
        rankings = [r for r in rankings if r.k >= 2]
        probe = self.fit_head(rankings) if config.linear_probe else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        # the fused kernel: a third of the optimizer time of the for-each one on this CPU (as Trainer's default)
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                      fused=all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params))
        rng = random.Random(config.seed)
        torch.manual_seed(config.seed)
        total_steps = config.epochs * math.ceil(len(rankings) / config.batch_rankings) if rankings else 0
        self.model.train()
        losses, pairs, sequences, step = [], 0, 0, 0
        started = last_log = time.monotonic()
        for epoch in range(config.epochs):
            for batch_rankings in self._batches(rankings, config.batch_rankings, rng):
                batch = self.collator(batch_rankings)
                rewards = self.model(batch.input_ids, batch.attention_mask, batch.completion_lengths)
                loss = k_way_ranking_loss(rewards, batch.pairs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                step += 1
                losses.append(float(loss.detach()))
                pairs += batch.pairs.n_pairs
                sequences += batch.input_ids.shape[0]
                now = time.monotonic()
                if progress is not None:
                    progress(step, total_steps, losses[-1])
                if now - last_log >= config.log_every_seconds or step == total_steps:
                    elapsed = now - started
                    rate = pairs / elapsed
                    eta = (total_steps - step) * elapsed / step
                    log.info("reward model: epoch %d step %d/%d loss %.4f, %.1f pairs/s, %.1f rankings/s, ETA %.0f s",
                             epoch + 1, step, total_steps, sum(losses[-20:]) / len(losses[-20:]), rate,
                             step * config.batch_rankings / elapsed, eta)
                    last_log = now
        self.model.eval()
        seconds = time.monotonic() - started
        return TrainStats(loss=sum(losses) / len(losses) if losses else float("nan"),
                          rankings=len(rankings) * config.epochs, pairs=pairs, sequences=sequences,
                          steps=step, seconds=seconds, losses=losses, probe=probe)

    @torch.inference_mode()
    def evaluate(self, rankings: list[Ranking]) -> EvalStats:
        """Pairwise accuracy and K-way loss on held-out rankings (hard labels for accuracy)."""
        rankings = [r for r in rankings if r.k >= 2]
        if not rankings:
            return EvalStats(accuracy=None, loss=None, pairs=0, rankings=0)
        self.model.eval()
        correct = decided = human_correct = human_decided = 0
        loss_sum = 0.0
        outcomes: list[RankingOutcome] = []
        for batch_rankings in self._batches(rankings, self.config.eval_batch_rankings, None):
            batch = self.collator(batch_rankings)
            rewards = self.model(batch.input_ids, batch.attention_mask, batch.completion_lengths)
            loss_sum += float(k_way_ranking_loss(rewards, batch.pairs)) * batch.pairs.n_rankings
            c, d = pairwise_accuracy_counts(rewards, batch.pairs)
            correct, decided = correct + c, decided + d
            outcomes += _outcomes(rewards, batch.pairs, batch_rankings)
            if batch.is_human.any():
                human = _subset(batch.pairs, batch.is_human)
                c, d = pairwise_accuracy_counts(rewards, human)
                human_correct, human_decided = human_correct + c, human_decided + d
        return EvalStats(
            accuracy=correct / decided if decided else None, loss=loss_sum / len(rankings),
            pairs=decided, rankings=len(rankings),
            human_accuracy=human_correct / human_decided if human_decided else None, per_ranking=outcomes,
        )

    @torch.inference_mode()
    def score(self, prompt: str, completions: list[str]) -> list[float]:
        batch = self.collator([Ranking("score", "score", prompt, list(completions))])
        return self.model(batch.input_ids, batch.attention_mask, batch.completion_lengths).tolist()


def _fold(group_id: str, folds: int) -> int:
    """The probe's cross-validation fold of a group (a hash, so a group's rankings share one)."""
    return int.from_bytes(hashlib.sha256(f"probe-fold:{group_id}".encode()).digest()[:8], "big") % folds


def _outcomes(rewards: torch.Tensor, pairs: PairIndex, rankings: list[Ranking]) -> list[RankingOutcome]:
    """Per ranking of a batch: its correctly ordered and its decided pairs (as pairwise_accuracy_counts)."""
    decided = pairs.target != 0.5
    diff = rewards[pairs.winner] - rewards[pairs.loser]
    agree = torch.where(pairs.target > 0.5, diff > 0, diff < 0) & decided
    n = pairs.n_rankings
    correct = torch.bincount(pairs.ranking, weights=agree.float(), minlength=n)
    counted = torch.bincount(pairs.ranking, weights=decided.float(), minlength=n)
    return [RankingOutcome(int(c), int(d), r.source != "ai") for c, d, r in zip(correct.tolist(), counted.tolist(),
                                                                               rankings)]


def _subset(pairs: PairIndex, mask: torch.Tensor) -> PairIndex:
    return PairIndex(pairs.winner[mask], pairs.loser[mask], pairs.target[mask], pairs.weight[mask],
                     pairs.ranking[mask], pairs.n_rankings)
