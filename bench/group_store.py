"""What storing a served group costs the serving handler, against a named baseline.

Baseline: one Redis PING round trip on the same embedded redis-server, measured in the same run.
The group is n=16 samples of 256 tokens each (with per-token log-probabilities), larger than a
typical request. Prints medians and the ratio save / PING.

    .venv/bin/python bench/group_store.py
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flywheel.contracts.groups import GroupResult, SampleResult
from flywheel.group_store import GroupStore
from flywheel.redis_server import RedisServer, open_redis
from serving.sampling import SamplingParams


def big_group(group_id: str, n: int = 16, tokens: int = 256) -> GroupResult:
    rng = random.Random(0)
    # the engine's log-probabilities are float32 values (their shortest repr is what JSON costs)
    samples = [SampleResult(i, f"{group_id}-{i}", "word " * tokens, "length",
                            [rng.randrange(49152) for _ in range(tokens)],
                            torch.tensor([-rng.random() * 5 for _ in range(tokens)], dtype=torch.float32).tolist())
               for i in range(n)]
    now = time.time()
    return GroupResult(group_id, 1, "<|im_start|>user\nTell me a story<|im_end|>\n", list(range(40)),
                       SamplingParams(n=n, max_new_tokens=tokens), samples, now, now, now)


def median_seconds(action, repeats: int) -> float:
    timings = []
    for i in range(repeats):
        started = time.perf_counter()
        action(i)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main(repeats: int = 200) -> None:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        client, _ = open_redis(server.url, server.data_dir)
        store = GroupStore(client, ttl_seconds=3600)
        groups = [big_group(f"bench-{i}") for i in range(8)]
        ping = median_seconds(lambda i: client.ping(), repeats)
        save = median_seconds(lambda i: store.save(groups[i % len(groups)]), repeats)
        print(f"baseline PING round trip: {ping * 1e3:.3f} ms")
        print(f"GroupStore.save (n=16 x 256 tokens): {save * 1e3:.3f} ms = {save / ping:.1f}x PING")


if __name__ == "__main__":
    main()
