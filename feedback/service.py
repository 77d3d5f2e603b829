"""The Feedback gRPC service: people rank served completions; the rankings go onto the stream.

Every refusal carries the status code a client can act on: NOT_FOUND for a group that never
existed or has expired, INVALID_ARGUMENT for a ranking that cannot be right whatever the server
state, PERMISSION_DENIED for an attempt to pass as the AI labeler or as another annotator,
ALREADY_EXISTS for a second ranking of a group by the same annotator, UNAVAILABLE while Redis is
down (retry later, with the same idempotency key). Rankings submitted here are always
``source=human``: the API has no way to mark feedback as coming from the AI labeler.

With auth on, the annotator is bound to the API key: a client key ranks as its own name
(``annotator_id`` empty or equal to it), so one key cannot pose as many annotators to get around
"one ranking per annotator per group". An admin key may name any annotator (a labelling front end
that authenticates its own users); left empty, it ranks as its own name too.
"""

from __future__ import annotations

import logging
import time

import grpc
import redis
from prometheus_client import CollectorRegistry

from feedback.metrics import FeedbackMetrics, register_stream_collector
from flywheel.api_keys import current_caller
from flywheel.contracts.groups import CompletionGroup
from flywheel.contracts.rankings import MAX_RANKED, MIN_RANKED, SOURCE_AI, SOURCE_HUMAN, RankingEntry
from flywheel.group_store import GroupStore
from flywheel.quoting import quote
from flywheel.rankings_stream import AlreadyRankedError, RankingStream
from flywheel.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger(__name__)

FEEDBACK_SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name
AI_ANNOTATOR_PREFIX = "ai:"  # annotator ids the AI labeler writes; people may not use them
MAX_ID_CHARS = 256
MAX_COMMENT_CHARS = 8192


