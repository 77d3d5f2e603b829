"""``flywheel train reward-model|policy``, ``flywheel reward-models``, ``flywheel policies``,
``flywheel promote`` and ``flywheel rollback``: the training runs and the two registries, from a
terminal.

A run goes to the Celery training queue by task name (this process loads no training code), or
runs here with ``--local``. ``flywheel policies export N DIR`` writes a version as a plain Hugging
Face folder (``flywheel.app.policy_export``). The two listings share one table: the version (the current one
starred), then each registry's own columns.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time

from flywheel.app.tables import CREATED, PARENT, STATUS, Column, figure_column, format_registry_table
from flywheel.config import FlywheelConfig, PolicyRunConfig, RewardModelRunConfig, add_config_flags, config_from_args
from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND


def _rankings_used(record) -> dict:
    return record.manifest.get("rankings", {})


def _stream_range(record) -> str:
    stream = _rankings_used(record).get("stream", {})
    return f"{stream.get('first_id', '')}..{stream.get('last_id', '')}"


REWARD_MODEL_COLUMNS = (
    STATUS, PARENT, CREATED,
    Column("rankings", lambda r: str(_rankings_used(r).get("count", "-"))),
    Column("new/replay", lambda r: f"{_rankings_used(r).get('new', '-')}/{_rankings_used(r).get('replayed', '-')}"),
    Column("human/ai", lambda r: f"{_rankings_used(r).get('human', '-')}/{_rankings_used(r).get('ai', '-')}"),
    figure_column("held-out acc", "heldout_accuracy"),
    figure_column("acc low (95%)", "policy_accuracy_low"),
    figure_column("judge acc", "judge_heldout_accuracy"),
    figure_column("judge low (95%)", "judge_accuracy_low"),
    figure_column("held-out loss", "heldout_loss"),
    figure_column("train loss", "training_loss"),
    Column("stream range", _stream_range),
)

POLICY_COLUMNS = (
    STATUS, PARENT,
    Column("reward model", lambda r: f"v{r.manifest.get('reward_model_version', '-')}"),
    Column("format", lambda r: str(r.manifest.get("format", "-"))),
    figure_column("judge gain", "reward_gain"),
    figure_column("gain low (97.5%)", "reward_gain_low"),
    figure_column("users' verdict", "users_verdict"),
    figure_column("verdict low", "users_verdict_low"),
    figure_column("PPO member gain", "policy_member_gain"),
    figure_column("KL to ref", "kl_to_ref", digits=3),
    figure_column("ppl ratio", "perplexity_ratio"),
    CREATED,
)


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="start a training run",
                                  description="Start a reward-model or a PPO run, on the Celery training queue or here.")
    train_sub = train.add_subparsers(dest="train_command", metavar="WHAT")
    reward = add_run_command(
        train_sub, "reward-model", "train the reward model on the rankings that arrived since the last run",
        "Enqueue a reward-model run on the Celery training queue and wait for it, or run it in this process with "
        "--local.", RewardModelRunConfig, train_reward_model_command, hours=6)
    reward.add_argument("--min-rankings", type=int, default=1,
                        help="skip the run unless this many rankings wait (default 1)")
    train.set_defaults(handler=lambda args: train.print_help() or 2)

    add_listing(subparsers, "reward-models", "reward-model", "status, parent, rankings used, held-out accuracy and "
                "loss", reward_models_command)

    add_run_command(
        train_sub, "policy", "improve the policy with PPO against the current reward model",
        "Enqueue a PPO run on the Celery training queue and wait for it, or run it in this process with --local. "
        "The candidate is promoted if it passes the evaluation gate.", PolicyRunConfig, train_policy_command,
        hours=12)

    policies = add_listing(subparsers, "policies", "policy", "v0 is the base model; status, parent, reward model, "
                           "gate figures", policies_command)
    policies_sub = policies.add_subparsers(dest="policies_command", metavar="COMMAND")
    export = policies_sub.add_parser(
        "export", help="write a policy version as a plain Hugging Face model folder",
        description="Write policy version N as a Hugging Face folder (merged weights in safetensors, config, "
                    "tokenizer, a model card with its lineage) that transformers and vLLM load as it is.")
    export.add_argument("version", type=int, help="the policy version (0 = the base model)")
    export.add_argument("directory", help="the folder to write (must not exist, or be empty)")
    add_config_flags(export, FlywheelConfig)
    export.set_defaults(handler=export_policy_command)

    promote = subparsers.add_parser(
        "promote", help="serve a policy version (0 = the base model), or lift a rollback's freeze",
        description="Point the policy registry at VERSION (its artifacts are verified first); every server "
                    "swaps to it. A rejected version may be promoted by hand (recorded as an override). "
                    "--resume lifts the freeze a rollback puts on automatic promotion.")
    promote.add_argument("version", type=int, nargs="?", help="the policy version to serve; 0 = the base model")
    promote.add_argument("--resume", action="store_true",
                         help="lift a rollback's freeze: training runs promote their candidates again")
    promote.add_argument("--reason", default="", help="why (kept in the audit stream)")
    add_config_flags(promote, FlywheelConfig)
    promote.set_defaults(handler=promote_command)

    rollback = subparsers.add_parser(
        "rollback", help="serve the previous good policy version again",
        description="Point the policy registry back at the previous good version (or --to N); the version left "
                    "is marked rolled_back. Every server swaps back.")
    rollback.add_argument("--to", type=int, default=None, dest="to_version",
                          help="the version to serve (default: the previous good one, else 0 = the base model)")
    rollback.add_argument("--reason", default="", help="why (kept in the audit stream)")
    add_config_flags(rollback, FlywheelConfig)
    rollback.set_defaults(handler=rollback_command)


def add_run_command(train_sub, command: str, help: str, description: str, section, handler,
                    hours: int) -> argparse.ArgumentParser:
    """``flywheel train COMMAND``: a run on the Celery training queue, or here with ``--local``."""
    run = train_sub.add_parser(command, help=help, description=description)
    run.add_argument("--local", action="store_true", help="run in this process instead of a Celery worker")
    run.add_argument("--no-wait", action="store_true", help="enqueue and return (Celery mode)")
    run.add_argument("--timeout", type=float, default=hours * 3600,
                     help=f"seconds to wait for the Celery run (default {hours} h)")
    add_config_flags(run, FlywheelConfig, section)
    run.set_defaults(handler=handler)
    return run


def add_listing(subparsers, command: str, what: str, columns: str, handler) -> argparse.ArgumentParser:
    """A registry listing command (``reward-models``, ``policies``): one table, or JSON."""
    listing = subparsers.add_parser(
        command, help=f"list the {what} versions",
        description=f"List the {what} versions of the registry, the current one starred ({columns}). Reads the "
                    f"Redis of the data directory (or --redis-url) and starts none.")
    listing.add_argument("--rebuild", action="store_true",
                         help="first rebuild the registry in Redis from the manifests in the data directory")
    listing.add_argument("--json", action="store_true", help="print the records as JSON")
    add_config_flags(listing, FlywheelConfig)
    listing.set_defaults(handler=handler)
    return listing


def _who() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _run_on_worker(args: argparse.Namespace, settings, kind: str, kwargs: dict, what: str) -> int:
    """Queue a ``kind`` run on the training queue by name (the task modules stay unloaded here),
    unless one waits there already (then that one is the run), and, unless ``--no-wait``, wait for
    it and print its report."""
    from flywheel.celery_app import make_celery
    from flywheel.redis_server import open_redis
    from flywheel.run_ledger import enqueue_run, queued_ttl_seconds

    celery = make_celery(settings=settings)
    client, _ = open_redis(settings.redis_url, settings.data_dir, fallback_url=celery.conf.broker_url)  # as the worker
    try:
        task_id, queued = enqueue_run(celery, client, kind, kwargs, queued_ttl_seconds(settings))
    finally:
        client.close()
    print(f"enqueued {what} run {task_id}" if queued else f"a {what} run is queued already: {task_id}")
    if args.no_wait:
        return 0
    started = time.monotonic()
    print(json.dumps(celery.AsyncResult(task_id).get(timeout=args.timeout, interval=1.0), indent=2))
    print(f"finished in {time.monotonic() - started:.0f} s")
    return 0


def train_reward_model_command(args: argparse.Namespace) -> int:
    settings = config_from_args(args)
    if args.local:
        from flywheel.redis_server import EmbeddedRedisOptions, redis_connection
        from training.reward_model_run import run_reward_model_training

        with redis_connection(settings.redis_url, settings.data_dir,
                              embedded=EmbeddedRedisOptions.of(settings)) as client:
            report = run_reward_model_training(settings, client, min_rankings=args.min_rankings, who="cli")
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    return _run_on_worker(args, settings, REWARD_MODEL_KIND, {"min_rankings": args.min_rankings, "who": "cli"},
                          "reward-model")


def train_policy_command(args: argparse.Namespace) -> int:
    settings = config_from_args(args)
    if args.local:
        from flywheel.redis_server import EmbeddedRedisOptions, redis_connection
        from training.policy_run import run_policy_training

        with redis_connection(settings.redis_url, settings.data_dir,
                              embedded=EmbeddedRedisOptions.of(settings)) as client:
            report = run_policy_training(settings, client, who=f"cli:{_who()}")
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    return _run_on_worker(args, settings, POLICY_KIND, {"who": f"cli:{_who()}"}, "policy")


def list_versions(args: argparse.Namespace, registry, columns, who: str, *, base_model_row: bool = False,
                  empty: str = "") -> int:
    """``--rebuild`` the registry from its manifests if asked, then print its versions as JSON
    (``--json``) or as a table; ``empty`` is printed instead of a table with no rows."""
    if args.rebuild:
        print(f"rebuilt {registry.rebuild_from_disk(who=who)} versions from {registry.root_dir}")
    records = registry.versions()
    if args.json:
        print(json.dumps([r.manifest for r in records], indent=2))
    elif not records and not base_model_row:
        print(empty)
    else:
        print(format_registry_table(records, registry.current_version(), columns, base_model_row=base_model_row))
    return 0


def _with_registry(args, kind: str, action):
    """``action(registry)`` on the registry of ``kind`` in the platform's existing Redis and data dir
    (none is started: ``flywheel.app.state``); which ones goes to stderr, so that a listing of the
    wrong folder cannot pass for an empty registry."""
    from flywheel.app.state import existing_state
    from flywheel.contracts.artifacts import registry_folder
    from flywheel.registry import open_registry

    settings = config_from_args(args)
    rebuild = getattr(args, "rebuild", False) and registry_folder(settings.data_dir, kind).is_dir()
    with existing_state(settings, allow_new_redis=rebuild) as (client, where):
        print(f"{kind.replace('_', ' ')} registry: {where.describe()}", file=sys.stderr)
        registry = open_registry(client, settings.data_dir, kind)
        try:
            return action(registry)
        except ValueError as exc:  # what is wrong, and where it was looked for
            raise ValueError(f"{exc} (registry in {where.describe()})") from exc


def reward_models_command(args: argparse.Namespace) -> int:
    return _with_registry(args, REWARD_MODEL_KIND, lambda registry: list_versions(
        args, registry, REWARD_MODEL_COLUMNS, who="cli", empty="no reward-model versions yet"))


def policies_command(args: argparse.Namespace) -> int:
    return _with_registry(args, POLICY_KIND, lambda registry: list_versions(
        args, registry, POLICY_COLUMNS, who=_who(), base_model_row=True))


def promote_command(args: argparse.Namespace) -> int:
    from flywheel.policy_admin import promote_policy, resume_promotion

    if (args.version is None) == (not args.resume):
        raise SystemExit("flywheel promote: give a VERSION to serve, or --resume (not both)")

    def promote(registry) -> int:
        if args.resume:
            resumed = resume_promotion(registry, _who(), args.reason)
            print("automatic promotion resumed" if resumed else "automatic promotion was not frozen")
            return 0
        promote_policy(registry, args.version, _who(), args.reason)
        print(f"policy v{registry.current_version()} is current")
        return 0

    return _with_registry(args, POLICY_KIND, promote)


def rollback_command(args: argparse.Namespace) -> int:
    from flywheel.policy_admin import rollback_policy

    def rollback(registry) -> int:
        left = registry.current_version()
        rollback_policy(registry, args.to_version, _who(), args.reason)
        print(f"rolled back from v{left}: policy v{registry.current_version()} is current; automatic promotion "
              f"is frozen until `flywheel promote --resume`")
        return 0

    return _with_registry(args, POLICY_KIND, rollback)


def export_policy_command(args: argparse.Namespace) -> int:
    from flywheel.app.policy_export import export_policy
    from flywheel.app.state import existing_state

    settings = config_from_args(args)
    with existing_state(settings) as (client, _):
        folder = export_policy(settings, client, args.version, args.directory)
    print(f"policy v{args.version} written to {folder}")
    return 0
