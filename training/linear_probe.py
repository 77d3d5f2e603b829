"""The reward head fitted in closed form: L2-regularized Bradley-Terry logistic regression on the
frozen backbone's features, its strength chosen by cross-validation over rankings.

Why: one round brings ~120 rankings per reward-model member. Fine-tuning the top layers from a
random head on so few spends its first steps moving features towards that random head (the
"feature distortion" of fine-tuning, Kumar et al. 2022, "Fine-Tuning can Distort Pretrained
Features and Underperform Out-of-Distribution"; their LP-FT fits a linear probe first). A probe is
convex, so it finds the best linear reading of the pretrained features for these pairs exactly,
and cross-validation picks how much to trust them: with a weak preference and few rankings it
shrinks the head towards zero instead of fitting noise. Fine-tuning, if any, starts from there.

The loss is the K-way ranking loss of ``training.reward_model`` (each ranking's pairs weighted to
count once, soft targets for AI pairs) plus λ/2 ‖w‖² in standardized feature units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from training.reward_model import PairIndex, pair_log_likelihood

DEFAULT_L2_GRID = tuple(10.0 ** (k / 2) for k in range(-6, 5))  # 1e-3 ... 100


@dataclass(frozen=True)
class ProbeFit:
    """A fitted head in the features' own units (score = features · weight + bias, mean score 0 over
    the fitted features) and the cross-validation that chose its L2 strength."""

    weight: torch.Tensor
    bias: float
    l2: float
    cv_loss: float
    """Held-out ranking loss per ranking at the chosen strength (log 2 = 0.693 is a head of zero)."""
    cv_accuracy: float
    """Held-out pairwise accuracy at the chosen strength (decided pairs, ties in the score count half)."""
    folds: int
    grid: tuple[tuple[float, float, float], ...]
    """(l2, cv loss, cv accuracy) for every strength tried."""
    features: str = "all"
    """Which of the candidate feature blocks the head reads (the others' weights are zero)."""
    candidates: tuple[tuple[str, float, float], ...] = ()
    """(features, cv loss, cv accuracy) of every candidate block set, each at its best strength."""

    def to_dict(self) -> dict:
        return {"features": self.features, "l2": self.l2, "cv_loss": round(self.cv_loss, 5),
                "cv_accuracy": round(self.cv_accuracy, 5), "folds": self.folds,
                "candidates": [{"features": name, "cv_loss": round(loss, 5), "cv_accuracy": round(acc, 5)}
                               for name, loss, acc in self.candidates],
                "grid": [{"l2": l2, "cv_loss": round(loss, 5), "cv_accuracy": round(acc, 5)} for l2, loss, acc in self.grid]}


def _objective(differences: torch.Tensor, beta: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
               rankings: int, l2: float) -> torch.Tensor:
    return -(weight * pair_log_likelihood(differences @ beta, target)).sum() / rankings + 0.5 * l2 * beta.pow(2).sum()


def _solve(differences: torch.Tensor, pairs: PairIndex, mask: torch.Tensor, l2: float,
           start: torch.Tensor | None, iterations: int = 50) -> torch.Tensor:
    """Newton's method with a backtracking line search: the objective is strongly convex and its
    Hessian (features × features) is small, so a handful of steps reach the optimum exactly."""
    d, target, weight = differences[mask], pairs.target[mask], pairs.weight[mask]
    rankings = max(int(torch.unique(pairs.ranking[mask]).numel()), 1)
    beta = torch.zeros(d.shape[1], dtype=d.dtype) if start is None else start.clone()
    eye = torch.eye(d.shape[1], dtype=d.dtype)
    value = _objective(d, beta, target, weight, rankings, l2)
    for _ in range(iterations):
        p = torch.sigmoid(d @ beta)
        gradient = d.T @ (weight * (p - target)) / rankings + l2 * beta
        if float(gradient.abs().max()) < 1e-9:
            break
        curvature = weight * p * (1.0 - p) / rankings
        hessian = (d.T * curvature) @ d + l2 * eye
        step = torch.linalg.solve(hessian, gradient)
        size = 1.0
        while True:
            candidate = beta - size * step
            candidate_value = _objective(d, candidate, target, weight, rankings, l2)
            if candidate_value <= value - 1e-4 * size * float(gradient @ step) or size < 1e-6:
                break
            size *= 0.5
        if float(value - candidate_value) < 1e-12:
            beta = candidate
            break
        beta, value = candidate, candidate_value
    return beta


def _held_out(differences: torch.Tensor, beta: torch.Tensor, pairs: PairIndex, mask: torch.Tensor) -> tuple[float, float, int]:
    """(summed per-ranking loss, summed correct pairs, decided pairs) on the masked pairs."""
    margin = differences[mask] @ beta
    target, weight = pairs.target[mask], pairs.weight[mask]
    per_pair = pair_log_likelihood(margin, target)
    decided = target != 0.5
    right = torch.where(target > 0.5, margin > 0, margin < 0).double() + 0.5 * (margin == 0).double()
    return float(-(weight * per_pair).sum()), float(right[decided].sum()), int(decided.sum())


def fit_pairwise_probe(features: torch.Tensor, pairs: PairIndex, fold_of_ranking: torch.Tensor,
                       l2_grid: tuple[float, ...] = DEFAULT_L2_GRID) -> ProbeFit:
    """Fit score = features · w + b on ``pairs`` (features [N, D], one row per completion), choosing
    λ from ``l2_grid`` by the held-out ranking loss over the folds of ``fold_of_ranking``
    ([n_rankings] fold ids; rankings of one group should share a fold), then refit on every pair."""
    if pairs.winner.numel() == 0:
        raise ValueError("a probe needs at least one pair")
    features = features.double()
    mean = features.mean(dim=0)
    scale = features.std(dim=0).clamp(min=1e-6)
    standardized = (features - mean) / scale
    basis = None
    if standardized.shape[1] > standardized.shape[0]:
        # more features than completions: the L2 solution lies in the span of the completions'
        # features, so solve in its orthonormal basis (exact, and the Hessian is N x N, not D x D)
        _, singular, basis = torch.linalg.svd(standardized, full_matrices=False)
        basis = basis[singular > singular[0] * 1e-9]
        standardized = standardized @ basis.T
    differences = standardized[pairs.winner] - standardized[pairs.loser]
    pair_fold = fold_of_ranking[pairs.ranking]
    folds = sorted(int(f) for f in torch.unique(pair_fold))
    everything = torch.ones_like(pair_fold, dtype=torch.bool)
    grid = []
    if len(folds) >= 2:
        starts: dict[int, torch.Tensor | None] = {f: None for f in folds}
        for l2 in sorted(l2_grid, reverse=True):  # strong to weak: each fit warm-starts the next
            loss_sum = right = decided = 0.0
            for fold in folds:
                held = pair_fold == fold
                beta = _solve(differences, pairs, ~held, l2, starts[fold])
                starts[fold] = beta
                fold_loss, fold_right, fold_decided = _held_out(differences, beta, pairs, held)
                loss_sum, right, decided = loss_sum + fold_loss, right + fold_right, decided + fold_decided
            grid.append((l2, loss_sum / pairs.n_rankings, right / decided if decided else float("nan")))
        grid.sort()
        l2, cv_loss, cv_accuracy = min(grid, key=lambda row: (row[1], -row[0]))
    else:
        l2, cv_loss, cv_accuracy = max(l2_grid), float("nan"), float("nan")
    beta = _solve(differences, pairs, everything, l2, None)
    if basis is not None:
        beta = basis.T @ beta
    weight = beta / scale
    bias = -float(mean @ weight)
    return ProbeFit(weight=weight.float(), bias=bias, l2=l2, cv_loss=cv_loss, cv_accuracy=cv_accuracy,
                    folds=len(folds), grid=tuple(grid))


def fit_probe_over_blocks(features: torch.Tensor, pairs: PairIndex, fold_of_ranking: torch.Tensor,
                          blocks: dict[str, slice], l2_grid: tuple[float, ...] = DEFAULT_L2_GRID) -> ProbeFit:
    """``fit_pairwise_probe`` on every block of ``blocks`` alone and on all of them together; the
    candidate with the lowest cross-validated loss wins (its weight zero outside its block).
    Which depth of a backbone carries a preference differs from one preference to another (word
    choice sits low, sentence shape higher); one penalty for every block at once would let the
    many uninformative ones drown the one that carries it."""
    whole = slice(0, features.shape[1])
    candidates = {"all": whole, **blocks} if len(blocks) > 1 else {"all": whole}
    fits = {name: fit_pairwise_probe(features[:, part], pairs, fold_of_ranking, l2_grid)
            for name, part in candidates.items()}
    scored = [(name, fit.cv_loss, fit.cv_accuracy) for name, fit in fits.items()]

    def rank(name: str) -> tuple[float, bool]:  # unmeasured (too few folds) last; ties go to "all"
        loss = fits[name].cv_loss
        return (loss if math.isfinite(loss) else math.inf, name != "all")

    best = min(fits, key=rank)
    weight = torch.zeros(features.shape[1], dtype=fits[best].weight.dtype)
    weight[candidates[best]] = fits[best].weight
    return replace(fits[best], weight=weight, features=best, candidates=tuple(scored))
