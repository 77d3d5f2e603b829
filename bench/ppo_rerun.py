"""Same-data comparisons of PPO settings: rerun the policy run in-process on a ``bench/loop.py``
data dir (its current reward model and served prompts, the demo's loop settings plus the given
settings), then let v0 and the candidate answer the 64 questions no user asked (4 samples each at
temperature 0.8, the same seeds for both) and compare them under the preference: win rate and
length-controlled win rate with bootstrap 95% CIs, median lengths, the gate's outcome.

    python bench/ppo_rerun.py DATA_DIR PREFERENCE [setting=value ...]
    python bench/ppo_rerun.py .flywheel/bench-loop/no-hedging no-hedging policy_learning_rate=3e-4

It writes a new (promoted or rejected) policy version into DATA_DIR's registry: copy the folder
first (``cp -a``) to compare several settings from the same start. Prints one JSON line.

The run starts from v0 (a loop bench ends with its promoted version current: it is rolled back,
and promotion resumed), and the stored groups of the evaluation questions are deleted first (a
data dir from before evaluation traffic was sent with ``store=False`` has them: PPO would train on
the very questions it is compared on).
"""
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if len(sys.argv) < 3:
    raise SystemExit(__doc__)
data_dir = Path(sys.argv[1]).resolve()
preference_name = sys.argv[2]
overrides = dict(a.split("=", 1) for a in sys.argv[3:])
from flywheel.app.demo import DEMO_DEFAULTS
from flywheel.config import FlywheelConfig
from flywheel.redis_server import open_redis
from flywheel.app.preferences import PREFERENCES, win_rate
from flywheel.app import simulated_users as simulated
from flywheel.contracts.prompts import render_prompt
from training.policy_model import Prompt
from flywheel.contracts.artifacts import POLICY_KIND
from flywheel.contracts.groups import CompletionGroup
from flywheel.contracts.keys import group_key
from flywheel.group_store import GroupStore
from flywheel.registry import open_registry
from training.policy_run import PolicyModelCache, run_policy_training

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the run's progress, on stderr
env = {f"FLYWHEEL_{k}": v for k, v in DEMO_DEFAULTS.items()}
model = str(data_dir.parent / "models" / "SmolLM2-135M-Instruct")
config = FlywheelConfig.load({"data_dir": data_dir, "model": model} | overrides, environ=env)
client, server = open_redis(config.redis_url, data_dir)
registry = open_registry(client, data_dir, POLICY_KIND)
if registry.current_version():
    registry.rollback(0, "ppo_rerun", "rerun from v0")
    registry.resume("ppo_rerun", "rerun from v0")
from transformers import AutoTokenizer
_, eval_questions = simulated.evaluation_split(simulated.question_pool())
eval_prompts = {render_prompt(AutoTokenizer.from_pretrained(model), q)[0] for q in eval_questions}
leaked = [g.group_id for g in map(CompletionGroup.from_json, GroupStore(client).all_records()) if g.prompt in eval_prompts]
if leaked:
    client.delete(*[group_key(g) for g in leaked])
print(f"deleted {len(leaked)} stored groups of evaluation questions", file=sys.stderr, flush=True)
cache = PolicyModelCache()
started = time.monotonic()
report = run_policy_training(config, client, who="rerun", cache=cache)
seconds = time.monotonic() - started
policy = cache.loaded_policy  # the policy the run just trained
tok = policy.tokenizer
prompts = [Prompt(*render_prompt(tok, q)) for q in eval_questions]

def answers(reference: bool) -> dict:
    """question -> 4 answers, of v0 (the adapters off) or of the candidate."""
    out = {q: [] for q in eval_questions}
    for j in range(4):
        gen = torch.Generator().manual_seed(7000 + j)
        ctx = policy.lm.disable_adapter() if reference else torch.no_grad()
        with ctx:
            _, _, responses, mask = policy.generate(prompts, 64, 0.8, generator=gen)
        for q, row, n in zip(eval_questions, responses, mask.sum(dim=1)):
            ids = [t for t in row[:int(n)].tolist() if t != policy.eos_id]
            out[q].append(tok.decode(ids, skip_special_tokens=True))
    return out

before, after = answers(True), answers(False)
pref = PREFERENCES[preference_name]
rate = win_rate(after, before, pref); lc = win_rate(after, before, pref, length_tolerance=0.2)
med = lambda a: statistics.median(len(t.strip()) for ts in a.values() for t in ts)
print(json.dumps({"overrides": overrides, "outcome": report.outcome, "reason": report.reason[:300],
                  "win": None if rate is None else [round(rate.rate, 3), round(rate.low, 3), round(rate.high, 3)],
                  "lc": None if lc is None else [round(lc.rate, 3), round(lc.low, 3), round(lc.high, 3), lc.pairs],
                  "chars": [med(before), med(after)], "run_seconds": round(seconds)}), flush=True)
client.close()
if server is not None:
    server.stop()
