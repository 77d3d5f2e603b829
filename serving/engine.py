"""The continuous-batching engine: one thread that owns the model and decodes every running
sequence together, one token per step.

Requests wait in a bounded queue. At each step boundary the scheduler admits waiting requests
while there are free sequence slots: the prompts admitted together are prefilled together in one
left-padded forward (each prompt once, its keys/values copied into ``n`` rows: the n samples share
the prefill), and all their rows join the running batch with one copy of its cache. Rows leave
as soon as they finish (end of sequence, stop string, length, cancellation or deadline), so a
short request never waits for a long one. Results flow back through a per-request event queue,
which the gRPC handlers read.

The work is split as in vLLM: ``serving/scheduler.py`` plans admissions and retirements from
plain request/row fields, ``serving/model_runner.py`` owns the model(s) and the batches' caches,
and this module's loop joins them, samples (``serving/sampling.py``), detokenizes and delivers
events.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from flywheel.contracts.groups import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, GroupResult, SampleResult
from serving.decode_step import lean_decoder
from serving.detokenizer import IncrementalDetokenizer
from serving.kv_cache import kv_bytes_per_token
from serving.model_runner import Batch, ModelRunner, Prefill
from serving.sampling import SamplingParams, sample_generator, sample_tokens
from serving.scheduler import Scheduler

__all__ = [
    "FINISH_CANCELLED", "FINISH_LENGTH", "FINISH_STOP", "DoneEvent", "Engine", "EngineConfig", "EngineObserver",
    "EngineStoppedError", "ErrorEvent", "GenerationFailedError", "GenerationRequest", "QueueFullError", "TokenEvent",
    "FAULTS_ENV",
    "iter_events", "run_to_completion", "top_alternatives",
]

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the caller should retry later."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down or failed."""


class GenerationFailedError(RuntimeError):
    """This request's generation failed inside the engine (the engine itself goes on serving)."""


# Test-only fault injection, read once when an engine starts and only when the variable is set: a
# prompt containing ``<<flywheel-fault:prefill>>`` fails in its prefill, ``...:decode>>`` in the
# first decode step of its batch, ``...:fatal>>`` in the engine loop itself (the engine cannot go
# on). Never set in production; tests/serving/test_engine_faults.py sets it on a server process.
FAULTS_ENV = "FLYWHEEL_TEST_ENGINE_FAULTS"
FAULT_MARK = "<<flywheel-fault:"


class InjectedFault(RuntimeError):
    """The fault a test asked for (``FAULTS_ENV``)."""


@dataclass
class TokenEvent:
    """Text a sample added since its previous event, and (when the request asked for them) the
    log-probabilities of the tokens that made it."""

    index: int
    text: str
    token_count: int
    group_id: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


@dataclass
class DoneEvent:
    result: GroupResult


@dataclass
class ErrorEvent:
    error: BaseException


@dataclass
class GenerationRequest:
    """A prompt and its sampling parameters, plus the queue its events are delivered on."""

    prompt: str
    prompt_token_ids: list[int]
    params: SamplingParams
    deadline: float | None = None  # time.monotonic() after which the request is cancelled
    stream: bool = False
    # report the k most likely tokens at each step (0 = only the sampled token's log-probability);
    # a reporting option, not a sampling one, so it is not part of the stored SamplingParams
    top_logprobs: int = 0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    events: "queue.SimpleQueue" = field(default_factory=queue.SimpleQueue)
    created_at: float = field(default_factory=time.time)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    # what the scheduler reads (serving.scheduler.Schedulable)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def cache_extent(self) -> int:
        return len(self.prompt_token_ids) + self.params.max_new_tokens

    def abandoned(self, now: float) -> bool:
        """Cancelled, or past its deadline at ``now`` (``time.monotonic()``)."""
        return self.cancelled.is_set() or (self.deadline is not None and now >= self.deadline)


