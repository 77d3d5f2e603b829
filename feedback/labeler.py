"""The AI labeler (RLAIF): which groups it ranks, and ranking one group onto the stream.

The scheduler picks groups once they are ``delay_seconds`` old: a group that no person ranked by
then is ranked by the AI judge, and so is a fixed ``fraction`` of all groups whether or not people
ranked them, which is what lets AI–human agreement be measured on a fair sample. Which groups
fall in the fraction is decided by a hash of the group id, so every scheduler agrees.

Labelling is idempotent per (group, judge): a task redelivered after a worker died appends
nothing twice. Rankings the judge is not confident about are skipped, not guessed. A judge that
cannot answer now (``JudgeUnavailableError``: its endpoint is down, refuses the key, times out)
loses no group: the group goes back among the candidates, due again after ``retry_seconds``, so
a later scheduling pass tries it again, until it is ranked or its record expires; each such failure is counted
(``flywheel_labelling_judge_errors_total{reason}``, outcome ``judge_error``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from feedback.metrics import LabellingMetrics
from feedback.pairwise import JudgeUnavailableError
from flywheel.contracts.keys import LABELLING_CANDIDATES_KEY, group_key, group_rankings_key
from flywheel.contracts.rankings import MAX_RANKED, SOURCE_AI, SOURCE_HUMAN, RankingEntry
from flywheel.contracts.redis_text import text
from flywheel.group_store import GroupStore
from flywheel.rankings_stream import RankingStream

if TYPE_CHECKING:  # the judge (and torch, for a local one) load only in labelling workers
    from feedback.pairwise import PairwiseJudge

log = logging.getLogger(__name__)

AI_ANNOTATOR_ID = "ai:labeler"

RANKED, LOW_CONFIDENCE, EXPIRED, ALREADY_RANKED, UNRANKABLE, JUDGE_ERROR = (
    "ranked", "low_confidence", "expired", "already_ranked", "unrankable", "judge_error")


@dataclass(frozen=True)
class LabellingConfig:
    delay_seconds: float = 3600.0
    fraction: float = 0.05
    min_confidence: float = 0.1
    group_ttl_seconds: int = 7 * 24 * 3600
    retry_seconds: float = 60.0  # a group the judge could not rank is due again after this


def in_agreement_sample(group_id: str, fraction: float) -> bool:
    """True for a stable ``fraction`` of group ids (the same answer in every process)."""
    digest = hashlib.blake2b(group_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


@dataclass(frozen=True)
class LabelOutcome:
    group_id: str
    outcome: str  # ranked, low_confidence, expired, already_ranked, unrankable, judge_error
    completion_ids: list[str] | None = None
    confidence: float | None = None
    ranking_id: str = ""
    entry_id: str = ""
    error: str = ""  # judge_error: what the judge's endpoint said

    def to_json(self) -> dict:
        return {"group_id": self.group_id, "outcome": self.outcome, "completion_ids": self.completion_ids,
                "confidence": self.confidence, "ranking_id": self.ranking_id, "entry_id": self.entry_id,
                "error": self.error}


_FORGET_IF_DUE = """
-- KEYS: candidates; ARGV: the due cutoff, then group ids. A member whose score moved past the
-- cutoff meanwhile (a labeler put it back to retry) stays.
local removed = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= tonumber(ARGV[1]) then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""


class LabellingScheduler:
    """Takes the groups that are due off the candidates set and says which to rank."""

    def __init__(self, client: redis.Redis, config: LabellingConfig) -> None:
        self.redis = client
        self.config = config
        self.due_before: float | None = None  # the cutoff of the last due_groups call
        self._forget_if_due = client.register_script(_FORGET_IF_DUE)

    def due_groups(self, now: float | None = None, batch: int = 500) -> list[str]:
        """Up to ``batch`` group ids to rank now. Each candidate is decided once: it leaves the set
        either way. Returns [] only when nothing more is due.

        The caller enqueues the returned ids before calling ``forget`` on them, so a crash in
        between ranks a group twice (harmless: labelling is idempotent) rather than never.
        """
        now = time.time() if now is None else now
        self.redis.zremrangebyscore(LABELLING_CANDIDATES_KEY, "-inf", now - self.config.group_ttl_seconds)
        self.due_before = now - self.config.delay_seconds
        while True:
            due = self.redis.zrangebyscore(LABELLING_CANDIDATES_KEY, "-inf", self.due_before, start=0, num=batch)
            ids = [text(g) for g in due]
            chosen, dropped = self._decide(ids)
            self.forget(dropped)
            if chosen or len(ids) < batch:
                return chosen

    def _decide(self, ids: list[str]) -> tuple[list[str], list[str]]:
        """Split due groups into those to rank and those to drop (expired, or ranked by a person
        and outside the agreement sample)."""
        pipe = self.redis.pipeline(transaction=False)
        for group_id in ids:
            pipe.exists(group_key(group_id))
            pipe.hexists(group_rankings_key(group_id), SOURCE_HUMAN)
        flags = pipe.execute() if ids else []
        chosen, dropped = [], []
        for i, group_id in enumerate(ids):
            alive, human = bool(flags[2 * i]), bool(flags[2 * i + 1])
            if alive and (not human or in_agreement_sample(group_id, self.config.fraction)):
                chosen.append(group_id)
            else:
                dropped.append(group_id)
        return chosen, dropped

    def forget(self, group_ids: list[str]) -> None:
        """Take decided groups off the candidates; one a labeler has put back to retry since
        (``return_to_candidates``: a score past this pass's cutoff) stays."""
        if not group_ids:
            return
        if self.due_before is None:
            self.redis.zrem(LABELLING_CANDIDATES_KEY, *group_ids)
        else:
            self._forget_if_due(keys=[LABELLING_CANDIDATES_KEY], args=[repr(self.due_before), *group_ids])


