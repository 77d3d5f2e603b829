"""The reward model of InstructGPT (Ouyang et al., 2022, §3.5): a causal-LM backbone with its
language-model head removed and a scalar head read at the last token of prompt + completion.

Pooling (``RewardModelConfig.pooling``): by default ("last+layer-means") the head reads the last
token's final hidden state *and* the mean of the completion's hidden states at seven depths of the
backbone (the embeddings, every sixth of the layers, the last layer). The last token carries what
depends on the answer as a whole; the means carry what is spread over it (word choice, tone,
register), which the last token of a 135M backbone summarizes poorly: trained on one round's
~120 rankings, a last-token head learned "shorter wins" (0.56 held-out accuracy, what length alone
gives on that data) and not the users' actual criterion. Style lives in the lower and middle
layers more than in the last one, which is shaped to predict the next token: on one round's
groups ranked by three style preferences, a linear probe of the last layer's mean ordered 0.57-0.67
of the held-out pairs, one of the seven depths' means 0.66-0.82 (``bench/reward_model_fit.py``).
A mean is length-normalized, so it adds no length incentive of its own. "last+mean" reads the last
layer's mean only; "last" is InstructGPT's head alone.

It also holds the paper's K-way ranking loss. For a ranking of K completions, all C(K,2) pairs of
that ranking form ONE batch element:

    loss(θ) = −1/C(K,2) · Σ_{(y_w, y_l)} log σ(r_θ(x, y_w) − r_θ(x, y_l))

and every completion of the ranking goes through the backbone once, not once per pair: a batch of
rankings is one padded forward of all their completions, and the pairs are differences of those
rewards (``PairIndex``). AI-labelled pairs carry the labeler's probability P(a ≻ b) as a soft
target (cross-entropy) and a weight relative to human rankings.

Artifacts: a version stores the *trained* parameters only (the scalar head, the top
``trainable_layers`` decoder layers and the final norm, in float32 so training resumes exactly) in
``model.safetensors``; the frozen rest is the backbone folder named in the manifest, which never
changes. For SmolLM2-135M with 4 trained layers that is ~56 MB per version instead of 540 MB. With
``trainable_layers=-1`` every parameter is trained and stored.

Calibration: the ranking loss sees only score differences, so a version's offset (and scale) is
whatever its initialization and training left, about ±2 on SmolLM2. A version is normalized
instead (``RewardCalibration``: mean 0, standard deviation 1 of its raw scores over a reference set
of served completions, stored in its manifest), as InstructGPT shifts its reward model so that the
demonstrations score 0 on average: PPO's reward, its missing-EOS penalty, its KL coefficient and
the gate's minimum gain then mean the same thing for every version. The same set gives the
version's length dependence (the slope of its score on log length), which a length-neutral reward
takes out (``RewardCalibration.normalize_length_neutral``, ``training.policy_reward``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from flywheel.models import autocast_context, autocast_dtype

from flywheel.contracts.artifacts import REWARD_MODEL_WEIGHTS_FILE

log = logging.getLogger(__name__)

HEAD_PREFIX = "reward_head."
POOLINGS = ("last", "last+mean", "last+layer-means")
MEAN_DEPTHS = 7  # "last+layer-means": completion means at the embeddings, every sixth of the layers and the last


@dataclass
class RewardModelConfig:
    """What a reward model is made of."""

    backbone: str
    """Hugging Face causal-LM folder whose transformer is the backbone (its LM head is dropped)."""
    trainable_layers: int = 4
    """Top decoder layers trained together with the final norm and the head; -1 = every parameter.
    Training the top of a pretrained backbone learns the ranking rule nearly as well on this data
    and skips most of the backward pass."""
    max_length: int = 512
    """Longest prompt + completion in tokens; longer prompts are cut from the left (the completion
    and the scored last token are kept)."""
    autocast_dtype: str = "bfloat16"
    """Compute dtype inside the forward (float32 master weights); "float32" turns autocast off."""
    pooling: str = "last+layer-means"
    """What the head reads: "last" (the last token's hidden state, InstructGPT's head), "last+mean"
    (that and the mean of the last layer over the completion's tokens) or "last+layer-means" (that
    and the completion's means at ``MEAN_DEPTHS`` depths; see the module docstring)."""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r}: expected one of {', '.join(POOLINGS)}")


class RewardModel(torch.nn.Module):
    """r_θ(x, y): the backbone's hidden state at the last non-pad token, through a linear head."""

    def __init__(self, backbone: torch.nn.Module, config: RewardModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        hidden = int(backbone.config.hidden_size) * (1 + len(self.mean_depths))
        self.reward_head = torch.nn.Linear(hidden, 1, bias=True)
        torch.nn.init.normal_(self.reward_head.weight, std=1.0 / math.sqrt(hidden + 1))
        torch.nn.init.zeros_(self.reward_head.bias)
        self.set_trainable(config.trainable_layers)

    @property
    def mean_depths(self) -> tuple[int, ...]:
        """The depths (0 = the embeddings, L = the last layer) whose completion means the head reads."""
        layers = int(self.backbone.config.num_hidden_layers)
        if self.config.pooling == "last+layer-means":
            return tuple(sorted({round(layers * k / (MEAN_DEPTHS - 1)) for k in range(MEAN_DEPTHS)}))
        return (layers,) if self.config.pooling == "last+mean" else ()

    def head_blocks(self) -> list[slice]:
        """The head's inputs by block: the last token's state, then one block per mean depth."""
        width = int(self.backbone.config.hidden_size)
        return [slice(i * width, (i + 1) * width) for i in range(1 + len(self.mean_depths))]

    @classmethod
    def from_backbone(cls, config: RewardModelConfig, device: torch.device | str = "cpu") -> "RewardModel":
        """A fresh reward model on ``device`` (the head random until trained or probed)."""
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(config.backbone, dtype=torch.float32)
        backbone.config.use_cache = False
        return cls(backbone, config).to(device)

    @property
    def device(self) -> torch.device:
        return self.reward_head.weight.device

    # ---- which parameters train ----
    def set_trainable(self, trainable_layers: int) -> None:
        """Train the top ``trainable_layers`` (with the final norm and the head), freeze the rest.

        Under a bfloat16 autocast the frozen parameters are stored in bfloat16 outright: autocast
        would otherwise cast every frozen float32 weight again on every forward, which on a CPU
        costs about as much as the matmuls of a small batch. Trained parameters stay float32.
        """
        self.requires_grad_(False)
        if trainable_layers < 0:
            self.requires_grad_(True)
            return
        self.reward_head.requires_grad_(True)
        layers = getattr(self.backbone, "layers", None)
        if trainable_layers > 0:
            if layers is None:
                raise ValueError("trainable_layers > 0 needs a backbone with .layers; use -1 to train all")
            for layer in list(layers)[-trainable_layers:]:
                layer.requires_grad_(True)
            norm = getattr(self.backbone, "norm", None)
            if norm is not None:
                norm.requires_grad_(True)
        compute_dtype = self.compute_dtype
        if compute_dtype is not None:
            for parameter in self.parameters():
                if not parameter.requires_grad:
                    parameter.data = parameter.data.to(compute_dtype)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- forward ----
    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for plain float32."""
        return autocast_dtype(self.config.autocast_dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.compute_dtype, self.device.type)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                completion_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards [N] (float32) of N right-padded sequences, read at each last non-pad token.
        ``completion_lengths`` [N]: how many of each sequence's last tokens are the completion (with
        its EOS), for the poolings with means; None = every token (prompt included). Inputs and
        outputs are host tensors whatever the model's device (the losses and the pair bookkeeping
        stay on the host; the rewards are a few numbers a batch)."""
        with self.autocast():
            rewards = self.reward_head(self._pooled(input_ids, attention_mask, completion_lengths)).squeeze(-1)
        return rewards.float().to("cpu")

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 completion_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """What the head reads [N, head inputs] (float32): the pooled hidden states of ``forward``."""
        with self.autocast():
            return self._pooled(input_ids, attention_mask, completion_lengths).float().to("cpu")

    def _pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                completion_lengths: torch.Tensor | None) -> torch.Tensor:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if completion_lengths is not None:
            completion_lengths = completion_lengths.to(self.device)
        depths = self.mean_depths
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=bool(depths) and depths != (self.backbone.config.num_hidden_layers,))
        hidden = out.last_hidden_state
        lengths = attention_mask.sum(dim=1)
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        if not depths:
            return final
        states = out.hidden_states
        # the last depth is the normed last_hidden_state (what "last+mean" read), the others the layers' outputs
        layers = self.backbone.config.num_hidden_layers
        means = [_completion_mean(hidden if d == layers else states[d], attention_mask, lengths, completion_lengths)
                 for d in depths]
        return torch.cat([final] + means, dim=-1)

    # ---- artifacts (safetensors only) ----
    def stored_state_dict(self, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
        """The trained parameters (plus any ``keys`` a parent stored), float32, contiguous."""
        names = {n for n, p in self.named_parameters() if p.requires_grad} | set(keys or ())
        state = self.state_dict()
        return {n: state[n].detach().to("cpu", torch.float32).contiguous().clone() for n in sorted(names)}

    def save(self, directory: Path, keys: set[str] | None = None,
             file_name: str = REWARD_MODEL_WEIGHTS_FILE) -> list[str]:
        """Write the stored parameters to ``directory/file_name`` (one file per member)."""
        state = self.stored_state_dict(keys)
        save_file(state, str(Path(directory) / file_name), metadata={"format": "pt"})
        return list(state)

    def load_stored(self, path: Path) -> list[str]:
        """Load a version's stored parameters over the backbone's; returns their names."""
        state = load_file(str(path))
        missing = set(state) - set(self.state_dict())
        if missing:
            raise ValueError(f"{path} holds parameters this model does not have: {sorted(missing)[:5]}")
        self.load_state_dict(state, strict=False)
        return list(state)


def scored_sequence(prompt_ids: list[int], completion_ids: list[int], eos_id: int | None,
                    max_length: int) -> tuple[list[int], int]:
    """What a reward model scores: prompt + completion + EOS (unless the completion already ends with
    it), cut from the left to ``max_length`` (the end is what is scored), and how many of the last
    ids are the completion with its EOS. The one encoding of training (``RankingCollator``),
    calibration and PPO's reward (``RewardModelScorer``), so all three score the same sequence."""
    completion = list(completion_ids)
    if eos_id is not None and (not completion or completion[-1] != eos_id):
        completion.append(eos_id)
    ids = (list(prompt_ids) + completion)[-max_length:]
    return ids, min(len(completion), len(ids))


def _completion_mean(hidden: torch.Tensor, attention_mask: torch.Tensor, lengths: torch.Tensor,
                     completion_lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean hidden state over each row's last ``completion_lengths`` non-pad tokens (right padding)."""
    if completion_lengths is None:
        mask = attention_mask
    else:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        start = (lengths - completion_lengths.to(lengths.device).clamp(min=1)).clamp(min=0).unsqueeze(1)
        mask = (positions >= start) & (positions < lengths.unsqueeze(1))
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


# ---- calibration ----
@dataclass(frozen=True)
class RewardCalibration:
    """Mean and standard deviation of a version's raw scores over a reference set of ``count``
    (prompt, completion) pairs; ``normalize`` maps raw scores to (r − mean) / std.

    It also holds the version's length dependence on that set: the least-squares slope of the raw
    score on log(completion tokens), ``length_slope`` (what a doubling of an answer's length is
    worth to the model, in raw units, × ln 2), around ``length_center``. ``normalize_length_neutral``
    takes that slope out: scores with mean 0 and std 1 and *no* linear dependence on log length
    over the reference set, so that a policy optimizing them gains nothing by talking less or more
    (see ``training.policy_reward``). A calibration without ``completion_lengths`` (or from an old
    manifest) has slope 0: its length-neutral scores are its plain ones.
    """

    mean: float
    std: float
    count: int
    length_slope: float = 0.0
    length_center: float = 0.0
    residual_std: float | None = None
    """Std of raw − slope·(log L − center) over the set; None = ``std`` (no length fit)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0 and self.count >= 2):
            raise ValueError(f"not a usable calibration: mean {self.mean}, std {self.std}, count {self.count}")
        if not (math.isfinite(self.length_slope) and math.isfinite(self.length_center)):
            raise ValueError(f"not a usable length fit: slope {self.length_slope}, center {self.length_center}")
        if self.residual_std is not None and not (math.isfinite(self.residual_std) and self.residual_std > 0):
            raise ValueError(f"not a usable length fit: residual std {self.residual_std}")

    @property
    def has_length_fit(self) -> bool:
        return self.residual_std is not None

    @classmethod
    def from_scores(cls, scores: torch.Tensor, completion_lengths: torch.Tensor | None = None) -> "RewardCalibration":
        """From the raw scores of a reference set (at least 2, not all equal) and, to fit the
        length dependence, each completion's length in tokens (with its EOS)."""
        scores = scores.detach().double().flatten()
        if scores.numel() < 2:
            raise ValueError(f"calibration needs at least 2 reference scores, got {scores.numel()}")
        std = float(scores.std())
        if not std > 1e-6:
            raise ValueError(f"the reward model gives every reference completion the same score ({float(scores[0]):.4f}):"
                             " it cannot rank them, and cannot be calibrated")
        mean = float(scores.mean())
        if completion_lengths is None:
            return cls(mean=mean, std=std, count=int(scores.numel()))
        log_length = _log_length(completion_lengths).double().flatten()
        if log_length.numel() != scores.numel():
            raise ValueError(f"{scores.numel()} scores but {log_length.numel()} completion lengths")
        center = float(log_length.mean())
        spread = float(((log_length - center) ** 2).sum())
        slope = float(((log_length - center) * (scores - mean)).sum()) / spread if spread > 1e-12 else 0.0
        residual = float((scores - slope * (log_length - center)).std())
        return cls(mean=mean, std=std, count=int(scores.numel()), length_slope=slope, length_center=center,
                   residual_std=max(residual, 1e-6))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.std

    def normalize_length_neutral(self, raw: torch.Tensor, completion_lengths: torch.Tensor) -> torch.Tensor:
        """(r − slope·(log L − center) − mean) / residual std: the score with the version's length
        dependence on the reference set taken out."""
        if not self.has_length_fit:
            return self.normalize(raw)
        log_length = _log_length(completion_lengths).to(raw.device, raw.dtype)
        return (raw - self.length_slope * (log_length - self.length_center) - self.mean) / self.residual_std

    def to_dict(self) -> dict:
        """For a manifest (plain JSON)."""
        data = {"mean": self.mean, "std": self.std, "count": self.count}
        if self.has_length_fit:
            data |= {"length_slope": self.length_slope, "length_center": self.length_center,
                     "residual_std": self.residual_std}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RewardCalibration":
        residual = data.get("residual_std")
        return cls(mean=float(data["mean"]), std=float(data["std"]), count=int(data["count"]),
                   length_slope=float(data.get("length_slope", 0.0)),
                   length_center=float(data.get("length_center", 0.0)),
                   residual_std=None if residual is None else float(residual))


def _log_length(completion_lengths: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(completion_lengths).float().clamp(min=1).log()


# ---- the K-way ranking loss ----
@dataclass
class PairIndex:
    """The comparison pairs of a batch of rankings, as indices into the batch's flat reward vector.

    ``target`` is P(winner ≻ loser): 1 for a human ranking, the labeler's probability for an AI one.
    ``weight`` is (ranking weight) / (pairs of that ranking), so each ranking counts once whatever
    its K; the loss is divided by the number of rankings in the batch.
    """

    winner: torch.Tensor
    loser: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    ranking: torch.Tensor
    n_rankings: int

    @property
    def n_pairs(self) -> int:
        return int(self.winner.numel())

    @classmethod
    def concat(cls, parts: list[tuple[PairIndex, int, int]]) -> PairIndex:
        """One index over several batches laid end to end: each part is (pairs, its batch's first
        row in the flat reward vector, its batch's first ranking)."""
        cat = torch.cat
        return cls(winner=cat([p.winner + row for p, row, _ in parts]), loser=cat([p.loser + row for p, row, _ in parts]),
                   target=cat([p.target for p, _, _ in parts]), weight=cat([p.weight for p, _, _ in parts]),
                   ranking=cat([p.ranking + first for p, _, first in parts]),
                   n_rankings=sum(p.n_rankings for p, _, _ in parts))


def pair_log_likelihood(margin: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log P(the labelled order) of each pair under Bradley-Terry, margin = r_winner − r_loser and
    target = P(winner ≻ loser): p log σ(margin) + (1−p) log σ(−margin). The one per-pair term of
    every ranking loss here (the fine-tuning loss and the linear probe's)."""
    return target * F.logsigmoid(margin) + (1.0 - target) * F.logsigmoid(-margin)


def k_way_ranking_loss(rewards: torch.Tensor, pairs: PairIndex) -> torch.Tensor:
    """−1/B · Σ_rankings w/C(K,2) · Σ_pairs [p log σ(r_w − r_l) + (1−p) log σ(r_l − r_w)].

    With p = 1 (human rankings) and w = 1 this is InstructGPT's −1/C(K,2) Σ log σ(r_w − r_l)
    averaged over the rankings of the batch.
    """
    per_pair = pair_log_likelihood(rewards[pairs.winner] - rewards[pairs.loser], pairs.target)
    return -(pairs.weight * per_pair).sum() / max(pairs.n_rankings, 1)


def pairwise_accuracy_counts(rewards: torch.Tensor, pairs: PairIndex) -> tuple[int, int]:
    """(pairs ordered as labelled, pairs with a preference); ties in the label (p = 0.5) skipped."""
    decided = pairs.target != 0.5
    diff = rewards[pairs.winner] - rewards[pairs.loser]
    agree = torch.where(pairs.target > 0.5, diff > 0, diff < 0)
    return int((agree & decided).sum()), int(decided.sum())
