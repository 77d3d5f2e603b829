"""The K-way ranking loss of InstructGPT, pinned against the pairwise loss computed by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from training.rankings import Ranking
from training.reward_model import k_way_ranking_loss, pairwise_accuracy_counts
from training.reward_trainer import RankingCollator


class CharTokenizer:
    """One token per character; enough to build batches without a real tokenizer."""

    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 50) for c in text]}


def hand_loss(rewards: list[float]) -> float:
    """−1/C(K,2) Σ_{i<j} log σ(r_i − r_j) for rewards listed best first."""
    pairs = list(itertools.combinations(range(len(rewards)), 2))
    return -sum(math.log(1 / (1 + math.exp(-(rewards[i] - rewards[j])))) for i, j in pairs) / len(pairs)


def test_k_way_loss_equals_the_mean_pairwise_loss_computed_by_hand():
    collator = RankingCollator(CharTokenizer(), max_length=64)
    rankings = [Ranking("a", "a", "p", ["w", "xx", "yyy", "zzzz"]), Ranking("b", "b", "q", ["s", "tt", "uuu"])]
    batch = collator(rankings)
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.1, 0.3, 0.2, -0.4])
    expected = (hand_loss([0.5, -1.0, 2.0, 0.1]) + hand_loss([0.3, 0.2, -0.4])) / 2
    assert batch.pairs.n_pairs == 6 + 3
    assert k_way_ranking_loss(rewards, batch.pairs).item() == pytest.approx(expected, rel=1e-6)


def test_each_completion_is_one_sequence_of_the_batch_not_one_per_pair():
    collator = RankingCollator(CharTokenizer(), max_length=64)
    batch = collator([Ranking("a", "a", "prompt ", ["one", "two", "three", "four"]) for _ in range(3)])
    assert batch.input_ids.shape[0] == 3 * 4  # 12 sequences for 18 pairs
    assert batch.pairs.n_pairs == 3 * 6
    lengths = batch.attention_mask.sum(1)
    assert lengths.tolist()[:4] == [len("prompt one") + 1, len("prompt two") + 1, len("prompt three") + 1,
                                    len("prompt four") + 1]  # + EOS, right-padded


def test_ai_rankings_train_on_the_soft_preference_with_their_weight():
    collator = RankingCollator(CharTokenizer(), max_length=64, ai_weight=0.25)
    ai = Ranking("a", "a", "p", ["x", "y"], source="ai", pair_probabilities=[(0, 1, 0.8)])
    batch = collator([ai])
    rewards = torch.tensor([1.0, 0.0])
    logsig = torch.nn.functional.logsigmoid
    expected = -0.25 * (0.8 * logsig(torch.tensor(1.0)) + 0.2 * logsig(torch.tensor(-1.0)))
    assert k_way_ranking_loss(rewards, batch.pairs).item() == pytest.approx(expected.item(), rel=1e-6)


def test_long_prompts_are_cut_from_the_left_so_the_scored_end_survives():
    collator = RankingCollator(CharTokenizer(), max_length=8)
    ids = collator.encode("a very long prompt", "end")
    assert len(ids) == 8 and ids[-1] == CharTokenizer.eos_token_id
    assert ids[-4:-1] == CharTokenizer()("end")["input_ids"]


def test_pairwise_accuracy_counts_the_pairs_ordered_as_ranked():
    collator = RankingCollator(CharTokenizer(), max_length=64)
    batch = collator([Ranking("a", "a", "p", ["x", "y", "z"])])
    assert pairwise_accuracy_counts(torch.tensor([3.0, 2.0, 1.0]), batch.pairs) == (3, 3)
    assert pairwise_accuracy_counts(torch.tensor([1.0, 2.0, 3.0]), batch.pairs) == (0, 3)
