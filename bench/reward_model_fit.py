"""Same-data comparisons of reward-model settings: train each member on a ``bench/loop.py`` data
dir's rankings exactly as a reward-model run splits them (the replay store; held-out groups and
the two members' halves by a hash of the group id), from the backbone and a fresh head, and measure
each on the rankings it never trained on (the held-out groups and the other member's half), as a
run's gate does. Prints a table: setting, each member's accuracy with its 95% interval over
rankings, training seconds; with ``--preference`` also the accuracy a perfect model of that
preference could reach on the same pairs (ties in the preference are broken at random by the users).

    python bench/reward_model_fit.py DATA_DIR [--preference no-hedging] demo trainable_layers=1,epochs=4 ...

Each word is one setting tried: ``name=value`` pairs joined by commas, applied over the demo's
reward-model settings (``flywheel.app.demo.DEMO_DEFAULTS``), the names those of the reward-model
config section without its prefix (``trainable_layers``, ``learning_rate``, ``epochs``,
``pooling``); ``demo`` (the default) is the demo's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.app.demo import DEMO_DEFAULTS  # noqa: E402
from flywheel.app.preferences import PREFERENCES  # noqa: E402
from flywheel.config import ENV_PREFIX, FlywheelConfig  # noqa: E402
from flywheel.contracts.artifacts import REWARD_MODEL_MEMBERS  # noqa: E402
from flywheel.contracts.heldout import is_held_out, reward_model_member  # noqa: E402
from training.rankings import Ranking  # noqa: E402
from training.reward_model import RewardModel  # noqa: E402
from training.reward_model_run import replay_store, reward_model_config, reward_training_config  # noqa: E402
from training.reward_trainer import RewardModelTrainer  # noqa: E402


def parse_setting(word: str) -> dict[str, str]:
    if word == "demo":
        return {}
    pairs = [part.partition("=") for part in word.split(",")]
    if any(not name or not sep for name, sep, _ in pairs):
        raise SystemExit(f"{word!r}: expected name=value[,name=value ...] or demo")
    return {name: value for name, _, value in pairs}


def best_possible(rankings: list[Ranking], preference) -> float:
    """Pairwise accuracy of the preference itself on these rankings: 1 on its decided pairs, 1/2 on its ties."""
    right = total = 0.0
    for ranking in rankings:
        scores = [preference.score(text) for text in ranking.completions]
        for a, b in itertools.combinations(range(len(scores)), 2):
            total += 1
            right += 1.0 if scores[a] > scores[b] else 0.5 if scores[a] == scores[b] else 0.0
    return right / total if total else float("nan")


def reranked(rankings: list[Ranking], preference) -> list[Ranking]:
    """The same groups ranked by ``preference`` as a simulated user would (ties at random, seeded)."""
    rng = random.Random(0)
    out = []
    for ranking in rankings:
        order = preference.rank(ranking.completions, rng)
        out.append(dataclasses.replace(ranking, completions=[ranking.completions[i] for i in order],
                                       completion_ids=[ranking.completion_ids[i] for i in order]
                                       if ranking.completion_ids else []))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--preference", choices=sorted(PREFERENCES))
    parser.add_argument("--rerank", choices=sorted(PREFERENCES),
                        help="rank the stored groups' completions anew by this preference (ties at random, seeded) "
                             "instead of the users' own rankings: one data dir tries every preference")
    parser.add_argument("settings", nargs="*", default=["demo"],
                        help="one word per setting tried: name=value[,name=value ...], or demo")
    args = parser.parse_intermixed_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    base_env = {ENV_PREFIX + name: value for name, value in DEMO_DEFAULTS.items()}
    base_env[ENV_PREFIX + "DATA_DIR"] = str(args.data_dir)
    config = FlywheelConfig.load(environ=base_env | {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)})
    rankings = replay_store(config).load()
    if args.rerank:
        rankings = reranked(rankings, PREFERENCES[args.rerank])
        args.preference = args.rerank
    fraction = config.reward_model.heldout_fraction
    held_out = [r for r in rankings if is_held_out(r.group_id, fraction)]
    train = [r for r in rankings if not is_held_out(r.group_id, fraction)]
    halves = {m: [r for r in train if reward_model_member(r.group_id) == m] for m in REWARD_MODEL_MEMBERS}
    print(f"{len(rankings)} rankings: {len(held_out)} held out, " +
          ", ".join(f"{m} {len(h)}" for m, h in halves.items()))
    if args.preference:
        print(f"a perfect model of {args.preference}: {best_possible(rankings, PREFERENCES[args.preference]):.3f}")

    rows = []
    for overrides in map(parse_setting, args.settings):
        env = base_env | {ENV_PREFIX + "REWARD_MODEL_" + k.upper(): v for k, v in overrides.items()}
        trial = FlywheelConfig.load(environ=env)
        model_config = reward_model_config(trial)
        training = reward_training_config(trial.reward_model)
        figures = []
        for member in REWARD_MODEL_MEMBERS:
            torch.manual_seed(0)
            model = RewardModel.from_backbone(model_config)
            trainer = RewardModelTrainer(model, AutoTokenizer.from_pretrained(model_config.backbone), training)
            started = time.monotonic()
            stats = trainer.train(halves[member])
            seconds = time.monotonic() - started
            others = held_out + [r for m, h in halves.items() if m != member for r in h]
            interval = trainer.evaluate(others).accuracy_interval()
            probe = (f" [probe: {stats.probe.features}, L2 {stats.probe.l2:.2g}, cv {stats.probe.cv_accuracy:.3f}]"
                     if stats.probe else "")
            figures.append(f"{member} {interval.mean:.3f} ({interval.low:.3f}-{interval.high:.3f}) {seconds:.0f} s{probe}")
        label = " ".join(f"{k}={v}" for k, v in overrides.items()) or "the demo's"
        rows.append((label, figures))
        print(f"{label:40s} " + " | ".join(figures), flush=True)
    print("\nsetting                                  accuracy on what it never trained on (95% CI), training time")
    for label, figures in rows:
        print(f"{label:40s} " + " | ".join(figures))


if __name__ == "__main__":
    main()
