"""The gates' confidence intervals: right quantiles, honest coverage, clusters as the unit."""

from __future__ import annotations

import random

import pytest

from training.evidence import Interval, clustered_accuracy, mean_interval, paired_gain, student_t_quantile


@pytest.mark.parametrize("df, expected", [(1, 12.706), (5, 2.571), (10, 2.228), (30, 2.042), (1000, 1.962)])
def test_t_quantiles_match_the_table(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert student_t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-3)


def test_the_mean_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = random.Random(0)
    covered = 0
    for _ in range(2000):
        interval = mean_interval([rng.gauss(1.0, 2.0) for _ in range(12)])
        covered += interval.low < 1.0 < interval.high
    assert 0.93 < covered / 2000 < 0.97


def test_a_null_gain_is_called_positive_at_most_a_few_percent_of_the_time():
    """Under no effect (the candidate is the current policy with another draw), the lower bound of
    the gain's interval exceeds 0 about 2.5% of the time: the gate's false-promotion rate."""
    rng = random.Random(1)
    false_positives = 0
    for _ in range(2000):
        prompt_effects = [rng.gauss(0, 1) for _ in range(40)]  # prompts differ a lot; both policies alike
        candidate = [[e + rng.gauss(0, 1) for _ in range(4)] for e in prompt_effects]
        current = [[e + rng.gauss(0, 1) for _ in range(4)] for e in prompt_effects]
        false_positives += paired_gain(candidate, current).above(0.0)
    assert false_positives / 2000 < 0.05


def test_a_real_gain_is_found_and_pairing_by_prompt_removes_the_prompt_spread():
    rng = random.Random(2)
    prompt_effects = [rng.gauss(0, 3) for _ in range(40)]
    candidate = [[e + 0.5 + rng.gauss(0, 0.5) for _ in range(4)] for e in prompt_effects]
    current = [[e + rng.gauss(0, 0.5) for _ in range(4)] for e in prompt_effects]
    gain = paired_gain(candidate, current)
    assert gain.above(0.0) and gain.low < 0.5 < gain.high
    assert gain.units == 40


def test_paired_gain_refuses_unpaired_input():
    with pytest.raises(ValueError):
        paired_gain([[1.0, 2.0]], [[1.0]])
    with pytest.raises(ValueError):
        paired_gain([[1.0]], [])


def test_accuracy_interval_treats_the_ranking_not_the_pair_as_the_unit():
    """Six pairs from one ranking are not six independent answers: 20 rankings that are either all
    right or all wrong give a much wider interval than 120 independent pairs would."""
    rng = random.Random(3)
    whole = [6.0 if rng.random() < 0.6 else 0.0 for _ in range(20)]
    clustered = clustered_accuracy(whole, [6] * 20)
    independent = clustered_accuracy([float(rng.random() < 0.6) for _ in range(120)], [1] * 120)
    assert clustered.high - clustered.low > 1.8 * (independent.high - independent.low)


def test_chance_accuracy_is_rarely_called_better_than_chance():
    rng = random.Random(4)
    false_positives = 0
    for _ in range(1000):
        correct = [float(sum(rng.random() < 0.5 for _ in range(6))) for _ in range(30)]
        false_positives += clustered_accuracy(correct, [6] * 30).above(0.5)
    assert false_positives / 1000 < 0.05


def test_empty_and_single_inputs_give_no_evidence():
    assert not mean_interval([]).above(-1e9)
    assert not mean_interval([3.0]).above(-1e9)
    assert not clustered_accuracy([], []).above(0.0)
    assert isinstance(mean_interval([1.0, 2.0]).to_dict()["low"], float)
    assert Interval(0.1, float("nan"), float("nan"), 1).to_dict()["low"] == "nan"
