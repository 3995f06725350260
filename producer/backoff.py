"""Exponential backoff with full jitter: the one formula every retry in the fleet uses. Pure.

Attempt n (0-based) waits uniform(0, min(cap, base * 2**n)): waiters spread out instead of
retrying in lockstep, and the wait never exceeds `cap`.
"""

from __future__ import annotations

import random
from typing import Final

_rng: Final = random.Random()  # noqa: S311 - jitter, not cryptography


def full_jitter(
    attempt: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    ceiling = min(cap, base * 2 ** min(attempt, 64))
    return (rng or _rng).uniform(0, ceiling)
