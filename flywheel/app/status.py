"""``flywheel status``: the platform at a glance for an operator.

What this server replica serves and how busy it is (Admin.GetStatus over gRPC), what the
registries point at, how many rankings wait for training, and the last training runs of the
reward model and the policy with their outcome (from Redis).
"""

from __future__ import annotations

import argparse
import time

from flywheel.api_keys import ROLE_ADMIN
from flywheel.config import ClientConfig, FlywheelConfig, add_config_flags, config_from_args
from flywheel.grpc_client import open_channel
from flywheel.app.tables import format_table

def register(subparsers) -> None:
    status = subparsers.add_parser("status", help="serving version, registries, rankings waiting, last runs",
                                   description=__doc__)
    status.add_argument("--runs", type=int, default=5, help="training runs to list per kind")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server")
    add_config_flags(status, FlywheelConfig, ClientConfig)
    status.set_defaults(handler=run_status)


def server_status(settings, timeout: float):
    import grpc

    from flywheel.v1 import admin_pb2, admin_pb2_grpc

    with open_channel(settings, role=ROLE_ADMIN) as channel:
        try:
            return admin_pb2_grpc.AdminStub(channel).GetStatus(admin_pb2.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"


def run_status(args: argparse.Namespace) -> int:
    from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND
    from flywheel.contracts.keys import REWARD_MODEL_CONSUMER_GROUP
    from flywheel.rankings_stream import RankingStream
    from flywheel.redis_server import open_redis
    from flywheel.registry import open_registry
    from flywheel.policy_admin import freeze_reason

    settings = config_from_args(args)
    served = server_status(settings, args.timeout)
    client, embedded = open_redis(settings.redis_url, settings.data_dir, socket_connect_timeout=2, socket_timeout=5)
    try:
        registries = {kind: open_registry(client, settings.data_dir, kind) for kind in (REWARD_MODEL_KIND, POLICY_KIND)}
        rows = []
        if isinstance(served, str):
            rows.append(("server", settings.grpc_address, f"unreachable ({served})"))
        else:
            rows += [("server", settings.grpc_address, f"serving policy v{served.serving_policy_version}"),
                     ("", "batch", f"{served.running_sequences} sequences running, {served.queued_requests} queued")]
        policies = registries[POLICY_KIND]
        pointer, frozen = policies.pointer(), policies.frozen()
        rows += [("registry", "policy", f"current v{pointer}" if pointer is not None else
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
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()
    return 0


KEY_FIGURES = {"heldout_accuracy", "heldout_loss", "reward_gain", "kl_to_ref", "perplexity_ratio"}
