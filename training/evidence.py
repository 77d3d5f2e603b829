"""Confidence intervals for the gates: a decision is only as good as its evidence.

Both gates compare means over units that are independent of each other while the measurements
inside one unit are not: the samples of one prompt (the policy gate) and the pairs of one ranking
(the reward-model gate). So every interval here is over per-unit means (a cluster-level Student-t
interval), never over the correlated measurements themselves, which would make it too narrow.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class Interval:
    """A mean over ``units`` independent units and its two-sided ``level`` confidence interval."""

    mean: float
    low: float
    high: float
    units: int
    level: float = 0.95

    def above(self, threshold: float) -> bool:
        """Whether the evidence says the true mean exceeds ``threshold`` (the interval's lower bound does)."""
        return math.isfinite(self.low) and self.low > threshold

    def to_dict(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else repr(v)) for k, v in asdict(self).items()}

    def describe(self, digits: int = 3) -> str:
        return (f"{self.mean:+.{digits}f} (95% CI {self.low:+.{digits}f} to {self.high:+.{digits}f}, "
                f"{self.units} units)" if self.level == 0.95 else
                f"{self.mean:+.{digits}f} ({self.level:.1%} CI {self.low:+.{digits}f} to {self.high:+.{digits}f}, "
                f"{self.units} units)")


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Student-t interval of the mean of independent ``values`` (NaN bounds with fewer than 2)."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, level)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = student_t_quantile(0.5 + level / 2, n - 1) * math.sqrt(variance / n)
    return Interval(mean, mean - half, mean + half, n, level)


def paired_gain(candidate: Sequence[Sequence[float]], current: Sequence[Sequence[float]],
                level: float = 0.95) -> Interval:
    """The candidate's gain over the current policy: per prompt, the mean over its samples of
    candidate minus current score (sample i of both drawn with the same seed), then the interval
    of the mean over prompts."""
    if len(candidate) != len(current):
        raise ValueError(f"{len(candidate)} candidate prompts but {len(current)} current ones")
    gains = []
    for mine, theirs in zip(candidate, current):
        if len(mine) != len(theirs) or not mine:
            raise ValueError("each prompt needs the same, non-zero number of samples from both policies")
        gains.append(math.fsum(a - b for a, b in zip(mine, theirs)) / len(mine))
    return mean_interval(gains, level)


def clustered_accuracy(correct_per_unit: Sequence[float], pairs_per_unit: Sequence[int],
                       level: float = 0.95) -> Interval:
    """Pairwise accuracy of a reward model with a confidence interval over rankings: the pairs of
    one ranking share a prompt and answers, so the ranking is the independent unit. The mean is the
    pooled accuracy (correct pairs / pairs); the interval is the ratio estimator's, with the
    cluster-robust (linearised) standard error."""
    pairs = [float(p) for p in pairs_per_unit]
    total_pairs = math.fsum(pairs)
    n = len(pairs)
    if n == 0 or total_pairs == 0:
        return Interval(math.nan, math.nan, math.nan, n, level)
    accuracy = math.fsum(correct_per_unit) / total_pairs
    if n < 2:
        return Interval(accuracy, math.nan, math.nan, n, level)
    mean_pairs = total_pairs / n
    residuals = [(c - accuracy * p) / mean_pairs for c, p in zip(correct_per_unit, pairs)]
    se = math.sqrt(math.fsum(r * r for r in residuals) / (n * (n - 1)))
    half = student_t_quantile(0.5 + level / 2, n - 1) * se
    return Interval(accuracy, accuracy - half, accuracy + half, n, level)


@functools.lru_cache(maxsize=256)
def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -student_t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def _t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * _regularized_incomplete_beta(x, df / 2, 0.5)
    return 1 - tail if t >= 0 else tail


def _regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by Lentz's continued fraction (Numerical Recipes' betacf)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):
        return 1 - _regularized_incomplete_beta(1 - x, b, a)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) * fraction / a
