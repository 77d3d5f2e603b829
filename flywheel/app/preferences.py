"""The simulated users' preferences: how a simulated user ranks the answers it got.

Each preference scores one answer's text (higher is better; an empty answer is worst) and ranks a
group by that score, breaking ties at random, so that a preference says nothing about what it does
not measure. Only ``concise`` is about length. The others are features of style that change how an
answer reads, not how long it is (each is a rate per word or per line, never a count that grows
with the text), so a policy that merely truncates or pads cannot win them. ``random`` is the null
control: rankings that carry no preference at all, which the loop must never promote a policy on.

They stand in for real users in the demo, the whole-loop test and ``bench/loop.py``; nothing in
the training code knows them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

WORD = re.compile(r"[A-Za-z']+")
SECOND_PERSON = {"you", "your", "you're", "yours", "yourself", "you'll", "you've", "you'd"}
FIRST_PERSON = {"i", "i'm", "me", "my", "mine", "myself", "i've", "i'll", "i'd", "we", "our", "us"}
EMPTY = float("-inf")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def concise(text: str) -> float:
    """Fewer characters are better."""
    stripped = text.strip()
    return -float(len(stripped)) if stripped else EMPTY


def addresses_the_reader(text: str) -> float:
    """Share of words that speak to the reader ("you", "your", ...)."""
    found = words(text)
    return sum(w in SECOND_PERSON for w in found) / len(found) if found else EMPTY


HEDGES = {"however", "but", "although", "though", "indeed", "actually", "generally", "typically", "often",
          "may", "might", "can", "could", "some", "various", "several", "also", "perhaps", "usually"}


def no_hedging(text: str) -> float:
    """Share of words that are not hedges or qualifiers ("however", "may", "often", "generally", ...)."""
    found = words(text)
    return 1 - sum(w in HEDGES for w in found) / len(found) if found else EMPTY


def simple_sentences(text: str) -> float:
    """Fewer commas per word: sentences that say one thing at a time."""
    found = words(text)
    return -text.count(",") / len(found) if found else EMPTY


def impersonal(text: str) -> float:
    """Share of words that are not the writer talking about itself ("I", "my", "we", ...)."""
    found = words(text)
    return 1 - sum(w in FIRST_PERSON for w in found) / len(found) if found else EMPTY


def plain_words(text: str) -> float:
    """Share of words that are short (at most 7 letters): plain words over long Latinate ones."""
    found = words(text)
    return sum(len(w) <= 7 for w in found) / len(found) if found else EMPTY


@dataclass(frozen=True)
class Preference:
    name: str
    description: str
    score: Callable[[str], float] | None  # None: rank at random (the null control)
    about_length: bool = False

    def rank(self, texts: Sequence[str], rng: random.Random) -> list[int]:
        """Indices of ``texts``, best first; ties (and everything, for the control) in random order."""
        order = list(range(len(texts)))
        rng.shuffle(order)
        if self.score is None:
            return order
        scores = [self.score(t) for t in texts]
        return sorted(order, key=lambda i: -scores[i])  # stable: the shuffle breaks ties

    def compare(self, a: str, b: str) -> float | None:
        """1 if ``a`` is preferred, 0 if ``b`` is, 0.5 for a tie; None for the control (no preference)."""
        if self.score is None:
            return None
        sa, sb = self.score(a), self.score(b)
        return 1.0 if sa > sb else 0.0 if sa < sb else 0.5


PREFERENCES = {p.name: p for p in (
    Preference("concise", "concise: the shortest non-empty answer is best", concise, about_length=True),
    Preference("second-person", "speaks to the reader: the larger share of 'you'/'your' words is best",
               addresses_the_reader),
    Preference("no-hedging", "direct: the smaller share of hedges ('however', 'may', 'often', ...) is best",
               no_hedging),
    Preference("simple-sentences", "simple sentences: the fewest commas per word is best", simple_sentences),
    Preference("impersonal", "impersonal: the smaller share of 'I'/'my'/'we' words is best", impersonal),
    Preference("plain-words", "plain words: the larger share of words of at most 7 letters is best", plain_words),
    Preference("random", "control: a random order, no preference at all", None),
)}


def answer_chars(text: str) -> int:
    return len(text.strip())


def similar_length(a: str, b: str, tolerance: float = 0.2) -> bool:
    """Whether two answers' lengths differ by at most ``tolerance`` of the longer one."""
    la, lb = answer_chars(a), answer_chars(b)
    return abs(la - lb) <= tolerance * max(la, lb, 1)


@dataclass(frozen=True)
class WinRate:
    """P(a candidate answer beats a baseline answer under a preference), ties counting half, with
    a 95% bootstrap interval that resamples questions (the pairs of one question are not independent)."""

    rate: float
    low: float
    high: float
    pairs: int
    questions: int

    def describe(self) -> str:
        if self.pairs == 0:
            return "n/a (no pairs)"
        return f"{self.rate:.2f} ({self.low:.2f}-{self.high:.2f})"


def win_rate(candidate: dict[str, list[str]], baseline: dict[str, list[str]], preference: Preference,
             length_tolerance: float | None = None, resamples: int = 2000, seed: int = 0) -> WinRate | None:
    """Every candidate answer against every baseline answer of the same question. With
    ``length_tolerance`` only pairs of similar length count (a length-controlled win rate: what a
    policy wins by changing how long it talks does not count). None for the control preference."""
    per_question: list[tuple[float, int]] = []
    for question, theirs in baseline.items():
        wins, pairs = 0.0, 0
        for a in candidate[question]:
            for b in theirs:
                if length_tolerance is not None and not similar_length(a, b, length_tolerance):
                    continue
                outcome = preference.compare(a, b)
                if outcome is None:
                    return None
                wins, pairs = wins + outcome, pairs + 1
        if pairs:
            per_question.append((wins, pairs))
    total_pairs = sum(p for _, p in per_question)
    if not total_pairs:
        return WinRate(float("nan"), float("nan"), float("nan"), 0, 0)
    rate = sum(w for w, _ in per_question) / total_pairs
    rng = random.Random(seed)
    rates = []
    for _ in range(resamples):
        drawn = rng.choices(per_question, k=len(per_question))
        rates.append(sum(w for w, _ in drawn) / max(sum(p for _, p in drawn), 1))
    rates.sort()
    return WinRate(rate, rates[int(0.025 * resamples)], rates[int(0.975 * resamples) - 1], total_pairs,
                   len(per_question))
