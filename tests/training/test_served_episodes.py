"""The served groups' samples as PPO episodes: which groups qualify, that a served rollout is the
rollout those samples would have been (same log-probs, scores, truncation, RLOO advantages), and
that an update on them alone raises a toy reward."""

from __future__ import annotations

import pytest
import torch

from flywheel.contracts.groups import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, CompletionGroup, StoredCompletion
from flywheel.contracts.heldout import prompt_is_held_out
from flywheel.group_store import GroupStore
from support.policy import one_thread  # noqa: F401 (fixture)
from training.policy_prompts import served_groups
from training.ppo import PPOConfig, PPOTrainer, ServedGroup
from training_fixtures import tiny_policy, tiny_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 2


def stored(group_id: str, prompt: str, completions, version: int = 0, **params) -> CompletionGroup:
    params = {"n": len(completions), "max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95, "seed": None,
              "stop": [], "min_new_tokens": 0} | params
    return CompletionGroup(group_id, version, prompt, [5, 6, 7], params, 1.0 + len(group_id),
                           [StoredCompletion(f"{group_id}-{i}", i, "text", reason, ids, [0.0] * len(ids))
                            for i, (ids, reason) in enumerate(completions)])


def training_prompt(index: int) -> str:
    """A prompt text outside the 0.5 held-out slice."""
    while True:
        text = f"question {index}"
        if not prompt_is_held_out(type("P", (), {"text": text, "token_ids": ()})(), 0.5):
            return text
        index += 1000


def test_only_groups_sampled_as_a_rollout_of_the_starting_version_qualify(redis_client):
    store = GroupStore(redis_client)
    ended, cut = ([9, 9, EOS], FINISH_STOP), ([9, 9, 9], FINISH_LENGTH)
    held_out = next(f"q{i}" for i in range(1000)
                    if prompt_is_held_out(type("P", (), {"text": f"q{i}", "token_ids": ()})(), 0.5))
    groups = {
        "good": stored("good", training_prompt(1), [ended, cut, ended]),
        "other-version": stored("other-version", training_prompt(2), [ended, cut], version=1),
        "greedy": stored("greedy", training_prompt(3), [ended, cut], temperature=0.0),
        "stop-strings": stored("stop-strings", training_prompt(4), [ended, cut], stop=["\n"]),
        "forced-length": stored("forced-length", training_prompt(5), [ended, cut], min_new_tokens=4),
        "too-long": stored("too-long", training_prompt(6), [ended, cut], max_new_tokens=65),
        "held-out": stored("held-out", held_out, [ended, cut]),
        # one sample cancelled, one ended on a token that is not the policy's EOS: one left, not enough
        "one-usable": stored("one-usable", training_prompt(7), [ended, ([9], FINISH_CANCELLED), ([9, 4], FINISH_STOP)]),
        "cancelled-one": stored("cancelled-one", training_prompt(8), [ended, cut, ([9], FINISH_CANCELLED)]),
    }
    for group in groups.values():
        store.save_group(group)

    found = served_groups(redis_client, version=0, eos_id=EOS, response_length=64, heldout_fraction=0.5)
    by_prompt = {g.prompt.text: g for g in found}
    assert set(by_prompt) == {groups["good"].prompt, groups["cancelled-one"].prompt}
    good = by_prompt[groups["good"].prompt]
    assert good.responses == [[9, 9, EOS], [9, 9, 9], [9, 9, EOS]] and good.temperature == 0.8
    assert good.prompt.token_ids == (5, 6, 7)
    assert len(by_prompt[groups["cancelled-one"].prompt].responses) == 2
    assert [g.prompt.text for g in served_groups(redis_client, 0, EOS, 64, 0.5, max_groups=1)] == \
        [groups["cancelled-one"].prompt]  # the newest
    assert [g.prompt.text for g in served_groups(redis_client, 1, EOS, 64, 0.5)] == [groups["other-version"].prompt]