@dataclass
class EngineConfig:
    max_batch_sequences: int = 64
    max_queued_requests: int = 256
    max_prefill_tokens_per_step: int = 4096  # bounds how long one step's admissions stall decoding
    idle_wait_seconds: float = 0.05
    # failed prefills or steps in a row (no step succeeding between them) after which the engine
    # stops for good: one failure fails only its group(s); repeated failures mean a broken engine
    max_consecutive_failures: int = 3
    # prompts whose leading 16-token blocks were prefilled before reuse them (0 = off); per policy version
    prefix_cache_entries: int = 64
    # the running batches' key/value caches stay within this (rows x widest row, see serving.scheduler); 0 = no bound
    max_cache_bytes: int = 0
    # a longer prompt is prefilled in chunks of about this many tokens, one per step, the running rows
    # decoding between them, so a long prompt does not stall every stream (0 = whole prompts; needs
    # the prefix cache, whose entries carry each chunk to the next)
    prefill_chunk_tokens: int = 512


PREFILL_CHUNK_MIN = 32  # two prefix-cache blocks: a chunk must carry at least one block to the next


class EngineObserver:
    """Hooks the engine calls; the serving metrics implement them (no-ops by default). Each hook
    that concerns sampling names the policy version that sampled, so metrics split by version
    after a hot-swap."""

    def on_step(self, batch_sequences: int, seconds: float, new_tokens: int, policy_version: int) -> None: ...
    # each loop: requests waiting, sequences decoding, and requests admitted but still prefilling in chunks (0 or 1)
    def on_queue(self, waiting: int, running: int, prefilling: int) -> None: ...
    def on_cache(self, allocated_bytes: int) -> None: ...  # the running batches' key/value buffers, each loop
    def on_admit(self, queued_seconds: float, policy_version: int) -> None: ...
    # once per prefill forward: the prompts prefilled together, their tokens and first sampled tokens
    def on_prefill(self, prompt_tokens: int, seconds: float, new_tokens: int, policy_version: int) -> None: ...
    def on_first_token(self, seconds: float, policy_version: int) -> None: ...
    def on_finished(self, result: GroupResult) -> None: ...
    def on_group_failed(self, stage: str) -> None: ...
    def on_prefix_hit(self, cached_tokens: int, prompt_tokens: int) -> None: ...
    # once per chunk of a long prompt's prefill (its last part is an ordinary prefill)
    def on_prefill_chunk(self, tokens: int, seconds: float) -> None: ...


class _Group:
    """Engine-side state of one admitted request."""

    def __init__(self, request: GenerationRequest, policy_version: int, eos_ids: set[int], tokenizer) -> None:
        self.request = request
        self.policy_version = policy_version
        self.group_id = uuid.uuid4().hex
        self.samples = [_Sequence(self, i, tokenizer) for i in range(request.params.n)]
        self.eos_ids = eos_ids
        self.first_token_at: float | None = None
        self.remaining = request.params.n

    def result(self) -> GroupResult:
        request = self.request
        samples = [
            SampleResult(s.index, f"{self.group_id}-{s.index}", s.detok.text, s.finish_reason or FINISH_CANCELLED,
                         list(s.detok.token_ids), list(s.logprobs), list(s.top_logprobs))
            for s in self.samples
        ]
        return GroupResult(self.group_id, self.policy_version, request.prompt, list(request.prompt_token_ids),
                           request.params, samples, request.created_at, self.first_token_at, time.time())


@dataclass
class _Prefilled:
    """Groups prefilled in one forward, with their first tokens, not yet in the batch."""

    groups: list[_Group]
    prefill: Prefill
    tokens: torch.Tensor
    logprobs: torch.Tensor
    seconds: float


@dataclass
class _Chunking:
    """A long prompt being prefilled a chunk per step: ``done`` of its tokens are in ``batch``'s
    prefix cache, ``reused`` of them were there before its first chunk (another request's)."""

    request: GenerationRequest
    batch: Batch
    done: int = 0
    reused: int = 0


