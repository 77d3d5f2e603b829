"""The simulated users' preferences rank by what they say they measure, and nothing else."""

from __future__ import annotations

import random

from flywheel.app.preferences import PREFERENCES, similar_length, win_rate
from flywheel.app.simulated_users import evaluation_split, question_pool


def test_each_preference_puts_an_empty_answer_last_and_ranks_by_its_feature():
    rng = random.Random(0)
    cases = {
        "concise": ("Paris.", "The capital of France is Paris, a city on the Seine."),
        "second-person": ("You can save money if you cook at home.", "People save money by cooking at home."),
        "no-hedging": ("Water boils at 100 degrees Celsius.", "However, water may often boil at 100 degrees."),
        "simple-sentences": ("Snow is white. It reflects light.", "Snow, which reflects light, is, in fact, white."),
        "impersonal": ("The answer is four.", "I think my answer is four."),
        "plain-words": ("Cats like to sleep in the sun.", "Felines frequently appreciate sunlight."),
    }
    for name, (better, worse) in cases.items():
        preference = PREFERENCES[name]
        assert preference.compare(better, worse) == 1.0, name
        assert preference.rank(["", worse, better], rng) == [2, 1, 0], name


def test_ties_are_broken_at_random_not_by_position_or_length():
    preference = PREFERENCES["no-hedging"]
    firsts = {preference.rank(["Yes.", "It is blue and round."], random.Random(seed))[0] for seed in range(20)}
    assert firsts == {0, 1}


def test_the_random_control_carries_no_preference():
    control = PREFERENCES["random"]
    orders = {tuple(control.rank(["a", "bb", "ccc"], random.Random(seed))) for seed in range(40)}
    assert len(orders) == 6
    assert control.compare("a", "b") is None
    assert win_rate({"q": ["a"]}, {"q": ["b"]}, control) is None


def test_only_concise_is_about_length():
    assert [p.name for p in PREFERENCES.values() if p.about_length] == ["concise"]


def test_win_rate_counts_ties_half_and_the_length_controlled_rate_skips_unequal_lengths():
    preference = PREFERENCES["impersonal"]
    candidate = {"q": ["The sky is blue.", "Blue."]}
    baseline = {"q": ["I saw a blue sky.", "The sky is blue."]}
    overall = win_rate(candidate, baseline, preference)
    # wins: (1) beats "I saw..": 1, ties "The sky..": 0.5; (2) "Blue." beats "I saw..": 1, ties: 0.5
    assert overall.rate == 3.0 / 4 and overall.pairs == 4
    controlled = win_rate(candidate, baseline, preference, length_tolerance=0.2)
    assert not similar_length("Blue.", "The sky is blue.")
    assert controlled.pairs == 2 and controlled.rate == 0.75  # (1) vs both of similar length


def test_the_evaluation_questions_are_fixed_and_never_asked():
    asked, held = evaluation_split(question_pool())
    again_asked, again_held = evaluation_split(list(reversed(question_pool())))
    assert len(held) >= 40 and set(held) == set(again_held)
    assert not set(asked) & set(held) and len(asked) + len(held) == len(question_pool())
