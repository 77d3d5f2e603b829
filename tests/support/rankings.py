"""Test data in the shared feedback contract, written with plain Redis commands: a served group
record at ``flywheel:group:{id}`` and a ranking entry on the ``flywheel:rankings`` stream."""

from __future__ import annotations

import json
import random
import time

from flywheel.contracts.keys import RANKINGS_STREAM, group_key
from training.rankings import Ranking


def publish_rankings(client, rankings: list[Ranking], ttl_seconds: int = 7 * 24 * 3600, seed: int = 0) -> list[str]:
    """Store each ranking's group (completions shuffled, as served) and XADD the ranking; returns stream ids."""
    rng = random.Random(seed)
    ids = []
    for ranking in rankings:
        served = list(enumerate(ranking.completions))
        rng.shuffle(served)
        completions = [{"completion_id": f"{ranking.group_id}-c{rank}", "index": index, "text": text,
                        "finish_reason": "stop", "token_ids": [], "logprobs": []}
                       for index, (rank, text) in enumerate(served)]
        group = {"group_id": ranking.group_id, "policy_version": 0, "prompt": ranking.prompt, "prompt_token_ids": [],
                 "params": {"n": ranking.k}, "created_at": time.time(), "completions": completions}
        client.set(group_key(ranking.group_id), json.dumps(group), ex=ttl_seconds)
        order = [f"{ranking.group_id}-c{rank}" for rank in range(ranking.k)]  # best first
        fields = {"ranking_id": ranking.ranking_id, "group_id": ranking.group_id, "completion_ids": json.dumps(order),
                  "source": ranking.source, "annotator_id": "tester" if ranking.source == "human" else "",
                  "judge_id": "judge" if ranking.source == "ai" else "", "comment": "", "policy_version": "0",
                  "created_at": str(time.time()), "confidence": "", "pair_probabilities": ""}
        if ranking.source == "ai":
            probabilities = [[order[a], order[b], p] for a, b, p in ranking.pair_probabilities] or [
                [order[i], order[j], 0.9] for i in range(ranking.k) for j in range(i + 1, ranking.k)]
            fields["pair_probabilities"] = json.dumps(probabilities)
            fields["confidence"] = "0.9"
        ids.append(client.xadd(RANKINGS_STREAM, fields).decode())
    return ids
