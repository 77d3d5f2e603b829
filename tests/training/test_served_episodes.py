"""The served groups' samples as PPO episodes: which groups qualify, that a served rollout is the
rollout those samples would have been (same log-probs, scores, truncation, RLOO advantages), and
that an update on them alone raises a toy reward."""

from __future__ import annotations

import pytest
import torch

from flywheel.contracts.groups import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, CompletionGroup, StoredCompletion
from flywheel.contracts.artifacts import JUDGE_MEMBER, POLICY_MEMBER
from flywheel.contracts.heldout import is_held_out, prompt_is_held_out, reward_model_member
from flywheel.group_store import GroupStore
from support.policy import one_thread  # noqa: F401 (fixture)
from training.policy_prompts import gate_rankings, rank_rewards, served_groups, stored_groups
from training.ppo import PPOConfig, PPOTrainer, ServedGroup
from training.rankings import Ranking
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

    found = served_groups(stored_groups(redis_client), version=0, eos_id=EOS, response_length=64, heldout_fraction=0.5)
    by_prompt = {g.prompt.text: g for g in found}
    assert set(by_prompt) == {groups["good"].prompt, groups["cancelled-one"].prompt}
    good = by_prompt[groups["good"].prompt]
    assert good.responses == [[9, 9, EOS], [9, 9, 9], [9, 9, EOS]] and good.temperature == 0.8
    assert good.prompt.token_ids == (5, 6, 7)
    assert len(by_prompt[groups["cancelled-one"].prompt].responses) == 2
    assert [g.prompt.text for g in served_groups(stored_groups(redis_client), 0, EOS, 64, 0.5, max_groups=1)] == \
        [groups["cancelled-one"].prompt]  # the newest
    assert [g.prompt.text for g in served_groups(stored_groups(redis_client), 1, EOS, 64, 0.5)] == [groups["other-version"].prompt]


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


def ranking(group_id: str, order: list[str], source: str = "human", by_text: bool = False) -> Ranking:
    """A ranking of completions ``order`` (ids ``{group_id}-{i}``, texts ``text {i}``), best first."""
    texts = [f"text {cid.rsplit('-', 1)[1]}" for cid in order]
    return Ranking(f"r-{group_id}-{source}-{by_text}", group_id, "prompt", texts, source=source,
                   completion_ids=[] if by_text else list(order))


def completions(group_id: str, count: int) -> list[StoredCompletion]:
    return [StoredCompletion(f"{group_id}-{i}", i, f"text {i}", FINISH_STOP, [9, i, EOS], [0.0] * 3)
            for i in range(count)]


def test_a_ranking_becomes_standardized_rewards_of_the_samples_it_orders():
    kept = completions("g", 4)
    rewards = rank_rewards(kept, [ranking("g", ["g-2", "g-0", "g-3", "g-1"])])
    spread = (15 / 3) ** 0.5
    assert rewards == pytest.approx([1 / spread, -3 / spread, 3 / spread, -1 / spread])
    assert sum(rewards) == pytest.approx(0) and (sum(r * r for r in rewards) / 4) == pytest.approx(1)
    # a ranking stored before rankings kept their ids joins by text, to the same rewards
    assert rank_rewards(kept, [ranking("g", ["g-2", "g-0", "g-3", "g-1"], by_text=True)]) == pytest.approx(rewards)
    # two rankings: the mean; a ranked sample the run dropped (cancelled) does not count, the others keep their order
    both = rank_rewards(kept, [ranking("g", ["g-2", "g-0", "g-3", "g-1"]), ranking("g", ["g-0", "g-2", "g-1", "g-3"])])
    assert both == pytest.approx([2 / spread, -2 / spread, 2 / spread, -2 / spread])
    assert rank_rewards(kept[:3], [ranking("g", ["g-3", "g-2", "g-0", "g-1"])]) == pytest.approx([0, -1.5 ** 0.5, 1.5 ** 0.5])
    # nothing the users said about all of them: the reward model must score the group
    assert rank_rewards(kept, [ranking("g", ["g-2", "g-0"])]) is None  # a partial ranking
    assert rank_rewards(kept, [ranking("g", ["g-2", "g-0", "g-3", "g-1"], source="ai")]) is None
    assert rank_rewards(kept, []) is None


def test_served_groups_carry_the_users_rankings_and_leave_the_judges_groups_to_the_gate(redis_client):
    ended = ([9, 9, EOS], FINISH_STOP)
    ids = {member: next(f"{member}-{i}" for i in range(1000) if reward_model_member(f"{member}-{i}") == member
                        and not is_held_out(f"{member}-{i}", 0.1)) for member in (POLICY_MEMBER, JUDGE_MEMBER)}
    held = next(f"held-{i}" for i in range(1000) if is_held_out(f"held-{i}", 0.1))
    unranked = next(f"unranked-{i}" for i in range(1000) if reward_model_member(f"unranked-{i}") == POLICY_MEMBER)
    names = [*ids.values(), held, unranked]
    groups = [stored(gid, training_prompt(n), [ended] * 3) for n, gid in enumerate(names)]
    rankings = {gid: [ranking(gid, [f"{gid}-1", f"{gid}-0", f"{gid}-2"])] for gid in [*ids.values(), held]}
    found = {g.prompt.text: g for g in served_groups(groups, 0, EOS, 64, 0.5, rankings=rankings,
                                                       ranking_heldout_fraction=0.1)}
    scores = {gid: found[group.prompt].scores for gid, group in zip(names, groups) if group.prompt in found}
    assert set(scores) == {ids[POLICY_MEMBER], held, unranked}  # the judge's groups are the gate's evidence
    assert scores[ids[POLICY_MEMBER]] == pytest.approx([0, 1.5 ** 0.5, -(1.5 ** 0.5)])
    assert scores[held] == pytest.approx([0, 1.5 ** 0.5, -(1.5 ** 0.5)])  # the reward model's held-out: no member's
    assert scores[unranked] is None  # the reward model scores it
    without = served_groups(groups, 0, EOS, 64, 0.5)  # no split given: every group, none rewarded by a ranking
    assert len(without) == 4 and all(g.scores is None for g in without)


