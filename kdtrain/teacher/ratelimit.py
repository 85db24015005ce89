"""Client-side rate limiting for API teachers: requests per minute and tokens per minute.

Providers limit both at once (a "tier"), and a 429 costs a round trip and a backoff, so the
client waits *before* sending instead. Each limit is a token bucket holding up to one
minute's allowance and refilling continuously; a request goes out once both buckets hold
its cost. The token cost is only an estimate before the call (prompt + max new tokens), so
it is settled against the reply's ``usage`` afterwards. Time comes from an injected clock
and waiting from an injected sleep: with a fake pair, the spacing is exact and instant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from kdtrain.teacher.base import TeacherError

Clock = Callable[[], float]
Sleep = Callable[[float], None]

# Refill arithmetic in floats can leave a bucket a hair short after exactly the computed
# wait; treat that as full enough rather than sleeping for a vanishing remainder forever.
_EPSILON = 1e-9


@dataclass(frozen=True)
class RateLimits:
    """Per-minute limits; ``None`` leaves that dimension unlimited."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise TeacherError(f"rate limits: at {name}: expected a positive number or None, found {value!r}")


class TokenBucket:
    """Holds up to ``capacity`` units, refilled at ``capacity`` per minute, starting full."""

    def __init__(self, capacity: float, clock: Clock):
        self.capacity, self.per_second, self._clock = float(capacity), capacity / 60.0, clock
        self._level, self._stamp = self.capacity, clock()

    def level(self) -> float:
        """Units available now (negative after a reply cost more than was taken)."""
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.per_second)
        self._stamp = now
        return self._level

    def wait_s(self, amount: float) -> float:
        """Seconds until ``amount`` units are available (0 when they are now)."""
        missing = amount - self.level()
        return 0.0 if missing <= _EPSILON * max(1.0, self.capacity) else missing / self.per_second

    def take(self, amount: float) -> None:
        self.level()
        self._level -= amount

    def give_back(self, amount: float) -> None:
        """Return units (negative: take more) once the true cost of a request is known."""
        self.level()
        self._level = min(self.capacity, self._level + amount)


class RateLimiter:
    """Both buckets of one :class:`RateLimits`; ``acquire`` waits until both allow a request."""

    def __init__(self, limits: RateLimits, clock: Clock = time.monotonic, sleep: Sleep = time.sleep):
        self.limits, self._sleep = limits, sleep
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        self._requests = TokenBucket(rpm, clock) if rpm is not None else None
        self._tokens = TokenBucket(tpm, clock) if tpm is not None else None

    def acquire(self, tokens: int) -> float:
        """Wait (via the injected sleep) until one request of ``tokens`` may go; the seconds waited."""
        if self._tokens is not None and tokens > self._tokens.capacity:
            raise TeacherError(
                f"rate limits: expected a request of at most tokens_per_minute={self._tokens.capacity:g} tokens, "
                f"found one estimated at {tokens}: it could never be sent (raise the limit or shorten the request)"
            )
        waited = 0.0
        while True:
            delay = max(self._requests.wait_s(1) if self._requests else 0.0,
                        self._tokens.wait_s(tokens) if self._tokens else 0.0)
            if delay <= 0.0:
                break
            self._sleep(delay)
            waited += delay
        if self._requests is not None:
            self._requests.take(1)
        if self._tokens is not None:
            self._tokens.take(tokens)
        return waited

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the tokens bucket once the reply's usage says what the request really cost."""
        if self._tokens is not None:
            self._tokens.give_back(estimated - actual)
