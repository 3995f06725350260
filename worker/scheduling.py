"""Where a build runs: the placer picks a daemon (or namespace) and holds its capacity."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from producer.contract import BuildRequest


class Placer(Protocol):
    def place(self, request: BuildRequest) -> AbstractAsyncContextManager[str | None]:
        """Wait for room, then yield where to build; leaving the block frees the room."""
        ...


class FixedPlacer:
    """Every build goes to one place, with no capacity accounting (one daemon, simulate)."""

    def __init__(self, placement: str | None) -> None:
        self.placement = placement

    @asynccontextmanager
    async def place(self, request: BuildRequest) -> AsyncIterator[str | None]:
        yield self.placement
