"""The Admin gRPC service: the policy registry, platform status, promotion and rollback.

Promotion and rollback only move the registry's ``current`` pointer (recorded in its audit
stream with who, when, from, to and why); every replica follows the pointer through pub/sub, this
one included. A version is verified (manifest checksums) before the pointer moves to it, by a
promotion or a rollback (``flywheel.policy_admin``), so an operator cannot point the fleet at an
artifact no server would load: FAILED_PRECONDITION says why. A rollback freezes automatic
promotion until ResumePromotion; GetStatus reports the freeze and a lost pointer.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import grpc
import redis

from flywheel.api_keys import current_caller
from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND
from flywheel.contracts.keys import registry_current_key
from flywheel.policy_admin import (PolicyNotFoundError, freeze_reason, promote_policy, resume_promotion,
                                   rollback_policy)
from flywheel.registry import open_registry
from flywheel.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
REWARD_MODEL_CURRENT_KEY = registry_current_key(REWARD_MODEL_KIND)
STATUSES = {
    "current": admin_pb2.POLICY_STATUS_CURRENT,
    "candidate": admin_pb2.POLICY_STATUS_CANDIDATE,
    "rejected": admin_pb2.POLICY_STATUS_REJECTED,
    "rolled_back": admin_pb2.POLICY_STATUS_ROLLED_BACK,
    "superseded": admin_pb2.POLICY_STATUS_SUPERSEDED,
}


MAX_REASON_CHARS = 1024  # a reason is kept in every manifest's history and the audit stream
MAX_OPERATOR_CHARS = 128


def operator(context: grpc.ServicerContext) -> str:
    """Who made a change, for the audit stream: the caller's declared name (``x-flywheel-operator``)
    and the name of the API key that made it; without auth, the declared name or the address."""
    declared = (dict(context.invocation_metadata()).get("x-flywheel-operator") or "")[:MAX_OPERATOR_CHARS]
    caller = current_caller()
    if caller is None:
        return declared or f"grpc:{context.peer()}"
    return caller.name if not declared or declared == caller.name else f"{declared} (key {caller.name})"


def check_reason(reason: str, context: grpc.ServicerContext) -> None:
    if len(reason) > MAX_REASON_CHARS:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"reason is longer than {MAX_REASON_CHARS} characters")


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, client: redis.Redis, data_dir: Path, serving_status: Callable[[], tuple[int, int, int]],
                 rankings_waiting: Callable[[], int] | None = None) -> None:
        self.registry = open_registry(client, data_dir, POLICY_KIND)
        self.client = client
        self.serving_status = serving_status  # () -> (serving version, running sequences, queued requests)
        self.rankings_waiting = rankings_waiting

    def ListPolicies(self, request, context):
        with self._redis_errors(context):
            current = self.registry.current_version()
            records = self.registry.versions()
        policies = [admin_pb2.PolicyVersion(
            version=0, status=admin_pb2.POLICY_STATUS_CURRENT if current == 0 else admin_pb2.POLICY_STATUS_SUPERSEDED,
            format="base")]
        for record in records:
            manifest = record.manifest
            policies.append(admin_pb2.PolicyVersion(
                version=record.version, parent_version=int(record.parent or 0),
                reward_model_version=int(manifest.get("reward_model_version") or 0),
                status=STATUSES.get(record.status, admin_pb2.POLICY_STATUS_UNSPECIFIED),
                created_unix=record.created_at,
                gate_metrics={k: float(v) for k, v in record.figures.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)},
                artifact_path=str(self.registry.path(record.version)), format=str(manifest.get("format", ""))))
        return admin_pb2.ListPoliciesResponse(policies=policies, current_version=current)

    def GetStatus(self, request, context):
        serving, running, queued = self.serving_status()
        with self._redis_errors(context):
            pointer = self.registry.pointer()
            frozen = self.registry.frozen()
            reward = self.client.get(REWARD_MODEL_CURRENT_KEY)
            waiting = self.rankings_waiting() if self.rankings_waiting else 0
        return admin_pb2.PlatformStatus(
            serving_policy_version=serving, registry_policy_version=pointer or 0,
            reward_model_version=int(reward) if reward else 0, rankings_waiting=waiting,
            running_sequences=running, queued_requests=queued, promotion_frozen=frozen is not None,
            promotion_frozen_reason=freeze_reason(frozen), registry_pointer_missing=pointer is None)

    def Promote(self, request, context):
        check_reason(request.reason, context)
        return self._change(context, lambda who: promote_policy(
            self.registry, request.version, who, request.reason or "promoted by an operator"))

    def Rollback(self, request, context):
        check_reason(request.reason, context)
        to_version = request.to_version if request.HasField("to_version") else None
        return self._change(context, lambda who: rollback_policy(
            self.registry, to_version, who, request.reason or "rolled back by an operator"))

    def ResumePromotion(self, request, context):
        check_reason(request.reason, context)
        who = operator(context)
        with self._redis_errors(context):
            was_frozen = resume_promotion(self.registry, who, request.reason)
        log.info("automatic promotion resumed by %s (was frozen: %s)", who, was_frozen)
        return admin_pb2.ResumePromotionResponse(was_frozen=was_frozen)

    def _change(self, context, apply: Callable[[str], object]):
        who = operator(context)
        with self._redis_errors(context):
            previous = self.registry.current_version()
            try:
                apply(who)
            except PolicyNotFoundError as exc:
                context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            except ValueError as exc:  # already current, nothing to roll back to, ...
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            now = self.registry.current_version()
        log.info("policy pointer v%d -> v%d by %s", previous, now, who)
        return admin_pb2.PolicyChange(from_version=previous, to_version=now)

    @staticmethod
    @contextlib.contextmanager
    def _redis_errors(context):
        """Redis down: UNAVAILABLE with a message, instead of an INTERNAL error."""
        try:
            yield
        except redis.RedisError as exc:
            log.warning("Admin: the registry is unavailable: %s", exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, "the registry store is unavailable; retry shortly")


def add_admin_service(server: grpc.Server, servicer: AdminServicer) -> None:
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)


