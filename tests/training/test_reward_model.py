"""The reward model on a tiny backbone: it learns a synthetic rule, and a version stores only what
it trained (safetensors), which loads back to the same scores."""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from training.reward_model import RewardModel, RewardModelConfig
from training.reward_trainer import RewardModelTrainer, RewardTrainingConfig
from support.synthetic import synthetic_rankings


def test_training_the_top_layer_in_bfloat16_learns_shorter_wins_well_above_chance(tiny_model_dir):
    torch.manual_seed(0)
    config = RewardModelConfig(str(tiny_model_dir), trainable_layers=1, max_length=96, autocast_dtype="bfloat16")
    model = RewardModel.from_backbone(config)
    trainer = RewardModelTrainer(model, AutoTokenizer.from_pretrained(tiny_model_dir),
                                 RewardTrainingConfig(learning_rate=3e-3, epochs=3, batch_rankings=4))
    held_out = synthetic_rankings(32, seed=99)
    before = trainer.evaluate(held_out)
    stats = trainer.train(synthetic_rankings(64, seed=1))
    after = trainer.evaluate(held_out)
    assert stats.pairs == 3 * 64 * 6 and stats.sequences == 3 * 64 * 4  # each completion once per epoch
    assert after.accuracy > 0.8 > before.accuracy, (before, after)
    assert after.loss < before.loss


def test_a_version_stores_the_trained_parameters_and_loads_back_to_the_same_scores(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    config = RewardModelConfig(str(tiny_model_dir), trainable_layers=1, max_length=96, autocast_dtype="float32")
    model = RewardModel.from_backbone(config)
    with torch.no_grad():
        model.reward_head.weight.add_(1.0)
        model.backbone.layers[-1].mlp.up_proj.weight.mul_(1.5)
    names = model.save(tmp_path)
    assert "reward_head.weight" in names and any(n.startswith("backbone.layers.1.") for n in names)
    assert not any(n.startswith("backbone.layers.0.") or "embed_tokens" in n for n in names)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert all(handle.get_tensor(n).dtype == torch.float32 for n in handle.keys())

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt, completions = "<|im_start|>user\nhi<|im_end|>\n", ["short", "a much longer answer"]
    expected = RewardModelTrainer(model, tokenizer).score(prompt, completions)
    torch.manual_seed(1)
    fresh = RewardModel.from_backbone(config)
    fresh.load_stored(tmp_path / "model.safetensors")
    assert RewardModelTrainer(fresh, tokenizer).score(prompt, completions) == expected


def test_the_mean_pooling_covers_exactly_each_completion_and_its_end(tiny_model_dir):
    from training.reward_model import _completion_mean
    from training.reward_trainer import RankingCollator
    from training.rankings import Ranking

    hidden = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)  # row 0: 0..4, row 1: 5..9
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    means = _completion_mean(hidden, attention, attention.sum(dim=1), torch.tensor([2, 3]))
    assert means.squeeze(-1).tolist() == [2.5, 8.0]  # positions 2-3 of row 0 (4 is padding), 7-9 of row 1

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    collator = RankingCollator(tokenizer, max_length=96)
    batch = collator([Ranking("r", "g", "<|im_start|>user\nhi<|im_end|>\n", ["short", "a much longer answer"])])
    for row, completion in enumerate(["short", "a much longer answer"]):
        expected = len(tokenizer(completion, add_special_tokens=False)["input_ids"]) + 1  # and the EOS
        assert int(batch.completion_lengths[row]) == expected


def test_a_last_token_head_and_a_mean_pooled_head_both_train_and_store(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for pooling, width in (("last", 1), ("last+mean", 2)):
        torch.manual_seed(0)
        config = RewardModelConfig(str(tiny_model_dir), trainable_layers=1, max_length=96, autocast_dtype="float32",
                                   pooling=pooling)
        model = RewardModel.from_backbone(config)
        assert model.reward_head.in_features == width * model.backbone.config.hidden_size
        trainer = RewardModelTrainer(model, tokenizer, RewardTrainingConfig(learning_rate=3e-3, epochs=2, batch_rankings=4))
        trainer.train(synthetic_rankings(32, seed=1))
        assert trainer.evaluate(synthetic_rankings(32, seed=99)).accuracy > 0.7, pooling
    try:
        RewardModelConfig(str(tiny_model_dir), pooling="max")
    except ValueError as exc:
        assert "pooling 'max'" in str(exc)
    else:
        raise AssertionError("an unknown pooling was accepted")
