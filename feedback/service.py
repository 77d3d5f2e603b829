"""The Feedback gRPC service: people rank served completions; the rankings go onto the stream.

Every refusal carries the status code a client can act on: NOT_FOUND for a group that never
existed or has expired, INVALID_ARGUMENT for a ranking that cannot be right whatever the server
state, PERMISSION_DENIED for an attempt to pass as the AI labeler or as another annotator,
ALREADY_EXISTS for a second ranking of a group by the same annotator, UNAVAILABLE while Redis is
down and RESOURCE_EXHAUSTED while it is at its maxmemory (retry later, with the same idempotency key). Rankings submitted here are always
``source=human``: the API has no way to mark feedback as coming from the AI labeler.

With auth on, the annotator is bound to the API key: a client key ranks as its own name
(``annotator_id`` empty or equal to it), so one key cannot pose as many annotators to get around
"one ranking per annotator per group". An admin key may name any annotator (a labelling front end
that authenticates its own users); left empty, it ranks as its own name too. The rules live in
``feedback.intake``, which the HTTP front end's ``POST /v1/rankings`` calls as well.
"""

from __future__ import annotations

import logging

import grpc
import redis
from prometheus_client import CollectorRegistry

from feedback.intake import RankingIntake, RankingSubmission, Rejection
from feedback.metrics import FeedbackMetrics, register_stream_collector
from flywheel.contracts.rankings import SOURCE_AI, SOURCE_HUMAN
from flywheel.group_store import GroupStore
from flywheel.rankings_stream import RankingStream
from flywheel.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger(__name__)

FEEDBACK_SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name


def submission_of(request: feedback_pb2.SubmitRankingRequest) -> RankingSubmission:
    return RankingSubmission(group_id=request.group_id, completion_ids=tuple(request.completion_ids),
                             annotator_id=request.annotator_id, comment=request.comment,
                             idempotency_key=request.idempotency_key)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    """Validates rankings and appends them to the rankings stream."""

    def __init__(self, client: redis.Redis, *, group_ttl_seconds: int = 7 * 24 * 3600,
                 registry: CollectorRegistry | None = None) -> None:
        self.groups = GroupStore(client, group_ttl_seconds)
        self.stream = RankingStream(client, group_ttl_seconds=group_ttl_seconds)
        self.metrics = FeedbackMetrics(registry) if registry is not None else None
        if registry is not None:
            register_stream_collector(registry, self.stream)
        self.intake = RankingIntake(self.groups, self.stream, self.metrics)

    def SubmitRanking(self, request: feedback_pb2.SubmitRankingRequest, context: grpc.ServicerContext):
        try:
            result = self.intake.submit(submission_of(request))
        except Rejection as rejection:
            context.abort(grpc.StatusCode[rejection.status.upper()], rejection.message)
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


def _ack(result) -> feedback_pb2.SubmitRankingResponse:
    return feedback_pb2.SubmitRankingResponse(ranking_id=result.ranking_id, stream_entry_id=result.entry_id,
                                              duplicate=result.duplicate)


def add_feedback_service(server: grpc.Server, servicer: FeedbackServicer) -> None:
    feedback_pb2_grpc.add_FeedbackServicer_to_server(servicer, server)
