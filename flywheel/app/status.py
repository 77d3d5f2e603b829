"""``flywheel status``: the platform at a glance for an operator.

What this server replica serves and how busy it is (Admin.GetStatus over gRPC), what the
registries point at, how many rankings wait for training, and the last training runs of the
reward model and the policy with their outcome (from Redis). It reads the platform's existing
Redis only (``flywheel.app.state``): in a folder with none it says so instead of starting one.
It exits with 0 when it saw everything, 1 when the server could not be reached (the rest is still
shown), 2 when there is no state where it looked.
"""

from __future__ import annotations

import argparse
import sys
import time

from flywheel.api_keys import ROLE_ADMIN
from flywheel.app.tables import format_table, plain_text
from flywheel.config import ClientConfig, FlywheelConfig, add_config_flags, config_from_args
from flywheel.grpc_client import explain_rpc_error, open_channel


def register(subparsers) -> None:
    status = subparsers.add_parser("status", help="serving version, registries, rankings waiting, last runs",
                                   description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("--runs", type=int, default=5, help="training runs to list per kind (default 5)")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server (default 5)")
    add_config_flags(status, FlywheelConfig, ClientConfig)
    status.set_defaults(handler=run_status)


def server_status(settings, timeout: float):
    """The server's Admin.GetStatus, or why it could not be had (a sentence for the operator)."""
    import grpc

    from flywheel.v1 import admin_pb2, admin_pb2_grpc

    with open_channel(settings, role=ROLE_ADMIN) as channel:
        try:
            return admin_pb2_grpc.AdminStub(channel).GetStatus(admin_pb2.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return explain_rpc_error(exc, settings, role=ROLE_ADMIN)


def run_status(args: argparse.Namespace) -> int:
    from flywheel.app.state import StateNotFound, existing_state
    from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND
    from flywheel.contracts.keys import REWARD_MODEL_CONSUMER_GROUP
    from flywheel.rankings_stream import RankingStream
    from flywheel.registry import open_registry
    from flywheel.policy_admin import freeze_reason

    settings = config_from_args(args)
    served = server_status(settings, args.timeout)
    if isinstance(served, str):
        rows = [("server", settings.grpc_address, "unreachable")]
        print(f"flywheel status: {served}", file=sys.stderr)
    else:
        rows = [("server", settings.grpc_address, f"serving policy v{served.serving_policy_version}"),
                ("", "batch", f"{served.running_sequences} sequences running, {served.queued_requests} queued")]
    try:
        with existing_state(settings) as (client, where):
            registries = {kind: open_registry(client, settings.data_dir, kind)
                          for kind in (REWARD_MODEL_KIND, POLICY_KIND)}
            policies = registries[POLICY_KIND]
            pointer, frozen = policies.pointer(), policies.frozen()
            rows += [("state", "redis", where.redis), ("", "data dir", str(where.data_dir)),
                     ("registry", "policy", f"current v{pointer}" if pointer is not None else
                      "POINTER MISSING (a Redis reset?): servers keep their version; `flywheel policies --rebuild`"),
                     ("registry", "automatic promotion",
                      f"FROZEN: {freeze_reason(frozen)}; `flywheel promote --resume` lifts it" if frozen else "on"),
                     ("registry", "reward model", f"current v{registries[REWARD_MODEL_KIND].current_version()}"),
                     ("feedback", "rankings waiting",
                      str(RankingStream(client).waiting_for(REWARD_MODEL_CONSUMER_GROUP)))]
            print(format_table(("part", "what", "state"), rows))
            for kind, registry in registries.items():
                records = registry.versions()[-args.runs:]
                print(f"\nlast {kind.replace('_', '-')} runs:")
                if not records:
                    print("  none yet")
                    continue
                print(format_table(("version", "outcome", "created (UTC)", "figures"), [
                    (f"v{r.version}", r.status, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_at)),
                     ", ".join(f"{k} {v:.3f}" for k, v in sorted(r.figures.items())
                               if isinstance(v, float) and k in KEY_FIGURES))
                    for r in reversed(records)]))
    except StateNotFound as exc:
        print(format_table(("part", "what", "state"), rows))
        print(f"flywheel status: {exc}", file=sys.stderr)
        return 2
    return 0 if not isinstance(served, str) else 1


KEY_FIGURES = {"heldout_accuracy", "heldout_loss", "reward_gain", "kl_to_ref", "perplexity_ratio"}
