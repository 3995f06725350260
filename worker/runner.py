"""One build attempt from start to end: what the worker's loop runs for every job.

An attempt starts by taking a new lease generation (producer/store.py): its token goes
with everything it publishes, and a newer attempt of the same build fences it off. Every
attempt ends in exactly one way:

| what happens                               | the attempt ends with                        |
|--------------------------------------------|----------------------------------------------|
| the backend returns                        | Succeeded                                    |
| a permanent BuildError                     | Failed                                       |
| a temporary BuildError, retry budget left  | Retrying, the job deferred for the next one  |
| a temporary BuildError, budget spent       | DeadLettered                                 |
| any other exception (a bug)                | as a temporary error of class `internal`     |
| the build's timeout                        | Failed, class `timeout`                      |
| a cancel request                           | Cancelled                                    |
| an unreadable job                          | DeadLettered, class `unreadable`             |
| the lease lost (another attempt took over) | nothing: it stops, publishes nothing, and    |
|                                            | leaves arq's job to the new attempt          |
| the worker stopping (SIGTERM, after drain) | the job handed back untouched: no attempt    |
|                                            | spent, another worker runs it                |

A terminal event, Retrying and Started are retried through any Redis outage until they
land (producer/resilience.py); the store refuses a second terminal event and anything from
a fenced attempt, so retrying is safe. Progress (Step, Log) is best effort.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from producer.contract import (
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
    encode,
)
from producer.keys import slot_key
from producer.resilience import RedisHealth, persistently
from producer.store import AttemptToken, Begun, BuildStore, DeadLetterEntry, PublishOutcome
from worker.backends.base import Backend, BuildJob, Built
from worker.backends.capabilities import recipe_refusal
from worker.capacity import Capacity, Held
from worker.errors import BuildError, PermanentBuildError, TemporaryBuildError
from worker.progress import LogBudget, ProgressBuffer
from worker.retry import RetrySettings, decide
from worker.scheduling import Placement, Placer
from worker.settings import SchedulingSettings, WorkerSettings
from worker.telemetry import AttemptTrace, Telemetry

logger = logging.getLogger("buildfleet.worker")

_T = TypeVar("_T")
_RELEASE_PATIENCE_S = 2.0


@dataclass
class _Attempt:
    """What the runner knows about one attempt while it runs."""

    request: BuildRequest
    number: int
    started_at: float
    avoid: tuple[str, ...] = ()
    retry_since: float = 0.0
    """When this build's first temporary failure happened (0: none yet)."""
    token: AttemptToken | None = None
    held: Held | None = None
    placement: Placement = field(default_factory=lambda: Placement(None))
    capacity_wait_s: float = 0.0
    task: asyncio.Task[Built] | None = None
    """Placement and build: what a cancel, a lost lease or the timeout stops."""
    cancel_reason: str | None = None
    lost_reason: str | None = None
    trace: AttemptTrace | None = None

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    @property
    def slot(self) -> str | None:
        """The slot set this attempt holds a slot in, if any."""
        daemon = self.placement.daemon
        return slot_key(daemon) if daemon is not None and self.placement.limit else None


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
    health: RedisHealth = field(default_factory=RedisHealth)
    fenced_jobs: set[str] = field(default_factory=set)
    """Jobs whose attempt lost its lease: the loop leaves them to the attempt that took over."""
    settled_jobs: set[str] = field(default_factory=set)
    """Jobs that the attempt's last event (terminal, or Retrying: the job deferred) dealt
    with already: the worker's loop has nothing to do."""
    _attempts: dict[str, _Attempt] = field(default_factory=dict)

    @property
    def running(self) -> list[str]:
        """The builds this worker is running (or placing) now."""
        return list(self._attempts)

    def handled(self, build_id: str) -> bool:
        """Whether the last attempt of `build_id`'s job dealt with the job itself (its last
        event finished it) or left it to another attempt: asked once, as its run ends."""
        if build_id in self.settled_jobs or build_id in self.fenced_jobs:
            self.settled_jobs.discard(build_id)
            self.fenced_jobs.discard(build_id)
            return True
        return False

    def cancel(self, build_id: str, reason: str) -> bool:
        """Stop a build this worker runs; its runner then publishes Cancelled."""
        current = self._attempts.get(build_id)
        if current is None or current.cancel_reason is not None:
            return False
        logger.info("cancelling %s: %s", build_id, reason)
        current.cancel_reason = reason
        current.stop()
        return True

    def lost(self, build_id: str, why: str) -> None:
        """The attempt lost its lease: stop it now, publish nothing for it."""
        current = self._attempts.get(build_id)
        if current is None or current.lost_reason is not None:
            return
        logger.warning("build %s attempt %d stopped: %s", build_id, current.number, why)
        current.lost_reason = why
        current.stop()

    async def run(
        self,
        ctx: dict[str, Any],
        raw: bytes,
        attempt: int = 1,
        avoid: Sequence[str] = (),
        retry_since: float = 0.0,
    ) -> None:
        """The build function a job names (arq's shape: `ctx["job_id"]` is the build's id):
        `raw` is the encoded request, `attempt` numbers this attempt, `avoid` names daemons
        that failed this build before, `retry_since` is when its first temporary failure
        happened (the job's arguments: producer/jobcodec.py)."""
        build_id: str = ctx["job_id"]
        try:
            request = decode_request(raw)
            if request.id != build_id:
                raise ContractError(f"request id {request.id!r} does not match job {build_id!r}")
        except ContractError as exc:
            await self._dead_letter_unreadable(build_id, raw, str(exc))
            return
        current = _Attempt(request, attempt, time.time(), tuple(avoid), retry_since)
        self._attempts[build_id] = current
        try:
            await self._run(current)
        finally:
            del self._attempts[build_id]
            if current.token is not None:
                self.capacity.drop(current.token)
            if current.lost_reason is not None:
                self.fenced_jobs.add(build_id)

    async def _run(self, current: _Attempt) -> None:
        request = current.request
        started = Started(
            build_id=request.id,
            attempt=current.number,
            worker=self.settings.name,
            backend=self.backend.name,
        )
        offer = self.placer.offer(request, current.avoid)
        outcome = await self._surely(
            lambda: self.store.start(
                started,
                request.priority,
                lease_s=self.scheduling.lease_ttl_s,
                slots=[(slot_key(daemon), limit) for daemon, limit in offer],
                slot_ttl_s=self.scheduling.slot_ttl_s,
            ),
            f"starting {request.id}",
        )
        match outcome:
            case Begun(token=token, slot=slot):
                current.token = token
                current.held = self.capacity.hold(token)
                if slot:
                    self._placed(current, self.placer.placed(offer[slot - 1][0]))
            case PublishOutcome.CANCEL_REQUESTED:
                await self._end(current, Cancelled, reason="cancelled before it started")
                return
            case _:
                return  # it has ended already: a duplicate delivery of its job
        with self.telemetry.attempt(request, current.number, self.settings.name) as traced:
            current.trace = traced
            await self._attempt(current)

    async def _attempt(self, current: _Attempt) -> None:
        """Build, and end the attempt in exactly one way."""
        timeout = self._timeout(current.request)
        try:
            async with asyncio.timeout(timeout):
                # Its own task, so that a cancel stops it while it waits for a slot too.
                current.task = asyncio.create_task(self._build(current))
                if current.cancel_reason is not None or current.lost_reason is not None:
                    current.stop()
                built = await current.task
        except TimeoutError:
            error = PermanentBuildError(
                f"build exceeded its timeout of {timeout:g}s", error_class="timeout"
            )
            await self._end(current, Failed, error=error)
        except asyncio.CancelledError:
            if current.lost_reason is not None:
                await self._let_go(current)
                return
            if current.cancel_reason is None or _task_is_cancelling():
                await self._let_go(current)
                raise  # the worker is stopping: the job goes back to the queue for another
            await self._end(current, Cancelled, reason=current.cancel_reason)
        except BuildError as error:
            await self._failed(current, error)
        except Exception as exc:
            # A bug or an unforeseen failure must not lose the build: retry, then dead-letter.
            logger.exception(
                "build %s: unexpected error in the %s backend",
                current.request.id,
                self.backend.name,
            )
            unexpected = TemporaryBuildError(f"{type(exc).__name__}: {exc}", error_class="internal")
            await self._failed(current, unexpected)
        else:
            await self._end(current, Succeeded, digest=built.digest)

    async def _build(self, current: _Attempt) -> Built:
        request, token = current.request, current.token
        # Every backend refuses what it cannot build from, before it waits for a slot.
        if (reason := recipe_refusal(request, self.backend.name)) is not None:
            raise PermanentBuildError(reason, error_class="unsupported")
        progress = _Progress(self, current)
        if current.placement.daemon is None and token is not None:
            waiting_since = time.monotonic()
            placement = await self.placer.wait(
                request, token.holder, current.avoid, since=waiting_since
            )
            current.capacity_wait_s = time.monotonic() - waiting_since
            self._placed(current, placement)
        job = BuildJob(
            request=request,
            attempt=current.number,
            timeout_s=self._timeout(request),
            placement=current.placement.daemon,
            traceparent=current.trace.traceparent if current.trace else None,
            fence=current.held,
        )
        with self.telemetry.holding_slot(
            current.placement.daemon, current.trace, current.capacity_wait_s
        ):
            try:
                return await self.backend.build(job, progress)
            finally:
                progress.close()  # what is held goes out before the attempt's end

    def _timeout(self, request: BuildRequest) -> float:
        """The build's deadline: its own or the default, never past the fleet's maximum."""
        return min(self.settings.timeout_for(request), self.store.queue.max_timeout_s)

    def _placed(self, current: _Attempt, placement: Placement) -> None:
        current.placement = placement
        if current.token is not None and placement.daemon is not None and placement.limit:
            self.capacity.holds_slot(current.token, placement.daemon, placement.limit)

    async def _let_go(self, current: _Attempt) -> None:
        """Free the slot of an attempt that ends without a terminal event (lost, or handed
        back); if Redis is away, the slot lapses on its own."""
        if current.token is None or current.slot is None:
            return
        try:
            async with asyncio.timeout(_RELEASE_PATIENCE_S):
                await asyncio.shield(self.placer.release(current.placement, current.token.holder))
        except Exception as exc:
            logger.info("could not free %s's slot now (%s); it lapses", current.request.id, exc)

    async def _failed(self, current: _Attempt, error: BuildError) -> None:
        since = current.retry_since or time.time()
        daemon = current.placement.daemon
        if isinstance(error, TemporaryBuildError) and error.daemon_at_fault and daemon:
            self.placer.blame(daemon)
            current.avoid = (*current.avoid, daemon)
        decision = decide(error, current.number, time.time() - since, self.retry)
        if decision.retry:
            await self._retry_later(current, error, decision.delay_s, since)
        elif isinstance(error, TemporaryBuildError):
            reason = (
                f"gave up after {current.number} attempts in {time.time() - since:.0f}s: "
                f"{error.message}"
            )
            await self._end(current, DeadLettered, error=error, reason=reason)
        else:
            await self._end(current, Failed, error=error)

    async def _retry_later(
        self, current: _Attempt, error: BuildError, delay_s: float, since: float
    ) -> None:
        request, token = current.request, current.token
        assert token is not None  # an attempt that failed had started
        event = Retrying(
            build_id=request.id,
            attempt=current.number,
            reason=error.message,
            error_class=error.error_class,
            next_attempt_at=time.time() + delay_s,
        )
        if current.trace is not None:
            self.telemetry.retried(current.trace, error.error_class)
        outcome = await self._surely(
            lambda: self.store.reschedule(
                event,
                request,
                token,
                next_attempt=current.number + 1,
                avoid=current.avoid,
                retry_since=since,
                slot=current.slot,
            ),
            f"rescheduling {request.id}",
        )
        if outcome is PublishOutcome.PUBLISHED:
            self.settled_jobs.add(request.id)
        elif outcome is PublishOutcome.FENCED:
            current.lost_reason = "another attempt took over its lease"

    async def _end(
        self,
        current: _Attempt,
        kind: type[TerminalEvent],
        *,
        digest: str | None = None,
        error: BuildError | None = None,
        reason: str | None = None,
    ) -> None:
        status = cast(Status, kind.__struct_config__.tag)
        result = self._result(current, status, digest=digest, error=error, reason=reason)
        event = kind(
            build_id=result.build_id, attempt=current.number, result=result, reason=reason or ""
        )
        if current.trace is not None:
            self.telemetry.ended(current.trace, result)
        dead_letter = DeadLetterEntry(encode(current.request)) if kind is DeadLettered else None
        outcome = await self._surely(
            lambda: self.store.publish(
                event, current.token, slot=current.slot, dead_letter=dead_letter
            ),
            f"ending {current.request.id}",
        )
        match outcome:
            case PublishOutcome.PUBLISHED:
                self.settled_jobs.add(result.build_id)
                logger.info(
                    "build %s %s after %d attempt(s)", result.build_id, status, result.attempts
                )
            case PublishOutcome.FENCED:
                current.lost_reason = "another attempt took over its lease"

    def _result(
        self,
        current: _Attempt,
        status: Status,
        *,
        digest: str | None,
        error: BuildError | None,
        reason: str | None,
    ) -> BuildResult:
        now = time.time()
        submitted = current.request.submitted_at or current.started_at
        return BuildResult(
            build_id=current.request.id,
            status=status,
            digest=digest,
            images=current.request.images,
            attempts=current.number,
            backend=self.backend.name,
            daemon=current.placement.daemon,
            queue_wait_s=max(0.0, current.started_at - submitted),
            capacity_wait_s=current.capacity_wait_s,
            build_s=max(0.0, now - current.started_at - current.capacity_wait_s),
            error_class=error.error_class if error else None,
            error=reason or (error.message if error else None),
            failed_step=error.step if error else None,
            log_tail=error.log_tail if error else (),
            finished_at=now,
        )

    async def _surely(self, operation: Callable[[], Awaitable[_T]], doing: str) -> _T:
        return await persistently(operation, health=self.health, doing=doing)

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
        outcome = await self._surely(
            lambda: self.store.publish(event, dead_letter=DeadLetterEntry(raw)),
            f"dead-lettering {build_id}",
        )
        if outcome is PublishOutcome.PUBLISHED:
            self.settled_jobs.add(build_id)


class _Progress:
    """The progress sink of one attempt: Log events within the build's log budget, Step
    and Log events held in a ProgressBuffer and published at most once per
    `progress_interval_s` (a timer, not the next event, sends what is held), and at the
    end. Best effort, never awaited: a slow Redis does not slow the build."""

    def __init__(self, runner: BuildRunner, current: _Attempt) -> None:
        self.runner = runner
        self.current = current
        self.budget = LogBudget(runner.settings.log_cap_bytes)
        self.buffer = ProgressBuffer()
        self.timer: asyncio.TimerHandle | None = None

    async def __call__(self, event: Step | Log) -> None:
        if isinstance(event, Log):
            if (admitted := self.budget.admit(event)) is None:
                return
            event = admitted
        self.buffer.add(event)
        if self.timer is None:
            interval = self.runner.settings.progress_interval_s
            self.timer = asyncio.get_running_loop().call_later(interval, self.flush)

    def flush(self) -> None:
        self.timer = None
        runner, trace, token = self.runner, self.current.trace, self.current.token
        for event in self.buffer.flush():
            runner.store.publish_soon(event, token)
            if trace is not None and isinstance(event, Step):
                runner.telemetry.step(trace, event)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.flush()


def _task_is_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
