"""The rankings stream on a real Redis: at-least-once delivery per consumer group, safe trimming."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from feedback.groups import LABELLING_CANDIDATES_KEY, group_key
from feedback.rankings import (
    DEAD_LETTER_STREAM, RANKINGS_STREAM, RankingConsumer, RankingEntry, RankingStream,
)

from support.feedback import group_result


def append_rankings(client, count: int, start: int = 0) -> list[str]:
    stream = RankingStream(client, group_ttl_seconds=3600)
    return [stream.append(RankingEntry(f"g{i}", [f"g{i}-1", f"g{i}-0"], "human", annotator_id="a")).entry_id
            for i in range(start, start + count)]


def test_group_store_round_trip_with_ttl(group_store, redis_client):
    result = group_result("gA", ["one", "two"], created_at=1_700_000_000.0)
    group_store.save(result)
    group = group_store.load("gA")
    assert group.group_id == "gA" and group.policy_version == 3 and group.prompt == result.prompt
    assert group.prompt_token_ids == [1, 2, 3, 4] and group.created_at == 1_700_000_000.0
    assert group.params == result.params.to_json()
    assert [(c.completion_id, c.index, c.text, c.finish_reason) for c in group.completions] == [
        ("gA-0", 0, "one", "stop"), ("gA-1", 1, "two", "stop")]
    assert group.completions[1].token_ids == [101, 201, 2] and group.completions[1].logprobs == [-0.5, -1.25, -0.125]
    assert 3590 < redis_client.ttl(group_key("gA")) <= 3600
    raw = json.loads(redis_client.get(group_key("gA")))  # the documented record layout
    assert set(raw) == {"group_id", "policy_version", "prompt", "prompt_token_ids", "params", "created_at",
                        "completions"}
    assert redis_client.zscore(LABELLING_CANDIDATES_KEY, "gA") == 1_700_000_000.0
    assert group_store.load("missing") is None


def test_every_consumer_group_gets_every_entry(redis_client):
    reward = RankingConsumer(redis_client, "reward-model", "rm-1")
    ppo = RankingConsumer(redis_client, "ppo", "ppo-1")
    ids = append_rankings(redis_client, 5)
    assert [r.entry_id for r in reward.read(count=10)] == ids
    assert [r.entry_id for r in ppo.read(count=10)] == ids
    assert reward.read(count=10, block_ms=50) == []


def test_a_consumer_killed_before_acknowledging_loses_nothing(redis_server, redis_client):
    RankingConsumer(redis_client, "reward-model", "setup")  # the group exists before the entries
    ids = append_rankings(redis_client, 6)
    script = (
        "import json, sys, time, redis\n"
        "from feedback.rankings import RankingConsumer\n"
        f"c = RankingConsumer(redis.Redis.from_url({redis_server.url!r}), 'reward-model', 'doomed')\n"
        "got = c.read(count=4)\n"
        "print(json.dumps([r.entry_id for r in got]), flush=True)\n"
        "time.sleep(600)\n"
    )
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        taken = json.loads(doomed.stdout.readline())
    finally:
        doomed.kill()
        doomed.wait()
    assert taken == ids[:4]

    survivor = RankingConsumer(redis_client, "reward-model", "survivor", min_idle_ms=1000)
    first = survivor.read(count=10)
    assert [r.entry_id for r in first] == ids[4:]  # the dead consumer's entries are not idle long enough yet
    time.sleep(1.05)
    reclaimed = survivor.read(count=10)
    assert [r.entry_id for r in reclaimed] == ids[:4]
    assert reclaimed[0].ranking.group_id == "g0" and reclaimed[0].ranking.completion_ids == ["g0-1", "g0-0"]
    assert survivor.ack([r.entry_id for r in first + reclaimed]) == 6
    assert redis_client.xpending(RANKINGS_STREAM, "reward-model")["pending"] == 0


def test_a_restarted_consumer_gets_back_what_it_held(redis_client):
    ids = append_rankings(redis_client, 3)
    RankingConsumer(redis_client, "reward-model", "rm-1").read(count=2)  # then the process dies
    again = RankingConsumer(redis_client, "reward-model", "rm-1")
    assert [r.entry_id for r in again.read(count=10)] == ids  # its own two first, then the new one
    assert again.read(count=10) == []


def test_keep_alive_stops_reclaiming_of_entries_still_in_use(redis_client):
    append_rankings(redis_client, 2)
    holder = RankingConsumer(redis_client, "reward-model", "holder", min_idle_ms=1000)
    other = RankingConsumer(redis_client, "reward-model", "other", min_idle_ms=1000)
    assert len(holder.read(count=10)) == 2
    time.sleep(0.6)
    holder.keep_alive()
    time.sleep(0.6)
    assert other.read(count=10) == []  # 1.2 s since delivery, but only 0.6 s since keep_alive
    assert holder.read(count=10) == []  # and the holder is not handed its own entries twice
    time.sleep(0.7)
    assert len(other.read(count=10)) == 2


def test_redis_restart_mid_run_loses_nothing(redis_server, redis_client):
    consumer = RankingConsumer(redis_client, "reward-model", "rm-1")
    ids = append_rankings(redis_client, 10)
    got = consumer.read(count=6)
    consumer.ack([r.entry_id for r in got[:3]])
    redis_server.stop()  # SIGTERM: redis flushes its append-only file
    redis_server.start()
    ids += append_rankings(redis_client, 5, start=10)
    rest = consumer.read(count=100)
    assert [r.entry_id for r in got + rest] == ids
    assert redis_client.xpending(RANKINGS_STREAM, "reward-model")["pending"] == 3 + 9  # held across the restart
    consumer.ack([r.entry_id for r in got[3:] + rest])
    assert redis_client.xpending(RANKINGS_STREAM, "reward-model")["pending"] == 0
    assert RankingStream(redis_client).stats().rankings["human"] == 15


def test_trimming_keeps_whatever_any_consumer_group_still_needs(redis_client):
    stream = RankingStream(redis_client)
    assert stream.trim_acknowledged() == 0  # no stream, no groups
    reward = RankingConsumer(redis_client, "reward-model", "rm-1")
    ppo = RankingConsumer(redis_client, "ppo", "ppo-1")
    ids = append_rankings(redis_client, 6)
    reward.ack([r.entry_id for r in reward.read(count=6)])
    ppo_got = ppo.read(count=4)
    ppo.ack([ppo_got[0].entry_id, ppo_got[2].entry_id])  # ids[1] is still pending with ppo
    assert stream.trim_acknowledged() == 1
    assert [e[0].decode() for e in redis_client.xrange(RANKINGS_STREAM)] == ids[1:]
    ppo.ack([ppo_got[1].entry_id, ppo_got[3].entry_id])
    assert stream.trim_acknowledged() == 3  # ids[4:] were never delivered to ppo
    assert [e[0].decode() for e in redis_client.xrange(RANKINGS_STREAM)] == ids[4:]
    assert [r.entry_id for r in ppo.read(count=10)] == ids[4:]


def test_malformed_entries_go_to_the_dead_letter_stream(redis_client):
    consumer = RankingConsumer(redis_client, "reward-model", "rm-1")
    redis_client.xadd(RANKINGS_STREAM, {"group_id": "g", "completion_ids": "not json"})
    good = append_rankings(redis_client, 1)
    assert [r.entry_id for r in consumer.read(count=10)] == good
    assert redis_client.xlen(DEAD_LETTER_STREAM) == 1
    assert redis_client.xpending(RANKINGS_STREAM, "reward-model")["pending"] == 1  # only the good one


def test_ai_entry_fields_round_trip():
    entry = RankingEntry("g", ["g-1", "g-0"], "ai", policy_version=7, annotator_id="ai:labeler", judge_id="judge@c",
                         pair_probabilities=[("g-0", "g-1", 0.25)], confidence=0.5)
    fields = entry.to_fields()
    assert all(isinstance(v, str) for v in fields.values())
    assert json.loads(fields["pair_probabilities"]) == [["g-0", "g-1", 0.25]] and fields["confidence"] == "0.5"
    assert RankingEntry.from_fields({k.encode(): v.encode() for k, v in fields.items()}) == entry


def test_cli_trim(redis_server, redis_client, capsys):
    from flywheel.app.cli import main as flywheel_main

    consumer = RankingConsumer(redis_client, "reward-model", "rm-1")
    append_rankings(redis_client, 3)
    consumer.ack([r.entry_id for r in consumer.read(count=2)])
    assert flywheel_main(["feedback", "trim", "--redis-url", redis_server.url]) == 0
    assert "trimmed 2 acknowledged rankings" in capsys.readouterr().out
    assert redis_client.xlen(RANKINGS_STREAM) == 1


def test_a_consumer_survives_its_group_vanishing(redis_client):
    consumer = RankingConsumer(redis_client, "reward-model", "rm-1")
    append_rankings(redis_client, 2)
    assert len(consumer.read(count=10)) == 2
    redis_client.flushall()  # e.g. a Redis without persistence restarted
    ids = append_rankings(redis_client, 1)
    assert [r.entry_id for r in consumer.read(count=10)] == ids
