"""The engine's scheduler: which waiting requests join the batch this step, which rows leave it.

It only plans; the engine carries the plan out (prefills, events). It reads a few plain fields
of requests and rows, never a model or a tensor, so the admission policy is tested on its own
(``tests/serving/test_scheduler.py``).

Admission is first come, first served: the queue's head is admitted while its ``n`` rows fit in
the free sequence slots and the step still has prefill budget, so a big request at the head is
never overtaken by small ones behind it. The budget bounds how long one step's prefills stall
the running rows' decoding; it is checked before each admission, so a prompt longer than the
whole budget is still admitted (the first of its step) rather than never. A request cancelled or
past its deadline while it waits is finished without a prefill when it reaches the head. The
requests admitted together are prefilled together (``prefill_groups``), in as few forwards as
padding allows.

A prompt longer than ``prefill_chunk_tokens`` is prefilled in chunks, one per step, the running rows
decoding between them (``Engine`` carries it across steps): it is admitted only as the first of a
plan and ends it, so it and nothing else is prefilled while its chunks run, and the queue behind it
keeps its order.

Admission is also bounded by the key/value cache's memory (``max_cache_tokens``, the engine's
byte budget over one token's keys and values in every layer). A batch is left-padded, so its cache
is rows x its widest row: every row can reach ``cache_extent`` columns (prompt + max_new_tokens),
and the batch is budgeted at rows x the widest extent among them. One long prompt thus waits at
the head, rather than making 63 short rows pad to its length, until the batch it would join fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Iterable, Protocol, Sequence, TypeVar


class Schedulable(Protocol):
    """What admission reads of a waiting request (``GenerationRequest`` in the engine)."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def n(self) -> int: ...

    @property
    def cache_extent(self) -> int:
        """The most cache columns one of its rows can take: prompt tokens + max_new_tokens."""
        ...

    def abandoned(self, now: float) -> bool:
        """Cancelled by the caller or past its deadline (``now`` is ``time.monotonic()``)."""
        ...


class Row(Protocol):
    """What retirement reads of a running row (one sample of an admitted request)."""

    finish_reason: str | None
    request: Schedulable


R = TypeVar("R", bound=Schedulable)


@dataclass
class Admission(Generic[R]):
    """One admission plan: the queue's first ``taken`` requests, in order, split by what to do."""

    finish: list[R] = field(default_factory=list)  # abandoned while waiting: complete them unstarted
    admit: list[R] = field(default_factory=list)  # prefill these, in arrival order
    budget_left: int = 0  # prefill tokens the step has left after ``admit``

    @property
    def taken(self) -> int:
        return len(self.finish) + len(self.admit)


@dataclass
class Retirement:
    """Rows leaving a batch: ``keep`` and ``leave`` are row indices, in order, that cover it.

    A leaving row whose ``finish_reason`` is still ``None`` was dropped: its request was
    cancelled or ran past its deadline.
    """

    keep: list[int]
    leave: list[int]


@dataclass(frozen=True)
class CacheUse:
    """What the running batches may take of the key/value cache, in token columns: the batch new
    rows join (``rows`` x its widest ``extent``) and every other one (a hot-swap's previous version
    finishing its rows), ``others`` tokens in all."""

    rows: int = 0
    extent: int = 0
    others: int = 0

    @property
    def tokens(self) -> int:
        return self.rows * self.extent + self.others


@dataclass(frozen=True)
class Scheduler:
    max_batch_sequences: int
    max_prefill_tokens_per_step: int
    max_cache_tokens: int = 0
    """Token columns (rows x width) the running batches' caches may reach; 0 = no bound."""
    prefill_chunk_tokens: int = 0
    """Prompts longer than this are prefilled in chunks over several steps; 0 = whole prompts."""

    def chunked(self, request: Schedulable) -> bool:
        """Whether ``request``'s prompt is prefilled in chunks, one per step."""
        return 0 < self.prefill_chunk_tokens < request.prompt_tokens

    def plan_admission(self, waiting: Iterable[R], running: int, now: float,
                       budget: int | None = None, cache: CacheUse = CacheUse()) -> Admission[R]:
        """Plan from the head of ``waiting`` given ``running`` rows in the batch.

        ``budget`` is what is left of this step's prefill tokens (the whole budget if ``None``).
        ``cache`` is what the running rows may take of the cache (``max_cache_tokens``); into an
        empty cache the head is admitted whatever its size (the server refuses requests larger than
        the whole budget), so the queue always moves. The plan assumes the admitted rows stay. A
        prefilled sample may finish on its first token and free its slot at once, so the engine
        plans again with ``budget_left`` until a plan takes nothing; the step then admits what
        deciding one request at a time would.
        """
        budget = self.max_prefill_tokens_per_step if budget is None else budget
        free = self.max_batch_sequences - running
        plan: Admission[R] = Admission(budget_left=budget)
        for request in waiting:
            if budget <= 0:
                break
            if request.abandoned(now):
                plan.finish.append(request)  # costs no budget and no slot
                continue
            if request.n > free:
                break  # the head waits for slots; nothing behind it overtakes
            if self.chunked(request) and plan.admit:
                break  # a chunked prompt starts a plan of its own, at the next one
            grown = CacheUse(cache.rows + request.n, max(cache.extent, request.cache_extent), cache.others)
            if self.max_cache_tokens and cache.tokens and grown.tokens > self.max_cache_tokens:
                break  # the head waits for cache memory, as for slots
            free -= request.n
            budget -= request.prompt_tokens
            cache = grown
            plan.admit.append(request)
            if self.chunked(request):
                budget = 0  # its chunks take the step: nothing is admitted behind it until they are done
                break
        plan.budget_left = budget
        return plan

    def prefill_groups(self, admitted: Sequence[R]) -> list[list[R]]:
        """Split one step's admissions into the groups prefilled together, each in one left-padded
        forward: by prompt length (shortest first), a group grows while its prompts times its longest
        prompt (the padded tokens it computes) stay within the step's prefill budget, so one long
        prompt does not make many short ones compute its length in padding. A prompt longer than
        the budget is a group of its own."""
        groups: list[list[R]] = []
        for request in sorted(admitted, key=lambda r: r.prompt_tokens):
            if groups and (len(groups[-1]) + 1) * request.prompt_tokens <= self.max_prefill_tokens_per_step:
                groups[-1].append(request)
            else:
                groups.append([request])
        return groups

    @staticmethod
    def plan_retirement(rows: Sequence[Row], now: float | None = None) -> Retirement | None:
        """The rows that leave: finished ones, and with ``now`` also those whose request was
        abandoned. ``None`` when every row stays (the common case, so a decode step allocates
        nothing more than the list it always built)."""
        if now is None:
            keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
        else:
            keep = [i for i, row in enumerate(rows) if row.finish_reason is None and not row.request.abandoned(now)]
        if len(keep) == len(rows):
            return None
        kept = set(keep)
        return Retirement(keep, [i for i in range(len(rows)) if i not in kept])
