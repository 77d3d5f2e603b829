"""Prometheus metrics of feedback collection and AI labelling.

Every class takes the ``CollectorRegistry`` to register on, so that a test (or a process that
hosts several servers) can keep them apart; library code never touches the global registry.
Stream state (length, pending entries per consumer group, agreement) lives in Redis and is shared
by every process, so it is read at scrape time by a collector instead of being counted here.
"""

from __future__ import annotations

import logging

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flywheel.rankings_stream import RankingStream
from flywheel.redis_server import memory_usage

log = logging.getLogger(__name__)


class FeedbackMetrics:
    """Rankings accepted and rejected, by source and reason, and the agreement pairs counted here."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rankings_accepted = Counter(
            "flywheel_rankings_accepted_total", "Rankings added to the rankings stream.", ["source"], registry=registry)
        self.rankings_rejected = Counter(
            "flywheel_rankings_rejected_total", "Rankings refused (people) or withheld (AI), by reason.",
            ["source", "reason"], registry=registry)
        self.agreement_pairs = Counter(
            "flywheel_ai_human_agreement_pairs_total",
            "Completion pairs ranked by both a person and the AI labeler, by whether they agreed.",
            ["agreement"], registry=registry)

    def observe_agreement(self, agreed: int, pairs: int) -> None:
        self.agreement_pairs.labels("agreed").inc(agreed)
        self.agreement_pairs.labels("disagreed").inc(pairs - agreed)


class LabellingMetrics(FeedbackMetrics):
    """What a labelling worker adds: how long labelling takes and how much it gets done."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.duration = Histogram(
            "flywheel_labelling_duration_seconds", "Judge time to rank one group.", registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.delay = Histogram(
            "flywheel_labelling_delay_seconds", "Time from serving a group to its AI ranking.", registry=registry,
            buckets=(1, 10, 60, 300, 900, 1800, 3600, 7200, 21600, 86400))
        self.groups = Counter(
            "flywheel_labelling_groups_total", "Groups the labeler finished, by outcome.", ["outcome"],
            registry=registry)
        self.comparisons = Counter(
            "flywheel_labelling_comparisons_total", "Judge prompts scored (two per pair: both orders).",
            registry=registry)
        self.judge_errors = Counter(
            "flywheel_labelling_judge_errors_total",
            "Groups the judge could not rank now (its endpoint failed), by reason; each goes back among the "
            "candidates", ["reason"], registry=registry)
        self.judge_loads = Counter(
            "flywheel_labelling_judge_loads_total", "Judge models loaded (once per worker process and model).",
            registry=registry)


class RankingStreamCollector(Collector):
    """Reads the rankings stream's state, and how full its Redis is, from Redis at scrape time."""

    def __init__(self, stream: RankingStream) -> None:
        self.stream = stream

    def collect(self):
        up = GaugeMetricFamily("flywheel_rankings_redis_up", "1 when the rankings stream's Redis answered the scrape.")
        try:
            stats = self.stream.stats()
            used, most = memory_usage(self.stream.redis)
        except redis.RedisError as exc:
            log.warning("cannot read rankings stream stats: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("flywheel_rankings_stream_entries", "Entries in the rankings stream.",
                                value=stats.length)
        yield GaugeMetricFamily("flywheel_rankings_dead_letter_entries",
                                "Entries in the dead-letter stream flywheel:rankings:dead (rankings no run could use).",
                                value=stats.dead_letter_length)
        yield GaugeMetricFamily("flywheel_redis_memory_used_bytes", "Memory the shared Redis uses (INFO used_memory).",
                                value=used)
        yield GaugeMetricFamily("flywheel_redis_memory_max_bytes",
                                "The shared Redis's maxmemory (0 = unbounded); above it, writes are refused.",
                                value=most)
        pending = GaugeMetricFamily("flywheel_rankings_pending_entries",
                                    "Rankings delivered to a consumer group but not yet acknowledged.",
                                    labels=["consumer_group"])
        lag = GaugeMetricFamily("flywheel_rankings_lag_entries", "Rankings not yet delivered to a consumer group.",
                                labels=["consumer_group"])
        for group in stats.consumer_groups:
            pending.add_metric([group.name], group.pending)
            lag.add_metric([group.name], group.lag)
        yield pending
        yield lag
        yield GaugeMetricFamily("flywheel_ai_human_agreement_ratio",
                                "Fraction of pairs ordered alike by people and the AI labeler (all time).",
                                value=stats.agreement.ratio)
        yield GaugeMetricFamily("flywheel_ai_human_agreement_groups",
                                "Groups ranked by both a person and the AI labeler (the agreement's sample).",
                                value=stats.agreement_groups)


def register_stream_collector(registry: CollectorRegistry, stream: RankingStream) -> RankingStreamCollector:
    collector = RankingStreamCollector(stream)
    registry.register(collector)
    return collector
