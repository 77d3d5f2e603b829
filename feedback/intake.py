"""Taking in one person's ranking: the checks and the append that every front end shares.

The gRPC ``Feedback.SubmitRanking`` (``feedback.service``) and the HTTP ``POST /v1/rankings``
(the OpenAI-compatible server) both build a ``RankingSubmission`` and call
``RankingIntake.submit``, so one set of rules holds whichever way a ranking arrives: its shape,
the annotator bound to the caller's key, the group and its completions, idempotent retries and
one ranking per annotator per group. A refusal is a ``Rejection`` whose ``status`` is a name both
front ends map to their own codes (``invalid_argument`` is gRPC's INVALID_ARGUMENT and HTTP 400).
Rankings taken in here are always ``source=human``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from feedback.metrics import FeedbackMetrics
from flywheel.api_keys import current_caller
from flywheel.contracts.groups import CompletionGroup
from flywheel.contracts.keys import group_annotators_key, group_rankings_key
from flywheel.contracts.rankings import MAX_RANKED, MIN_RANKED, SOURCE_HUMAN, RankingEntry
from flywheel.group_store import GroupStore
from flywheel.quoting import quote
from flywheel.rankings_stream import AlreadyRankedError, AppendResult, RankingStream
from flywheel.redis_server import is_out_of_memory

log = logging.getLogger(__name__)

AI_ANNOTATOR_PREFIX = "ai:"  # annotator ids the AI labeler writes; people may not use them
MAX_ID_CHARS = 256
MAX_COMMENT_CHARS = 8192

# the statuses of a Rejection, named as gRPC names its codes (lower case)
INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED = "invalid_argument", "not_found", "permission_denied"
ALREADY_EXISTS, UNAVAILABLE, RESOURCE_EXHAUSTED = "already_exists", "unavailable", "resource_exhausted"


class Rejection(Exception):
    """Why a ranking was refused: a status, a metric label, a message for the client and, when one
    field is at fault, its name."""

    def __init__(self, status: str, reason: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.field = field


@dataclass(frozen=True)
class RankingSubmission:
    """A ranking as a client sends it, whatever the front end: completion ids best first."""

    group_id: str
    completion_ids: tuple[str, ...]
    annotator_id: str = ""
    comment: str = ""
    idempotency_key: str = ""


def check_shape(submission: RankingSubmission) -> None:
    """Checks that need no stored state; raises Rejection."""
    ids = list(submission.completion_ids)
    if not submission.group_id:
        raise Rejection(INVALID_ARGUMENT, "missing_group", "group_id is required", "group_id")
    if len(ids) < MIN_RANKED:
        raise Rejection(INVALID_ARGUMENT, "too_few",
                        f"rank at least {MIN_RANKED} completions (best first); got {len(ids)}", "completion_ids")
    if len(ids) > MAX_RANKED:
        raise Rejection(INVALID_ARGUMENT, "too_many",
                        f"rank at most {MAX_RANKED} completions at once; got {len(ids)}", "completion_ids")
    for i, cid in enumerate(ids):
        if len(cid) > MAX_ID_CHARS:
            raise Rejection(INVALID_ARGUMENT, "too_long",
                            f"completion_ids[{i}] is longer than {MAX_ID_CHARS} characters", f"completion_ids[{i}]")
    repeated = sorted({cid for cid in ids if ids.count(cid) > 1})
    if repeated:
        raise Rejection(INVALID_ARGUMENT, "repeated_id",
                        f"each completion may appear once in a ranking; repeated: {', '.join(map(quote, repeated))}",
                        "completion_ids")
    for name in ("group_id", "annotator_id", "idempotency_key"):
        if len(getattr(submission, name)) > MAX_ID_CHARS:
            raise Rejection(INVALID_ARGUMENT, "too_long", f"{name} is longer than {MAX_ID_CHARS} characters", name)
    if len(submission.comment) > MAX_COMMENT_CHARS:
        raise Rejection(INVALID_ARGUMENT, "too_long", f"comment is longer than {MAX_COMMENT_CHARS} characters",
                        "comment")
    if submission.annotator_id.startswith(AI_ANNOTATOR_PREFIX):
        raise Rejection(PERMISSION_DENIED, "reserved_annotator",
                        f"annotator ids starting with {AI_ANNOTATOR_PREFIX!r} are reserved for the AI labeler",
                        "annotator_id")


def annotator_of(submission: RankingSubmission) -> str:
    """Who ranked: the submission's annotator_id, bound to the caller's key when auth is on."""
    caller = current_caller()
    if caller is None or (caller.is_admin and submission.annotator_id):
        return submission.annotator_id
    if submission.annotator_id and submission.annotator_id != caller.name:
        raise Rejection(PERMISSION_DENIED, "foreign_annotator",
                        f"this API key ranks as {caller.name!r}; leave annotator_id empty or set it to that "
                        f"(only an admin key may rank on behalf of other annotators)", "annotator_id")
    return caller.name


def check_against_group(group: CompletionGroup | None, submission: RankingSubmission) -> CompletionGroup:
    if group is None:
        raise Rejection(NOT_FOUND, "unknown_group", f"group {quote(submission.group_id)} does not exist or has expired",
                        "group_id")
    known = set(group.completion_ids)
    strangers = [cid for cid in submission.completion_ids if cid not in known]
    if strangers:
        raise Rejection(INVALID_ARGUMENT, "unknown_completion",
                        f"not completions of group {group.group_id}: {', '.join(map(quote, strangers))}",
                        "completion_ids")
    return group


def caller_scoped(annotator: str, idempotency_key: str) -> str:
    """An idempotency key in the annotator's own namespace: another caller who happens to send the
    same key neither gets this caller's acknowledgement nor loses its own ranking."""
    if not idempotency_key or not annotator:
        return idempotency_key
    return f"{annotator}/{idempotency_key}"


