"""The weight of AI rankings follows the measured AI-human agreement: the rule, and a real
reward-model run on a real Redis that records it in its manifest and its metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from flywheel.contracts.artifacts import REWARD_MODEL_KIND
from flywheel.contracts.rankings import SOURCE_AI, SOURCE_HUMAN, RankingEntry
from flywheel.rankings_stream import RankingStream
from flywheel.registry import open_registry
from support.rankings import publish_rankings
from support.synthetic import synthetic_rankings
from training.ai_weight import RULE, ai_ranking_weight
from training.metrics import RewardModelMetrics
from training.reward_model_run import RewardModelCache, run_reward_model_training

from test_reward_model_run import tiny_settings


@pytest.mark.parametrize("agreed, pairs, groups, weight", [
    (50, 100, 40, 0.0),      # a judge at chance earns nothing
    (30, 100, 40, 0.0),      # nor does one worse than chance
    (80, 100, 40, 0.3),      # 80%: 0.6 of the largest weight (0.5)
    (100, 100, 40, 0.5),     # always agrees: the largest weight
    (100, 100, 19, 0.0),     # too few groups ranked by both: not trusted yet
    (0, 0, 0, 0.0),          # nothing measured
])
def test_the_rule(agreed, pairs, groups, weight):
    result = ai_ranking_weight(agreed, pairs, groups, max_weight=0.5, min_groups=20)
    assert result.weight == pytest.approx(weight)
    assert result.to_dict()["rule"] == RULE and result.overlap_groups == groups


def test_a_run_weighs_ai_rankings_by_the_agreement_the_stream_counted(redis_client, tmp_path, tiny_model_dir):
    settings = tiny_settings(tmp_path, tiny_model_dir, reward_model_epochs=1, reward_model_ai_min_overlap_groups=3,
                             reward_model_min_accuracy=-1)
    publish_rankings(redis_client, synthetic_rankings(24, seed=4))
    overlap = synthetic_rankings(3, seed=9, prefix="both")
    publish_rankings(redis_client, overlap)  # stores the groups (and one ranking each)
    stream = RankingStream(redis_client)
    for i, ranking in enumerate(overlap):
        order = [f"{ranking.group_id}-c{rank}" for rank in range(ranking.k)]
        stream.append(RankingEntry(ranking.group_id, order, SOURCE_HUMAN, annotator_id="person"))
        judged = order if i < 2 else order[::-1]  # the judge agrees on two groups, reverses the third
        stream.append(RankingEntry(ranking.group_id, judged, SOURCE_AI, annotator_id="ai:labeler", judge_id="j",
                                   pair_probabilities=[(a, b, 0.9) for j, a in enumerate(judged) for b in judged[j + 1:]],
                                   confidence=0.8))
    # 12 of 18 pairs agree: agreement 2/3, weight 0.5 x (2 x 2/3 - 1) = 1/6
    registry = CollectorRegistry()
    metrics = RewardModelMetrics(registry)
    report = run_reward_model_training(settings, redis_client, cache=RewardModelCache(), metrics=metrics)
    assert report.outcome in ("promoted", "rejected"), report
    manifest = open_registry(redis_client, settings.data_dir, REWARD_MODEL_KIND).get(report.version).manifest
    recorded = manifest["ai_weight"]
    assert recorded["agreement"] == pytest.approx(2 / 3) and recorded["overlap_groups"] == 3
    assert recorded["weight"] == pytest.approx(1 / 6) and manifest["training"]["ai_weight"] == pytest.approx(1 / 6)
    assert manifest["figures"]["ai_weight"] == pytest.approx(1 / 6)
    assert registry.get_sample_value("flywheel_reward_model_ai_weight") == pytest.approx(1 / 6)
    assert registry.get_sample_value("flywheel_reward_model_ai_agreement_ratio") == pytest.approx(2 / 3)
    assert registry.get_sample_value("flywheel_reward_model_ai_agreement_groups") == 3
