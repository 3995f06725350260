"""arq's worker loop, made the fleet's: poll, claim, run, finish.

arq's `Worker` keeps its drain on SIGTERM (`allow_pick_jobs`, `job_completion_wait`), its
health record and its close; the rest is replaced, to cut the round trips a build pays
before it starts and after it ends:

- a worker polls at once when a producer says builds were queued (pub/sub), the poll
  delay staying the guarantee;
- a poll reads the queue, claims the jobs there is room for and reads them, in one Lua call
  (producer/lua/claim.lua), where arq pays a round trip to read the queue and five a job;
- arq's try count is not kept: attempts are the fleet's own (the job's arguments), so
  nothing about a job is written when it starts;
- an attempt's last event finishes its job in the same Lua call (a terminal event drops
  it, Retrying defers it): the loop only finishes what no event did.

Every claimed job ends in one way:

| the job                                        | its queue entry, job and claim         |
|------------------------------------------------|----------------------------------------|
| dealt with by the attempt's last event         | left alone: finished already           |
| fenced (another attempt took over its lease)   | left alone: the new attempt owns them  |
| handed back (the worker stopping)              | the claim dropped: another worker runs |
|                                                | it, no attempt spent                   |
| anything else (a duplicate delivery of an      | dropped (a bug is logged); the         |
| ended build, another function, a bug)          | watchdog ends a build left running     |
| expired (queued without a job)                 | dropped by the claim, a warning logged |

Redis may go away at any moment: a failed poll is retried with capped exponential backoff
and jitter, builds in flight keep running, and one line is logged when Redis is lost and
one when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final, NamedTuple

from arq import Worker
from arq.utils import timestamp_ms

from producer import jobcodec, lua
from producer.backoff import full_jitter
from producer.keys import ARQ_IN_PROGRESS_PREFIX, ARQ_JOB_PREFIX, in_progress_key, job_key
from producer.resilience import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    RedisHealth,
    is_transient,
    raise_if_cancelling,
)
from worker.runner import BuildRunner

logger = logging.getLogger("buildfleet.worker")

_FINISH_PATIENCE_S: Final = 5.0


class Claimed(NamedTuple):
    """A job a poll claimed (claim.lua)."""

    job_id: str
    job: bytes
    """arq's job (producer/jobcodec.py); empty when it had expired."""


class FleetWorker(Worker):
    """arq's worker with the fleet's poll, claims and job runs (see the module's docs)."""

    def __init__(self, *args: Any, runner: BuildRunner, health: RedisHealth, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.runner = runner
        self.health = health
        self.queued = asyncio.Event()
        """Set when a producer says builds were queued: poll now."""
        self._failures = 0

    async def main(self) -> None:
        """arq's poll loop, without its start-up round trips, surviving Redis outages."""
        self.ctx["redis"] = self.pool
        while True:
            raise_if_cancelling()
            await self._poll_iteration()
            if self.burst and await self._queue_drained():
                await asyncio.gather(*self.tasks.values())
                return
            await self._nap()

    async def _nap(self) -> None:
        """Until the next poll: the poll delay, or less when builds are queued."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.poll_delay_s):
                await self.queued.wait()
        self.queued.clear()

    async def _queue_drained(self) -> bool:
        return bool(self.health.reachable and await self.pool.zcard(self.queue_name) == 0)

    async def _poll_iteration(self) -> None:
        try:
            await self._poll()
        except Exception as exc:
            raise_if_cancelling()
            self._failures += 1
            if is_transient(exc):
                self.health.failed(exc, "polling the queue")
            else:
                logger.exception("polling the queue failed; going on")
            await asyncio.sleep(full_jitter(self._failures, base=BACKOFF_BASE_S, cap=BACKOFF_CAP_S))
        else:
            self._failures = 0
            self.health.succeeded()

    async def _poll(self) -> None:
        room = self.max_jobs - self.job_counter
        if self.allow_pick_jobs and room > 0:  # not when draining: arq's signal handler
            reply = await lua.run(
                self.pool,
                lua.CLAIM,
                [self.queue_name],
                [
                    timestamp_ms(),
                    int(self.in_progress_timeout_s * 1000),
                    room,
                    self.queue_read_limit,
                    ARQ_IN_PROGRESS_PREFIX,
                    ARQ_JOB_PREFIX,
                ],
            )
            for job_id, job in zip(reply[::2], reply[1::2], strict=True):
                self._start(Claimed(job_id.decode(), job))
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # an error in a job's run is not swallowed
        await self.heart_beat()

    def _start(self, claimed: Claimed) -> None:
        """Run a claimed job, counted against `max_jobs` until it ends (`job_counter`
        alone: arq's semaphore belongs to its own start_jobs, which this loop replaces)."""
        self.job_counter += 1
        task = self.loop.create_task(self._run(claimed))
        task.add_done_callback(self._ended)
        self.tasks[claimed.job_id] = task

    def _ended(self, _: asyncio.Task[None]) -> None:
        self.job_counter -= 1

    async def _run(self, claimed: Claimed) -> None:
        """One claimed job, ended as the module's table says."""
        job_id = claimed.job_id
        if not claimed.job:
            logger.warning("job %s expired: it was queued without its job", job_id)
            return
        job = jobcodec.deserialize(claimed.job)
        function = self.functions.get(job["f"])
        if function is None:
            logger.warning("job %s calls %r, which this worker has not: dropped", job_id, job["f"])
            await self._finish(job_id, drop=True)
            return
        ctx = {**self.ctx, "job_id": job_id}
        try:
            async with asyncio.timeout(self.job_timeout_s):
                await function.coroutine(ctx, *job["a"], **job["k"])
        except asyncio.CancelledError:
            self.jobs_retried += 1
            logger.info("job %s handed back: the worker is stopping", job_id)
            await self._finish(job_id, drop=False)
            return
        except Exception:
            self.jobs_failed += 1
            logger.exception("job %s failed outside its build; dropped", job_id)
        else:
            self.jobs_complete += 1
        await self._finish(job_id, drop=True)

    async def _finish(self, job_id: str, *, drop: bool) -> None:
        """What no event of the job's attempt did: drop the job, or hand it back (its claim
        dropped, it stays queued). Nothing for a job its attempt's last event dealt with,
        nor for one another attempt owns now."""
        if self.runner.handled(job_id):
            return
        claim = in_progress_key(job_id)
        try:
            async with asyncio.timeout(_FINISH_PATIENCE_S):
                await asyncio.shield(self._forget(job_id, claim) if drop else self._unclaim(claim))
        except Exception as exc:  # the claim lapses; the watchdog and reaper take it from there
            logger.warning("could not finish job %s now (%s)", job_id, exc)

    async def _forget(self, job_id: str, claim: str) -> None:
        async with self.pool.pipeline(transaction=True) as transaction:
            transaction.zrem(self.queue_name, job_id)
            transaction.delete(job_key(job_id), claim)
            await transaction.execute()

    async def _unclaim(self, claim: str) -> None:
        await self.pool.delete(claim)
