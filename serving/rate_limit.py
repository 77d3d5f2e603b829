"""Per-key request rate limit, kept in Redis so that every server replica counts against one budget.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket stored as one timestamp):
each key has a "theoretical arrival time" (TAT); a request is allowed when TAT - now is within the
burst, and then pushes TAT one emission interval (1 / rate) later. One Lua script reads and moves
TAT atomically with Redis's own clock, so replicas with skewed clocks still agree, and a refusal
says exactly when the next request would pass (the ``retry-after-ms`` hint).

When Redis cannot be reached the limiter lets requests through (fails open) and says so in the
log and a metric: serving completions matters more than metering them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import redis

from flywheel.api_keys import ROLE_ADMIN, ROLE_CLIENT, Caller
from flywheel.contracts.keys import rate_limit_key

log = logging.getLogger(__name__)

_LOG_EVERY_SECONDS = 30.0

_GCRA_SCRIPT = """
-- KEYS[1]: the key's TAT (ms); ARGV: emission interval (ms), burst tolerance (ms)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return {0, math.ceil(wait)} end
local new_tat = tat + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
return {1, 0}
"""


@dataclass(frozen=True)
class Rate:
    """``per_second`` sustained, up to ``burst`` requests at once; per_second 0 = unlimited."""

    per_second: float
    burst: int

    @property
    def unlimited(self) -> bool:
        return self.per_second <= 0

    def describe(self) -> str:
        return f"{self.per_second:g} requests/s (burst {self.burst})"


class RateLimiter:
    """``check(caller)`` returns None to go on, or the seconds to wait before the next try."""

    def __init__(self, client: redis.Redis, rates: dict[str, Rate], on_error: Callable[[], None] | None = None) -> None:
        self.redis = client
        self.rates = rates
        self.on_error = on_error
        self._script = client.register_script(_GCRA_SCRIPT)
        self._last_log = 0.0

    @classmethod
    def from_settings(cls, client: redis.Redis, settings, on_error: Callable[[], None] | None = None) -> "RateLimiter":
        return cls(client, {
            ROLE_CLIENT: Rate(settings.client_requests_per_second, max(1, settings.client_request_burst)),
            ROLE_ADMIN: Rate(settings.admin_requests_per_second, max(1, settings.admin_request_burst)),
        }, on_error)

    def rate(self, caller: Caller) -> Rate:
        return self.rates.get(caller.role, Rate(0, 1))

    def check(self, caller: Caller) -> float | None:
        rate = self.rate(caller)
        if rate.unlimited:
            return None
        interval_ms = 1000.0 / rate.per_second
        tolerance_ms = interval_ms * (rate.burst - 1)
        try:
            allowed, wait_ms = self._script(keys=[rate_limit_key(caller.name)],
                                            args=[repr(interval_ms), repr(tolerance_ms)])
        except redis.RedisError as exc:
            if self.on_error is not None:
                self.on_error()
            now = time.monotonic()
            if now - self._last_log > _LOG_EVERY_SECONDS:  # Redis down: one line, not one per request
                self._last_log = now
                log.warning("rate limiter: Redis unavailable (%s); letting requests through unmetered", exc)
            return None
        return None if int(allowed) else max(int(wait_ms), 1) / 1000.0


def retry_after_ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
