"""Benchmark: this reward-model trainer (K-way ranking loss, each completion run once) against the
pairwise baseline (trl's RewardTrainer on the C(K,2) chosen/rejected pairs of each ranking).

Both sides get the same synthetic ranked data (K = 4, "the shorter answer wins"), the same backbone
(the embedded SmolLM2-135M-Instruct unless --model), the same trained parameters (the top
--trainable-layers decoder layers, the final norm and a fresh scalar head), the same max length,
precision, learning rate, optimizer (AdamW), seed and number of epochs over the same rankings; each
is timed over its training loop only (model loading and TRL's dataset preparation excluded). The
held-out accuracy of both is measured by the same code on the same held-out rankings.

    python bench/train_reward.py            # 64 training rankings (384 pairs), 64 held out
    python bench/train_reward.py --quick    # 16 training rankings, one repeat

Each side trains --repeats times, alternately, from the same seed; the best time of each counts
(other processes on a shared machine can slow either phase several-fold). The last line is the
speed ratio: this trainer's pairs/s over the baseline's.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # support.synthetic: the test data builder
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from flywheel.models import resolve_model_path  # noqa: E402
from training.reward_model import RewardModel, RewardModelConfig  # noqa: E402
from training.reward_trainer import RewardModelTrainer, RewardTrainingConfig  # noqa: E402
from support.synthetic import synthetic_rankings  # noqa: E402

BASELINE_PAD = "<|endoftext|>"  # SmolLM2's pad == eos; a distinct pad lets the classifier read the EOS


def pairwise_accuracy(score, rankings) -> float:
    """Fraction of the C(K,2) pairs of each held-out ranking that ``score`` orders as ranked."""
    correct = total = 0
    for ranking in rankings:
        rewards = score(ranking.prompt, ranking.completions)
        for i in range(ranking.k):
            for j in range(i + 1, ranking.k):
                correct += rewards[i] > rewards[j]
                total += 1
    return correct / total


def freeze_all_but_top(layers, trainable_layers: int, model, keep: list) -> None:
    model.requires_grad_(False)
    for module in list(layers)[-trainable_layers:] + keep:
        module.requires_grad_(True)


def run_ours(args, model_path: Path, train, held):
    config = RewardModelConfig(str(model_path), trainable_layers=args.trainable_layers, max_length=args.max_length,
                               autocast_dtype=args.precision)
    torch.manual_seed(args.seed)
    model = RewardModel.from_backbone(config)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trainer = RewardModelTrainer(model, tokenizer, RewardTrainingConfig(
        learning_rate=args.lr, batch_rankings=args.batch_rankings, epochs=args.epochs, seed=args.seed,
        max_grad_norm=1.0, log_every_seconds=30))
    stats = trainer.train(train)
    print(f"flywheel: trained in {stats.seconds:.1f} s", flush=True)
    accuracy = pairwise_accuracy(trainer.score, held)
    return {
        "what": (f"RewardModelTrainer: {len(train)} rankings x {args.epochs} epoch(s), batch {args.batch_rankings} "
                 f"rankings (= {args.batch_rankings * args.k} sequences per forward, each completion once), "
                 f"{stats.steps} steps, {model.trainable_parameter_count() / 1e6:.1f} M trained parameters, "
                 f"frozen parameters in {'bfloat16' if model.compute_dtype is not None else 'float32'}"),
        "pairs": stats.pairs, "seconds": stats.seconds, "accuracy": accuracy, "loss": stats.loss,
    }


def run_baseline(args, model_path: Path, train, held):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    rows = [{"prompt": r.prompt, "chosen": r.completions[i], "rejected": r.completions[j]}
            for r in train for i in range(r.k) for j in range(i + 1, r.k)]
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    freeze_all_but_top(model.model.layers, args.trainable_layers, model, [model.model.norm, model.score])
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.baseline_frozen_bf16:  # give the baseline this trainer's trick too (not what trl does by itself)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(
            output_dir=out, per_device_train_batch_size=args.baseline_batch_pairs, num_train_epochs=args.epochs,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            max_length=args.max_length, gradient_checkpointing=False, bf16=args.precision == "bfloat16",
            use_cpu=True, report_to=[], save_strategy="no", logging_steps=10, seed=args.seed,
            pad_token=BASELINE_PAD, dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer)
        started = time.monotonic()
        result = trainer.train()
        seconds = time.monotonic() - started
    print(f"baseline: trained in {seconds:.1f} s", flush=True)
    model.eval()
    pad_id = tokenizer.convert_tokens_to_ids(BASELINE_PAD)

    @torch.inference_mode()
    def score(prompt, completions):
        ids = [tokenizer(prompt + c + tokenizer.eos_token, add_special_tokens=False)["input_ids"][-args.max_length:]
               for c in completions]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(x) for x in ids])[:, None]).long()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bfloat16"):
            return model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()

    accuracy = pairwise_accuracy(score, held)
    steps = math.ceil(len(rows) / args.baseline_batch_pairs) * args.epochs
    return {
        "what": (f"trl {__import__('trl').__version__} RewardTrainer: {len(rows)} chosen/rejected pairs x "
                 f"{args.epochs} epoch(s), batch {args.baseline_batch_pairs} pairs (= "
                 f"{2 * args.baseline_batch_pairs} sequences per forward), {steps} steps, "
                 f"{trained / 1e6:.1f} M trained parameters, gradient checkpointing off, frozen parameters in "
                 f"{'bfloat16' if args.baseline_frozen_bf16 else 'float32 (autocast casts them each forward)'}"),
        "pairs": len(rows) * args.epochs, "seconds": seconds, "accuracy": accuracy,
        "loss": float(result.training_loss),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF causal-LM folder; empty = embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", default=str(ROOT / ".flywheel"))
    parser.add_argument("--rankings", type=int, default=64, help="training rankings (each gives C(K,2) pairs)")
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--trainable-layers", type=int, default=4)
    parser.add_argument("--batch-rankings", type=int, default=1,
                        help="this trainer: rankings per step (1 ranking = C(K,2) = 6 pairs, vs the baseline's 8)")
    parser.add_argument("--baseline-batch-pairs", type=int, default=8, help="baseline: pairs per step")
    parser.add_argument("--precision", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--baseline-frozen-bf16", action="store_true",
                        help="also hold the baseline's frozen parameters in bfloat16 (as this trainer does)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; the median time counts")
    parser.add_argument("--quick", action="store_true", help="16 training rankings, 16 held out")
    args = parser.parse_args(argv)
    if args.quick:
        args.rankings, args.heldout, args.repeats = 16, 16, 1
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = resolve_model_path(args.model, Path(args.data_dir))
    train = synthetic_rankings(args.rankings, k=args.k, seed=args.seed + 1)
    held = synthetic_rankings(args.heldout, k=args.k, seed=args.seed + 1000)
    print(f"backbone {model_path.name}, K={args.k}, {len(train)} training rankings "
          f"({len(train) * math.comb(args.k, 2)} pairs), {len(held)} held-out rankings, max_length {args.max_length}, "
          f"{args.precision}, lr {args.lr}, {torch.get_num_threads()} threads", flush=True)
    # A B A B ...: each repeat trains a fresh model from the same seed; the median run of each side
    # counts, so one burst of load from other processes on the machine does not decide the ratio.
    runs: dict[str, list[dict]] = {"flywheel": [], "baseline": []}
    for _ in range(args.repeats):
        runs["flywheel"].append(run_ours(args, model_path, train, held))
        runs["baseline"].append(run_baseline(args, model_path, train, held))
    ours, baseline = (sorted(runs[name], key=lambda r: r["seconds"])[(len(runs[name]) - 1) // 2]
                      for name in ("flywheel", "baseline"))
    for name, r in (("flywheel", ours), ("baseline", baseline)):
        times = ", ".join(f"{x['seconds']:.1f}" for x in runs[name])
        print(f"{name}: {r['what']}")
        print(f"{name}: {r['pairs']} pairs in {r['seconds']:.1f} s (median of {times}) = "
              f"{r['pairs'] / r['seconds']:.2f} pairs/s, train loss {r['loss']:.4f}, "
              f"held-out pairwise accuracy {r['accuracy']:.3f}", flush=True)
    ratio = (ours["pairs"] / ours["seconds"]) / (baseline["pairs"] / baseline["seconds"])
    print(f"speed ratio (flywheel pairs/s / baseline pairs/s): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
