"""A backend that builds nothing: it takes a configured time and outcome.

For load tests and capacity planning, as kwok is for Kubernetes. A request can override the
configured behaviour with labels `simulate.duration_s` and `simulate.outcome`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import msgspec

from producer.contract import Step
from worker.backends.base import BuildJob, Built, ProgressSink
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
        began = time.time()
        try:
            if duration:
                await asyncio.sleep(duration)
        finally:
            self._record(job, began)
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

    def _record(self, job: BuildJob, began: float) -> None:
        if self.settings.journal is None:
            return
        line = _journal_encoder.encode(
            JournalEntry(
                build_id=job.request.id,
                attempt=job.attempt,
                placement=job.placement,
                began=began,
                ended=time.time(),
            )
        )
        with open(self.settings.journal, "ab") as journal:
            journal.write(line + b"\n")

    async def aclose(self) -> None:
        return None
