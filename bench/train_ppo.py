"""Benchmark: one PPO iteration by this trainer against trl's PPO trainer (``trl.experimental.ppo``,
trl==1.12.0, the last release that has it).

Both sides get the same model (the embedded SmolLM2-135M-Instruct unless --model), the same 64
chat-rendered prompts (token ids), responses of up to 48 tokens stopped at EOS, 4 PPO epochs over
minibatches of 8 episodes (8 optimizer steps per epoch), the same β, clip ranges, γ, λ, learning
rate, and the same reward model: the model's own transformer with a fresh scalar head (seeded),
the head's weights handed to the baseline's ``AutoModelForSequenceClassification``. Model loading
is excluded; the timed part is one full iteration (generation, scoring, reference and value
passes, GAE, the 4 update epochs).

How they differ is the point of the design: the baseline trains the full policy and a separate
full value model in float32 (trl's CPU setting), with a second copy of the policy as π_ref; this
trainer trains LoRA adapters and a value head that share the frozen backbone (one forward gives
logits and values; π_ref = the adapters disabled), under a bfloat16 autocast where the CPU has
native bfloat16.

trl 1.12 conflicts with the trl the reward bench uses, so the baseline runs in its own venv
(``make bench-venv`` → .venv-trl112) as a subprocess of this script and reports JSON on stdout.

    python bench/train_ppo.py               # both sides; the last line is ours / baseline seconds
    python bench/train_ppo.py --skip-baseline
    python bench/train_ppo.py --device cuda # ours on the GPU against ours on the CPU (no trl there)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_VENV = ROOT / ".venv-trl112"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOPICS = ["the water cycle", "photosynthesis", "how a bicycle works", "why the sky is blue", "volcanoes",
          "the printing press", "how bread rises", "the Moon's phases", "recycling", "sleep", "fractions", "glaciers",
          "vaccines", "sound waves", "budgeting", "bees and pollination"]
ASKS = ["Explain {} in two sentences.", "Give me one surprising fact about {}.", "Write a short question a child might "
        "ask about {}.", "Summarize {} for a busy reader."]


def bench_prompts(count: int) -> list[str]:
    return [ASKS[i % len(ASKS)].format(TOPICS[(i // len(ASKS)) % len(TOPICS)]) for i in range(count)]


# ---------------------------------------------------------------- baseline (runs in .venv-trl112)
def run_baseline(spec_path: str) -> None:
    """trl's PPOTrainer for one iteration; prints one JSON line."""
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    tokenizer.pad_token = "<|endoftext|>"  # pad == eos in SmolLM2; trl masks on the pad id
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
    head = load_file(spec["reward_head"])
    with torch.no_grad():
        reward_model.score.weight.copy_(head["reward_head.weight"])
    for model in (policy, ref_policy, value_model, reward_model):
        model.config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    dataset = Dataset.from_dict({"input_ids": spec["prompt_token_ids"]})
    config = PPOConfig(
        output_dir=spec["output_dir"], bf16=False, use_cpu=True, report_to=[], save_strategy="no",
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=spec["batch_size"] // spec["mini_batch_size"], total_episodes=spec["batch_size"],
        local_rollout_forward_batch_size=spec["batch_size"], num_ppo_epochs=spec["ppo_epochs"],
        response_length=spec["response_length"], stop_token="eos", temperature=spec["temperature"],
        learning_rate=spec["learning_rate"], kl_coef=spec["kl_coef"], cliprange=spec["cliprange"],
        cliprange_value=spec["cliprange_value"], vf_coef=spec["vf_coef"], gamma=spec["gamma"], lam=spec["lam"],
        num_sample_generations=0, logging_steps=1, seed=spec["seed"], dataloader_num_workers=0,
        gradient_checkpointing=False)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model)
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    logged = [entry for entry in trainer.state.log_history if "objective/scores" in entry]
    last = logged[-1] if logged else {}
    trainable = sum(p.numel() for m in (policy, value_model) for p in m.parameters() if p.requires_grad)
    print(json.dumps({
        "seconds": seconds, "mean_score": last.get("objective/scores"), "kl": last.get("objective/kl"),
        "what": (f"trl {__import__('trl').__version__} PPOTrainer: 1 iteration of {spec['batch_size']} episodes, "
                 f"4 models (policy, π_ref copy, value model, reward model), float32, full fine-tuning of policy "
                 f"and value model ({trainable / 1e6:.1f} M trained parameters), {spec['ppo_epochs']} epochs x "
                 f"{config.num_mini_batches} minibatches of {spec['mini_batch_size']}, rollout forward batch "
                 f"{spec['batch_size']}, gradient checkpointing off"),
    }))


