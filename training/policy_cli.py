"""``flywheel train policy``, ``flywheel policies``, ``flywheel promote`` and ``flywheel rollback``."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import time

from flywheel.cli import add_settings_flags, settings_from_args
from flywheel.tables import format_table

RUN_SETTINGS = ["data_dir", "model", "redis_url", "policy_finetune", "policy_iterations", "policy_batch_size",
                "policy_mini_batch_size", "policy_ppo_epochs", "policy_response_length", "policy_learning_rate",
                "policy_kl_coef", "policy_kl_target", "policy_ptx_coef", "policy_prompts_file",
                "policy_heldout_fraction", "policy_min_reward_gain", "policy_kl_budget", "policy_perplexity_margin",
                "policy_autocast"]


def register(subparsers, train_subparsers) -> None:
    train = train_subparsers.add_parser(
        "policy", help="improve the policy with PPO against the current reward model",
        description="Enqueue a PPO run on the Celery training queue and wait for it, or run it in this process "
                    "with --local. The candidate is promoted if it passes the evaluation gate.")
    train.add_argument("--local", action="store_true", help="run in this process instead of a Celery worker")
    train.add_argument("--no-wait", action="store_true", help="enqueue and return (Celery mode)")
    train.add_argument("--timeout", type=float, default=12 * 3600, help="seconds to wait for the Celery run")
    add_settings_flags(train, RUN_SETTINGS)
    train.set_defaults(handler=train_policy_command)

    versions = subparsers.add_parser("policies", help="list the policy versions")
    versions.add_argument("--rebuild", action="store_true", help="rebuild the registry in Redis from the manifests")
    versions.add_argument("--json", action="store_true", help="print the records as JSON")
    add_settings_flags(versions, ["data_dir", "redis_url"])
    versions.set_defaults(handler=policies_command)

    promote = subparsers.add_parser("promote", help="serve a policy version (0 = the base model)")
    promote.add_argument("version", type=int)
    promote.add_argument("--reason", default="", help="why (kept in the audit stream)")
    add_settings_flags(promote, ["data_dir", "redis_url"])
    promote.set_defaults(handler=promote_command)

    rollback = subparsers.add_parser("rollback", help="serve the previous good policy version again")
    rollback.add_argument("--to", type=int, default=None, dest="to_version",
                          help="the version to serve (default: the previous good one, else 0 = the base model)")
    rollback.add_argument("--reason", default="", help="why (kept in the audit stream)")
    add_settings_flags(rollback, ["data_dir", "redis_url"])
    rollback.set_defaults(handler=rollback_command)


def _who() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _with_registry(args, action):
    from flywheel.contracts.artifacts import POLICY_KIND
    from flywheel.redis_server import redis_connection
    from flywheel.registry import open_registry

    settings = settings_from_args(args)
    with redis_connection(settings.redis_url, settings.data_dir) as client:
        return action(open_registry(client, settings.data_dir, POLICY_KIND))


def train_policy_command(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.local:
        from flywheel.redis_server import redis_connection
        from training.policy_run import run_policy_training

        with redis_connection(settings.redis_url, settings.data_dir) as client:
            report = run_policy_training(settings, client, who=f"cli:{_who()}")
        print(json.dumps(report.to_dict(), indent=2))
        return 0

    from flywheel.celery_app import make_celery

    celery = make_celery(settings=settings)
    result = celery.send_task("training.train_policy", kwargs={"who": f"cli:{_who()}"}, queue="training")
    print(f"enqueued policy run {result.id}")
    if args.no_wait:
        return 0
    started = time.monotonic()
    print(json.dumps(result.get(timeout=args.timeout, interval=1.0), indent=2))
    print(f"finished in {time.monotonic() - started:.0f} s")
    return 0


def _num(value, digits: int = 4) -> str:
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def format_policies_table(records, current: int) -> str:
    header = ("version", "status", "parent", "reward model", "format", "reward gain", "KL to ref", "ppl ratio",
              "created (UTC)")
    rows = [("v0" + (" *" if current == 0 else ""), "base", "-", "-", "-", "-", "-", "-", "-")]
    for r in records:
        m, f = r.manifest, r.figures
        rows.append((f"v{r.version}" + (" *" if r.version == current else ""), r.status,
                     f"v{r.parent}" if r.parent is not None else "-", f"v{m.get('reward_model_version', '-')}",
                     str(m.get("format", "-")), _num(f.get("reward_gain")), _num(f.get("kl_to_ref"), 3),
                     _num(f.get("perplexity_ratio")), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_at))))
    return format_table(header, rows)


def policies_command(args: argparse.Namespace) -> int:
    def show(registry) -> int:
        if args.rebuild:
            print(f"rebuilt {registry.rebuild_from_disk(who=_who())} versions from {registry.root_dir}")
        records = registry.versions()
        if args.json:
            print(json.dumps([r.manifest for r in records], indent=2))
        else:
            print(format_policies_table(records, registry.current_version()))
        return 0

    return _with_registry(args, show)


def promote_command(args: argparse.Namespace) -> int:
    from flywheel.policy_admin import promote_policy

    def promote(registry) -> int:
        promote_policy(registry, args.version, _who(), args.reason)
        print(f"policy v{registry.current_version()} is current")
        return 0

    return _with_registry(args, promote)


def rollback_command(args: argparse.Namespace) -> int:
    from flywheel.policy_admin import rollback_policy

    def rollback(registry) -> int:
        left = registry.current_version()
        rollback_policy(registry, args.to_version, _who(), args.reason)
        print(f"rolled back from v{left}: policy v{registry.current_version()} is current")
        return 0

    return _with_registry(args, rollback)