def return_to_candidates(client: redis.Redis, group_id: str, config: LabellingConfig,
                         now: float | None = None) -> None:
    """Put a group the judge could not rank back among the candidates, due again in
    ``retry_seconds``. It is dropped like any candidate once its record expires."""
    now = time.time() if now is None else now
    client.zadd(LABELLING_CANDIDATES_KEY, {group_id: now - config.delay_seconds + config.retry_seconds})


def put_back(client: redis.Redis, group_id: str, config: LabellingConfig, error: JudgeUnavailableError,
             metrics: LabellingMetrics | None = None) -> LabelOutcome:
    """The outcome of a group the judge could not rank now: back among the candidates, counted."""
    return_to_candidates(client, group_id, config)
    if metrics is not None:
        metrics.judge_errors.labels(error.reason).inc()
    return LabelOutcome(group_id, JUDGE_ERROR, error=str(error))


class Labeler:
    """Ranks one stored group with the judge and appends the ranking (source=ai) to the stream."""

    def __init__(self, client: redis.Redis, judge: "PairwiseJudge", config: LabellingConfig,
                 metrics: LabellingMetrics | None = None) -> None:
        self.redis = client
        self.groups = GroupStore(client, config.group_ttl_seconds)
        self.stream = RankingStream(client, group_ttl_seconds=config.group_ttl_seconds)
        self.judge = judge
        self.config = config
        self.metrics = metrics

    def idempotency_key(self, group_id: str) -> str:
        return f"{self.judge.judge_id}:{group_id}"

    def label(self, group_id: str) -> LabelOutcome:
        started = time.monotonic()
        outcome = self._label(group_id)
        if self.metrics is not None:
            self.metrics.groups.labels(outcome.outcome).inc()
            if outcome.outcome in (RANKED, LOW_CONFIDENCE):
                self.metrics.duration.observe(time.monotonic() - started)
            if outcome.outcome == LOW_CONFIDENCE:
                self.metrics.rankings_rejected.labels(SOURCE_AI, LOW_CONFIDENCE).inc()
        if outcome.outcome == JUDGE_ERROR:
            log.warning("group %s not labelled, back among the candidates: %s", group_id, outcome.error)
        else:
            log.info("labelled group %s: %s (confidence %s)", group_id, outcome.outcome, outcome.confidence)
        return outcome

    def _label(self, group_id: str) -> LabelOutcome:
        key = self.idempotency_key(group_id)
        if self.stream.find_duplicate(SOURCE_AI, key) is not None:
            return LabelOutcome(group_id, ALREADY_RANKED)
        group = self.groups.load(group_id)
        if group is None:
            return LabelOutcome(group_id, EXPIRED)
        completions = sorted(group.completions, key=lambda c: c.index)[:MAX_RANKED]
        if len(completions) < 2:
            return LabelOutcome(group_id, UNRANKABLE)
        try:
            verdict = self.judge.rank(group.prompt, {c.completion_id: c.text for c in completions})
        except JudgeUnavailableError as error:
            return put_back(self.redis, group_id, self.config, error, self.metrics)
        if self.metrics is not None:
            self.metrics.comparisons.inc(verdict.comparisons)
        if verdict.confidence < self.config.min_confidence:
            return LabelOutcome(group_id, LOW_CONFIDENCE, verdict.completion_ids, verdict.confidence)
        entry = RankingEntry(
            group_id=group_id, completion_ids=verdict.completion_ids, source=SOURCE_AI,
            policy_version=group.policy_version, annotator_id=AI_ANNOTATOR_ID, judge_id=self.judge.judge_id,
            pair_probabilities=verdict.pair_probabilities, confidence=verdict.confidence)
        result = self.stream.append(entry, key)
        if self.metrics is not None and not result.duplicate:
            self.metrics.rankings_accepted.labels(SOURCE_AI).inc()
            self.metrics.delay.observe(max(entry.created_at - group.created_at, 0.0))
            if result.agreement is not None:
                self.metrics.observe_agreement(result.agreement.agreed_pairs, result.agreement.pairs)
        outcome = ALREADY_RANKED if result.duplicate else RANKED
        return LabelOutcome(group_id, outcome, verdict.completion_ids, verdict.confidence,
                            result.ranking_id, result.entry_id)
