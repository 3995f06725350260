"""The seam every backend implements: one method that builds, plus `aclose()`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from producer.contract import BuildRequest, Log, Step
from worker.settings import DEFAULT_BUILD_TIMEOUT_S

ProgressSink = Callable[[Step | Log], Awaitable[None]]
"""Where a backend sends what it sees while building; the worker stamps, caps and publishes."""


class Fence(Protocol):
    """An attempt's lease as its worker knows it."""

    @property
    def valid_until(self) -> float:
        """Monotonic time until which the lease is surely the attempt's."""
        ...

    async def confirmed(self) -> None:
        """Return once the lease is surely the attempt's again (after a renewal); if
        another attempt takes over, the caller is cancelled instead."""
        ...


@dataclass(frozen=True, slots=True)
class BuildJob:
    """One attempt at one request, placed by the scheduler."""

    request: BuildRequest
    attempt: int
    timeout_s: float = DEFAULT_BUILD_TIMEOUT_S
    """How long this attempt may take: the request's timeout, or the worker's default. The
    runner enforces it; a backend that hands the build to another system (a Kubernetes
    Job's deadline) passes it on."""
    placement: str | None = None
    """Where to build: a BuildKit daemon address, or a Kubernetes namespace."""
    traceparent: str | None = None
    """The W3C trace context of this attempt's span, for the backend's own tracing."""
    fence: Fence | None = None
    """The attempt's lease, for a backend that can pause its work while the lease is in
    doubt (the simulate backend, modelling a daemon that honours leases)."""


@dataclass(frozen=True, slots=True)
class Built:
    """A finished build: the digest pushed (None when nothing was pushed)."""

    digest: str | None


class Backend(Protocol):
    """Builds one attempt.

    `build` either returns `Built` or raises a `worker.errors.BuildError`. Cancelling the
    task that awaits it (cancel, timeout, drain) stops the build and releases everything
    it holds before `CancelledError` propagates.
    """

    name: str

    async def build(self, job: BuildJob, progress: ProgressSink) -> Built: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Probed(Protocol):
    """A backend whose builds run on daemons it can tell are healthy (the health probe)."""

    async def probe(self, address: str) -> bool:
        """True when the daemon at `address` answers; never raises for a daemon that is down."""


@runtime_checkable
class SweepsOrphans(Protocol):
    """A backend whose builds leave objects behind when their worker dies (Kubernetes
    Jobs, TaskRuns): the worker sweeps those whose build is no longer live."""

    async def reap_orphans(self, live_build_ids: set[str]) -> list[str]:
        """Delete the objects of builds not in `live_build_ids`; the names deleted."""
        ...