class Rejection(Exception):
    """Why a ranking was refused: a gRPC status, a metric label and a message for the client."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def check_request_shape(request: feedback_pb2.SubmitRankingRequest) -> None:
    """Checks that need no stored state; raises Rejection."""
    ids = list(request.completion_ids)
    if not request.group_id:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "missing_group", "group_id is required")
    if len(ids) < MIN_RANKED:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "too_few",
                        f"rank at least {MIN_RANKED} completions (best first); got {len(ids)}")
    if len(ids) > MAX_RANKED:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "too_many",
                        f"rank at most {MAX_RANKED} completions at once; got {len(ids)}")
    for i, cid in enumerate(ids):
        if len(cid) > MAX_ID_CHARS:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "too_long",
                            f"completion_ids[{i}] is longer than {MAX_ID_CHARS} characters")
    repeated = sorted({cid for cid in ids if ids.count(cid) > 1})
    if repeated:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "repeated_id",
                        f"each completion may appear once in a ranking; repeated: {', '.join(map(quote, repeated))}")
    for name in ("group_id", "annotator_id", "idempotency_key"):
        if len(getattr(request, name)) > MAX_ID_CHARS:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "too_long",
                            f"{name} is longer than {MAX_ID_CHARS} characters")
    if len(request.comment) > MAX_COMMENT_CHARS:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "too_long",
                        f"comment is longer than {MAX_COMMENT_CHARS} characters")
    if request.annotator_id.startswith(AI_ANNOTATOR_PREFIX):
        raise Rejection(grpc.StatusCode.PERMISSION_DENIED, "reserved_annotator",
                        f"annotator ids starting with {AI_ANNOTATOR_PREFIX!r} are reserved for the AI labeler")


def annotator_of(request: feedback_pb2.SubmitRankingRequest) -> str:
    """Who ranked: the request's annotator_id, bound to the caller's key when auth is on."""
    caller = current_caller()
    if caller is None or (caller.is_admin and request.annotator_id):
        return request.annotator_id
    if request.annotator_id and request.annotator_id != caller.name:
        raise Rejection(grpc.StatusCode.PERMISSION_DENIED, "foreign_annotator",
                        f"this API key ranks as {caller.name!r}; leave annotator_id empty or set it to that "
                        f"(only an admin key may rank on behalf of other annotators)")
    return caller.name


def check_against_group(group: CompletionGroup | None, request: feedback_pb2.SubmitRankingRequest) -> CompletionGroup:
    if group is None:
        raise Rejection(grpc.StatusCode.NOT_FOUND, "unknown_group",
                        f"group {quote(request.group_id)} does not exist or has expired")
    known = set(group.completion_ids)
    strangers = [cid for cid in request.completion_ids if cid not in known]
    if strangers:
        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "unknown_completion",
                        f"not completions of group {group.group_id}: {', '.join(map(quote, strangers))}")
    return group


def caller_scoped(annotator: str, idempotency_key: str) -> str:
    """An idempotency key in the annotator's own namespace: another caller who happens to send the
    same key neither gets this caller's acknowledgement nor loses its own ranking."""
    if not idempotency_key or not annotator:
        return idempotency_key
    return f"{annotator}/{idempotency_key}"


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    """Validates rankings and appends them to the rankings stream."""

    def __init__(self, client: redis.Redis, *, group_ttl_seconds: int = 7 * 24 * 3600,
                 registry: CollectorRegistry | None = None) -> None:
        self.groups = GroupStore(client, group_ttl_seconds)
        self.stream = RankingStream(client, group_ttl_seconds=group_ttl_seconds)
        self.metrics = FeedbackMetrics(registry) if registry is not None else None
        if registry is not None:
            register_stream_collector(registry, self.stream)

    def SubmitRanking(self, request: feedback_pb2.SubmitRankingRequest, context: grpc.ServicerContext):
        try:
            check_request_shape(request)
            annotator = annotator_of(request)
            idempotency_key = caller_scoped(annotator, request.idempotency_key)
            prior = self.stream.find_duplicate(SOURCE_HUMAN, idempotency_key)
            if prior is not None:
                return _ack(prior)
            group = check_against_group(self.groups.load(request.group_id), request)
            entry = RankingEntry(
                group_id=group.group_id, completion_ids=list(request.completion_ids), source=SOURCE_HUMAN,
                policy_version=group.policy_version, annotator_id=annotator, comment=request.comment,
                created_at=time.time())
            result = self.stream.append(entry, idempotency_key)
        except AlreadyRankedError as exc:
            self._count_rejection("already_ranked")
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except Rejection as rejection:
            self._count_rejection(rejection.reason)
            context.abort(rejection.code, rejection.message)
        except redis.RedisError as exc:
            log.warning("SubmitRanking: Redis unavailable: %s", exc)
            self._count_rejection("unavailable")
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the feedback store is unavailable; retry with the same idempotency key")
        if self.metrics is not None and not result.duplicate:
            self.metrics.rankings_accepted.labels(SOURCE_HUMAN).inc()
            if result.agreement is not None:
                self.metrics.observe_agreement(result.agreement.agreed_pairs, result.agreement.pairs)
        return _ack(result)

    def GetFeedbackStats(self, request: feedback_pb2.GetFeedbackStatsRequest, context: grpc.ServicerContext):
        try:
            stats = self.stream.stats()
        except redis.RedisError as exc:
            log.warning("GetFeedbackStats: Redis unavailable: %s", exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, "the feedback store is unavailable; retry shortly")
        return feedback_pb2.FeedbackStats(
            rankings_total=sum(stats.rankings.values()),
            human_rankings=stats.rankings.get(SOURCE_HUMAN, 0),
            ai_rankings=stats.rankings.get(SOURCE_AI, 0),
            stream_length=stats.length,
            consumer_groups=[feedback_pb2.ConsumerGroupStats(name=g.name, pending=g.pending, lag=g.lag)
                             for g in stats.consumer_groups],
            ai_human_agreement=stats.agreement.ratio,
            agreement_pairs=stats.agreement.pairs,
        )

    def _count_rejection(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rankings_rejected.labels(SOURCE_HUMAN, reason).inc()


def _ack(result) -> feedback_pb2.SubmitRankingResponse:
    return feedback_pb2.SubmitRankingResponse(ranking_id=result.ranking_id, stream_entry_id=result.entry_id,
                                              duplicate=result.duplicate)


def add_feedback_service(server: grpc.Server, servicer: FeedbackServicer) -> None:
    feedback_pb2_grpc.add_FeedbackServicer_to_server(servicer, server)
