"""The demo's --ai-fraction: simulated users rank only part of the served groups, through the real
gRPC API, and leave the rest to the AI labeler (they stay labelling candidates)."""

from __future__ import annotations

import grpc
import pytest
import redis

from flywheel.app import demo
from flywheel.app import simulated_users as simulated
from flywheel.app.preferences import PREFERENCES
from flywheel.contracts.keys import LABELLING_CANDIDATES_KEY, RANKINGS_STREAM
from flywheel.contracts.rankings import RankingEntry

from support.auth import CLIENT_KEY, CLIENT_NAME


def test_a_stable_share_of_groups_is_left_to_the_ai():
    ids = [f"{i:032x}" for i in range(4000)]
    share = sum(simulated.left_to_ai(g, 0.3) for g in ids) / len(ids)
    assert 0.27 < share < 0.33
    assert [simulated.left_to_ai(g, 0.3) for g in ids[:50]] == [simulated.left_to_ai(g, 0.3) for g in ids[:50]]
    assert not any(simulated.left_to_ai(g, 0.0) for g in ids)


def test_users_rank_only_their_share_and_leave_the_rest_to_the_labeler(tiny_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{tiny_server.port}")
    users = [simulated.SimulatedUser(CLIENT_NAME, CLIENT_KEY) for _ in range(2)]  # a client key ranks as its name
    tally = simulated.rank_rounds(channel, ["What is 2+2?", "Name a colour."], 16, users,
                                  preference=PREFERENCES["concise"], seed=1, ai_fraction=0.5,
                                  plan=simulated.SamplingPlan(n=2, max_new_tokens=4, timeout_seconds=120))
    channel.close()
    assert not tally.errors
    assert tally.rankings + tally.left_to_ai == 16 and tally.rankings > 0 and tally.left_to_ai > 0
    client = redis.Redis.from_url(tiny_server.config.redis_url)
    ranked = {RankingEntry.from_fields(f).group_id for _, f in client.xrange(RANKINGS_STREAM)}
    candidates = {m.decode() for m in client.zrange(LABELLING_CANDIDATES_KEY, 0, -1)}
    client.close()
    assert len(ranked) == tally.rankings and not any(simulated.left_to_ai(g, 0.5) for g in ranked)
    left = candidates - ranked  # served, not ranked by a person: the labeler's to rank once due
    assert len(left) == tally.left_to_ai and all(simulated.left_to_ai(g, 0.5) for g in left)


def test_the_fraction_is_checked_and_off_by_default(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--ai-fraction", "1.0"])
    assert "--ai-fraction must be at least 0 and below 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--ai-fraction"):
        demo.DemoConfig(data_dir=tmp_path, model="", ai_fraction=-0.1)
    assert demo.DemoConfig(data_dir=tmp_path, model="").ai_fraction == 0.0
    assert demo.DEMO_DEFAULTS["LABELLING_FRACTION"] == "0"  # the demo without RLAIF keeps its labeler idle