class RankingIntake:
    """Validates a person's ranking against the served group and appends it to the stream."""

    def __init__(self, groups: GroupStore, stream: RankingStream, metrics: FeedbackMetrics | None = None) -> None:
        self.groups = groups
        self.stream = stream
        self.metrics = metrics

    def submit(self, submission: RankingSubmission) -> AppendResult:
        """The stream's acknowledgement (``duplicate`` for a retry); raises Rejection. Runs with the
        caller of the request set (``flywheel.api_keys.caller_context``) when auth is on."""
        try:
            check_shape(submission)
            annotator = annotator_of(submission)
            idempotency_key = caller_scoped(annotator, submission.idempotency_key)
            prior = self.stream.find_duplicate(SOURCE_HUMAN, idempotency_key)
            if prior is not None:
                return prior
            group = check_against_group(self.groups.load(submission.group_id), submission)
            entry = RankingEntry(
                group_id=group.group_id, completion_ids=list(submission.completion_ids), source=SOURCE_HUMAN,
                policy_version=group.policy_version, annotator_id=annotator, comment=submission.comment,
                created_at=time.time())
            result = self.stream.append(entry, idempotency_key)
        except AlreadyRankedError as exc:
            self._count_rejection("already_ranked")
            raise Rejection(ALREADY_EXISTS, "already_ranked", str(exc), "group_id") from exc
        except Rejection as rejection:
            self._count_rejection(rejection.reason)
            raise
        except redis.RedisError as exc:
            if is_out_of_memory(exc):  # noeviction at maxmemory: nothing was written
                log.warning("ranking intake: Redis is at its maxmemory, ranking refused: %s", exc)
                self._count_rejection("redis_full")
                raise Rejection(RESOURCE_EXHAUSTED, "redis_full",
                                "the feedback store is full (Redis is at its maxmemory); the ranking was not "
                                "stored: retry later with the same idempotency key") from exc
            log.warning("ranking intake: Redis unavailable: %s", exc)
            self._count_rejection("unavailable")
            raise Rejection(UNAVAILABLE, "unavailable",
                            "the feedback store is unavailable; retry with the same idempotency key") from exc
        if self.metrics is not None and not result.duplicate:
            self.metrics.rankings_accepted.labels(SOURCE_HUMAN).inc()
            if result.agreement is not None:
                self.metrics.observe_agreement(result.agreement.agreed_pairs, result.agreement.pairs)
        return result

    def _count_rejection(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rankings_rejected.labels(SOURCE_HUMAN, reason).inc()


def next_group_to_rank(groups: GroupStore, annotator: str, limit_scanned: int = 5000) -> CompletionGroup | None:
    """The newest stored group of two or more completions that ``annotator`` has not ranked (for an
    anonymous annotator: that nobody has ranked), or None. Reads the newest ``limit_scanned`` group
    records (a SCAN of the group keys: fine for a ranking page, not for a hot path)."""
    candidates = []
    for raw in groups.all_records():
        try:
            group = CompletionGroup.from_json(raw)
        except (ValueError, KeyError, TypeError):
            continue
        if len(group.completions) >= 2:
            candidates.append(group)
    candidates.sort(key=lambda g: g.created_at, reverse=True)
    candidates = candidates[:limit_scanned]
    if not candidates:
        return None
    pipe = groups.redis.pipeline(transaction=False)
    for group in candidates:
        if annotator:
            pipe.sismember(group_annotators_key(group.group_id), annotator)
        else:
            pipe.hexists(group_rankings_key(group.group_id), SOURCE_HUMAN)
    for group, ranked in zip(candidates, pipe.execute()):
        if not ranked:
            return group
    return None
