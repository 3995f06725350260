"""Which daemon a build should run on. Pure: no Redis, no clock.

Rendezvous (highest-random-weight) hashing ranks the daemons for a build's cache key: the
same repository and Dockerfile always rank the same daemon first, so it lands where its
cache is, and removing a daemon moves only the keys that ranked it first. The load bound is
applied by walking the ranking (worker.capacity does it atomically in Redis): a daemon with
no free slot sends the build to the next one in rank.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from typing import Literal

Strategy = Literal["rendezvous", "random"]


def _weight(cache_key: str, daemon: str) -> int:
    digest = hashlib.blake2b(f"{daemon}\x00{cache_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(
    cache_key: str,
    daemons: Iterable[str],
    *,
    strategy: Strategy = "rendezvous",
    rng: random.Random | None = None,
) -> list[str]:
    """Daemons in the order a build with this cache key should try them."""
    candidates = list(dict.fromkeys(daemons))
    if strategy == "random":
        (rng or random).shuffle(candidates)
        return candidates
    return sorted(candidates, key=lambda daemon: _weight(cache_key, daemon), reverse=True)
