"""The AI judge and labeler on a tiny model, in-process (the Celery worker test runs them for real)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from prometheus_client import CollectorRegistry

from feedback.judge import Judge, JudgeConfig, readable_prompt
from feedback.labeler import Labeler, LabellingConfig, LabellingScheduler, in_agreement_sample
from feedback.metrics import LabellingMetrics
from flywheel.contracts.keys import LABELLING_CANDIDATES_KEY, RANKINGS_STREAM
from flywheel.contracts.rankings import RankingEntry, pairwise_agreement
from flywheel.rankings_stream import RankingStream

from support.feedback import PROMPT, group_result

ANSWERS = ["Four.", "2 + 2 = 4, because adding two and two makes four.", "Five.", "I like turtles."]


def with_combination(judge, combine_orders: str) -> Judge:
    """The same loaded judge, combining the two orders another way."""
    return Judge(judge.model, judge.tokenizer, judge.constitution, judge.judge_id,
                 JudgeConfig(combine_orders=combine_orders))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def test_raw_judge_is_position_biased_and_both_orders_cancel_it(judge):
    a, b = ANSWERS[0], ANSWERS[3]
    raw = judge.probability_a([judge.render("What is 2+2?", a, b), judge.render("What is 2+2?", b, a)])
    # asked twice with the answers swapped, the raw judge picks the same *position* both times
    assert (raw[0] - 0.5) * (raw[1] - 0.5) > 0 and abs(raw[0] + raw[1] - 1.0) > 0.2

    p_ab, p_ba = judge.compare("What is 2+2?", [(a, b), (b, a)])  # default: average in log-odds
    assert p_ab + p_ba == pytest.approx(1.0, abs=1e-6)
    assert logit(p_ab) == pytest.approx((logit(raw[0]) - logit(raw[1])) / 2.0, abs=1e-4)

    lee = with_combination(judge, "probability")  # Lee et al.: average the probabilities
    q_ab, q_ba = lee.compare("What is 2+2?", [(a, b), (b, a)])
    assert q_ab + q_ba == pytest.approx(1.0, abs=1e-6)
    assert q_ab == pytest.approx((raw[0] + 1.0 - raw[1]) / 2.0, abs=1e-6)
    # a saturated position bias squashes averaged probabilities towards 0.5; log-odds keep the evidence
    assert abs(q_ab - 0.5) < abs(p_ab - 0.5)


@pytest.mark.parametrize("combine_orders", ["log_odds", "probability"])
def test_verdict_does_not_depend_on_the_order_of_the_samples(judge, combine_orders):
    judge = with_combination(judge, combine_orders)
    verdicts = []
    for order in [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)]:
        texts = {f"c{i}": ANSWERS[k] for i, k in enumerate(order)}  # the same answers, other positions and ids
        verdict = judge.rank(PROMPT, texts)
        by_text = {(texts[a], texts[b]): p for a, b, p in verdict.pair_probabilities}
        verdicts.append(([texts[c] for c in verdict.completion_ids], verdict.confidence, by_text))
    ranking, confidence, pairs = verdicts[0]
    for other_ranking, other_confidence, other_pairs in verdicts[1:]:
        assert other_ranking == ranking
        assert other_confidence == pytest.approx(confidence, abs=1e-5)
        for (a, b), p in pairs.items():
            assert other_pairs.get((a, b), 1.0 - other_pairs.get((b, a), -1.0)) == pytest.approx(p, abs=1e-5)
    assert len(pairs) == 6 and 0.0 <= confidence <= 1.0


def test_ranking_follows_the_pairwise_preferences(judge):
    verdict = judge.rank(PROMPT, {f"c{i}": t for i, t in enumerate(ANSWERS)})
    p = {(a, b): q for a, b, q in verdict.pair_probabilities}
    p.update({(b, a): 1.0 - q for a, b, q in verdict.pair_probabilities})
    wins = {c: sum(p[(c, o)] for o in verdict.completion_ids if o != c) for c in verdict.completion_ids}
    assert [wins[c] for c in verdict.completion_ids] == sorted(wins.values(), reverse=True)
    margins = [2 * p[(hi, lo)] - 1 for hi, lo in itertools.combinations(verdict.completion_ids, 2)]
    assert verdict.confidence == pytest.approx(max(0.0, sum(margins) / len(margins)))


def test_served_chat_prompt_is_shown_to_the_judge_as_plain_text():
    text = readable_prompt("<|im_start|>system\nBe kind<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\n", ["<|im_start|>", "<|im_end|>"])
    assert text == "system: Be kind\nuser: Hi"
    assert readable_prompt("plain <|endoftext|>prompt", ["<|endoftext|>"]) == "plain  prompt"


def test_agreement_counts_pairs_ordered_alike():
    assert pairwise_agreement(["a", "b", "c"], ["a", "b", "c"]).ratio == 1.0
    reversed_ = pairwise_agreement(["a", "b", "c"], ["c", "b", "a"])
    assert (reversed_.agreed_pairs, reversed_.pairs) == (0, 3)
    partial = pairwise_agreement(["a", "b"], ["b", "c", "a"])  # only the pair (a, b) is shared
    assert (partial.agreed_pairs, partial.pairs) == (0, 1)


def labeler(redis_client, judge, min_confidence=0.0):
    metrics = LabellingMetrics(CollectorRegistry())
    return Labeler(redis_client, judge, LabellingConfig(min_confidence=min_confidence, group_ttl_seconds=3600),
                   metrics), metrics


def test_labeler_appends_an_ai_ranking_once_and_measures_agreement(redis_client, group_store, judge):
    group_store.save(group_result("g", ANSWERS, policy_version=5))
    human = ["g-1", "g-0", "g-2", "g-3"]
    RankingStream(redis_client).append(RankingEntry("g", human, "human", annotator_id="dana"))
    ai, metrics = labeler(redis_client, judge)

    outcome = ai.label("g")
    assert outcome.outcome == "ranked" and sorted(outcome.completion_ids) == sorted(human)
    entry = RankingEntry.from_fields(redis_client.xrange(RANKINGS_STREAM)[-1][1])
    assert (entry.source, entry.annotator_id, entry.judge_id) == ("ai", "ai:labeler", judge.judge_id)
    assert entry.completion_ids == outcome.completion_ids and entry.policy_version == 5
    assert len(entry.pair_probabilities) == 6 and entry.confidence == pytest.approx(outcome.confidence)

    stats = RankingStream(redis_client).stats()
    expected = pairwise_agreement(human, outcome.completion_ids)
    assert (stats.agreement.agreed_pairs, stats.agreement.pairs) == (expected.agreed_pairs, 6)
    assert metrics.agreement_pairs.labels("agreed")._value.get() == expected.agreed_pairs

    assert ai.label("g").outcome == "already_ranked"  # a redelivered task adds nothing
    assert redis_client.xlen(RANKINGS_STREAM) == 2
    assert metrics.rankings_accepted.labels("ai")._value.get() == 1


def test_low_confidence_groups_are_skipped_not_guessed(redis_client, group_store, judge):
    group_store.save(group_result("g", ANSWERS))
    ai, metrics = labeler(redis_client, judge, min_confidence=0.99)
    outcome = ai.label("g")
    assert outcome.outcome == "low_confidence" and outcome.confidence < 0.99
    assert redis_client.xlen(RANKINGS_STREAM) == 0
    assert metrics.rankings_rejected.labels("ai", "low_confidence")._value.get() == 1


def test_labeler_skips_expired_and_single_sample_groups(redis_client, group_store, judge):
    group_store.save(group_result("one", ["only answer"]))
    ai, _ = labeler(redis_client, judge)
    assert ai.label("gone").outcome == "expired"
    assert ai.label("one").outcome == "unrankable"
    assert redis_client.xlen(RANKINGS_STREAM) == 0


def test_scheduler_picks_unranked_groups_after_the_delay_and_a_fraction_of_the_rest(redis_client, group_store):
    now = 1_800_000_000.0
    sampled = next(f"h{i}" for i in range(1000) if in_agreement_sample(f"h{i}", 0.5))
    unsampled = next(f"h{i}" for i in range(1000) if not in_agreement_sample(f"h{i}", 0.5))
    for group_id, age in [("old", 120), ("fresh", 10), (sampled, 120), (unsampled, 120)]:
        group_store.save(group_result(group_id, ["a", "b"], created_at=now - age))
    stream = RankingStream(redis_client)
    for group_id in (sampled, unsampled):
        stream.append(RankingEntry(group_id, [f"{group_id}-0", f"{group_id}-1"], "human"))
    redis_client.zadd(LABELLING_CANDIDATES_KEY, {"expired": now - 120})  # its record is gone

    scheduler = LabellingScheduler(redis_client, LabellingConfig(delay_seconds=60, fraction=0.5))
    assert sorted(scheduler.due_groups(now)) == sorted(["old", sampled])
    # decided candidates leave the set (the chosen ones once enqueued); the fresh one waits its turn
    assert sorted(m.decode() for m in redis_client.zrange(LABELLING_CANDIDATES_KEY, 0, -1)) == sorted(
        ["fresh", "old", sampled])
    scheduler.forget(["old", sampled])
    assert scheduler.due_groups(now + 60) == ["fresh"]


def test_scheduler_looks_past_a_batch_of_dropped_groups(redis_client, group_store):
    now = 1_800_000_000.0
    stream = RankingStream(redis_client)
    for i in range(5):  # ranked by people, and none in the agreement sample (fraction 0)
        group_store.save(group_result(f"p{i}", ["a", "b"], created_at=now - 300 + i))
        stream.append(RankingEntry(f"p{i}", [f"p{i}-0", f"p{i}-1"], "human"))
    group_store.save(group_result("todo", ["a", "b"], created_at=now - 200))
    group_store.save(group_result("single", ["only"], created_at=now - 400))  # never a candidate
    scheduler = LabellingScheduler(redis_client, LabellingConfig(delay_seconds=60, fraction=0.0))
    assert scheduler.due_groups(now, batch=2) == ["todo"]
    scheduler.forget(["todo"])
    assert scheduler.due_groups(now, batch=2) == []
    assert redis_client.zcard(LABELLING_CANDIDATES_KEY) == 0


def test_agreement_sample_is_the_configured_fraction():
    share = sum(in_agreement_sample(f"group-{i}", 0.3) for i in range(4000)) / 4000
    assert 0.27 < share < 0.33
    assert not any(in_agreement_sample(f"group-{i}", 0.0) for i in range(100))
    assert all(in_agreement_sample(f"group-{i}", 1.0) for i in range(100))


def test_entry_pair_probabilities_are_json(redis_client, group_store, judge):
    group_store.save(group_result("g", ANSWERS[:2]))
    labeler(redis_client, judge)[0].label("g")
    fields = {k.decode(): v.decode() for k, v in redis_client.xrange(RANKINGS_STREAM)[0][1].items()}
    [[a, b, p]] = json.loads(fields["pair_probabilities"])
    assert (a, b) == ("g-0", "g-1") and 0.0 < p < 1.0 and 0.0 <= float(fields["confidence"]) <= 1.0
