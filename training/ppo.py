"""PPO for a language-model policy, as in InstructGPT (Ouyang et al., 2022, §3.5) and laid out like
CleanRL's single-file PPO: every step of one iteration is a visible function.

One iteration (``PPOTrainer.step``):

1. rollout: sample a response y to each prompt x from π_θ at temperature τ (batched, KV cache);
   keep per response token the log-prob log π_θold(y_t), the reference log-prob log π_ref(y_t) (both
   of softmax(z/τ), the distribution sampled from) and the value V(s_t); score (x, y) with the
   reward model r_φ.
2. rewards with a KL penalty: r_t = −β·(log π_θold(y_t) − log π_ref(y_t)) for every token, plus
   r_φ(x, y) at the last token (``kl_penalized_rewards``); β fixed or adapted to a KL target
   (``AdaptiveKLController``, Ziegler et al., 2019). A response cut at ``response_length``
   without an EOS has ``missing_eos_penalty`` taken off its score (``missing_eos_penalized``).
3. GAE: advantages Â_t and returns from the rewards and values, advantages whitened
   (``gae_advantages``, ``whiten``). The value head starts at zero, so the first rollout's
   advantages are the rewards-to-go alone: a random critic would add −V(s_t) terms that depend on
   the position, i.e. an incentive for or against length.
   With ``advantage_estimator="rloo"`` (REINFORCE leave-one-out, Ahmadian et al., 2024, as
   OpenRLHF's ``--advantage_estimator rloo``) there is no critic: each prompt is rolled out
   ``samples_per_prompt`` = k times in the batch, a sample's score is replaced by its score minus
   the mean score of the prompt's k − 1 other samples (``leave_one_out_scores``), and a token's
   advantage is the sum of the rewards from it to the end (``rewards_to_go``): that score plus the
   KL penalties still to come. Not whitened.
4. several epochs over shuffled minibatches: the clipped surrogate loss (``clipped_policy_loss``),
   the clipped value loss (``clipped_value_loss``; not with rloo) and, for PPO-ptx, γ times the
   language-model loss on a pretraining text batch (``pretraining_loss``). During the first
   ``critic_warmup_iterations`` only the value loss is optimised.

Before its iterations a run may learn from samples it did not generate (``step_served``): the
served groups' samples of the version it starts from are on-policy episodes, each at the τ its
request asked for (``Rollout.temperature``), with RLOO's baseline over each group's own samples
(``Rollout.prompt_index``, ``leave_one_out_by_prompt``); one pass over them in larger optimizer steps
(``served_mini_batch_size``, the gradients of ``mini_batch_size`` chunks accumulated).

With ``kl_stop`` the run ends at the first rollout whose KL to π_ref is past it, and the policy goes
back to the last iterate whose rollout was within it: the candidate the gate sees stays inside the
gate's KL budget instead of being rejected for the iterations that left it.

The policy is a ``PolicyWithValueHead`` (one forward gives the logits and the values; π_ref is the
same backbone with its LoRA adapters disabled). Responses are right-aligned after left-padded
prompts, so the response of every row occupies the last ``response_length`` positions.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from training.policy_model import PolicyWithValueHead, Prompt

log = logging.getLogger(__name__)

RewardFunction = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
"""score(prompt token ids, response token ids (ending with EOS when the policy stopped)) → [N]."""


@dataclass
class PPOConfig:
    """How one PPO run trains (names as in TRL's ``PPOConfig`` where they mean the same)."""

    batch_size: int = 64
    """Episodes (responses) per PPO iteration: batch_size / samples_per_prompt prompts."""
    mini_batch_size: int = 8
    """Episodes per optimizer step; an iteration makes ppo_epochs · batch_size / mini_batch_size steps."""
    rollout_batch_size: int = 64
    """Prompts generated together (one batched, KV-cached generation)."""
    ppo_epochs: int = 4
    response_length: int = 48
    temperature: float = 1.0
    """τ of the rollouts; every log-prob of a response (old, reference, new) is taken at τ too."""
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    """ε of the clipped surrogate objective."""
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    critic_warmup_iterations: int = 0
    """The first iterations train the value head alone (unclipped value loss, the policy and the
    shared body frozen), so the critic catches up before its errors shape the advantages (OpenRLHF's
    ``freezing_actor_steps``). 0 by default: the value head starts at V = 0, which is already the
    right baseline for a calibrated reward (mean 0 over served completions) and adds no
    position-dependent term to GAE; each warm-up iteration costs a whole rollout of the budget."""
    kl_coef: float = 0.05
    """β: weight of the per-token KL penalty (the initial value when adaptive)."""
    kl_target: float | None = None
    """Adapt β so that the mean KL per response approaches this (nats); None = fixed β."""
    kl_stop: float = 0.0
    """Stop the run when a rollout's mean KL to π_ref per response exceeds this (nats) and keep the
    last iterate whose rollout stayed within it; 0 = never. The gate refuses a candidate past its
    KL budget, so iterations past it would only turn a round's gain into a rejection."""
    kl_horizon: int | None = None
    """Episodes over which the adaptive β may move by a factor of about e^±0.2. None = the run's own
    episodes (``iterations`` · ``batch_size``, set by ``train``): Ziegler et al.'s 10,000 is made for
    runs of millions of episodes, and against a run of 256 it kept β where it started (±0.5%)."""
    missing_eos_penalty: float = 1.0
    """Taken off the score of a response cut at ``response_length`` without an EOS (TRL's
    ``missing_eos_penalty``). The reward model scores a cut response as if it had ended there, so
    without this PPO is paid for unfinished answers. 1.0 is one standard deviation of a calibrated
    reward over served completions (TRL's examples use 1.0 too): a cut answer must beat a finished
    one by that much to be worth it. 0 turns it off."""
    whiten_rewards: bool = False
    ptx_coef: float = 0.0
    """γ of PPO-ptx: weight of the language-model loss on pretraining text; 0 = plain PPO."""
    ptx_batch_size: int = 4
    ptx_max_length: int = 128
    max_prompt_length: int = 256
    """Longer prompts are cut from the left."""
    advantage_estimator: str = "gae"
    """"gae": the critic and GAE (PPO as in InstructGPT). "rloo": REINFORCE leave-one-out baselines
    over ``samples_per_prompt`` samples of each prompt, no critic (see the module docstring)."""
    samples_per_prompt: int = 1
    """k: responses sampled for each prompt in one batch (rloo needs k ≥ 2)."""
    served_mini_batch_size: int = 32
    """Episodes per optimizer step over the served groups (in chunks of ``mini_batch_size``, the
    gradients accumulated): a batch of several hundred episodes in steps of 8 would take as many
    steps as a whole run of rollouts."""
    served_epochs: int = 1
    seed: int = 0
    log_every_seconds: float = 10.0


ADVANTAGE_ESTIMATORS = ("gae", "rloo")


# ---- the pieces of the objective, on tensors ----
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the unmasked entries; masked entries come back 0."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_penalized_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = −β·(log π(y_t) − log π_ref(y_t)), plus the score at each response's
    last token. Returns (rewards [B, T], kl [B, T]); both 0 past the end of a response."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards, kl


def missing_eos_penalized(scores: torch.Tensor, truncated: torch.Tensor, penalty: float) -> torch.Tensor:
    """score − penalty for each response cut at the length limit (``truncated`` [B] bool)."""
    return scores - penalty * truncated.float()


def leave_one_out_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO's baseline: each score minus the mean of the other k − 1 scores of its prompt (the
    samples of a prompt are k consecutive rows). Sums to 0 over a prompt's samples; unbiased,
    since a sample's baseline does not depend on the sample itself."""
    return leave_one_out_by_prompt(scores, torch.arange(scores.shape[0], device=scores.device) // k)


def leave_one_out_by_prompt(scores: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """The same baseline where a prompt's samples are the rows sharing a ``prompt_index`` (served
    groups have as many samples as their request asked for); every prompt needs 2 or more."""
    count = torch.bincount(prompt_index).to(scores.dtype)
    total = torch.zeros_like(count).index_add_(0, prompt_index, scores)
    if bool((count[prompt_index] < 2).any()):
        raise ValueError("leave-one-out needs at least 2 samples of every prompt")
    baseline = (total[prompt_index] - scores) / (count[prompt_index] - 1)
    return scores - baseline


def rewards_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_{t' ≥ t} r_t' per token (γ = 1, as OpenRLHF's rloo): REINFORCE's return, 0 past the end."""
    rewards = rewards * mask
    return rewards.flip(dims=[1]).cumsum(dim=1).flip(dims=[1]) * mask


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016), backwards over the tokens:
    δ_t = r_t + γ·V(s_{t+1}) − V(s_t), Â_t = δ_t + γλ·Â_{t+1}; V past the end of a response is 0.
    Returns (advantages, returns = advantages + values), 0 past the end."""
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L^CLIP: mean over tokens of max(−Â·ρ, −Â·clip(ρ, 1−ε, 1+ε)), ρ = π_θ(y_t)/π_θold(y_t).
    Also the clip fraction and CleanRL's approximate KL, E[(ρ − 1) − log ρ]."""
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask)}
    return loss, stats


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """½ · mean of max((V − R)², (clip(V, V_old ± ε_v) − R)²): the value may not move further than
    ε_v from the rollout's estimate in one iteration, as the policy may not."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((losses_clipped > losses).float(), mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """H(π(·|s_t)) per position of the distribution sampled from, softmax(z/τ):
    logsumexp(z/τ) − Σ softmax(z/τ)·z/τ."""
    logits = logits.float() / _per_row(temperature, logits)
    probabilities = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probabilities * logits).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """log π(y_t) of the given tokens under softmax(z/τ), in float32. Responses are sampled at τ,
    so every log-prob of them (π_θold, π_ref, π_θ, the gate's KL) must be taken at the same τ:
    at τ = 1 the ratio ρ and the KL would describe a policy that never produced the samples."""
    return torch.log_softmax(logits.float() / _per_row(temperature, logits), dim=-1).gather(
        -1, tokens.unsqueeze(-1)).squeeze(-1)


def _per_row(temperature: float | torch.Tensor, logits: torch.Tensor) -> float | torch.Tensor:
    """τ as a divisor of [B, ..., V] logits: a float, or one τ per row ([B]) for served episodes,
    each sampled at the temperature its request asked for."""
    if isinstance(temperature, torch.Tensor):
        return temperature.float().view(-1, *([1] * (logits.dim() - 1)))
    return temperature


# ---- β ----
class FixedKLController:
    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"kind": "fixed", "value": self.value}


class AdaptiveKLController:
    """β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) (Ziegler et al., 2019): a proportional
    controller that keeps the KL to π_ref near ``target`` nats per response.

    A controller adapts over many runs, not one: ``state_dict`` is what a run stores (plain JSON)
    and ``from_state`` continues from it, so the next run starts from the β the last one reached."""

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        self.value = kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    @classmethod
    def from_state(cls, state: dict, target: float | None = None, horizon: int | None = None) -> "AdaptiveKLController":
        """Continue from a stored β; ``target`` and ``horizon`` (this run's) replace the stored ones."""
        value = float(state["value"])
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"not a usable KL coefficient in the stored state: {state!r}")
        return cls(value, float(target if target is not None else state["target"]),
                   int(horizon if horizon is not None else state["horizon"]))


def kl_controller(config: PPOConfig, state: dict | None = None) -> FixedKLController | AdaptiveKLController:
    """β's controller: adaptive towards ``kl_target`` when set (from a previous run's ``state`` when
    given, else from ``kl_coef``), fixed at ``kl_coef`` otherwise. An unset horizon is one
    iteration's episodes until ``PPOTrainer.train`` sizes it to the run."""
    if not config.kl_target:
        return FixedKLController(config.kl_coef)
    horizon = config.kl_horizon or config.batch_size
    if state is not None and "value" in state:
        return AdaptiveKLController.from_state(state, target=config.kl_target, horizon=horizon)
    return AdaptiveKLController(config.kl_coef, config.kl_target, horizon)


# ---- one iteration ----
@dataclass
class Rollout:
    """What one batch of episodes left behind, per response token ([B, T] unless noted)."""

    query_responses: torch.Tensor
    """[B, P + T]: left-padded prompts followed by right-padded responses."""
    attention_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    """1 up to and including a response's EOS (or its last sampled token), 0 after."""
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    """[B]: the reward model's score of each (prompt, response)."""
    truncated: torch.Tensor
    """[B] bool: the response reached ``response_length`` without an EOS."""
    frozen_hidden: torch.Tensor | None = None
    """[B, P + T, H]: output of the policy's frozen bottom layers, reused by every epoch."""
    temperature: torch.Tensor | None = None
    """[B]: τ each response was sampled at (None: the config's); its log-probs are taken at it."""
    prompt_index: torch.Tensor | None = None
    """[B]: rows with the same index are samples of one prompt (None: ``samples_per_prompt``
    consecutive rows); RLOO's baseline is over them."""


@dataclass(frozen=True)
class ServedGroup:
    """Samples the policy already served for one prompt: episodes PPO can learn from without
    generating them. On-policy for the version that served them, at the τ its request asked for."""

    prompt: Prompt
    responses: list[list[int]]
    """Each sample's token ids, ending with the EOS when it stopped."""
    temperature: float
    scores: list[float] | None = None
    """Each sample's reward when the users ranked the group (``training.policy_prompts.rank_rewards``):
    their verdict, where the reward model's score is only an estimate of it. None: the reward model
    scores them."""


@dataclass
class PPOStats:
    """The figures an iteration reports (all means over the iteration's tokens or responses)."""

    mean_score: float
    mean_reward: float
    """score − missing-EOS penalty − β·KL, per response."""
    kl_to_ref: float
    """Σ_t log π(y_t) − log π_ref(y_t), per response (nats)."""
    kl_coef: float
    policy_loss: float
    value_loss: float
    """0 with rloo (no critic)."""
    clipfrac: float
    approx_kl: float
    entropy: float
    ptx_loss: float | None
    response_length: float
    episodes: int
    seconds: float
    rollout_seconds: float
    truncated_fraction: float = 0.0
    """Responses cut at ``response_length`` without an EOS."""
    critic_warmup: bool = False
    """A critic warm-up iteration: the policy was not updated (policy_loss, clipfrac, approx_kl and
    entropy are 0)."""
    served: bool = False
    """The update on the served groups' samples (``PPOTrainer.step_served``), not on a rollout."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    iterations: list[PPOStats] = field(default_factory=list)
    seconds: float = 0.0
    kl_state: dict | None = None
    """The KL controller's state at the end (``state_dict``): what the next run continues from."""
    stopped: str | None = None
    """Why the run ended before its last iteration (the KL stop), None when it ran them all."""

    @property
    def last(self) -> PPOStats | None:
        return self.iterations[-1] if self.iterations else None


class PPOTrainer:
    """Improves a ``PolicyWithValueHead`` against a reward function with PPO (see module doc)."""

    def __init__(self, policy: PolicyWithValueHead, reward_fn: RewardFunction, config: PPOConfig,
                 ptx_texts: Sequence[str] = (), progress: Callable[[int, int, float, PPOStats], None] | None = None,
                 kl_state: dict | None = None):
        """``kl_state``: a previous run's ``kl_controller.state_dict()`` (``TrainResult.kl_state``), to
        continue the adaptive β from."""
        if config.batch_size % config.mini_batch_size:
            raise ValueError("batch_size must be a multiple of mini_batch_size")
        if not config.temperature > 0:
            raise ValueError(f"temperature must be > 0 (log-probs are taken at it), got {config.temperature}")
        if config.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, got "
                             f"{config.advantage_estimator!r}")
        if config.advantage_estimator == "rloo" and config.samples_per_prompt < 2:
            raise ValueError("rloo needs samples_per_prompt >= 2 (a sample's baseline is the others' mean)")
        if config.samples_per_prompt < 1 or config.batch_size % config.samples_per_prompt:
            raise ValueError("batch_size must be a multiple of samples_per_prompt")
        self.policy = policy
        self.reward_fn = reward_fn
        self.config = config
        self.progress = progress
        self.pad_id = policy.pad_id
        self.optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                           lr=config.learning_rate, eps=1e-5)
        self.kl_controller = kl_controller(config, kl_state)
        self.iteration = 0
        """PPO iterations (updates) done by this trainer."""
        self.rng = random.Random(config.seed)
        self.device = policy.device  # where the rollouts' tensors live
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.ptx_batches = (policy.text_batches(ptx_texts, config.ptx_batch_size, config.ptx_max_length)
                            if config.ptx_coef > 0 and ptx_texts else [])
        self._within_kl_stop: dict[str, torch.Tensor] | None = None
        """The trained parameters of the last iterate whose rollout was within ``kl_stop``."""
        self.stopped: str | None = None

    # 1. rollout
    @torch.no_grad()
    def rollout(self, prompts: Sequence[Prompt]) -> Rollout:
        parts = []
        for start in range(0, len(prompts), self.config.rollout_batch_size):
            chunk = prompts[start:start + self.config.rollout_batch_size]
            query_responses, attention_mask, responses, response_mask = self.policy.generate(
                chunk, self.config.response_length, self.config.temperature, self.config.max_prompt_length,
                generator=self.generator)
            parts.append(self._scored(chunk, query_responses, attention_mask, responses, response_mask,
                                      self.config.temperature))
        return self._joined(parts)

    @torch.no_grad()
    def served_rollout(self, groups: Sequence[ServedGroup]) -> Rollout:
        """The served groups as a rollout: their samples as sampled, with log π_θold, log π_ref and
        the values taken now (at each group's τ), and each sample's reward: the users' ranking where
        the group carries one, else the reward model's score."""
        rows = [(group.prompt, response[:self.config.response_length], group.temperature, index,
                 math.nan if group.scores is None else group.scores[j])
                for index, group in enumerate(groups) for j, response in enumerate(group.responses)]
        width = max(len(row[1]) for row in rows)  # every row's response in the last columns
        parts = []
        for start in range(0, len(rows), self.config.rollout_batch_size):
            chunk = rows[start:start + self.config.rollout_batch_size]
            prompts = [row[0] for row in chunk]
            input_ids, prompt_mask = self.policy.left_pad([p.token_ids[-self.config.max_prompt_length:]
                                                           for p in prompts])
            responses, response_mask = self.policy.right_pad([row[1] for row in chunk])
            responses = F.pad(responses, (0, width - responses.shape[1]), value=self.pad_id)
            response_mask = F.pad(response_mask, (0, width - response_mask.shape[1]), value=0)
            query_responses = torch.cat([input_ids, responses], dim=1)
            attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
            temperature = torch.tensor([row[2] for row in chunk], device=self.device)
            parts.append(self._scored(prompts, query_responses, attention_mask, responses, response_mask.float(),
                                      temperature, given_scores=torch.tensor([row[4] for row in chunk])))
        rollout = self._joined(parts)
        rollout.temperature = torch.tensor([row[2] for row in rows], device=self.device)
        rollout.prompt_index = torch.tensor([row[3] for row in rows], device=self.device)
        return rollout

    def _scored(self, prompts, query_responses, attention_mask, responses, response_mask, temperature,
                given_scores: torch.Tensor | None = None) -> tuple:
        """One chunk's log-probs (π_θold, π_ref at τ), values, scores and truncation flags.
        ``given_scores`` [B] (host): rewards already known (NaN where the reward model must score the row);
        the reward function's scores are host tensors too, moved to the rollout's device at the end."""
        frozen = self.policy.frozen_prefix(query_responses, attention_mask)
        logits, values = self.policy(query_responses, attention_mask, responses.shape[1], frozen)
        logprobs = token_logprobs(logits, responses, temperature)
        del logits
        ref_logits = self.policy.reference_logits(query_responses, attention_mask, responses.shape[1], frozen)
        ref_logprobs = token_logprobs(ref_logits, responses, temperature)
        del ref_logits
        prompt_ids = [p.token_ids[-self.config.max_prompt_length:] for p in prompts]
        response_ids = [row[:int(n)].tolist() for row, n in zip(responses, response_mask.sum(dim=1))]
        if given_scores is None:
            scores = self.reward_fn(prompt_ids, response_ids).float()
        else:
            scores = given_scores.float().clone()
            unknown = torch.isnan(scores).nonzero().flatten().tolist()
            if unknown:
                scores[unknown] = self.reward_fn([prompt_ids[i] for i in unknown],
                                                 [response_ids[i] for i in unknown]).float()
        last = (response_mask.sum(dim=1).long() - 1).clamp(min=0)
        truncated = responses.gather(1, last.unsqueeze(1)).squeeze(1) != self.policy.eos_id  # no EOS at its end
        return (query_responses, attention_mask, responses, response_mask, logprobs, ref_logprobs,
                values.float(), scores.to(self.device), truncated, frozen)

    def _joined(self, parts: list[tuple]) -> Rollout:
        frozen = None if parts[0][9] is None else _cat_padded([p[9] for p in parts], left=True, pad=0)
        return Rollout(*[_cat_padded([p[i] for p in parts], left=i < 2, pad=self.pad_id if i == 0 else 0)
                         for i in range(9)], frozen_hidden=frozen)

    # 2-3. rewards with the KL penalty, advantages
    def advantages_and_returns(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(advantages before any whitening, returns (the critic's targets), per-token KL), all [B, T]."""
        c = self.config
        mask = rollout.response_mask
        scores = missing_eos_penalized(rollout.scores, rollout.truncated, c.missing_eos_penalty)
        if c.advantage_estimator == "rloo":
            scores = (leave_one_out_scores(scores, c.samples_per_prompt) if rollout.prompt_index is None
                      else leave_one_out_by_prompt(scores, rollout.prompt_index))
        rewards, kl = kl_penalized_rewards(rollout.logprobs, rollout.ref_logprobs, scores, mask,
                                           self.kl_controller.value)
        if c.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        if c.advantage_estimator == "rloo":
            advantages = rewards_to_go(rewards, mask)
            return advantages, advantages, kl
        advantages, returns = gae_advantages(rewards, rollout.values, mask, c.gamma, c.lam)
        return advantages, returns, kl

    # 4. minibatch epochs
    def update(self, rollout: Rollout, epochs: int | None = None, mini_batch_size: int | None = None) -> dict[str, float]:
        """``epochs`` (the config's ``ppo_epochs``) passes over the rollout in optimizer steps of
        ``mini_batch_size`` episodes (the config's), each computed in chunks of the config's
        ``mini_batch_size`` with the gradients accumulated."""
        c = self.config
        epochs = c.ppo_epochs if epochs is None else epochs
        step_size = mini_batch_size or c.mini_batch_size
        mask = rollout.response_mask
        advantages, returns, kl = self.advantages_and_returns(rollout)
        train_critic = c.advantage_estimator == "gae"  # rloo has no critic
        if train_critic:
            advantages = whiten(advantages, mask)
        train_policy = not train_critic or self.iteration >= c.critic_warmup_iterations
        # the warm-up fits the critic to the returns: no trust region around a critic that knows nothing
        cliprange_value = c.cliprange_value if train_policy else math.inf

        sums: dict[str, float] = {}
        steps = 0
        batch = rollout.responses.shape[0]
        self.policy.train()
        for _epoch in range(epochs):
            order = list(range(batch))
            self.rng.shuffle(order)
            for start in range(0, batch, step_size):
                self.optimizer.zero_grad(set_to_none=True)
                step_rows = order[start:start + step_size]
                for chunk_start in range(0, len(step_rows), c.mini_batch_size):
                    idx = torch.tensor(step_rows[chunk_start:chunk_start + c.mini_batch_size], device=self.device)
                    figures = self._accumulate_gradients(rollout, idx, advantages, returns, train_policy,
                                                         train_critic, cliprange_value, len(idx) / len(step_rows),
                                                         steps)
                    for name, value in figures.items():
                        sums[name] = sums.get(name, 0.0) + float(value) * len(idx) / len(step_rows)
                torch.nn.utils.clip_grad_norm_([p for p in self.policy.parameters() if p.requires_grad],
                                               c.max_grad_norm)
                self.optimizer.step()
                steps += 1
        self.policy.eval()
        # what an iteration did not compute: the policy's figures in a critic warm-up, the critic's with rloo
        means = {"policy_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "entropy": 0.0, "value_loss": 0.0}
        means |= {name: value / max(steps, 1) for name, value in sums.items()}
        per_response_kl = kl.sum(dim=1)
        scores = missing_eos_penalized(rollout.scores, rollout.truncated, c.missing_eos_penalty)
        means |= {"kl_to_ref": float(per_response_kl.mean()),
                  "mean_reward": float((scores - self.kl_controller.value * per_response_kl).mean()),
                  "kl_coef": self.kl_controller.value, "critic_warmup": not train_policy}
        self.kl_controller.update(means["kl_to_ref"], batch)
        self.iteration += 1
        return means

    def _accumulate_gradients(self, rollout: Rollout, idx: torch.Tensor, advantages: torch.Tensor,
                              returns: torch.Tensor, train_policy: bool, train_critic: bool, cliprange_value: float,
                              weight: float, step: int) -> dict[str, torch.Tensor]:
        """Backward of ``weight`` × the losses of the rows ``idx``; returns their figures."""
        c = self.config
        mb_mask = rollout.response_mask[idx]
        response_length = rollout.responses.shape[1]
        temperature = c.temperature if rollout.temperature is None else rollout.temperature[idx]
        first = _first_used_column(rollout.attention_mask[idx], response_length)
        qr, am = rollout.query_responses[idx, first:], rollout.attention_mask[idx, first:]
        frozen = None if rollout.frozen_hidden is None else rollout.frozen_hidden[idx, first:]
        if train_policy:
            logits, values = self.policy(qr, am, response_length, frozen)
        else:  # critic warm-up: gradients reach the value head only
            logits, values = None, self.policy.critic_values(qr, am, response_length, frozen)
        loss = torch.zeros((), device=self.device)
        figures = {}
        if train_critic:
            vf_loss, vf_stats = clipped_value_loss(values.float(), rollout.values[idx], returns[idx], mb_mask,
                                                   cliprange_value)
            loss = loss + c.vf_coef * vf_loss
            figures |= {"value_loss": vf_loss.detach()} | vf_stats
        if train_policy:
            new_logprobs = token_logprobs(logits, rollout.responses[idx], temperature)
            pg_loss, pg_stats = clipped_policy_loss(new_logprobs, rollout.logprobs[idx], advantages[idx],
                                                    mb_mask, c.cliprange)
            loss = loss + pg_loss
            figures |= {"policy_loss": pg_loss.detach()} | pg_stats
            if self.ptx_batches:
                ptx = self.policy.language_model_loss(*self.ptx_batches[step % len(self.ptx_batches)])
                loss = loss + c.ptx_coef * ptx
                figures["ptx_loss"] = ptx.detach()
        (weight * loss).backward()
        if train_policy:
            with torch.no_grad():
                figures["entropy"] = masked_mean(entropy_from_logits(logits, temperature), mb_mask)
        return figures

    def step(self, prompts: Sequence[Prompt]) -> PPOStats | None:
        """One iteration on ``prompts``, each rolled out ``samples_per_prompt`` times. None when the
        rollout's KL to π_ref is past ``kl_stop``: then the policy is back at the last iterate within
        it (``stopped`` says why) and nothing was updated."""
        started = time.monotonic()
        prompts = [prompt for prompt in prompts for _ in range(self.config.samples_per_prompt)]
        rollout = self.rollout(prompts)
        rollout_seconds = time.monotonic() - started
        if self.config.kl_stop > 0 and self._past_kl_stop(rollout):
            return None
        return self._stats(rollout, self.update(rollout), started, rollout_seconds)

    def step_served(self, groups: Sequence[ServedGroup]) -> PPOStats | None:
        """One update on the samples already served (``served_epochs`` passes, optimizer steps of
        ``served_mini_batch_size`` episodes): the rankings' groups are on-policy episodes of the
        version that served them, as many as several iterations of rollouts, for the price of
        scoring them. None past ``kl_stop``, as ``step``."""
        started = time.monotonic()
        rollout = self.served_rollout(groups)
        rollout_seconds = time.monotonic() - started
        if self.config.kl_stop > 0 and self._past_kl_stop(rollout):
            return None
        figures = self.update(rollout, self.config.served_epochs, self.config.served_mini_batch_size)
        return self._stats(rollout, figures, started, rollout_seconds, served=True)

    def _stats(self, rollout: Rollout, figures: dict, started: float, rollout_seconds: float,
               served: bool = False) -> PPOStats:
        return PPOStats(
            mean_score=float(rollout.scores.mean()), mean_reward=figures["mean_reward"],
            kl_to_ref=figures["kl_to_ref"], kl_coef=figures["kl_coef"], policy_loss=figures["policy_loss"],
            value_loss=figures["value_loss"], clipfrac=figures["clipfrac"], approx_kl=figures["approx_kl"],
            entropy=figures["entropy"], ptx_loss=figures.get("ptx_loss"),
            response_length=float(rollout.response_mask.sum(dim=1).float().mean()),
            episodes=rollout.responses.shape[0], seconds=time.monotonic() - started, rollout_seconds=rollout_seconds,
            truncated_fraction=float(rollout.truncated.float().mean()), critic_warmup=figures["critic_warmup"],
            served=served)

    def _past_kl_stop(self, rollout: Rollout) -> bool:
        """Whether this rollout's policy is past ``kl_stop`` (then restore the last iterate within
        it); else remember this iterate's trained parameters as that last one."""
        kl = float(((rollout.logprobs - rollout.ref_logprobs) * rollout.response_mask).sum(dim=1).mean())
        trained = [(name, p) for name, p in self.policy.named_parameters() if p.requires_grad]
        if kl <= self.config.kl_stop:
            self._within_kl_stop = {name: p.detach().clone() for name, p in trained}
            return False
        if self._within_kl_stop is None:
            self.stopped = (f"the starting policy's KL to π_ref, {kl:.2f} nats, is past kl_stop "
                            f"{self.config.kl_stop}: not trained further")
        else:
            with torch.no_grad():
                for name, p in trained:
                    p.copy_(self._within_kl_stop[name])
            self.stopped = (f"the rollout after {self.iteration} updates had a KL to π_ref of {kl:.2f} nats, past "
                            f"kl_stop {self.config.kl_stop}: kept the policy after {self.iteration - 1} updates, the last "
                            "one whose rollout was within it")
        return True

    def train(self, prompts: Sequence[Prompt], iterations: int, served: Sequence[ServedGroup] = ()) -> TrainResult:
        """First one update on the ``served`` groups' samples (if any), then ``iterations`` PPO
        iterations of ``batch_size`` episodes each (batch_size / samples_per_prompt prompts, drawn
        from ``prompts``, reshuffled whenever they run out). Progress (rate, ETA) is logged and
        passed to ``progress``."""
        if not prompts:
            raise ValueError("no prompts to train on")
        served_episodes = sum(len(group.responses) for group in served)
        if isinstance(self.kl_controller, AdaptiveKLController) and self.config.kl_horizon is None:
            # β adapts within the run
            self.kl_controller.horizon = iterations * self.config.batch_size + served_episodes
        result = TrainResult()
        run_started = time.monotonic()
        if served:
            stats = self.step_served(served)
            if stats is None:
                log.info("PPO stopped: %s", self.stopped)
                iterations = 0
            else:
                result.iterations.append(stats)
                log.info("PPO on %d served samples of %d prompts: score %.4f, KL %.3f, policy loss %.4f, clipfrac "
                         "%.3f, approx KL %.4f | %.1f s (%.1f s scoring them)", served_episodes, len(served),
                         stats.mean_score, stats.kl_to_ref, stats.policy_loss, stats.clipfrac, stats.approx_kl,
                         stats.seconds, stats.rollout_seconds)
                if self.progress is not None:
                    self.progress(0, iterations, math.nan, stats)
        pool: list[Prompt] = []
        started = time.monotonic()  # the rate and ETA are the rollout iterations' own
        for iteration in range(1, iterations + 1):
            batch: list[Prompt] = []
            while len(batch) < self.config.batch_size // self.config.samples_per_prompt:
                if not pool:
                    pool = list(prompts)
                    self.rng.shuffle(pool)
                batch.append(pool.pop())
            stats = self.step(batch)
            if stats is None:
                log.info("PPO stopped: %s", self.stopped)
                break
            result.iterations.append(stats)
            elapsed = time.monotonic() - started
            rate = iteration * self.config.batch_size / elapsed
            eta = (iterations - iteration) * elapsed / iteration
            log.info("PPO iteration %d/%d: score %.4f, reward %.4f, KL %.3f (β %.4f), policy loss %.4f, value loss "
                     "%.4f, clipfrac %.3f, approx KL %.4f, entropy %.3f | %.2f episodes/s, ETA %.0f s",
                     iteration, iterations, stats.mean_score, stats.mean_reward, stats.kl_to_ref, stats.kl_coef,
                     stats.policy_loss, stats.value_loss, stats.clipfrac, stats.approx_kl, stats.entropy, rate, eta)
            if self.progress is not None:
                self.progress(iteration, iterations, eta, stats)
            if not all(math.isfinite(v) for v in (stats.policy_loss, stats.value_loss, stats.kl_to_ref)):
                log.warning("PPO stopped at iteration %d: a loss is not finite", iteration)
                break
        result.seconds = time.monotonic() - run_started
        result.kl_state = self.kl_controller.state_dict()
        result.stopped = self.stopped
        return result


def _first_used_column(attention_mask: torch.Tensor, response_length: int) -> int:
    """The first column that is not left padding in every row: a minibatch need not compute the rest."""
    prompt_mask = attention_mask[:, :-response_length] if response_length else attention_mask
    used = prompt_mask.any(dim=0).nonzero()
    return int(used[0]) if used.numel() else 0


def _cat_padded(tensors: list[torch.Tensor], left: bool, pad: int | float) -> torch.Tensor:
    """Concatenate along the batch, padding the second dimension (on the left for prompts)."""
    if len(tensors) == 1 or tensors[0].dim() == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    later = [0, 0] * (tensors[0].dim() - 2)  # F.pad counts from the last dimension: leave those after dim 1
    padded = [F.pad(t, later + ([width - t.shape[1], 0] if left else [0, width - t.shape[1]]), value=pad)
              for t in tensors]
    return torch.cat(padded)
