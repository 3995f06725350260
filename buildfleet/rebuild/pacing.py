"""When a batch's builds go in: at most `--rate` a second, and longest first. Pure.

`Pacer` is a generic cell rate algorithm: the n-th submission is due `n / rate` seconds
after the first, and time spent idle earns a credit of at most `burst` submissions (50 ms
worth, at least one), so any window of `w` seconds holds at most `w * rate + burst`
submissions however the batch was held up in between (by `--max-in-flight`, or Redis).

Longest first: list scheduling that starts the longest builds first finishes within 4/3 of
the optimum (Graham's bound), while an unlucky order can leave the longest build starting
last; durations are those of earlier builds of the same recipe, and a recipe never built
counts as the median of the known ones (nothing known: the given order stays).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar

_T = TypeVar("_T")
BURST_WINDOW_S: Final = 0.05


class Pacer:
    def __init__(self, rate: float | None, now: float) -> None:
        self.rate = rate
        self.interval = 1.0 / rate if rate else 0.0
        self.burst = max(1, int((rate or 0) * BURST_WINDOW_S))
        self._due = now
        """When the next submission is due (the theoretical arrival time)."""

    def _earliest(self, now: float) -> float:
        return max(self._due, now - (self.burst - 1) * self.interval)

    def allowance(self, now: float) -> int:
        """How many submissions may go now."""
        if self.rate is None:
            return 1 << 30
        due = self._earliest(now)
        if now < due:
            return 0
        return min(self.burst, math.floor((now - due) / self.interval) + 1)

    def took(self, count: int, now: float) -> None:
        if self.rate is not None:
            self._due = self._earliest(now) + count * self.interval

    def wait_s(self, now: float) -> float:
        """How long until the next submission may go."""
        return max(0.0, self._due - now) if self.rate is not None else 0.0


def longest_first(
    items: Sequence[_T], duration_key: Callable[[_T], str], durations: Mapping[str, float]
) -> list[_T]:
    """`items` by expected duration, longest first; ties keep their order."""
    known = [durations[k] for k in map(duration_key, items) if k in durations]
    if not known:
        return list(items)
    typical = statistics.median(known)
    return sorted(items, key=lambda item: -durations.get(duration_key(item), typical))


def smoothed(previous: float | None, latest: float, weight: float = 0.5) -> float:
    """A recipe's expected duration after one more build (exponential smoothing)."""
    return latest if previous is None else weight * latest + (1 - weight) * previous
