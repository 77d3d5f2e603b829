"""Follow the policy registry's ``current`` pointer and hot-swap the engine to it.

Every server subscribes to the registry's pub/sub channel, so a promotion or rollback reaches all
replicas within moments; a periodic check of the pointer covers a missed message (a Redis restart,
a subscription that dropped). The new version is loaded and verified in this background thread
while serving goes on; the engine swaps it in at a step boundary.

- A version that fails to load is refused with a logged error and counted, the old version keeps
  serving, and it is tried again with exponential backoff (``retry_seconds`` doubling up to
  ``max_retry_seconds``): an artifact still being copied to a replica's storage is loaded once it
  is whole, without waiting for the pointer to move.
- An absent pointer is a lost pointer (the registry stores 0 for the base model explicitly): the
  server keeps serving what it serves and reports ``pointer_missing`` (an alert), never falls
  back to the base model.
- ``FollowerState`` after every check says whether this replica serves what the registry points
  at (``in_sync``); the server reports SERVING only once that has been true.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import redis

from flywheel.contracts.artifacts import POLICY_KIND
from flywheel.contracts.keys import registry_channel, registry_current_key, registry_frozen_key
from serving.policy_loader import LoadedPolicy, PolicyLoadError

log = logging.getLogger(__name__)

POLICY_CHANNEL = registry_channel(POLICY_KIND)
POLICY_CURRENT_KEY = registry_current_key(POLICY_KIND)
POLICY_FROZEN_KEY = registry_frozen_key(POLICY_KIND)


@dataclass(frozen=True)
class FollowerState:
    """What the last check found."""

    pointer: int | None
    """The registry's current version; None when the pointer is missing (lost) or unreadable."""
    serving: int
    in_sync: bool
    """This replica serves the pointer's version."""
    pointer_missing: bool
    promotion_frozen: bool | None
    """A rollback has paused automatic promotion (None: unknown, Redis unreadable)."""


@dataclass
class Refusal:
    why: str
    attempts: int
    retry_at: float


class PolicyFollower:
    def __init__(self, client: redis.Redis, load: Callable[[int], LoadedPolicy],
                 swap: Callable[[LoadedPolicy], None], serving_version: Callable[[], int],
                 poll_seconds: float = 5.0, on_failure: Callable[[int, Exception], None] | None = None,
                 on_state: Callable[[FollowerState], None] | None = None, retry_seconds: float = 2.0,
                 max_retry_seconds: float = 300.0) -> None:
        self.client = client
        self.load = load
        self.swap = swap
        self.serving_version = serving_version
        self.poll_seconds = poll_seconds
        self.on_failure = on_failure
        self.on_state = on_state
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused: dict[int, Refusal] = {}  # version -> why and when to try again
        self.state: FollowerState | None = None

    def start(self) -> "PolicyFollower":
        self._thread = threading.Thread(target=self._run, name="policy-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def target_version(self) -> int | None:
        """The registry's current version, None when the pointer key is absent (lost)."""
        raw = self.client.get(POLICY_CURRENT_KEY)
        return None if raw is None else int(raw)

    def check_once(self) -> FollowerState:
        """Swap to the pointer's version if it differs from the one being served (and was not
        refused too recently); the state it leaves. Raises ``redis.RedisError`` when Redis is down."""
        try:
            target = self.target_version()
            frozen = bool(self.client.exists(POLICY_FROZEN_KEY))
        except redis.RedisError:
            self._report(None, None, missing=False)
            raise
        if target is None:
            log.error("the policy pointer %s is missing (a Redis reset?); still serving v%d — restore it with "
                      "`flywheel policies --rebuild`", POLICY_CURRENT_KEY, self.serving_version())
            return self._report(None, frozen, missing=True)
        self._refused = {v: r for v, r in self._refused.items() if v == target}
        refusal = self._refused.get(target)
        if target == self.serving_version() or (refusal is not None and time.monotonic() < refusal.retry_at):
            return self._report(target, frozen)
        started = time.perf_counter()
        try:
            loaded = self.load(target)
        except PolicyLoadError as exc:
            attempts = refusal.attempts + 1 if refusal else 1
            delay = min(self.retry_seconds * 2 ** (attempts - 1), self.max_retry_seconds)
            self._refused[target] = Refusal(str(exc), attempts, time.monotonic() + delay)
            log.error("refusing policy v%d (attempt %d, next in %.0f s), still serving v%d: %s", target, attempts,
                      delay, self.serving_version(), exc)
            if self.on_failure is not None:
                self.on_failure(target, exc)
            return self._report(target, frozen)
        self._refused.pop(target, None)
        self.swap(loaded)
        log.info("swapped to policy v%d in %.2f s", target, time.perf_counter() - started)
        return self._report(target, frozen)

    def _report(self, pointer: int | None, frozen: bool | None, missing: bool = False) -> FollowerState:
        serving = self.serving_version()
        self.state = FollowerState(pointer, serving, pointer is not None and pointer == serving, missing, frozen)
        if self.on_state is not None:
            self.on_state(self.state)
        return self.state

    def _next_wait(self) -> float:
        """Until the next poll, or sooner when a refused version's retry is due."""
        due = [r.retry_at - time.monotonic() for r in self._refused.values()]
        return max(0.05, min([self.poll_seconds, *due]))

    def _run(self) -> None:
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(POLICY_CHANNEL)
                    self.check_once()  # catch up on anything missed while unsubscribed
                message = pubsub.get_message(timeout=self._next_wait())
                if message is not None and _moves_pointer(message):
                    self._refused.clear()  # a promotion or rollback: try the pointer's version at once
                # a message means the pointer may have moved; none in poll_seconds: check anyway
                self.check_once()
            except redis.RedisError as exc:
                log.warning("policy follower: Redis unavailable (%s); retrying", exc)
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
                pubsub = None
                self._stop.wait(min(self.poll_seconds, 2.0))
            except Exception:
                log.exception("policy follower failed; retrying")
                self._stop.wait(self.poll_seconds)
        if pubsub is not None:
            pubsub.close()


def _moves_pointer(message: dict) -> bool:
    try:
        return json.loads(message.get("data") or "{}").get("action") in ("promote", "rollback", "rebuild")
    except (ValueError, AttributeError):
        return False
