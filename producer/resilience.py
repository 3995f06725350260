"""Riding out Redis outages: which errors mean "Redis is away, try again", and how to wait.

Redis restarts, fails over (a demoted primary answers READONLY), refuses writes when it is
out of memory (OOM), or is cut off by the network (a timeout). Code that must not give up
(a worker's loops, a terminal event that has to land) retries these with capped
exponential backoff and full jitter, and tells one `RedisHealth` per process, which logs
one line when Redis is lost and one when it is back instead of a traceback per attempt.
Any other error is a bug or a refusal that retrying would not fix: it is raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.backoff import full_jitter

TRANSIENT_ERRORS: Final[tuple[type[Exception], ...]] = (
    RedisConnectionError,  # refused, reset, loading the dataset, failover in progress
    RedisTimeoutError,
    ReadOnlyError,  # a demoted primary
    OutOfMemoryError,  # maxmemory reached: writes refused until memory frees
    ClusterDownError,  # also MASTERDOWN: a replica that lost its primary
    TryAgainError,
    OSError,  # socket errors redis-py does not wrap
)
"""Redis is unreachable or refuses for now; the same command later may succeed."""

BACKOFF_BASE_S: Final = 0.05
BACKOFF_CAP_S: Final = 5.0

_T = TypeVar("_T")
_log = logging.getLogger("buildfleet.redis")


def describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RedisHealth:
    """Whether this process can reach Redis, as its last command found it.

    Many loops share one: the first failure logs "lost", the first success after it logs
    "back". `stable_for()` tells how long Redis has answered since it came back (reapers
    wait for it to exceed a lease period, so live workers renew before anyone takes a
    build from them).
    """

    def __init__(self, logger: logging.Logger = _log) -> None:
        self.logger = logger
        self._lost_at: float | None = None
        self._back_at = time.monotonic()

    @property
    def reachable(self) -> bool:
        return self._lost_at is None

    def failed(self, exc: BaseException, doing: str) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()
            self.logger.warning(
                "Redis unreachable while %s (%s); retrying with backoff", doing, describe(exc)
            )

    def succeeded(self) -> None:
        if self._lost_at is not None:
            now = time.monotonic()
            self.logger.warning("Redis is back after %.1fs", now - self._lost_at)
            self._lost_at = None
            self._back_at = now

    def stable_for(self) -> float:
        """Seconds since Redis last came back (or since start); 0 while it is away."""
        return 0.0 if self._lost_at is not None else time.monotonic() - self._back_at


async def persistently(
    operation: Callable[[], Awaitable[_T]],
    *,
    health: RedisHealth,
    doing: str,
    cap_s: float = BACKOFF_CAP_S,
) -> _T:
    """`operation()`, retried through any transient Redis failure until it succeeds.

    For writes that must land (a terminal event) and loops that must go on. Retrying is
    safe only for idempotent operations: every caller's is (Lua scripts guarded by the
    build's state, SET, ZADD XX).
    """
    attempt = 0
    while True:
        try:
            result = await operation()
        except TRANSIENT_ERRORS as exc:
            health.failed(exc, doing)
            await asyncio.sleep(full_jitter(attempt, base=BACKOFF_BASE_S, cap=cap_s))
            attempt += 1
        else:
            health.succeeded()
            return result