class _Sequence:
    def __init__(self, group: _Group, index: int, tokenizer) -> None:
        params = group.request.params
        self.group = group
        self.request = group.request  # what the scheduler reads (serving.scheduler.Row)
        self.index = index
        self.generator = sample_generator(params.seed, index)
        self.detok = IncrementalDetokenizer(tokenizer, params.stop, params.min_new_tokens)
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.streamed_tokens = 0  # tokens whose log-probabilities a TokenEvent has carried
        self.finish_reason: str | None = None


class Engine:
    """Owns the model(s); ``submit`` from any thread, results arrive on the request's event queue."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig | None = None,
                 observer: EngineObserver | None = None, policy_version: int = 0,
                 on_fatal=None) -> None:
        self.tokenizer = tokenizer
        # called (on the engine thread) once the engine has stopped for good after a failure
        self.on_fatal = on_fatal
        self._faults = bool(os.environ.get(FAULTS_ENV))
        self._consecutive_failures = 0
        self._in_hand: list[GenerationRequest] = []
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.cache_token_bytes = kv_bytes_per_token(model)
        self.max_cache_tokens = self.config.max_cache_bytes // self.cache_token_bytes
        if self.config.max_cache_bytes and not self.max_cache_tokens:
            raise ValueError(f"max_cache_bytes {self.config.max_cache_bytes} holds no token of this model "
                             f"({self.cache_token_bytes} bytes of keys and values per token)")
        chunk = self.config.prefill_chunk_tokens
        if chunk and not self.config.prefix_cache_entries:
            log.warning("prefill_chunk_tokens %d needs the prefix cache (prefix_cache_entries 0): long prompts are "
                        "prefilled whole", chunk)
            chunk = 0
        if chunk and chunk < PREFILL_CHUNK_MIN:
            raise ValueError(f"prefill_chunk_tokens must be 0 or at least {PREFILL_CHUNK_MIN}, got {chunk}")
        self.scheduler = Scheduler(self.config.max_batch_sequences, self.config.max_prefill_tokens_per_step,
                                   self.max_cache_tokens, chunk)
        self._chunking: _Chunking | None = None
        self.runner = ModelRunner(model, policy_version, self.config.prefix_cache_entries)
        self.device = self.runner.device

        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._running = False
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._pending_swap: tuple[torch.nn.Module, int, threading.Event] | None = None

    # ---- public API (any thread) ----

    @property
    def policy_version(self) -> int:
        """The version new requests are served by."""
        pending = self._pending_swap
        return pending[1] if pending is not None else self.runner.current.version

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.current.model

    def start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="flywheel-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; requests still waiting or running get an error event."""
        with self._wakeup:
            self._running = False
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def swap(self, model: torch.nn.Module, version: int) -> threading.Event:
        """Serve ``version`` from the next step boundary on. Requests already running finish on the
        model they started with; requests admitted after the boundary use the new one. Returns an
        event set once the swap has happened."""
        lean_decoder(model)  # made here, in the caller's thread: the engine thread would stall on it
        done = threading.Event()
        with self._wakeup:
            self._pending_swap = (model, version, done)
            self._wakeup.notify()
        return done

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        with self._wakeup:
            if not self._running:
                raise EngineStoppedError("the engine is not running")
            if len(self._waiting) >= self.config.max_queued_requests:
                raise QueueFullError(
                    f"the request queue is full ({self.config.max_queued_requests} waiting); retry later")
            self._waiting.append(request)
            self._wakeup.notify()
        return request

    @property
    def failure(self) -> BaseException | None:
        """Why the engine stopped for good, or None while it runs (or stopped normally)."""
        return self._failure

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running_sequences(self) -> int:
        return self.runner.running_sequences

    # ---- the engine thread ----

    def _loop(self) -> None:
        runner = self.runner
        try:
            with torch.inference_mode():
                while True:
                    with self._wakeup:
                        if not self._running:
                            break
                        if (not runner.running_sequences and not self._waiting and self._pending_swap is None
                                and self._chunking is None):
                            self._wakeup.wait(self.config.idle_wait_seconds)
                            continue
                    self._apply_swap()
                    self._drop_cancelled()
                    self._admit()
                    for batch in list(runner.batches):
                        if batch.rows:
                            self._decode_step(batch)
                    runner.release_finished_versions()
                    self.observer.on_queue(len(self._waiting), runner.running_sequences,
                                           0 if self._chunking is None else 1)
                    self.observer.on_cache(runner.cache_bytes)
        except BaseException as exc:  # the loop itself broke (not one group's work): the engine cannot go on
            log.exception("engine loop failed; the engine stops")
            self._failure = exc
        finally:
            failure = self._failure
            self._fail_everything(
                EngineStoppedError(f"the engine stopped after an internal failure ({type(failure).__name__}); "
                                   "the server is restarting, retry shortly")
                if failure is not None else EngineStoppedError("the server is shutting down"))
            if failure is not None and self.on_fatal is not None:
                try:
                    self.on_fatal(failure)
                except Exception:
                    log.exception("the engine's on_fatal callback failed")

    def _group_failed(self, stage: str, exc: Exception, requests: list[GenerationRequest]) -> None:
        """One prefill or decode step failed: its requests get an error, the engine goes on, unless
        failures keep coming with no success between them (then the loop ends: a broken engine)."""
        self._consecutive_failures += 1
        log.error("engine %s failed for %d request(s) (%s: %s); failure %d in a row", stage, len(requests),
                  type(exc).__name__, exc, self._consecutive_failures, exc_info=exc)
        error = GenerationFailedError(
            f"generation failed in the engine's {stage} ({type(exc).__name__}); the server goes on serving, "
            "retrying the request may succeed")
        for request in requests:
            self.observer.on_group_failed(stage)
            request.events.put(ErrorEvent(error))
        if self._consecutive_failures >= self.config.max_consecutive_failures:
            raise EngineStoppedError(f"{self._consecutive_failures} engine failures in a row") from exc

    def _inject(self, stage: str, requests) -> None:
        if self._faults and any(f"{FAULT_MARK}{stage}>>" in r.prompt for r in requests):
            raise InjectedFault(f"injected {stage} fault ({FAULTS_ENV})")

    def _apply_swap(self) -> None:
        with self._lock:
            pending, self._pending_swap = self._pending_swap, None
        if pending is None:
            return
        model, version, done = pending
        finishing = self.runner.swap(model, version)
        log.info("now serving policy version %d (%d sequences finish on the previous version)", version, finishing)
        done.set()

    def _fail_everything(self, error: BaseException) -> None:
        with self._lock:
            self._running = False
            waiting, self._waiting = list(self._waiting), collections.deque()
            pending, self._pending_swap = self._pending_swap, None
        groups = {id(s.group): s.group for s in self.runner.rows()}
        in_hand, self._in_hand = self._in_hand, []
        if self._chunking is not None:
            in_hand.append(self._chunking.request)
            self._chunking = None
        for request in in_hand + waiting + [g.request for g in groups.values()]:
            request.events.put(ErrorEvent(error))
        self.runner.clear()
        if pending is not None:
            pending[2].set()

    def _admit(self) -> None:
        """Carry out the scheduler's admissions (in arrival order) until a plan takes nothing: a
        prefill may free slots at once (a sample done on its first token), and requests may arrive
        meanwhile, so each plan starts from the live queue, running rows and budget left."""
        if self._chunking is not None:  # a long prompt's chunks take the step until its last one
            self._prefill_next_chunk()
            return
        budget: int | None = None  # the step's whole budget
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._waiting:
                    return
                plan = self.scheduler.plan_admission(self._waiting, self.runner.running_sequences, now, budget,
                                                     self.runner.cache_use())
                for _ in range(plan.taken):
                    self._waiting.popleft()
            if not plan.taken:
                return
            for request in plan.finish:
                self._finish_unstarted(request)
            # out of the queue, not yet in a batch: if the loop dies now, these must hear of it too
            self._in_hand = list(plan.admit)
            if plan.admit and self.scheduler.chunked(plan.admit[-1]):  # the plan's only one (Scheduler)
                self._chunking = _Chunking(plan.admit[-1], self.runner.current)
                self._in_hand = []
                self.observer.on_admit(time.time() - self._chunking.request.created_at, self.runner.current.version)
                self._prefill_next_chunk()
                return
            if plan.admit:
                self._prefill(plan.admit)
            self._in_hand = []
            budget = plan.budget_left

    def _prefill_next_chunk(self) -> None:
        """One more chunk of the long prompt being prefilled, or its last part as an ordinary
        prefill (which joins the batch). Chunks end one token past a prefix-cache block, so each
        chunk's blocks are what the next one finds; after a hot-swap it starts again on the new
        version's batch (its prefix cache is that model's)."""
        chunking = self._chunking
        request, batch = chunking.request, self.runner.current
        if request.abandoned(time.monotonic()):
            self._chunking = None
            self._finish_unstarted(request)
            return
        if chunking.batch is not batch:
            chunking.batch, chunking.done, chunking.reused = batch, 0, 0
        tokens = request.prompt_token_ids
        chunk, block = self.scheduler.prefill_chunk_tokens, batch.prefixes.block_tokens
        # from what the cache holds (a shared system turn, the same long prompt sent before), else from the last chunk
        start = max(chunking.done, batch.prefixes.cached_tokens(tokens))
        end = (start + chunk) // block * block + 1
        if end >= len(tokens):  # the rest fits in one chunk: the prompt's own prefill
            self._chunking = None
            self._in_hand = [request]
            self._prefill([request], chunked=chunking)
            self._in_hand = []
            return
        started = time.perf_counter()
        try:
            self._inject("prefill", [request])
            found = batch.prefill_chunk(tokens[:end])
        except Exception as exc:  # only this request's: nothing of it is in the batch yet
            self._chunking = None
            self._group_failed("prefill", exc, [request])
            return
        if chunking.done == 0:
            chunking.reused = found
        chunking.done = end - 1
        self._consecutive_failures = 0
        self.observer.on_prefill_chunk(end - found, time.perf_counter() - started)

    def _finish_unstarted(self, request: GenerationRequest) -> None:
        group = _Group(request, self.policy_version, self.eos_ids, self.tokenizer)
        for sample in group.samples:
            sample.finish_reason = FINISH_CANCELLED
        self._deliver(group)

    def _prefill(self, requests: list[GenerationRequest], chunked: _Chunking | None = None) -> None:
        """Prefill the requests admitted together (one forward per group the scheduler makes) and
        append all their rows to the batch with one cache copy. With ``chunked``, ``requests`` is
        that long prompt alone, its last part: observed at its admission already, and its
        prefix-cache hit is what the cache held before its chunks (the prefill's own if none ran)."""
        batch = self.runner.current
        if chunked is None:
            for request in requests:
                self.observer.on_admit(time.time() - request.created_at, batch.version)
        self._inject("fatal", requests)  # outside the groups' handling: a failure of the loop itself
        done: list[_Prefilled] = []
        for together in self.scheduler.prefill_groups(requests):
            done += self._prefill_together(batch, together)
        if not done:
            return
        rows = [s for d in done for g in d.groups for s in g.samples]
        try:
            batch.add([d.prefill for d in done], rows, torch.cat([d.tokens for d in done]),
                      [row.request.cache_extent for row in rows])
        except Exception as exc:  # the batch's cache may be half-extended: its rows cannot go on
            self._fail_batch(batch, "prefill", exc, extra=[g.request for d in done for g in d.groups])
            return
        for d in done:  # clients hear of the rows once they are in the batch
            samples = [s for g in d.groups for s in g.samples]
            self._record(samples, d.tokens, d.logprobs, d.prefill.logits)
            self.observer.on_prefill(sum(g.request.prompt_tokens for g in d.groups), d.seconds, len(samples),
                                     batch.version)
            for group, hit in zip(d.groups, d.prefill.prefix_hits):
                if chunked is not None and chunked.done:
                    hit = chunked.reused
                self.observer.on_prefix_hit(hit, group.request.prompt_tokens)
                group.first_token_at = time.time()
                self.observer.on_first_token(group.first_token_at - group.request.created_at, batch.version)
        self._consecutive_failures = 0
        # a sample may already be finished (max_new_tokens=1, end of sequence): retire it now
        self._retire(batch)

    def _prefill_together(self, batch: Batch, requests: list[GenerationRequest]) -> list["_Prefilled"]:
        """One forward for ``requests``; if it fails, each is prefilled alone, so a failure fails
        only the request(s) it belongs to (until the rows join the batch, they concern nobody else)."""
        started = time.perf_counter()
        groups = [_Group(r, batch.version, self.eos_ids, self.tokenizer) for r in requests]
        try:
            self._inject("prefill", requests)
            prefill = batch.prefill([(r.prompt_token_ids, r.params.n) for r in requests])
            tokens, logprobs = self._choose(prefill.logits, [s for g in groups for s in g.samples])
        except Exception as exc:
            if len(requests) == 1:
                self._group_failed("prefill", exc, requests)
                return []
            log.warning("the joint prefill of %d requests failed (%s: %s); prefilling them one by one",
                        len(requests), type(exc).__name__, exc)
            return [d for r in requests for d in self._prefill_together(batch, [r])]
        self._consecutive_failures = 0  # a prefill worked: the failures before it were not the engine's
        return [_Prefilled(groups, prefill, tokens, logprobs, time.perf_counter() - started)]

    def _decode_step(self, batch: Batch) -> None:
        started = time.perf_counter()
        try:
            self._inject("decode", [s.request for s in batch.rows])
            logits = batch.forward_step()
            tokens, logprobs = self._choose(logits, batch.rows)
        except Exception as exc:  # the step's rows share one forward: the groups in it fail, the rest go on
            self._fail_batch(batch, "decode step", exc)
            return
        batch.last_tokens = tokens.unsqueeze(1)
        self._record(batch.rows, tokens, logprobs, logits)
        size = len(batch.rows)
        # observed before the rows retire: a finished request's client may read the metrics at once
        self.observer.on_step(size, time.perf_counter() - started, size, batch.version)
        self._retire(batch)
        self._consecutive_failures = 0

    def _fail_batch(self, batch: Batch, stage: str, exc: Exception, extra: list[GenerationRequest] = ()) -> None:
        """Every group with a row in ``batch`` fails (their shared cache is no longer trustworthy)."""
        requests = list({id(s.request): s.request for s in batch.rows}.values())
        requests += [r for r in extra if all(r is not q for q in requests)]
        batch.clear()
        self._group_failed(stage, exc, requests)

    def _choose(self, logits: torch.Tensor, rows: list[_Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one token per row with each row's own parameters and random stream."""
        params = [s.group.request.params for s in rows]
        temperatures = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        uniforms = torch.cat([torch.rand(1, generator=s.generator) for s in rows])
        early = [i for i, (s, p) in enumerate(zip(rows, params)) if len(s.detok.token_ids) < p.min_new_tokens]
        blocked = None
        if early:
            eos = sorted(self.eos_ids)
            blocked = (torch.tensor(early).repeat_interleave(len(eos)), torch.tensor(eos * len(early)))
        return sample_tokens(logits, temperatures, top_ps, uniforms, blocked)

    def _record(self, rows: list[_Sequence], tokens: torch.Tensor, logprobs: torch.Tensor,
                logits: torch.Tensor) -> None:
        alternatives = top_alternatives(logits, [s.request.top_logprobs for s in rows])
        for sequence, token, logprob, top in zip(rows, tokens.tolist(), logprobs.tolist(), alternatives):
            self._append_token(sequence, token, logprob, top)

    def _append_token(self, sequence: _Sequence, token: int, logprob: float,
                      top: list[tuple[int, float]] | None = None) -> None:
        group = sequence.group
        is_eos = token in group.eos_ids
        sequence.detok.add(token, skip=is_eos)
        sequence.logprobs.append(logprob)
        if top is not None:
            sequence.top_logprobs.append(top)
        count = len(sequence.detok.token_ids)
        if is_eos or sequence.detok.stopped:
            sequence.finish_reason = FINISH_STOP
        elif count >= group.request.params.max_new_tokens:
            sequence.finish_reason = FINISH_LENGTH
        if group.request.stream:
            delta = sequence.detok.take_delta(final=sequence.finish_reason is not None)
            if delta or sequence.finish_reason is not None:
                start, sequence.streamed_tokens = sequence.streamed_tokens, count
                group.request.events.put(TokenEvent(
                    sequence.index, delta, count, group.group_id, sequence.logprobs[start:],
                    sequence.top_logprobs[start:], sequence.detok.token_ids[start:]))

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for batch in self.runner.batches:
            self._retire(batch, now)

    def _retire(self, batch: Batch, now: float | None = None) -> None:
        """Remove the rows the scheduler retires (with ``now``, also those of abandoned requests,
        which finish as cancelled); complete groups whose samples are all done."""
        retirement = self.scheduler.plan_retirement(batch.rows, now)
        if retirement is None:
            return
        done_groups = []
        for i in retirement.leave:
            sequence = batch.rows[i]
            if sequence.finish_reason is None:
                sequence.finish_reason = FINISH_CANCELLED
            group = sequence.group
            group.remaining -= 1
            if group.remaining == 0:
                done_groups.append(group)
        batch.keep(retirement.keep)
        for group in done_groups:  # after the batch shrank, so a finished request sees its slots free
            self._deliver(group)

    def _deliver(self, group: _Group) -> None:
        """Hand a finished group to its request, observed first (also when nobody waits for it any
        more: a client that went away still counts as a cancelled request)."""
        result = group.result()
        self.observer.on_finished(result)
        group.request.events.put(DoneEvent(result))


def top_alternatives(logits: torch.Tensor, ks: list[int]) -> list[list[tuple[int, float]] | None]:
    """Per row, its ``k`` most likely (token id, raw log-probability) pairs, or None where k is 0.
    One top-k over the rows that ask, so a batch where nobody asks pays nothing."""
    wanted = [i for i, k in enumerate(ks) if k > 0]
    out: list[list[tuple[int, float]] | None] = [None] * len(ks)
    if not wanted:
        return out
    rows = torch.log_softmax(logits[wanted].float(), dim=-1)
    values, ids = rows.topk(max(ks[i] for i in wanted), dim=-1)
    for row, i in enumerate(wanted):
        k = ks[i]
        out[i] = list(zip(ids[row, :k].tolist(), values[row, :k].tolist()))
    return out


def run_to_completion(engine: Engine, request: GenerationRequest, timeout: float | None = None) -> GroupResult:
    """Submit and wait for the group (for CLI tools and tests that do not stream)."""
    engine.submit(request)
    deadline = None if timeout is None else time.monotonic() + timeout
    for event in iter_events(request, deadline):
        if isinstance(event, DoneEvent):
            return event.result
    raise TimeoutError("no result before the timeout")


def iter_events(request: GenerationRequest, deadline: float | None = None):
    """Yield the request's events until it is done; raises the engine's error if it failed."""
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            event = request.events.get(timeout=wait)
        except queue.Empty:
            request.cancel()
            return
        if isinstance(event, ErrorEvent):
            raise event.error
        yield event
        if isinstance(event, DoneEvent):
            return


