"""The reward head's linear probe: it recovers a linear preference from pairs, shrinks to (nearly)
nothing when the rankings carry none, and a trainer's probe alone orders held-out rankings."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from support.synthetic import random_rankings, synthetic_rankings
from training.linear_probe import fit_pairwise_probe
from training.reward_model import PairIndex, RewardModel, RewardModelConfig
from training.reward_trainer import RewardModelTrainer, RewardTrainingConfig


def pairs_of(scores: torch.Tensor, k: int, rankings: int, noise: float, generator: torch.Generator) -> PairIndex:
    """Every pair of each group of k rows, the winner by ``scores`` plus Gumbel noise (Bradley-Terry)."""
    winner, loser, owner = [], [], []
    for r in range(rankings):
        base = r * k
        noisy = scores[base:base + k] - noise * torch.log(-torch.log(torch.rand(k, generator=generator)))
        for i in range(k):
            for j in range(i + 1, k):
                a, b = (base + i, base + j) if noisy[i] > noisy[j] else (base + j, base + i)
                winner.append(a), loser.append(b), owner.append(r)
    n = len(winner)
    return PairIndex(torch.tensor(winner), torch.tensor(loser), torch.ones(n), torch.full((n,), 1 / 6),
                     torch.tensor(owner), rankings)


def test_the_probe_recovers_a_linear_preference_and_orders_new_pairs():
    generator = torch.Generator().manual_seed(0)
    k, rankings, dim = 4, 120, 64
    direction = torch.randn(dim, generator=generator)
    features = torch.randn(rankings * k, dim, generator=generator) * 3 + 5  # offset and scale: standardized inside
    pairs = pairs_of(features @ direction / direction.norm(), k, rankings, noise=0.5, generator=generator)
    fit = fit_pairwise_probe(features, pairs, torch.arange(rankings) % 5)
    fresh = torch.randn(400, dim, generator=generator) * 3 + 5
    truth, predicted = fresh @ direction, fresh @ fit.weight + fit.bias
    agree = ((truth[::2] > truth[1::2]) == (predicted[::2] > predicted[1::2])).float().mean()
    assert agree > 0.85, agree
    assert fit.cv_accuracy > 0.75 and fit.cv_loss < 0.6, fit
    assert abs(float((features @ fit.weight + fit.bias).mean())) < 1e-3  # mean score 0 over what it fitted


def test_with_rankings_that_carry_no_preference_the_probe_chooses_a_strong_penalty_and_stays_near_chance():
    generator = torch.Generator().manual_seed(1)
    k, rankings, dim = 4, 120, 64
    features = torch.randn(rankings * k, dim, generator=generator)
    pairs = pairs_of(torch.zeros(rankings * k), k, rankings, noise=1.0, generator=generator)
    fit = fit_pairwise_probe(features, pairs, torch.arange(rankings) % 5)
    assert fit.l2 >= 1.0, fit.grid  # the cross-validation prefers a shrunken head to fitting noise
    assert fit.cv_loss > 0.68 and fit.cv_accuracy < 0.6, fit
    scores = features @ fit.weight
    assert float(scores.std()) < 0.5  # a head that says little, not confident noise


def test_the_trainers_probe_alone_orders_held_out_rankings_of_a_tiny_model(tiny_model_dir):
    torch.manual_seed(0)
    config = RewardModelConfig(str(tiny_model_dir), trainable_layers=0, max_length=96, autocast_dtype="float32")
    model = RewardModel.from_backbone(config)
    trainer = RewardModelTrainer(model, AutoTokenizer.from_pretrained(tiny_model_dir),
                                 RewardTrainingConfig(epochs=0, linear_probe=True))
    held_out = synthetic_rankings(32, seed=99)
    before = trainer.evaluate(held_out)
    stats = trainer.train(synthetic_rankings(64, seed=1))
    after = trainer.evaluate(held_out)
    assert stats.probe is not None and stats.steps == 0
    assert after.accuracy > 0.8 > before.accuracy, (before, after)
    assert stats.probe.cv_accuracy > 0.7, stats.probe


def test_the_trainers_probe_on_random_rankings_learns_nothing(tiny_model_dir):
    torch.manual_seed(0)
    config = RewardModelConfig(str(tiny_model_dir), trainable_layers=0, max_length=96, autocast_dtype="float32")
    trainer = RewardModelTrainer(RewardModel.from_backbone(config), AutoTokenizer.from_pretrained(tiny_model_dir),
                                 RewardTrainingConfig(epochs=0, linear_probe=True))
    stats = trainer.train(random_rankings(64, seed=1))
    after = trainer.evaluate(random_rankings(64, seed=2))
    assert 0.35 < after.accuracy < 0.65, after
    assert stats.probe.cv_loss > 0.66, stats.probe


def test_with_more_features_than_completions_the_probe_solves_in_their_span_and_still_generalizes():
    generator = torch.Generator().manual_seed(2)
    k, rankings, dim = 4, 40, 600  # 160 completions, 600 features
    direction = torch.zeros(dim)
    direction[:20] = torch.randn(20, generator=generator)
    features = torch.randn(rankings * k, dim, generator=generator)
    pairs = pairs_of(features @ direction / direction.norm(), k, rankings, noise=0.3, generator=generator)
    fit = fit_pairwise_probe(features, pairs, torch.arange(rankings) % 5)
    assert fit.weight.shape == (dim,)
    # the optimum of the full problem, not an approximation: its gradient in all 600 dimensions is ~0
    features = features.double()
    scale = features.std(dim=0)
    beta = (fit.weight.double() * scale).requires_grad_(True)
    standardized = (features - features.mean(dim=0)) / scale
    margin = (standardized[pairs.winner] - standardized[pairs.loser]) @ beta
    loss = -(pairs.weight.double() * torch.nn.functional.logsigmoid(margin)).sum() / rankings
    (loss + 0.5 * fit.l2 * beta.pow(2).sum()).backward()
    assert float(beta.grad.abs().max()) < 1e-4, float(beta.grad.abs().max())
    fresh = torch.randn(400, dim, generator=generator)
    truth, predicted = fresh @ direction, fresh @ fit.weight
    agree = ((truth[::2] > truth[1::2]) == (predicted[::2] > predicted[1::2])).float().mean()
    assert agree > 0.58, agree
