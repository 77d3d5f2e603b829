"""The one skeleton of every training run: lock, prepare, evaluate, train, evaluate, gate, write,
promote.

A reward-model run and a PPO run differ in what they read, train and measure, not in how a
version comes to be: one run of a kind at a time (a Redis lock that a dead worker cannot keep),
the model measured before and after training on the same held-out data, a gate that decides,
the candidate written whole whatever the gate says (temp folder + rename, checksums in the
manifest, so a rejected version stays inspectable with its figures), then promoted or marked
rejected. Each run fills in the steps of ``TrainingRun``; ``TrainingRun.run`` is the order they
happen in, the same for both.

Promotion is a compare-and-set on the version the run started from, refused while an operator's
rollback has frozen automatic promotion, and fenced by the run lock's token: a run that started
from v3 never promotes its child after an operator rolled v3 back, and a run whose lease lapsed
(a pause longer than the lock's TTL) stops at its next step and can promote nothing. Such a
candidate is kept, marked ``rejected`` with the reason.
"""

from __future__ import annotations

import abc
import math
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import redis as redis_lib

from flywheel.registry import LeaseLost, RegistryConflict, VersionRecord, VersionRegistry
from flywheel.run_ledger import RunAttempt
from flywheel.run_lock import RunLock, run_exclusively


@dataclass
class RunReport:
    outcome: str
    """promoted | rejected | skipped"""
    reason: str
    version: int = 0
    figures: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def json_safe_figures(figures: dict) -> dict:
    """A manifest's figures with every non-finite float as its string ("nan", "inf"): JSON has no NaN."""
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in figures.items()}


class GateDecision(Protocol):
    """What a gate says of a candidate (``training.policy_gate``, ``training.reward_model_gate``)."""

    passed: bool
    why: str
    figures: dict
    """What a rejection adds to the version's figures."""


class TrainingRun(abc.ABC):
    """One run of one kind of model. ``run()`` takes the lock and calls the steps in order:

    ``prepare`` (read the data; a reason to skip, or None), ``set_up(current)`` (load the models,
    warm-start from the current version), ``evaluate`` (before), ``train``, ``evaluate`` (after),
    ``gate``, ``manifest``, ``write_artifacts`` (into the registry's temp folder), promote or
    reject, ``written`` (what may only happen once the version is on disk), ``record_metrics``.
    """

    name: ClassVar[str]
    """The run's name in log lines and in the skip reason of a held lock: "reward-model", "policy"."""
    lock_key: ClassVar[str]
    compares_with_base: ClassVar[bool] = False
    """Without a current version, measure the model before training anyway: the policy's base model
    serves as version 0 and is what a first candidate must beat; a first reward model has nothing
    to be compared with."""

    def __init__(self, client: redis_lib.Redis, registry: VersionRegistry, *, lock_seconds: float, who: str = "",
                 metrics=None, attempt: RunAttempt | None = None) -> None:
        self.client = client
        self.registry = registry
        self.lock_seconds = lock_seconds
        self.who = who or f"{socket.gethostname()}:{os.getpid()}"
        self.metrics = metrics
        self.attempt = attempt
        """The task delivery this run executes for (the run ledger); None for a run outside Celery."""

    def run(self) -> RunReport:
        """The run, or a skip when another run of this kind holds the lock (``DuplicateDelivery``
        when the holder is this very run, or it has finished)."""
        self.lock = lock = RunLock(self.client, self.lock_key, self.lock_seconds)
        return run_exclusively(lock, self.metrics, self.name,
                               RunReport("skipped", f"another {self.name} run holds the lock"), self._run_locked,
                               attempt=self.attempt)

    def _run_locked(self, started: float) -> RunReport:
        lock = self.lock
        skip = self.prepare()
        if skip is not None:
            return RunReport("skipped", skip)
        lock.check()
        self.registry.initialize_if_fresh()
        started_from = self.registry.pointer()  # the compare-and-set of the promotion (None: pointer lost)
        current = self.registry.get(started_from) if started_from else None
        self.set_up(current)
        lock.check()
        before = self.evaluate() if current is not None or self.compares_with_base else None
        lock.check()
        self.train()
        lock.check()
        after = self.evaluate()
        decision = self.gate(current, before, after)
        manifest = self.manifest(current, before, after, decision, started)
        lock.check()
        record = self.registry.write_version(lambda folder: self.write_artifacts(folder, manifest), manifest)
        passed, why = decision.passed, decision.why
        if passed:
            try:
                self.registry.promote(record.version, self.who, why, expected_current=started_from, automatic=True,
                                      fence=lock.fence)
            except LeaseLost:
                raise  # another run holds the lock now: leave the candidate as it is, decide nothing
            except RegistryConflict as exc:  # the pointer moved, or a rollback froze promotion
                passed, why = False, f"passed its gate but was not promoted: {exc}"
        if not passed:
            self.registry.reject(record.version, self.who, why, decision.figures if not decision.passed else None)
        self.written(record)
        if self.metrics is not None:
            self.record_metrics(after, decision)
            self.metrics.current_version.set(self.registry.current_version())
        return RunReport("promoted" if passed else "rejected", why, record.version, manifest["figures"])

    # ---- the steps a run fills in ----

    @abc.abstractmethod
    def prepare(self) -> str | None:
        """Read what the run trains and evaluates on; the reason to skip the run, or None."""

    @abc.abstractmethod
    def set_up(self, current: VersionRecord | None) -> None:
        """Load the models and warm-start from ``current`` where it fits."""

    @abc.abstractmethod
    def evaluate(self) -> Any:
        """The model as it is now, on the held-out data."""

    @abc.abstractmethod
    def train(self) -> None: ...

    @abc.abstractmethod
    def gate(self, current: VersionRecord | None, before: Any, after: Any) -> GateDecision: ...

    @abc.abstractmethod
    def manifest(self, current: VersionRecord | None, before: Any, after: Any, decision: GateDecision,
                 started: float) -> dict:
        """The version's manifest; its ``figures`` are also the report's."""

    @abc.abstractmethod
    def write_artifacts(self, folder: Path, manifest: dict) -> None:
        """Write the candidate into ``folder``; what writing learns (a format) may go into ``manifest``."""

    def written(self, record: VersionRecord) -> None:
        """After the version is on disk and promoted or rejected."""

    def record_metrics(self, after: Any, decision: GateDecision) -> None:
        """The run's gauges (the current version's is set after this)."""
