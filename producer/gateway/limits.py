"""Rate limits and counted slots, in process memory. Pure (the clock is passed in).

Each gateway replica limits on its own: with N replicas behind a load balancer a caller gets
at most N times the configured rate, which bounds a flood without a Redis round trip per
request.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Final

MAX_KEYS: Final = 10_000
"""Buckets kept at most (least recently used go first): webhook sources are unbounded."""


class RateLimiter:
    """A token bucket per key: `rate` per second, up to `burst` at once."""

    def __init__(self, rate: float, burst: int, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """0 when a request under `key` may go now (and count it), else the seconds until it
        may (for `Retry-After`)."""
        level, since = self._buckets.pop(key, (self.burst, now))
        level = min(self.burst, level + (now - since) * self.rate)
        if level >= 1.0:
            self._remember(key, (level - 1.0, now))
            return 0.0
        self._remember(key, (level, now))
        return (1.0 - level) / self.rate

    def _remember(self, key: str, bucket: tuple[float, float]) -> None:
        self._buckets[key] = bucket
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


class Slots:
    """Counted slots per key and in all (open event streams)."""

    def __init__(self, per_key: int, total: int) -> None:
        self.per_key = per_key
        self.total = total
        self._held: dict[str, int] = {}
        self.in_use = 0

    def acquire(self, key: str) -> str | None:
        """None when a slot was taken, else why not."""
        if self.in_use >= self.total:
            return f"{self.total} event streams are open, the most this gateway serves"
        if self._held.get(key, 0) >= self.per_key:
            return f"this token holds {self.per_key} event streams open, its most"
        self._held[key] = self._held.get(key, 0) + 1
        self.in_use += 1
        return None

    def release(self, key: str) -> None:
        left = self._held.get(key, 0) - 1
        if left > 0:
            self._held[key] = left
        else:
            self._held.pop(key, None)
        self.in_use -= 1
