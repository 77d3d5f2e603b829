"""The scheduler's admission and retirement plans, on plain records: no model, no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import serving.scheduler
from serving.scheduler import CacheUse, Scheduler

NOW = 100.0


@dataclass(eq=False)
class Waiting:
    """A queued request as the scheduler sees it (``GenerationRequest`` has the same three members)."""

    name: str
    prompt_tokens: int = 10
    n: int = 1
    cancelled: bool = False
    deadline: float | None = None
    max_new_tokens: int = 10

    @property
    def cache_extent(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    def abandoned(self, now: float) -> bool:
        return self.cancelled or (self.deadline is not None and now >= self.deadline)


@dataclass
class Running:
    request: Waiting
    finish_reason: str | None = None


def names(requests):
    return [r.name for r in requests]


def test_admits_in_arrival_order_and_spends_the_budget():
    waiting = [Waiting("a", 30), Waiting("b", 20), Waiting("c", 5)]
    plan = Scheduler(max_batch_sequences=8, max_prefill_tokens_per_step=100).plan_admission(waiting, 0, NOW)
    assert names(plan.admit) == ["a", "b", "c"]
    assert plan.finish == [] and plan.taken == 3
    assert plan.budget_left == 45


def test_slots_count_every_sample_and_the_head_is_not_overtaken():
    scheduler = Scheduler(max_batch_sequences=8, max_prefill_tokens_per_step=10_000)
    waiting = [Waiting("a", n=4), Waiting("b", n=3), Waiting("c", n=1)]
    # 2 running + a's 4 = 6; b needs 3 of the 2 left, so it waits, and c (which would fit) waits behind it
    plan = scheduler.plan_admission(waiting, 2, NOW)
    assert names(plan.admit) == ["a"]
    assert plan.taken == 1


def test_a_request_filling_the_last_slots_exactly_is_admitted():
    scheduler = Scheduler(max_batch_sequences=8, max_prefill_tokens_per_step=10_000)
    assert names(scheduler.plan_admission([Waiting("a", n=3)], 5, NOW).admit) == ["a"]
    assert scheduler.plan_admission([Waiting("a", n=4)], 5, NOW).taken == 0


def test_the_budget_is_checked_before_each_admission():
    """The request that crosses the budget is admitted; the next one waits for the next step."""
    scheduler = Scheduler(max_batch_sequences=64, max_prefill_tokens_per_step=100)
    waiting = [Waiting("a", 60), Waiting("b", 60), Waiting("c", 1)]
    plan = scheduler.plan_admission(waiting, 0, NOW)
    assert names(plan.admit) == ["a", "b"]
    assert plan.budget_left == -20


def test_a_prompt_longer_than_the_whole_budget_is_still_admitted_alone():
    scheduler = Scheduler(max_batch_sequences=64, max_prefill_tokens_per_step=100)
    waiting = [Waiting("long", 500), Waiting("short", 1)]
    for running in (0, 10):  # into an empty batch, and (as today) into a running one too
        plan = scheduler.plan_admission(waiting, running, NOW)
        assert names(plan.admit) == ["long"]
        assert plan.budget_left == -400


def test_a_later_plan_of_the_same_step_gets_only_the_budget_left():
    """After a prefill frees slots the engine plans again with ``budget_left``."""
    scheduler = Scheduler(max_batch_sequences=4, max_prefill_tokens_per_step=100)
    waiting = [Waiting("a", 70, n=4), Waiting("b", 20, n=4), Waiting("c", 20, n=1)]
    first = scheduler.plan_admission(waiting, 0, NOW)
    assert names(first.admit) == ["a"]  # b needs the slots a holds
    # a's samples all finished on their first token: the slots are free again, 30 tokens are left
    second = scheduler.plan_admission(waiting[first.taken:], 0, NOW, first.budget_left)
    assert names(second.admit) == ["b"]
    assert second.budget_left == 10
    assert scheduler.plan_admission(waiting[2:], 0, NOW, 0).taken == 0  # spent: nothing more this step


def test_abandoned_requests_are_finished_without_a_prefill():
    scheduler = Scheduler(max_batch_sequences=4, max_prefill_tokens_per_step=100)
    waiting = [
        Waiting("cancelled", 1_000, n=8, cancelled=True),  # too big for slots and budget: costs neither
        Waiting("a", 10, n=2),
        Waiting("expired", deadline=NOW - 1),
        Waiting("in-time", deadline=NOW + 1, n=2),
        Waiting("b"),
    ]
    plan = scheduler.plan_admission(waiting, 0, NOW)
    assert names(plan.finish) == ["cancelled", "expired"]
    assert names(plan.admit) == ["a", "in-time"]
    assert plan.taken == 4  # the queue's first four go, in order; b waits for a slot
    assert plan.budget_left == 80


def test_an_abandoned_request_waits_behind_a_blocked_head_or_a_spent_budget():
    scheduler = Scheduler(max_batch_sequences=4, max_prefill_tokens_per_step=100)
    blocked = [Waiting("big", n=4), Waiting("cancelled", cancelled=True)]
    assert scheduler.plan_admission(blocked, 1, NOW).taken == 0
    spent = [Waiting("long", 200), Waiting("cancelled", cancelled=True)]
    plan = scheduler.plan_admission(spent, 0, NOW)
    assert names(plan.admit) == ["long"] and plan.finish == []


def test_finished_rows_retire_and_the_rest_keep_their_order():
    request = Waiting("r", n=4)
    rows = [Running(request), Running(request, "stop"), Running(request), Running(request, "length")]
    retirement = Scheduler.plan_retirement(rows)
    assert retirement.keep == [0, 2]
    assert retirement.leave == [1, 3]
    everyone = Scheduler.plan_retirement([Running(request, "stop"), Running(request, "cancelled")])
    assert (everyone.keep, everyone.leave) == ([], [0, 1])


def test_nothing_retires_while_every_row_runs():
    rows = [Running(Waiting("r", n=2)), Running(Waiting("s"))]
    assert Scheduler.plan_retirement(rows) is None
    assert Scheduler.plan_retirement(rows, NOW) is None
    assert Scheduler.plan_retirement([]) is None


def test_rows_of_abandoned_requests_are_dropped_only_when_asked_with_a_time():
    live, cancelled, expired = Waiting("live"), Waiting("c", cancelled=True), Waiting("e", deadline=NOW - 1)
    rows = [Running(cancelled), Running(live), Running(expired), Running(live, "stop")]
    dropped = Scheduler.plan_retirement(rows, NOW)
    assert dropped.keep == [1]
    assert dropped.leave == [0, 2, 3]
    after_a_decode_step = Scheduler.plan_retirement(rows)  # only finished rows leave there
    assert after_a_decode_step.keep == [0, 1, 2]


def test_the_scheduler_needs_no_torch():
    root = Path(serving.scheduler.__file__).resolve().parents[1]  # this checkout, not an installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    code = "import sys, serving.scheduler; sys.exit(2 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_one_steps_admissions_are_prefilled_together_within_the_padded_budget():
    """Shortest first; a group stops growing once its prompts times its longest would pass the
    budget, so one long prompt is not padded onto many short ones; a prompt over the budget is alone."""
    scheduler = Scheduler(max_batch_sequences=64, max_prefill_tokens_per_step=100)
    admitted = [Waiting("long", 90), Waiting("a", 10), Waiting("b", 30), Waiting("c", 20), Waiting("huge", 400)]
    assert [names(g) for g in scheduler.prefill_groups(admitted)] == [["a", "c", "b"], ["long"], ["huge"]]
    assert [names(g) for g in scheduler.prefill_groups([Waiting(str(i), 5) for i in range(4)])] == [["0", "1", "2", "3"]]
    assert scheduler.prefill_groups([]) == []


def test_a_batch_is_budgeted_at_its_rows_times_its_widest_row():
    """Left padding makes every row as wide as the widest: two short rows fit a budget of 200
    tokens alone, but not beside one long row (3 rows x 100 columns)."""
    scheduler = Scheduler(max_batch_sequences=64, max_prefill_tokens_per_step=10_000, max_cache_tokens=200)
    short = [Waiting("a", 10, max_new_tokens=30), Waiting("b", 10, max_new_tokens=30)]
    assert names(scheduler.plan_admission(short, 0, NOW).admit) == ["a", "b"]  # 2 x 40
    long = Waiting("long", 60, max_new_tokens=40)  # 100 columns
    plan = scheduler.plan_admission([long] + short, 0, NOW)
    assert names(plan.admit) == ["long", "a"]  # 2 x 100 fits; a third row of 100 would not
    # the rows already running count at the widest of theirs and the newcomer's
    assert scheduler.plan_admission([Waiting("c", 10, max_new_tokens=30)], 2, NOW,
                                    cache=CacheUse(rows=2, extent=100)).taken == 0
    assert names(scheduler.plan_admission([Waiting("c", 10, max_new_tokens=30)], 1, NOW,
                                          cache=CacheUse(rows=1, extent=100)).admit) == ["c"]


def test_the_head_waits_for_cache_memory_and_nothing_overtakes_it():
    scheduler = Scheduler(max_batch_sequences=64, max_prefill_tokens_per_step=10_000, max_cache_tokens=1000)
    waiting = [Waiting("big", 400, n=2, max_new_tokens=100), Waiting("small", 5, max_new_tokens=5)]
    busy = CacheUse(rows=4, extent=100, others=200)  # 600 taken: 600 + 6 x 500 would pass 1000
    assert scheduler.plan_admission(waiting, 4, NOW, cache=busy).taken == 0
    assert names(scheduler.plan_admission(waiting, 0, NOW, cache=CacheUse()).admit) == ["big"]
    # a request larger than the whole budget still goes into an empty cache: the queue always moves
    huge = Waiting("huge", 2000, max_new_tokens=100)
    assert names(scheduler.plan_admission([huge, Waiting("next")], 0, NOW).admit) == ["huge"]
    assert Scheduler(64, 10_000).plan_admission([huge] * 3, 0, NOW).taken == 3  # 0: no bound


def test_a_chunked_prompt_is_admitted_only_first_and_ends_the_plan():
    """A prompt past prefill_chunk_tokens waits for a plan of its own (nothing before it in the
    step), and nothing behind it is admitted with it: its chunks take the steps until its last one."""
    scheduler = Scheduler(max_batch_sequences=16, max_prefill_tokens_per_step=4096, prefill_chunk_tokens=512)
    short, long, behind = Waiting("short"), Waiting("long", prompt_tokens=2000), Waiting("behind")
    assert not scheduler.chunked(short) and scheduler.chunked(long)
    plan = scheduler.plan_admission([short, long, behind], running=0, now=NOW)
    assert names(plan.admit) == ["short"]
    plan = scheduler.plan_admission([long, behind], running=0, now=NOW)
    assert names(plan.admit) == ["long"] and plan.budget_left == 0
    # without chunking the same prompt is an ordinary (whole) admission, with what fits behind it
    whole = Scheduler(max_batch_sequences=16, max_prefill_tokens_per_step=4096)
    assert names(whole.plan_admission([long, behind], running=0, now=NOW).admit) == ["long", "behind"]
