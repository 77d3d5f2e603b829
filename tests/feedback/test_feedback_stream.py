"""The rankings stream on a real Redis: at-least-once delivery per consumer group, safe trimming."""

from __future__ import annotations

import json
import subprocess
import sys

from flywheel.contracts.keys import DEAD_LETTER_STREAM, LABELLING_CANDIDATES_KEY, RANKINGS_STREAM, group_key
from flywheel.group_store import GroupStore
from flywheel.contracts.rankings import RankingEntry
from flywheel.rankings_stream import RankingStream, RankingStreamReader

from support.feedback import group_result


def append_rankings(client, count: int, start: int = 0) -> list[str]:
    stream = RankingStream(client, group_ttl_seconds=3600)
    return [stream.append(RankingEntry(f"g{i}", [f"g{i}-1", f"g{i}-0"], "human", annotator_id="a")).entry_id
            for i in range(start, start + count)]


def entry_ids(claimed: list[tuple[str, dict]]) -> list[str]:
    return [entry_id for entry_id, _ in claimed]


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
    reward = RankingStreamReader(redis_client, consumer="rm-1")
    ppo = RankingStreamReader(redis_client, group="ppo", consumer="ppo-1")
    ids = append_rankings(redis_client, 5)
    assert entry_ids(reward.claim(10)) == ids
    assert entry_ids(ppo.claim(10)) == ids
    assert reward.acknowledge(ids) == 5
    assert reward.claim(10) == []
    assert entry_ids(ppo.claim(10)) == ids  # still unacknowledged by ppo


def test_a_consumer_killed_before_acknowledging_loses_nothing(redis_server, redis_client):
    RankingStreamReader(redis_client).ensure_group()  # the group exists before the entries
    ids = append_rankings(redis_client, 6)
    script = (
        "import json, sys, time, redis\n"
        "from flywheel.rankings_stream import RankingStreamReader\n"
        f"c = RankingStreamReader(redis.Redis.from_url({redis_server.url!r}), consumer='doomed')\n"
        "got = c.claim(4)\n"
        "print(json.dumps([entry_id for entry_id, _ in got]), flush=True)\n"
        "time.sleep(600)\n"
    )
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        taken = json.loads(doomed.stdout.readline())
    finally:
        doomed.kill()
        doomed.wait()
    assert taken == ids[:4]

    # one run at a time: whatever is pending when a run starts was left by a dead one, and it comes first
    survivor = RankingStreamReader(redis_client, consumer="survivor")
    claimed = survivor.claim(10)
    assert entry_ids(claimed) == ids
    assert RankingEntry.from_fields(claimed[0][1]).completion_ids == ["g0-1", "g0-0"]
    assert survivor.acknowledge(ids) == 6
    assert redis_client.xpending(RANKINGS_STREAM, "reward-model")["pending"] == 0


def test_a_restarted_consumer_gets_back_what_it_held(redis_client):
    ids = append_rankings(redis_client, 3)
    RankingStreamReader(redis_client, consumer="rm-1").claim(2)  # then the process dies
    again = RankingStreamReader(redis_client, consumer="rm-1")
    assert entry_ids(again.claim(10)) == ids  # its own two first, then the new one
    again.acknowledge(ids)
    assert again.claim(10) == []


def test_redis_restart_mid_run_loses_nothing(redis_server, redis_client):
    reader = RankingStreamReader(redis_client, consumer="rm-1")
    reader.ensure_group()
    ids = append_rankings(redis_client, 10)
    got = entry_ids(reader.claim(6))
    reader.acknowledge(got[:3])
    redis_server.stop()  # SIGTERM: redis flushes its append-only file
    redis_server.start()
    ids += append_rankings(redis_client, 5, start=10)
    assert redis_client.xpending(RANKINGS_STREAM, "reward-model")["pending"] == 3  # held across the restart
    rest = entry_ids(reader.claim(100))
    assert rest == ids[3:]
    assert redis_client.xpending(RANKINGS_STREAM, "reward-model")["pending"] == 3 + 9
    reader.acknowledge(rest)
    assert redis_client.xpending(RANKINGS_STREAM, "reward-model")["pending"] == 0
    assert RankingStream(redis_client).stats().rankings["human"] == 15


def test_waiting_counts_new_and_unacknowledged_entries(redis_client):
    reader = RankingStreamReader(redis_client, consumer="rm-1")
    assert reader.waiting(10) == 0  # no stream yet
    ids = append_rankings(redis_client, 5)
    assert reader.waiting(10) == 5 and reader.waiting(3) == 3
    reader.acknowledge(entry_ids(reader.claim(2)))
    assert reader.waiting(10) == 3
    reader.claim(1)  # delivered, not acknowledged: still waits
    assert reader.waiting(10) == 3
    assert RankingStream(redis_client).waiting_for("reward-model") == 3
    assert entry_ids(reader.claim(10)) == ids[2:]  # the pending one first, then the two new ones
    reader.acknowledge(ids)
    assert reader.waiting(10) == 0