def test_the_gate_rankings_are_the_judges_human_ones_newest_first():
    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(word) for word in text.split()]}

    judge = [f"judge-{i}" for i in range(1000) if reward_model_member(f"judge-{i}") == JUDGE_MEMBER
             and not is_held_out(f"judge-{i}", 0.1)][:3]
    policy = next(f"policy-{i}" for i in range(1000) if reward_model_member(f"policy-{i}") == POLICY_MEMBER
                  and not is_held_out(f"policy-{i}", 0.1))
    def made(gid, created, source="human"):
        return Ranking(f"r-{gid}-{source}", gid, "a bb", ["ccc", "dddd e"], source=source, created_at=created)
    rankings = {judge[0]: [made(judge[0], "1.0"), made(judge[0], "5.0", "ai")], judge[1]: [made(judge[1], "3.0")],
                judge[2]: [made(judge[2], "2.0")], policy: [made(policy, "9.0")]}
    chosen = gate_rankings(rankings, Tokenizer(), 0.1, max_rankings=2)
    assert [r.prompt_ids for r in chosen] == [(1, 2), (1, 2)] and chosen[0].answers == ((3,), (4, 1))
    assert len(gate_rankings(rankings, Tokenizer(), 0.1, max_rankings=10)) == 3  # no AI, no policy-half ranking


def test_a_served_rollout_takes_the_rankings_rewards_and_scores_only_the_rest(tiny_model_dir):
    policy = tiny_policy(tiny_model_dir)
    prompts = tiny_prompts(policy, 2)
    scored: list[list[int]] = []

    def reward(prompt_ids, response_ids):
        scored.extend(response_ids)
        return torch.full((len(response_ids),), 7.0)

    groups = [ServedGroup(prompts[0], [[5, 6], [7]], 1.0, [0.5, -0.5]), ServedGroup(prompts[1], [[8, 9], [4]], 1.0)]
    config = PPOConfig(batch_size=4, mini_batch_size=2, rollout_batch_size=3, response_length=4,
                       advantage_estimator="rloo", samples_per_prompt=2)
    rollout = PPOTrainer(policy, reward, config).served_rollout(groups)
    assert rollout.scores.tolist() == [0.5, -0.5, 7.0, 7.0]
    assert sorted(scored) == [[4], [8, 9]]


def test_an_update_on_ranked_served_samples_alone_raises_what_the_ranking_prefers(sharp_tiny_model_dir):
    """The reward model says nothing (0 for every sample): only the users' rankings (by the toy
    reward) can move the policy."""
    from test_ppo_learns import toy_reward

    policy = tiny_policy(sharp_tiny_model_dir)
    reward = toy_reward(policy)
    prompts = tiny_prompts(policy, 32)

    def samples(seed: int, ranked: bool = False) -> list[ServedGroup]:
        generator = torch.Generator().manual_seed(seed)
        _, _, responses, mask = policy.generate([p for p in prompts for _ in range(4)], 12, 1.0, generator=generator)
        rows = [r[:int(n)].tolist() for r, n in zip(responses, mask.sum(dim=1))]
        groups = []
        for i, p in enumerate(prompts):
            group_rows = rows[4 * i:4 * i + 4]
            scores = reward([list(p.token_ids)] * 4, group_rows).tolist()
            kept = [StoredCompletion(f"g{i}-{j}", j, "", FINISH_STOP, r, []) for j, r in enumerate(group_rows)]
            best_first = sorted(range(4), key=lambda j: -scores[j])
            user = Ranking(f"r{i}", f"g{i}", "", [""] * 4, completion_ids=[f"g{i}-{j}" for j in best_first])
            groups.append(ServedGroup(p, group_rows, 1.0, rank_rewards(kept, [user]) if ranked else None))
        return groups

    def mean_reward(groups: list[ServedGroup]) -> float:
        return float(reward([list(g.prompt.token_ids) for g in groups for _ in g.responses],
                            [r for g in groups for r in g.responses]).mean())

    before = mean_reward(samples(100) + samples(101))
    config = PPOConfig(batch_size=32, mini_batch_size=8, rollout_batch_size=64, response_length=12,
                       learning_rate=5e-3, kl_coef=0.05, advantage_estimator="rloo", samples_per_prompt=4,
                       served_mini_batch_size=16, served_epochs=8, seed=0)
    silent = lambda prompt_ids, response_ids: torch.zeros(len(response_ids))  # noqa: E731
    PPOTrainer(policy, silent, config).train(prompts, iterations=0, served=samples(1, ranked=True))
    after = mean_reward(samples(100) + samples(101))
    assert after > before + 0.25, (before, after)
