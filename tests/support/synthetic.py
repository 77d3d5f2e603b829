"""Synthetic ranked data with a known rule, for tests and the benchmark: each group has K
completions of different lengths and the shorter answer wins ("be concise")."""

from __future__ import annotations

import random

from flywheel.contracts.heldout import is_held_out
from training.rankings import Ranking

WORDS = ("the answer is that we should check the value again and then report what we found "
         "because it matters for the result here so please read it carefully").split()
TOPICS = ["the weather", "a recipe", "prime numbers", "a poem", "the train times", "a bug report",
          "the budget", "a summary", "the meeting", "a translation"]


def synthetic_group(rng: random.Random, k: int, min_words: int = 2, max_words: int = 24) -> tuple[str, list[str]]:
    """A prompt and K completions of distinct lengths, in random order."""
    prompt = f"<|im_start|>user\nTell me about {rng.choice(TOPICS)}.<|im_end|>\n<|im_start|>assistant\n"
    lengths = rng.sample(range(min_words, max_words + 1), k)
    completions = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]
    return prompt, completions


def shorter_wins(completions: list[str]) -> list[int]:
    """Indices of ``completions``, best first, under the rule: fewer words is better."""
    return sorted(range(len(completions)), key=lambda i: len(completions[i].split()))


def synthetic_rankings(n: int, k: int = 4, seed: int = 0, source: str = "human",
                       reverse: bool = False, prefix: str = "g") -> list[Ranking]:
    """``n`` rankings under the shorter-wins rule (``reverse``: the longer wins)."""
    rng = random.Random(seed)
    rankings = []
    for i in range(n):
        prompt, completions = synthetic_group(rng, k)
        order = shorter_wins(completions)
        if reverse:
            order = order[::-1]
        ranked = [completions[j] for j in order]
        rankings.append(Ranking(ranking_id=f"{prefix}{seed}-{i}-r", group_id=f"{prefix}{seed}-{i}", prompt=prompt,
                                completions=ranked, source=source))
    return rankings


def split_held_out(rankings: list[Ranking], fraction: float) -> tuple[list[Ranking], list[Ranking]]:
    """(training, held-out) by the same group-id hash the runs use."""
    train = [r for r in rankings if not is_held_out(r.group_id, fraction)]
    held = [r for r in rankings if is_held_out(r.group_id, fraction)]
    return train, held


def random_rankings(n: int, k: int = 4, seed: int = 0, prefix: str = "random") -> list[Ranking]:
    """``n`` rankings in a random order: the null control, with no preference to learn."""
    rng = random.Random(seed)
    rankings = []
    for i in range(n):
        prompt, completions = synthetic_group(rng, k)
        rng.shuffle(completions)
        rankings.append(Ranking(ranking_id=f"{prefix}{seed}-{i}-r", group_id=f"{prefix}{seed}-{i}", prompt=prompt,
                                completions=completions))
    return rankings