def test_trimming_keeps_whatever_any_consumer_group_still_needs(redis_client):
    stream = RankingStream(redis_client)
    assert stream.trim_acknowledged() == 0  # no stream, no groups
    reward = RankingStreamReader(redis_client, consumer="rm-1")
    ppo = RankingStreamReader(redis_client, group="ppo", consumer="ppo-1")
    reward.ensure_group()
    ppo.ensure_group()
    ids = append_rankings(redis_client, 6)
    reward.acknowledge(entry_ids(reward.claim(6)))
    ppo_got = entry_ids(ppo.claim(4))
    ppo.acknowledge([ppo_got[0], ppo_got[2]])  # ids[1] is still pending with ppo
    assert stream.trim_acknowledged() == 1
    assert [e[0].decode() for e in redis_client.xrange(RANKINGS_STREAM)] == ids[1:]
    ppo.acknowledge([ppo_got[1], ppo_got[3]])
    assert stream.trim_acknowledged() == 3  # ids[4:] were never delivered to ppo
    assert [e[0].decode() for e in redis_client.xrange(RANKINGS_STREAM)] == ids[4:]
    assert entry_ids(ppo.claim(10)) == ids[4:]


def test_unusable_entries_go_to_the_dead_letter_stream_never_a_silent_ack(group_store, redis_client):
    group_store.save(group_result("g0", ["zero", "one"]))
    reader = RankingStreamReader(redis_client, consumer="rm-1")
    malformed = redis_client.xadd(RANKINGS_STREAM, {"group_id": "g0", "completion_ids": "not json"}).decode()
    good, expired = append_rankings(redis_client, 2)  # g1 has no stored group (and so no copy in its entry)

    batch = reader.read(10, lambda entry_id, ranking, group: (entry_id, [group.completion(c).text
                                                                          for c in ranking.completion_ids]))
    assert batch.rankings == [(good, ["one", "zero"])]
    assert batch.entry_ids == [malformed, good, expired]
    assert batch.skipped[malformed].startswith("malformed") and "expired" in batch.skipped[expired]
    assert (batch.first_id, batch.last_id) == (malformed, expired)
    assert reader.acknowledge(batch.entry_ids) == 1  # the two unusable ones were acknowledged with their move
    assert reader.claim(10) == []
    dead = {fields[b"dead_entry_id"].decode(): fields for _, fields in redis_client.xrange(DEAD_LETTER_STREAM)}
    assert set(dead) == {malformed, expired}
    assert dead[malformed][b"completion_ids"] == b"not json" and b"malformed" in dead[malformed][b"dead_reason"]
    assert dead[expired][b"group_id"] == b"g1" and b"expired" in dead[expired][b"dead_reason"]


def test_a_ranking_whose_group_expires_before_training_still_trains(redis_client):
    store = GroupStore(redis_client, ttl_seconds=1)
    store.save(group_result("short", ["zero", "one"]))
    stream = RankingStream(redis_client, group_ttl_seconds=1)
    acked = stream.append(RankingEntry("short", ["short-1", "short-0"], "human", annotator_id="a")).entry_id
    import time

    deadline = time.monotonic() + 10
    while store.load("short") is not None:  # the served group's TTL runs out (a trainer down for 7 days)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    batch = RankingStreamReader(redis_client, consumer="rm-1").read(
        10, lambda entry_id, ranking, group: (entry_id, [group.completion(c).text for c in ranking.completion_ids]))
    assert batch.rankings == [(acked, ["one", "zero"])] and batch.skipped == {}


def test_an_idle_pending_entry_is_reclaimed_and_a_fresh_one_is_not(redis_client):
    append_rankings(redis_client, 2)
    live = RankingStreamReader(redis_client, consumer="live")
    assert len(live.claim(1)) == 1  # pending with a consumer that is alive
    other = RankingStreamReader(redis_client, consumer="other", claim_idle_seconds=0.5)
    assert len(other.claim(10)) == 1  # only the new entry: the live consumer's is not idle yet
    import time

    time.sleep(0.6)
    assert len(other.claim(10)) == 2  # both idle now: taken over


def test_cli_trim(redis_server, redis_client, capsys):
    from flywheel.app.cli import main as flywheel_main

    reader = RankingStreamReader(redis_client, consumer="rm-1")
    reader.ensure_group()
    append_rankings(redis_client, 3)
    reader.acknowledge(entry_ids(reader.claim(2)))
    assert flywheel_main(["feedback", "trim", "--redis-url", redis_server.url]) == 0
    assert "trimmed 2 acknowledged rankings" in capsys.readouterr().out
    assert redis_client.xlen(RANKINGS_STREAM) == 1


def test_a_consumer_survives_its_group_vanishing(redis_client):
    reader = RankingStreamReader(redis_client, consumer="rm-1")
    append_rankings(redis_client, 2)
    assert len(reader.claim(10)) == 2
    redis_client.flushall()  # e.g. a Redis without persistence restarted
    ids = append_rankings(redis_client, 1)
    assert entry_ids(reader.claim(10)) == ids
