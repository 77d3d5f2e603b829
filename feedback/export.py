"""The collected rankings as files other tools read.

Two shapes, one JSON object a line:

- pairwise, ``{"prompt", "chosen", "rejected"}``: TRL's preference format (``RewardTrainer``,
  ``DPOTrainer``); a K-way ranking gives its K(K-1)/2 ordered pairs, as InstructGPT's loss uses them;
- K-way, every ranking whole: the prompt, the completions best first, and where it came from
  (``source``, ``annotator_id``, ``judge_id``, the ``policy_version`` that served the group, times
  and ids), for anyone who trains on full rankings or audits them.

``prompt`` is the rendered prompt the policy saw (chat template applied), so ``prompt + chosen``
is exactly the text that was served. The stream is read with ``scan_rankings`` (XRANGE, not
through a consumer group: exporting acknowledges nothing and moves no trainer's position), which
joins each ranking with its group as the trainers do: the live record, else the copy the entry
carries. Only a ranking with neither (from before copies, its group expired) is counted as skipped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator

import redis

from flywheel.contracts.groups import CompletionGroup
from flywheel.contracts.keys import RANKINGS_STREAM
from flywheel.contracts.rankings import RankingEntry
from flywheel.rankings_stream import scan_rankings

EXPORT_FORMATS = ("pairwise", "kway")


@dataclass
class ExportCounts:
    rankings: int = 0
    records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # why -> how many

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def ranked_entries(client: redis.Redis, since: float | None = None, source: str | None = None,
                   counts: ExportCounts | None = None, stream: str = RANKINGS_STREAM,
                   ) -> Iterator[tuple[str, RankingEntry, CompletionGroup]]:
    """(stream id, entry, group) of every ranking on the stream, oldest first, filtered by
    ``created_at >= since`` and ``source``."""
    counts = counts if counts is not None else ExportCounts()
    start = "-" if since is None else f"{int(since * 1000)}-0"  # stream ids start with the time in ms
    for entry_id, fields, raw in scan_rankings(client, start, stream):
        try:
            entry = RankingEntry.from_fields(fields)
        except (ValueError, KeyError, TypeError):
            counts.skip("malformed")
            continue
        if (since is not None and entry.created_at < since) or (source and entry.source != source):
            continue
        counts.rankings += 1
        if raw is None:
            counts.skip("group_expired")
            continue
        try:
            group = CompletionGroup.from_json(raw)
        except (ValueError, KeyError, TypeError):
            counts.skip("malformed")
            continue
        if any(group.completion(cid) is None for cid in entry.completion_ids):
            counts.skip("unknown_completion")
            continue
        yield entry_id, entry, group


def pairwise_records(entry: RankingEntry, group: CompletionGroup) -> list[dict]:
    texts = [group.completion(cid).text for cid in entry.completion_ids]
    return [{"prompt": group.prompt, "chosen": better, "rejected": worse}
            for better, worse in itertools.combinations(texts, 2)]


def kway_record(entry_id: str, entry: RankingEntry, group: CompletionGroup) -> dict:
    return {
        "prompt": group.prompt, "completions": [group.completion(cid).text for cid in entry.completion_ids],
        "completion_ids": list(entry.completion_ids), "group_id": group.group_id, "source": entry.source,
        "annotator_id": entry.annotator_id, "judge_id": entry.judge_id, "policy_version": entry.policy_version,
        "comment": entry.comment, "ranking_id": entry.ranking_id, "stream_entry_id": entry_id,
        "created_at": entry.created_at, "served_at": group.created_at, "sampling": group.params,
    }


def export_records(client: redis.Redis, fmt: str, since: float | None = None, source: str | None = None,
                   counts: ExportCounts | None = None) -> Iterator[dict]:
    """The records of ``fmt`` (``pairwise`` or ``kway``) for every matching ranking."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    counts = counts if counts is not None else ExportCounts()
    for entry_id, entry, group in ranked_entries(client, since, source, counts):
        records = pairwise_records(entry, group) if fmt == "pairwise" else [kway_record(entry_id, entry, group)]
        counts.records += len(records)
        yield from records
