"""Where one engine decode step's time goes, at 1, 16 and 64 rows (issue 13's per-step profile).

On the served model (the embedded SmolLM2-135M-Instruct unless ``--model``), through the engine's
own ``ModelRunner``: prompts are prefilled into one running batch of R rows, then each step is
timed in its parts, each the median of ``--steps`` steps:

- the model's forward (``Batch.forward_step``: masks, positions, the 30 decoder layers, the LM head),
  split by ``torch.profiler`` into matmuls, attention, other operators and the time outside any
  operator (Python, module calls, dispatch: the fixed cost of a step), against the baseline in the
  same run: the same step through transformers' forward (``Batch.transformers_step``), which the
  engine ran before the lean decode step (``serving.decode_step``);
- sampling (``serving.sampling.sample_tokens``) for greedy rows, temperature 0.8, and top-p 0.95
  (the demo's users), against the baseline in the same run: the same rule computed with a full sort
  of the vocabulary, which sampling did before.

    python bench/step.py [--rows 1 16 64] [--steps 20] [--prompt-tokens 40] [--dtype auto] [--quantize int4]
                         [--device cuda]

On a GPU (``--device cuda``) each timed step ends with ``torch.cuda.synchronize()`` and the
operator split (a CPU profile) is left out; the tok/s column is rows per step time either way.

The last lines are the ratios: top-p sampling at the largest row count, full sort / now, and the
decode step at each row count, transformers' forward / the lean step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flywheel.models import load_model  # noqa: E402
from serving.model_runner import ModelRunner  # noqa: E402
from serving.quantize import QUANTIZE_SCHEMES, quantized  # noqa: E402
from serving.sampling import nucleus_pick, sample_tokens  # noqa: E402


def full_sort_sampling(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor,
                       uniforms: torch.Tensor) -> torch.Tensor:
    """The baseline: top-p through a sort of every row's whole vocabulary (the same pick after it)."""
    probs = torch.softmax(logits.float() / temperatures.unsqueeze(1), dim=-1)
    ranked, order = torch.sort(probs, dim=-1, descending=True)
    torch.log_softmax(logits.float(), dim=-1)  # the reported log-probabilities, as before
    return nucleus_pick(ranked, order, top_ps, uniforms.unsqueeze(1))


def median_ms(function, steps: int, device: torch.device = torch.device("cpu")) -> float:
    """The median wall time of ``function`` in ms; on a GPU, until its kernels are done."""
    def timed() -> float:
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started
    timed()  # warm-up
    return statistics.median(timed() for _ in range(steps)) * 1000


def running_batch(runner: ModelRunner, rows: int, prompt_tokens: int, vocab: int):
    batch = runner.current
    batch.clear()
    generator = torch.Generator().manual_seed(rows)
    prompts = [(torch.randint(100, vocab - 1, (prompt_tokens,), generator=generator).tolist(), 1) for _ in range(rows)]
    with torch.inference_mode():
        prefill = batch.prefill(prompts)
        batch.add([prefill], list(range(rows)), prefill.logits.argmax(dim=-1), [prompt_tokens + 1024] * rows)
    return batch


def operator_shares(batch, forward_ms: float, steps: int = 3) -> str:
    """The forward's time by kind of operator (self time of the aten operators), and what is spent
    outside any operator (Python, module calls, dispatch): the step's fixed cost."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            batch.forward_step()
    groups = {"matmul": 0.0, "attention": 0.0, "other ops": 0.0}
    for event in prof.key_averages():
        if event.key.startswith("aten::") and event.self_cpu_time_total:
            name = event.key
            group = ("matmul" if any(k in name for k in ("mm", "linear", "matmul", "addmm")) else
                     "attention" if "attention" in name or "softmax" in name else "other ops")
            groups[group] += event.self_cpu_time_total
    per_step = {k: v / steps / 1000 for k, v in groups.items()}  # ms
    outside = max(forward_ms - sum(per_step.values()), 0.0)
    return ", ".join(f"{k} {v:.1f} ms" for k, v in per_step.items()) + f", outside operators {outside:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_SCHEMES,
                        help="the served weights (serving.quantize; up to 8 rows decode from them)")
    parser.add_argument("--model", default="", help="model folder; default the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", default=str(ROOT / ".flywheel"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (as FLYWHEEL_DEVICE)")
    args = parser.parse_args(argv)

    loaded = load_model(args.model, Path(args.data_dir), args.dtype, args.device)
    vocab = loaded.model.config.vocab_size
    runner = ModelRunner(quantized(loaded.model, args.quantize))
    device = runner.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"model {loaded.path.name}  dtype {loaded.dtype}  quantize {args.quantize}  device {device} ({where})  "
          f"prompt {args.prompt_tokens} tokens, {args.steps} steps per figure (medians)")
    if runner.current.decoder is None:
        print("the lean decode step does not cover this model: both forward columns are transformers'")
    print(f"{'rows':>5} {'forward':>10} {'tok/s':>7} {'transformers':>13} {'greedy':>9} {'T=0.8':>9} "
          f"{'top-p now':>10} {'top-p sort':>11}  forward's operators")
    ratio, step_ratios = None, []
    for rows in args.rows:
        batch = running_batch(runner, rows, args.prompt_tokens, vocab)
        length = batch.cache.length

        def rewound(step):  # each timed step decodes the same column again: the cache does not grow
            def run():
                for layer in batch.cache.layers:
                    layer.length = length
                return step()
            return run

        with torch.inference_mode():
            forward = median_ms(rewound(batch.forward_step), args.steps, device)
            transformers_forward = median_ms(rewound(batch.transformers_step), args.steps, device)
            logits = rewound(batch.forward_step)()
        uniforms = torch.rand(rows, generator=torch.Generator().manual_seed(0))
        ones, hot, nucleus = torch.ones(rows), torch.full((rows,), 0.8), torch.full((rows,), 0.95)
        greedy = median_ms(lambda: sample_tokens(logits, torch.zeros(rows), ones, uniforms), args.steps)
        sampled = median_ms(lambda: sample_tokens(logits, hot, ones, uniforms), args.steps)
        top_p = median_ms(lambda: sample_tokens(logits, hot, nucleus, uniforms), args.steps)
        baseline = median_ms(lambda: full_sort_sampling(logits, hot, nucleus, uniforms), args.steps)
        shares = operator_shares(batch, forward) if device.type == "cpu" else "-"
        print(f"{rows:>5} {forward:>8.1f}ms {rows * 1000 / forward:>7.0f} {transformers_forward:>11.1f}ms "
              f"{greedy:>7.2f}ms {sampled:>7.2f}ms {top_p:>8.2f}ms {baseline:>9.2f}ms  {shares}")
        ratio = baseline / top_p
        step_ratios.append(f"{rows} rows {transformers_forward / forward:.2f}x")
    print(f"top-p sampling at {args.rows[-1]} rows, full sort / now: {ratio:.1f}x")
    print(f"decode step, transformers' forward / the lean step: {', '.join(step_ratios)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