def test_a_served_rollout_is_the_rollout_its_samples_came_from(sharp_tiny_model_dir):
    from training.policy_model import response_mask_until_eos

    # adapters on the top layer only: the frozen layers' hidden states are kept per row, as in the demo
    policy = tiny_policy(sharp_tiny_model_dir, perturb=True, lora_layers=1)
    assert policy.frozen_prefix(*policy.left_pad([[1, 2], [3]])) is not None
    generate = policy.generate

    def first_rows_stop_early(prompts, response_length, *args, **kwargs):
        """Rows 0-2 end with an EOS at their third token (a random tiny model almost never samples it)."""
        query_responses, attention_mask, responses, _ = generate(prompts, response_length, *args, **kwargs)
        prompt_width = query_responses.shape[1] - response_length
        responses = responses.clone()
        responses[:3, 2], responses[:3, 3:] = policy.eos_id, policy.pad_id
        mask = response_mask_until_eos(responses, policy.eos_id)
        attention_mask = torch.cat([attention_mask[:, :prompt_width], mask.long()], dim=1)
        return torch.cat([query_responses[:, :prompt_width], responses], dim=1), attention_mask, responses, mask.float()

    policy.generate = first_rows_stop_early
    prompts = tiny_prompts(policy, 4)
    config = PPOConfig(batch_size=8, mini_batch_size=4, rollout_batch_size=8, response_length=6, temperature=0.7,
                       advantage_estimator="rloo", samples_per_prompt=2, seed=3)
    score = lambda prompt_ids, response_ids: torch.tensor([float(len(r)) + 0.1 * sum(r) % 3  # noqa: E731
                                                           for r in response_ids])
    trainer = PPOTrainer(policy, score, config)
    rollout = trainer.rollout([p for p in prompts for _ in range(2)])
    lengths = rollout.response_mask.sum(dim=1).long()
    assert rollout.truncated.any() and not rollout.truncated.all(), "want both ended and cut samples"
    groups = [ServedGroup(prompts[i], [rollout.responses[row, :lengths[row]].tolist() for row in (2 * i, 2 * i + 1)],
                          0.7) for i in range(4)]
    # in chunks of 3 rows: the first chunk's responses are all short, and every chunk is padded to one layout
    served = PPOTrainer(policy, score, PPOConfig(**{**config.__dict__, "rollout_batch_size": 3})).served_rollout(groups)

    assert served.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(served.truncated, rollout.truncated) and torch.equal(served.scores, rollout.scores)
    width = served.responses.shape[1]
    mask = rollout.response_mask[:, :width].bool()
    assert torch.equal(served.response_mask.bool(), mask) and torch.equal(served.responses[mask], rollout.responses[:, :width][mask])
    for name in ("logprobs", "ref_logprobs"):
        assert torch.allclose(getattr(served, name)[mask], getattr(rollout, name)[:, :width][mask], atol=1e-4), name
    advantages, _, _ = trainer.advantages_and_returns(rollout)
    served_advantages, _, _ = trainer.advantages_and_returns(served)
    assert torch.allclose(served_advantages[mask], advantages[:, :width][mask], atol=1e-4)


def test_an_update_on_served_samples_alone_raises_the_reward(sharp_tiny_model_dir):
    from test_ppo_learns import toy_reward

    policy = tiny_policy(sharp_tiny_model_dir)
    reward = toy_reward(policy)
    prompts = tiny_prompts(policy, 32)

    def samples(seed: int) -> list[ServedGroup]:
        generator = torch.Generator().manual_seed(seed)
        _, _, responses, mask = policy.generate([p for p in prompts for _ in range(4)], 12, 1.0, generator=generator)
        rows = [r[:int(n)].tolist() for r, n in zip(responses, mask.sum(dim=1))]
        return [ServedGroup(p, rows[4 * i:4 * i + 4], 1.0) for i, p in enumerate(prompts)]

    def mean_reward(groups: list[ServedGroup]) -> float:
        scores = reward([list(g.prompt.token_ids) for g in groups for _ in g.responses],
                        [r for g in groups for r in g.responses])
        return float(scores.mean())

    before = mean_reward(samples(100) + samples(101))
    config = PPOConfig(batch_size=32, mini_batch_size=8, rollout_batch_size=64, response_length=12,
                       learning_rate=5e-3, kl_coef=0.05, advantage_estimator="rloo", samples_per_prompt=4,
                       served_mini_batch_size=16, served_epochs=8, seed=0)
    trainer = PPOTrainer(policy, reward, config)
    result = trainer.train(prompts, iterations=0, served=samples(1))
    assert len(result.iterations) == 1 and result.iterations[0].served and result.iterations[0].episodes == 128
    after = mean_reward(samples(100) + samples(101))
    assert after > before + 0.25, (before, after)  # 5.0 -> 5.4 on the development machine
