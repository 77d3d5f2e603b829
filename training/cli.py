"""``flywheel train reward-model`` and ``flywheel reward-models``; the policy commands are in
``training.policy_cli``."""

from __future__ import annotations

import argparse
import json
import time

from flywheel.cli import add_settings_flags, settings_from_args
from flywheel.tables import format_table

RUN_SETTINGS = ["data_dir", "model", "redis_url", "reward_model_backbone", "reward_model_max_rankings",
                "reward_model_heldout_fraction", "reward_model_accuracy_margin", "reward_model_replay_ratio",
                "reward_model_ai_weight", "reward_model_learning_rate", "reward_model_batch_rankings",
                "reward_model_epochs", "reward_model_max_length", "reward_model_trainable_layers",
                "reward_model_autocast"]


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="start a training run")
    train_sub = train.add_subparsers(dest="train_command", metavar="WHAT")
    reward = train_sub.add_parser(
        "reward-model", help="train the reward model on the rankings that arrived since the last run",
        description="Enqueue a reward-model run on the Celery training queue and wait for it, or run it in "
                    "this process with --local.")
    reward.add_argument("--local", action="store_true", help="run in this process instead of a Celery worker")
    reward.add_argument("--min-rankings", type=int, default=1, help="skip unless this many rankings wait")
    reward.add_argument("--no-wait", action="store_true", help="enqueue and return (Celery mode)")
    reward.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for the Celery run")
    add_settings_flags(reward, RUN_SETTINGS)
    reward.set_defaults(handler=train_reward_model_command)
    train.set_defaults(handler=lambda args: train.print_help() or 2)

    versions = subparsers.add_parser("reward-models", help="list the reward-model versions")
    versions.add_argument("--rebuild", action="store_true", help="rebuild the registry in Redis from the manifests")
    versions.add_argument("--json", action="store_true", help="print the records as JSON")
    add_settings_flags(versions, ["data_dir", "redis_url"])
    versions.set_defaults(handler=reward_models_command)

    from training import policy_cli

    policy_cli.register(subparsers, train_sub)


def train_reward_model_command(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.local:
        from flywheel.redis_server import redis_connection
        from training.reward_model_run import run_reward_model_training

        with redis_connection(settings.redis_url, settings.data_dir) as client:
            report = run_reward_model_training(settings, client, min_rankings=args.min_rankings, who="cli")
        print(json.dumps(report.to_dict(), indent=2))
        return 0

    from flywheel.celery_app import make_celery

    celery = make_celery(settings=settings)
    result = celery.send_task("training.train_reward_model", kwargs={"min_rankings": args.min_rankings, "who": "cli"},
                              queue="training")
    print(f"enqueued reward-model run {result.id}")
    if args.no_wait:
        return 0
    started = time.monotonic()
    report = result.get(timeout=args.timeout, interval=1.0)
    print(json.dumps(report, indent=2))
    print(f"finished in {time.monotonic() - started:.0f} s")
    return 0


def format_versions_table(records, current: int) -> str:
    header = ("version", "status", "parent", "created (UTC)", "rankings", "new/replay", "human/ai",
              "held-out acc", "held-out loss", "train loss", "stream range")
    rows = []
    for r in records:
        m, f = r.manifest, r.figures
        used = m.get("rankings", {})
        stream = used.get("stream", {})

        def num(value, digits=4):
            return "-" if value is None else f"{value:.{digits}f}"

        rows.append((
            f"v{r.version}" + (" *" if r.version == current else ""), r.status,
            f"v{r.parent}" if r.parent else "-",
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_at)), str(used.get("count", "-")),
            f"{used.get('new', '-')}/{used.get('replayed', '-')}", f"{used.get('human', '-')}/{used.get('ai', '-')}",
            num(f.get("heldout_accuracy")), num(f.get("heldout_loss")), num(f.get("training_loss")),
            f"{stream.get('first_id', '')}..{stream.get('last_id', '')}",
        ))
    return format_table(header, rows)


def reward_models_command(args: argparse.Namespace) -> int:
    from flywheel.contracts.artifacts import REWARD_MODEL_KIND
    from flywheel.redis_server import redis_connection
    from flywheel.registry import open_registry

    settings = settings_from_args(args)
    with redis_connection(settings.redis_url, settings.data_dir) as client:
        registry = open_registry(client, settings.data_dir, REWARD_MODEL_KIND)
        if args.rebuild:
            print(f"rebuilt {registry.rebuild_from_disk(who='cli')} versions from {registry.root_dir}")
        records = registry.versions()
        if args.json:
            print(json.dumps([r.manifest for r in records], indent=2))
        elif not records:
            print("no reward-model versions yet")
        else:
            print(format_versions_table(records, registry.current_version()))
    return 0
