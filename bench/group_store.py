"""What storing a served group costs the serving handler, and what durability at acknowledgement
costs the rankings, each against a named baseline measured in the same run.

1. GroupStore.save (one script: the memory check, SET, ZADD) against one PING round trip and
   against the plain pipelined SET + ZADD it replaced, on the same redis-server. The group is n=16
   samples of 256 tokens each (with per-token log-probabilities), larger than a typical request.
2. Rankings per second through the real intake path (``feedback.intake.RankingIntake.submit``:
   duplicate check, group load, the append script), one client and 8 concurrent clients, on a
   redis-server with ``appendfsync always`` (the embedded default) and with ``everysec`` (the
   baseline), alternating rounds; medians of the rounds, the ratio always / everysec printed last.

    .venv/bin/python bench/group_store.py
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from feedback.intake import RankingIntake, RankingSubmission
from flywheel.contracts.groups import CompletionGroup, GroupResult, SampleResult
from flywheel.contracts.keys import LABELLING_CANDIDATES_KEY, group_key
from flywheel.group_store import GroupStore
from flywheel.rankings_stream import RankingStream
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


def plain_pipelined_save(client, group: CompletionGroup, ttl_seconds: int) -> None:
    """The save before the memory check: SET with expiry and ZADD in one pipelined round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.set(group_key(group.group_id), group.to_json(), ex=ttl_seconds)
    pipe.zadd(LABELLING_CANDIDATES_KEY, {group.group_id: group.created_at})
    pipe.execute()


def group_store_costs(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis", max_memory_bytes=2**30) as server:
        client, _ = open_redis(server.url, server.data_dir)
        store = GroupStore(client, ttl_seconds=3600)
        groups = [big_group(f"bench-{i}") for i in range(8)]
        records = [CompletionGroup.from_result(g) for g in groups]
        ping = median_seconds(lambda i: client.ping(), repeats)
        plain = median_seconds(lambda i: plain_pipelined_save(client, records[i % len(records)], 3600), repeats)
        save = median_seconds(lambda i: store.save(groups[i % len(groups)]), repeats)
        print(f"baseline PING round trip: {ping * 1e3:.3f} ms")
        print(f"baseline pipelined SET + ZADD (no memory check): {plain * 1e3:.3f} ms")
        print(f"GroupStore.save (n=16 x 256 tokens): {save * 1e3:.3f} ms = {save / ping:.1f}x PING, "
              f"{save / plain:.2f}x the plain pipeline")


def rankings_per_second(appendfsync: str, rankings: int, clients: int) -> float:
    """Rankings/s through RankingIntake.submit on a fresh redis-server with ``appendfsync``."""
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis", appendfsync=appendfsync) as server:
        client, _ = open_redis(server.url, server.data_dir, max_connections=clients + 2)
        store = GroupStore(client, ttl_seconds=3600)
        groups = [big_group(f"rank-{i}", n=4, tokens=64) for i in range(rankings)]
        for group in groups:
            store.save(group)
        intake = RankingIntake(store, RankingStream(client, group_ttl_seconds=3600))
        submissions = [RankingSubmission(g.group_id, tuple(s.completion_id for s in reversed(g.samples)),
                                         annotator_id="bench", idempotency_key=f"k-{g.group_id}") for g in groups]

        def work(part: list[RankingSubmission]) -> None:
            for submission in part:
                assert not intake.submit(submission).duplicate

        threads = [threading.Thread(target=work, args=(submissions[k::clients],)) for k in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        client.close()
        return rankings / elapsed


def durability_costs(rounds: int, rankings: int) -> None:
    ratios = []
    for clients in (1, 8):
        rates: dict[str, list[float]] = {"everysec": [], "always": []}
        for _ in range(rounds):  # alternating, so that a slower moment of the machine hits both
            for appendfsync in rates:
                rates[appendfsync].append(rankings_per_second(appendfsync, rankings, clients))
        everysec, always = (statistics.median(rates[k]) for k in ("everysec", "always"))
        print(f"rankings/s, {clients} client(s), median of {rounds} rounds of {rankings}: "
              f"everysec (baseline) {everysec:.0f}, always {always:.0f}")
        ratios.append((clients, always / everysec))
    for clients, ratio in ratios:
        print(f"ratio always / everysec, {clients} client(s): {ratio:.2f}")


def main(repeats: int = 200, rounds: int = 3, rankings: int = 300) -> None:
    group_store_costs(repeats)
    durability_costs(rounds, rankings)


if __name__ == "__main__":
    main()
