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
    ResponseError,
    TryAgainError,
    WatchError,
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

_TRANSIENT_REPLIES: Final = ("NOREPLICAS", "MASTERDOWN", "LOADING", "READONLY", "OOM", "BUSY ")
"""Error replies that say the same: a primary that lost its replicas (`min-replicas-to-write`,
during a failover), a replica cut off from its primary, a dataset loading, a script running
too long. Some reach redis-py as a plain ResponseError (or inside a script's error)."""


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` means "Redis is away or refusing for now; try again"."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    if isinstance(exc, WatchError) and exc.__context__ is not None:
        # redis-py re-raises a connection lost under WATCH as a WatchError (arq's claim)
        return is_transient(exc.__context__)
    if isinstance(exc, ResponseError):
        head = str(exc)[:160]
        return any(head.startswith(code) or f" {code}" in head for code in _TRANSIENT_REPLIES)
    return False


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

    SETTLE_S: Final = 1.0
    """Redis counts as back once it has answered this long after the last failure (during
    a failover, reads succeed on the old primary while its writes are refused)."""

    def __init__(self, logger: logging.Logger = _log) -> None:
        self.logger = logger
        self._lost_at: float | None = None
        self._failed_at = 0.0
        self._back_at = time.monotonic()

    @property
    def reachable(self) -> bool:
        return self._lost_at is None

    def failed(self, exc: BaseException, doing: str) -> None:
        self._failed_at = time.monotonic()
        if self._lost_at is None:
            self._lost_at = self._failed_at
            self.logger.warning(
                "Redis unreachable while %s (%s); retrying with backoff", doing, describe(exc)
            )

    def succeeded(self) -> None:
        if self._lost_at is None:
            return
        now = time.monotonic()
        if now - self._failed_at >= self.SETTLE_S:
            self.logger.warning("Redis is back after %.1fs", now - self._lost_at)
            self._lost_at = None
            self._back_at = now

    def stable_for(self) -> float:
        """Seconds since Redis last came back (or since start); 0 while it is away."""
        return 0.0 if self._lost_at is not None else time.monotonic() - self._back_at


def raise_if_cancelling() -> None:
    """Raise CancelledError when the current task has been asked to stop.

    A cancellation can be lost inside a library: redis-py (with hiredis) can end a blocking
    read that was cancelled normally, or turn the cancellation into a timeout or a lost
    connection. A loop that goes on after such a call must check, or it would run forever
    after being cancelled (and `asyncio.run`, waiting for it, never return).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def persistently(
    operation: Callable[[], Awaitable[_T]],
    *,
    health: RedisHealth,
    doing: str,
    cap_s: float = BACKOFF_CAP_S,
    patience_s: float | None = None,
) -> _T:
    """`operation()`, retried through any transient Redis failure until it succeeds (or,
    with `patience_s`, until that long has passed: then the last failure is raised).

    For writes that must land (a terminal event) and loops that must go on. Retrying is
    safe only for idempotent operations: every caller's is (Lua scripts guarded by the
    build's state, SET, ZADD XX, reads).
    """
    attempt = 0
    give_up_at = None if patience_s is None else time.monotonic() + patience_s
    while True:
        try:
            result = await operation()
        except Exception as exc:
            if not is_transient(exc) or (give_up_at is not None and time.monotonic() > give_up_at):
                raise
            raise_if_cancelling()
            health.failed(exc, doing)
            await asyncio.sleep(full_jitter(attempt, base=BACKOFF_BASE_S, cap=cap_s))
            attempt += 1
        else:
            raise_if_cancelling()
            health.succeeded()
            return result
