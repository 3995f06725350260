"""A backend that builds nothing: it takes a configured time and outcome.

For load tests, the fault soak and capacity planning, as kwok is for Kubernetes. A request
can override the configured behaviour with labels `simulate.duration_s` and
`simulate.outcome`.

With `outage_file`, it models daemons going away: a build placed on a daemon named there
fails as a lost daemon would fail it (temporary, the daemon at fault), and `probe` reports
the daemon down until it leaves the file.

It models a daemon that honours leases: work happens in short stretches, each only while
the attempt's lease is surely its own (`BuildJob.fence`); when that is in doubt (Redis
away, or the worker was paused) the work waits for a renewal, and when another attempt
takes over, the runner stops it. Each stretch is appended to the journal as it ends, so a
worker killed mid-build leaves what it did: the journal is what tests and the soak check
concurrency, overlapping runs and capacity against.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Final

import msgspec

from producer.contract import Step
from worker.backends.base import BuildJob, Built, Fence, ProgressSink
from worker.errors import PermanentBuildError, TemporaryBuildError
from worker.settings import SimulateSettings


class JournalEntry(msgspec.Struct, frozen=True):
    build_id: str
    attempt: int
    placement: str | None
    began: float
    ended: float


_journal_encoder = msgspec.json.Encoder()


class SimulateBackend:
    name = "simulate"

    def __init__(self, settings: SimulateSettings) -> None:
        self.settings = settings
        self._journal: int | None = None

    async def build(self, job: BuildJob, progress: ProgressSink) -> Built:
        labels = job.request.labels
        duration = float(labels.get("simulate.duration_s", self.settings.duration_s))
        outcome = labels.get("simulate.outcome", self.settings.outcome)
        for index in range(self.settings.steps):
            now = time.time()
            await progress(
                Step(
                    build_id=job.request.id,
                    attempt=job.attempt,
                    vertex=f"sha256:{index:064x}",
                    name=f"[{index + 1}/{self.settings.steps}] simulated step",
                    started=now,
                    completed=now,
                )
            )
        await self._work(job, duration)
        match outcome:
            case "failed":
                raise PermanentBuildError(
                    "simulated failure", error_class="run_failed", step="simulated step"
                )
            case "temporary":
                raise TemporaryBuildError(
                    "simulated daemon loss", error_class="daemon_unreachable", daemon_at_fault=True
                )
        digest = hashlib.sha256(f"{job.request.id}:{job.attempt}".encode()).hexdigest()
        return Built(digest=f"sha256:{digest}" if job.request.images else None)

    async def _work(self, job: BuildJob, duration: float) -> None:
        """`duration` seconds of work, done only while the lease is surely the attempt's."""
        remaining = duration
        while remaining > 0:
            self._check_daemon(job)
            fence = job.fence
            if fence is not None and time.monotonic() >= fence.valid_until:
                await fence.confirmed()
            began = time.monotonic()
            stretch = min(remaining, self.settings.slice_s, _room(fence, began))
            try:
                await asyncio.sleep(stretch)
            finally:
                # Work past the lease's sure end does not count: the daemon would have
                # stopped it (a paused worker wakes up to find it so).
                ended = min(time.monotonic(), began + _room(fence, began))
                self._record(job, _wall(began), _wall(ended))
            remaining -= ended - began

    def _down(self) -> set[str]:
        if self.settings.outage_file is None:
            return set()
        try:
            return set(Path(self.settings.outage_file).read_text().split())
        except FileNotFoundError:
            return set()

    def _check_daemon(self, job: BuildJob) -> None:
        if job.placement is not None and job.placement in self._down():
            raise TemporaryBuildError(
                f"simulated daemon {job.placement} is gone",
                error_class="daemon_unreachable",
                daemon_at_fault=True,
            )

    async def probe(self, address: str) -> bool:
        """The health probe: the daemon is up unless the outage file names it."""
        return address not in self._down()

    def _record(self, job: BuildJob, began: float, ended: float) -> None:
        if self.settings.journal is None or ended <= began:
            return
        if self._journal is None:
            self._journal = os.open(self.settings.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        entry = JournalEntry(job.request.id, job.attempt, job.placement, began, ended)
        os.write(self._journal, _journal_encoder.encode(entry) + b"\n")

    async def aclose(self) -> None:
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None


_WALL_AT_START: Final = time.time() - time.monotonic()


def _wall(monotonic: float) -> float:
    """A monotonic reading as wall-clock time, for the journal that several processes write.

    One offset for the process: a run's stretches, timed on the monotonic clock, then never
    seem to overlap because the wall clock was slewed between two readings."""
    return _WALL_AT_START + monotonic


def _room(fence: Fence | None, now: float) -> float:
    return float("inf") if fence is None else max(0.0, fence.valid_until - now)
