"""One build attempt from start to end: the function arq calls for every job.

A started build ends in exactly one of: a terminal event (Succeeded, Failed, Cancelled,
DeadLettered), a Retrying event with the job deferred for its next attempt, or, when the
worker itself is stopping, the job handed back to the queue untouched for another worker.
The build store refuses any event after a terminal one, so races cannot add a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import stamina
from arq import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.contract import (
    BuildEvent,
    BuildRequest,
    BuildResult,
    Cancelled,
    ContractError,
    DeadLettered,
    Failed,
    Log,
    Retrying,
    Started,
    Status,
    Step,
    Succeeded,
    TerminalEvent,
    decode_request,
)
from producer.store import BuildStore, PublishOutcome
from worker.backends.base import Backend, BuildJob, Built
from worker.capacity import Capacity
from worker.errors import BuildError, TemporaryBuildError
from worker.progress import LogBudget
from worker.retry import RetrySettings, decide
from worker.scheduling import Placer
from worker.settings import SchedulingSettings, WorkerSettings
from worker.telemetry import AttemptTrace, Telemetry

logger = logging.getLogger("buildfleet.worker")

_REDIS_ERRORS: Final = (RedisConnectionError, RedisTimeoutError)


@dataclass
class _Attempt:
    """What the runner knows about one attempt while it runs."""

    request: BuildRequest
    number: int
    started_at: float
    task: asyncio.Task[Built] | None = None
    """Placement and build: what a cancel stops."""
    cancel_reason: str | None = None
    placement: str | None = None
    capacity_wait_s: float = 0.0
    avoid: tuple[str, ...] = ()
    trace: AttemptTrace | None = None

    def result(self, status: Status, **fields: Any) -> BuildResult:
        now = time.time()
        submitted = self.request.submitted_at or self.started_at
        return BuildResult(
            build_id=self.request.id,
            status=status,
            images=self.request.images,
            attempts=self.number,
            daemon=self.placement,
            queue_wait_s=max(0.0, self.started_at - submitted),
            capacity_wait_s=self.capacity_wait_s,
            build_s=max(0.0, now - self.started_at - self.capacity_wait_s),
            finished_at=now,
            **fields,
        )


@dataclass
class BuildRunner:
    store: BuildStore
    backend: Backend
    placer: Placer
    capacity: Capacity
    settings: WorkerSettings
    retry: RetrySettings
    scheduling: SchedulingSettings
    telemetry: Telemetry = field(default_factory=Telemetry)
    _attempts: dict[str, _Attempt] = field(default_factory=dict)

    @property
    def running(self) -> list[str]:
        """The builds this worker is running (or placing) now."""
        return list(self._attempts)

    def cancel(self, build_id: str, reason: str) -> bool:
        """Stop a build this worker runs; its runner then publishes Cancelled."""
        attempt = self._attempts.get(build_id)
        if attempt is None or attempt.cancel_reason is not None:
            return False
        attempt.cancel_reason = reason
        if attempt.task is not None:
            attempt.task.cancel()
        return True

    async def run(
        self, ctx: dict[str, Any], raw: bytes, attempt: int = 1, avoid: Sequence[str] = ()
    ) -> None:
        """arq's job function: `raw` is the encoded request, `attempt` counts our retries,
        `avoid` names daemons that failed this build before."""
        build_id: str = ctx["job_id"]
        try:
            request = decode_request(raw)
        except ContractError as exc:
            await self._dead_letter_unreadable(build_id, raw, str(exc))
            return
        if request.id != build_id:
            await self._dead_letter_unreadable(
                build_id, raw, f"request id {request.id!r} does not match job id {build_id!r}"
            )
            return
        current = _Attempt(request, attempt, started_at=time.time(), avoid=tuple(avoid))
        self._attempts[build_id] = current
        self.capacity.hold_lease(build_id)
        try:
            await self._run(current)
        finally:
            self.capacity.drop_lease(build_id)
            del self._attempts[build_id]

    async def _run(self, current: _Attempt) -> None:
        request = current.request
        started = Started(
            build_id=request.id,
            attempt=current.number,
            worker=self.settings.name,
            backend=self.backend.name,
        )
        match await self._publish_started(started):
            case PublishOutcome.ALREADY_ENDED:
                return
            case PublishOutcome.CANCEL_REQUESTED:
                await self._end(current, Cancelled, "cancelled", reason="cancelled before start")
                return
        with self.telemetry.attempt(request, current.number, self.settings.name) as traced:
            current.trace = traced
            await self._attempt(current)

    async def _attempt(self, current: _Attempt) -> None:
        """Build, and end the attempt in exactly one way."""
        request = current.request
        timeout = self.settings.timeout_for(request)
        try:
            async with asyncio.timeout(timeout):
                # Its own task, so that a cancel stops it while it waits for a slot too.
                current.task = asyncio.create_task(self._build(current))
                if current.cancel_reason is not None:
                    current.task.cancel()
                built = await current.task
        except TimeoutError:
            await self._end(
                current,
                Failed,
                "failed",
                error_class="timeout",
                error=f"build exceeded its timeout of {timeout:g}s",
            )
        except asyncio.CancelledError:
            if current.cancel_reason is None or _task_is_cancelling():
                raise  # the worker is stopping: arq puts the job back for another worker
            await self._end(current, Cancelled, "cancelled", reason=current.cancel_reason)
        except BuildError as error:
            await self._failed(current, error)
        except Exception as exc:
            # A bug or an unforeseen failure must not lose the build: retry, then dead-letter.
            logger.exception(
                "build %s: unexpected error in the %s backend", request.id, self.backend.name
            )
            unexpected = TemporaryBuildError(f"{type(exc).__name__}: {exc}", error_class="internal")
            await self._failed(current, unexpected)
        else:
            await self._end(current, Succeeded, "succeeded", digest=built.digest)

    async def _build(self, current: _Attempt) -> Built:
        request = current.request
        budget = LogBudget(self.settings.log_cap_bytes)

        async def progress(event: Step | Log) -> None:
            if isinstance(event, Log) and (admitted := budget.admit(event)) is not None:
                self.store.publish_soon(admitted)
            elif isinstance(event, Step):
                self.store.publish_soon(event)
                if current.trace is not None:
                    self.telemetry.step(current.trace, event)

        waiting_since = time.monotonic()
        async with self.placer.place(request, current.avoid) as placement:
            current.capacity_wait_s = time.monotonic() - waiting_since
            current.placement = placement
            job = BuildJob(
                request=request,
                attempt=current.number,
                timeout_s=self.settings.timeout_for(request),
                placement=placement,
                traceparent=current.trace.traceparent if current.trace else None,
            )
            with self.telemetry.holding_slot(placement, current.trace, current.capacity_wait_s):
                return await self.backend.build(job, progress)

    async def _failed(self, current: _Attempt, error: BuildError) -> None:
        decision = decide(error, current.number, self.retry)
        fields: dict[str, Any] = {
            "error_class": error.error_class,
            "error": error.message,
            "failed_step": error.step,
            "log_tail": error.log_tail,
        }
        if isinstance(error, TemporaryBuildError) and error.daemon_at_fault and current.placement:
            self.placer.blame(current.placement)
            current.avoid = (*current.avoid, current.placement)
        if decision.retry:
            await self._retry_later(current, error, decision.delay_s)
        elif isinstance(error, TemporaryBuildError):
            await self._end(
                current,
                DeadLettered,
                "dead_lettered",
                reason=f"gave up after {current.number} attempts: {error.message}",
                **fields,
            )
        else:
            await self._end(current, Failed, "failed", **fields)

    async def _retry_later(self, current: _Attempt, error: BuildError, delay_s: float) -> None:
        request = current.request
        next_attempt = current.number + 1
        event = Retrying(
            build_id=request.id,
            attempt=current.number,
            reason=error.message,
            error_class=error.error_class,
            next_attempt_at=time.time() + delay_s,
        )
        if current.trace is not None:
            self.telemetry.retried(current.trace, error.error_class)
        outcome = await self.store.reschedule(event, request, next_attempt, current.avoid)
        if outcome is PublishOutcome.PUBLISHED:
            raise Retry(defer=delay_s)

    async def _end(
        self,
        current: _Attempt,
        kind: type[TerminalEvent],
        status: Status,
        *,
        reason: str | None = None,
        **fields: Any,
    ) -> None:
        if reason is not None:
            fields.setdefault("error", reason)
        result = current.result(status, backend=self.backend.name, **fields)
        event = kind(
            build_id=current.request.id,
            attempt=current.number,
            result=result,
            reason=reason or "",
        )
        if current.trace is not None:
            self.telemetry.ended(current.trace, result)
        await self._publish_terminal(event, status, result, current.request)

    async def _publish_started(self, started: Started) -> PublishOutcome:
        return await self._publish_surely(
            started,
            status="running",
            attempt=started.attempt,
            lease=(self.settings.name, self.scheduling.lease_ttl_s),
        )

    async def _publish_terminal(
        self,
        event: TerminalEvent,
        status: Status,
        result: BuildResult,
        request: BuildRequest | None,
    ) -> None:
        outcome = await self._publish_surely(event, status=status, result=result)
        if outcome is PublishOutcome.PUBLISHED:
            logger.info("build %s %s after %d attempt(s)", event.build_id, status, event.attempt)
            if isinstance(event, DeadLettered):
                await self.store.keep_dead_letter(event, request)

    async def _publish_surely(self, event: BuildEvent, **transition: Any) -> PublishOutcome:
        """A status change must survive a Redis hiccup: retried with backoff until it lands.

        Retrying is safe: the store refuses a second terminal event. The first try skips the
        retry machinery, which costs more than the write itself on the hot path.
        """
        try:
            return await self.store.publish(event, **transition)
        except _REDIS_ERRORS:
            logger.warning("Redis hiccup publishing %s; retrying", type(event).__name__)
        async for attempt in stamina.retry_context(on=_REDIS_ERRORS, attempts=10, timeout=60.0):
            with attempt:
                return await self.store.publish(event, **transition)
        raise AssertionError("unreachable: stamina re-raises after the last attempt")

    async def _dead_letter_unreadable(self, build_id: str, raw: bytes, reason: str) -> None:
        logger.warning("dead-lettering unreadable job %s: %s", build_id, reason)
        result = BuildResult(
            build_id=build_id,
            status="dead_lettered",
            error_class="unreadable",
            error=reason,
            finished_at=time.time(),
        )
        event = DeadLettered(build_id=build_id, result=result, reason=reason)
        outcome = await self.store.publish(event, status="dead_lettered", result=result)
        if outcome is PublishOutcome.PUBLISHED:
            await self.store.keep_dead_letter(event, None, raw=raw)


def _task_is_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
