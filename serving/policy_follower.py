"""Follow the policy registry's ``current`` pointer and hot-swap the engine to it.

Every server subscribes to the registry's pub/sub channel, so a promotion or rollback reaches all
replicas within moments; a periodic check of the pointer covers a missed message (a Redis restart,
a subscription that dropped). The new version is loaded and verified in this background thread
while serving goes on; the engine swaps it in at a step boundary. A version that fails to load is
refused with a logged error and counted, and the old version keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import redis

from flywheel.contracts.artifacts import POLICY_KIND
from flywheel.contracts.keys import registry_channel, registry_current_key
from serving.policy_loader import LoadedPolicy, PolicyLoadError

log = logging.getLogger(__name__)

POLICY_CHANNEL = registry_channel(POLICY_KIND)
POLICY_CURRENT_KEY = registry_current_key(POLICY_KIND)


class PolicyFollower:
    def __init__(self, client: redis.Redis, load: Callable[[int], LoadedPolicy],
                 swap: Callable[[LoadedPolicy], None], serving_version: Callable[[], int],
                 poll_seconds: float = 5.0, on_failure: Callable[[int, Exception], None] | None = None) -> None:
        self.client = client
        self.load = load
        self.swap = swap
        self.serving_version = serving_version
        self.poll_seconds = poll_seconds
        self.on_failure = on_failure
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused: dict[int, str] = {}  # version -> why; not retried until the pointer moves away

    def start(self) -> "PolicyFollower":
        self._thread = threading.Thread(target=self._run, name="policy-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def target_version(self) -> int:
        raw = self.client.get(POLICY_CURRENT_KEY)
        return int(raw) if raw else 0

    def check_once(self) -> None:
        """Swap to the pointer's version if it differs from the one being served."""
        target = self.target_version()
        self._refused = {v: why for v, why in self._refused.items() if v == target}
        if target == self.serving_version() or target in self._refused:
            return
        started = time.perf_counter()
        try:
            loaded = self.load(target)
        except PolicyLoadError as exc:
            self._refused[target] = str(exc)
            log.error("refusing policy v%d, still serving v%d: %s", target, self.serving_version(), exc)
            if self.on_failure is not None:
                self.on_failure(target, exc)
            return
        self.swap(loaded)
        log.info("swapped to policy v%d in %.2f s", target, time.perf_counter() - started)

    def _run(self) -> None:
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(POLICY_CHANNEL)
                    self.check_once()  # catch up on anything missed while unsubscribed
                message = pubsub.get_message(timeout=self.poll_seconds)
                # a message means the pointer may have moved; no message in poll_seconds: check anyway
                self.check_once()
                if message is None:
                    continue
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