# ---------------------------------------------------------------- this trainer
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF causal-LM folder; default the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", default=str(ROOT / ".flywheel"))
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--mini-batch-size", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--precision", default="auto", help="our autocast: bfloat16, float32 or auto")
    parser.add_argument("--lora-layers", type=int, default=8, help="our adapters on the top N layers; -1 = all")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads on both sides; 0 = torch's default (all cores). On a shared machine "
                             "1 avoids OpenMP threads spinning against other jobs")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--device", default="cpu",
                        help="where ours trains (cpu, cuda, auto); on a GPU the baseline is ours on the CPU")
    parser.add_argument("--baseline-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        run_baseline(args.baseline_worker)
        return 0

    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from flywheel.contracts.prompts import render_prompt
    from flywheel.models import resolve_compute_dtype, resolve_device, resolve_model_path
    from training.policy_model import PolicyModelConfig, PolicyWithValueHead, Prompt
    from training.policy_reward import RewardModelScorer
    from training.ppo import PPOConfig, PPOTrainer
    from training.reward_model import RewardModel, RewardModelConfig

    device = resolve_device(args.device)
    precision = resolve_compute_dtype(args.precision, device)
    model_path = resolve_model_path(args.model, Path(args.data_dir))
    config = PPOConfig(batch_size=args.episodes, mini_batch_size=args.mini_batch_size, rollout_batch_size=args.episodes,
                       ppo_epochs=args.ppo_epochs, response_length=args.response_length, learning_rate=3e-6, seed=0)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}; torch threads {torch.get_num_threads()} on both sides", flush=True)

    def one_iteration(on: torch.device, autocast: str):
        """(seconds, stats, policy, reward model) of one PPO iteration of ours on ``on``."""
        torch.manual_seed(0)
        reward_model = RewardModel.from_backbone(RewardModelConfig(str(model_path), trainable_layers=0,
                                                                   autocast_dtype=autocast), on)
        reward_model.requires_grad_(False)
        policy = PolicyWithValueHead.from_pretrained(PolicyModelConfig(str(model_path), autocast_dtype=autocast,
                                                                       lora_layers=args.lora_layers), on)
        prompts = [Prompt(*render_prompt(policy.tokenizer, text)) for text in bench_prompts(args.episodes)]
        trainer = PPOTrainer(policy, RewardModelScorer(reward_model, eos_id=policy.eos_id, pad_id=policy.pad_id),
                             config)
        started = time.monotonic()
        stats = trainer.step(prompts)
        if on.type == "cuda":
            torch.cuda.synchronize(on)
        return time.monotonic() - started, stats, policy, reward_model, prompts, trainer

    if device.type == "cuda":
        one_iteration(device, precision)  # a warm-up: CUDA's context, cuBLAS and the kernels load once
    ours_seconds, stats, policy, reward_model, prompts, trainer = one_iteration(device, precision)
    steps = config.ppo_epochs * config.batch_size // config.mini_batch_size
    layers = len(policy.body.layers)
    adapted = layers - policy.frozen_layers
    print(f"flywheel: PPOTrainer, 1 iteration of {config.batch_size} episodes, LoRA r={policy.config.lora_rank} on "
          f"the top {adapted} of {layers} layers of the frozen base (bottom {policy.frozen_layers} computed once per "
          f"rollout), {policy.trainable_parameter_count() / 1e6:.2f} M trained parameters incl. the value head, "
          f"value head sharing the policy's backbone, π_ref = adapters disabled, {precision} autocast on {device}, "
          f"{config.ppo_epochs} epochs x {config.batch_size // config.mini_batch_size} minibatches of "
          f"{config.mini_batch_size} ({steps} optimizer steps), one batched KV-cached generation of "
          f"{config.batch_size}: {ours_seconds:.1f} s (rollout {stats.rollout_seconds:.1f} s), mean score "
          f"{stats.mean_score:.4f}, KL {stats.kl_to_ref:.4f}, mean response {stats.response_length:.1f} tokens",
          flush=True)
    baseline_seconds = None
    if device.type != "cpu" and not args.skip_baseline:  # trl's venv is a CPU machine's: ours on the CPU instead
        del policy, trainer, reward_model
        cpu_precision = resolve_compute_dtype(args.precision, "cpu")
        cpu_seconds, cpu_stats, *_ = one_iteration(torch.device("cpu"), cpu_precision)
        print(f"baseline: the same iteration on the CPU ({torch.get_num_threads()} threads, {cpu_precision}): "
              f"{cpu_seconds:.1f} s (rollout {cpu_stats.rollout_seconds:.1f} s)")
        print(f"load average after: {os.getloadavg()}")
        print(f"flywheel PPO on {device}: {ours_seconds:.1f} s per iteration; on the CPU: {cpu_seconds:.1f} s")
        print(f"ratio (CPU / {device} seconds per iteration): {cpu_seconds / ours_seconds:.2f}")
        return 0
    if not args.skip_baseline:
        python = BASELINE_VENV / "bin" / "python"
        if not python.exists():
            print(f"{python} is missing: run `make bench-venv`", file=sys.stderr)
            return 2
        del policy, trainer, reward_model.backbone
        with tempfile.TemporaryDirectory() as tmp:
            head = Path(tmp) / "reward_head.safetensors"
            save_file({"reward_head.weight": reward_model.reward_head.weight.detach().float().contiguous()}, str(head))
            spec = {"model": str(model_path), "reward_head": str(head), "output_dir": str(Path(tmp) / "out"),
                    "prompt_token_ids": [list(p.token_ids) for p in prompts], "batch_size": config.batch_size,
                    "mini_batch_size": config.mini_batch_size, "ppo_epochs": config.ppo_epochs,
                    "response_length": config.response_length, "temperature": config.temperature,
                    "learning_rate": config.learning_rate, "kl_coef": config.kl_coef, "cliprange": config.cliprange,
                    "cliprange_value": config.cliprange_value, "vf_coef": config.vf_coef, "gamma": config.gamma,
                    "lam": config.lam, "seed": config.seed, "threads": torch.get_num_threads()}
            (Path(tmp) / "spec.json").write_text(json.dumps(spec))
            env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1")
            done = subprocess.run([str(python), __file__, "--baseline-worker", str(Path(tmp) / "spec.json")],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                return 1
            baseline = json.loads(done.stdout.strip().splitlines()[-1])
        baseline_seconds = baseline["seconds"]
        print(f"baseline: {baseline['what']}: {baseline_seconds:.1f} s, mean score {baseline['mean_score']}, "
              f"KL {baseline['kl']}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(f"flywheel PPO: {ours_seconds:.1f} s per iteration")
    if baseline_seconds is not None:
        print(f"trl PPOTrainer: {baseline_seconds:.1f} s per iteration")
        print(f"ratio (flywheel / trl seconds per iteration): {ours_seconds / baseline_seconds:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
