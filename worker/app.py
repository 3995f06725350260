"""A worker process: its loop takes jobs off the queue (worker/loop.py), the runner
builds them, and its chores keep the fleet's books.

arq is configured for this fleet: msgpack envelopes instead of pickle, no arq results (the
build store keeps ours), a short poll delay, and on SIGTERM a drain (`job_completion_wait`)
after which unfinished builds go back to the queue.

Redis may go away at any moment (a restart, a failover, OOM, a cut cable): every loop of
the worker (the poll, the heartbeat, the reaper and the watchdog, the cancel listener)
retries with capped exponential backoff and jitter, builds in flight keep running, and one
line is logged when Redis is lost and one when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Final

from arq import Worker
from arq.connections import ArqRedis
from arq.worker import func

from producer import jobcodec
from producer.connection import connect
from producer.keys import CANCEL_CHANNEL, queued_channel
from producer.resilience import (
    RedisHealth,
    persistently,
)
from producer.store import BuildStore
from producer.workers import DaemonBeat, WorkerBeat
from worker.backends.base import Backend, SweepsOrphans
from worker.backends.factory import make_backend, make_health, placement_targets
from worker.capacity import Capacity, decode_notice
from worker.errors import BuildError
from worker.loop import FleetWorker
from worker.metrics_server import serve_metrics
from worker.recovery import Reaper, Watchdog
from worker.runner import BuildRunner
from worker.scheduling import DaemonHealth, FixedPlacer, LeasedPlacer, Placer
from worker.settings import WorkerConfig
from worker.telemetry import Telemetry

logger = logging.getLogger("buildfleet.worker")

# arq's job timeout is the longest a build may ask for plus room to publish its end
# through a long Redis outage; a build's own timeout (WorkerSettings.timeout_for) always
# fires first. It also sets how long a claim lives (arq's in_progress_timeout_s).
_ARQ_TIMEOUT_SLACK_S: Final = 3600.0
_ORPHAN_SWEEP_S: Final = 60.0
_QUEUE_SAMPLE_S: Final = 5.0
_LISTEN_POLL_S: Final = 1.0


def make_placer(config: WorkerConfig, capacity: Capacity, health: DaemonHealth) -> Placer:
    """Targets configured: leased, cache-affine placement; none: no capacity accounting."""
    targets = placement_targets(config)
    if not targets:
        return FixedPlacer(None)
    return LeasedPlacer(targets, capacity, health, config.scheduling)


async def _sample_queue_depth(
    redis: ArqRedis, queue: str, telemetry: Telemetry, health: RedisHealth
) -> None:
    async def sample() -> None:
        telemetry.queue_depth = int(await redis.zcard(queue))

    while True:
        await persistently(sample, health=health, doing="sampling the queue depth")
        await asyncio.sleep(_QUEUE_SAMPLE_S)


async def _reap_orphan_jobs(
    redis: ArqRedis, queue: str, backend: SweepsOrphans, health: RedisHealth
) -> None:
    """Sweep the objects (Kaniko Jobs, TaskRuns) of builds no longer queued, running or
    waiting to retry.

    A build keeps its arq job in the queue until it ends, so the queue is the set of live
    builds. A build whose worker died stays live: its re-run adopts the object.
    """

    async def sweep() -> None:
        live = {member.decode() for member in await redis.zrange(queue, 0, -1)}
        try:
            for name in await backend.reap_orphans(live):
                logger.info("deleted orphaned build object %s", name)
        except BuildError as exc:
            logger.warning("orphaned Job sweep failed: %s", exc)

    while True:
        await asyncio.sleep(_ORPHAN_SWEEP_S)
        await persistently(sweep, health=health, doing="sweeping orphaned Jobs")


async def _listen(redis: ArqRedis, worker: FleetWorker, health: RedisHealth) -> None:
    """Two pub/sub channels: cancel requests for running builds, and producers saying that
    builds were queued. The subscription is made again after Redis comes back; a cancel
    sent meanwhile reaches the worker through its heartbeat (the record keeps every cancel
    request), a queued build through the next poll."""
    queued = queued_channel(worker.queue_name).encode()

    async def listen() -> None:
        async with redis.pubsub() as pubsub:
            await pubsub.subscribe(CANCEL_CHANNEL, queued)
            health.succeeded()
            while True:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=_LISTEN_POLL_S
                )
                if message is None:
                    continue
                if message["channel"] == queued:
                    worker.queued.set()
                elif notice := decode_notice(message["data"]):
                    worker.runner.cancel(notice.build_id, notice.reason)

    await persistently(listen, health=health, doing="listening for cancels and queued builds")


def _describe(config: WorkerConfig, runner: BuildRunner, health: DaemonHealth) -> WorkerBeat:
    down = set(health.addresses) - set(health.healthy())
    return WorkerBeat(
        name=config.worker.name,
        at=time.time(),
        builds=tuple(runner.running),
        backend=config.worker.backend,
        concurrency=config.worker.concurrency,
        daemons={
            target.address: DaemonBeat(target.address not in down, target.max_builds)
            for target in placement_targets(config)
        },
    )


async def _settle_jobs(worker: Worker, grace_s: float = 5.0) -> None:
    """Let jobs finishing their bookkeeping finish, cancel the rest (they go back to the
    queue), and forget them: arq's close() would re-raise each one's CancelledError."""
    jobs = [task for task in worker.tasks.values() if not task.done()]
    if jobs:
        _done, pending = await asyncio.wait(jobs, timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    worker.tasks.clear()


@asynccontextmanager
async def running_worker(
    config: WorkerConfig,
    *,
    burst: bool = False,
    handle_signals: bool = True,
    backend: Backend | None = None,
) -> AsyncIterator[FleetWorker]:
    """An arq worker wired to a runner and its chores; closed on exit."""
    redis = connect(config.redis, ArqRedis)
    health = RedisHealth()
    backend = backend or make_backend(config)
    capacity = Capacity(redis, config.scheduling, worker=config.worker.name, health=health)
    daemons = make_health(config, backend)
    telemetry = Telemetry()
    store = BuildStore(redis, config.queue)
    runner = BuildRunner(
        store=store,
        backend=backend,
        placer=make_placer(config, capacity, daemons),
        capacity=capacity,
        settings=config.worker,
        retry=config.retry,
        scheduling=config.scheduling,
        telemetry=telemetry,
        health=health,
    )
    worker = FleetWorker(
        functions=[func(runner.run, name=jobcodec.BUILD_FUNCTION)],
        job_timeout=config.queue.max_timeout_s + _ARQ_TIMEOUT_SLACK_S,
        redis_pool=redis,
        queue_name=config.queue.name,
        max_jobs=config.worker.concurrency,
        poll_delay=config.worker.poll_delay_s,
        keep_result=0,
        job_serializer=jobcodec.serialize,
        job_deserializer=jobcodec.deserialize,
        burst=burst,
        handle_signals=handle_signals and not burst,
        job_completion_wait=int(config.worker.drain_grace_s),
        health_check_interval=10,
        log_results=False,
        runner=runner,
        health=health,
    )
    chores: list[Coroutine[Any, Any, None]] = [
        _sample_queue_depth(redis, config.queue.name, telemetry, health),
        _listen(redis, worker, health),
        capacity.heartbeat(runner, lambda: _describe(config, runner, daemons)),
        # arq's claims live `in_progress_timeout_s`: how the reaper tells a claim's age.
        Reaper(
            redis,
            config.scheduling,
            claim_ttl_s=worker.in_progress_timeout_s,
            health=health,
        ).run(),
        Watchdog(store, config.scheduling, health=health).run(),
    ]
    if daemons.probe is not None:
        await daemons.probe_all()
        chores.append(daemons.run())
    if isinstance(backend, SweepsOrphans):
        chores.append(_reap_orphan_jobs(redis, config.queue.name, backend, health))
    if metrics_server := await serve_metrics(config, redis, daemons):
        logger.info("metrics, health and readiness on %s", metrics_server.url)
    background = [asyncio.create_task(chore) for chore in chores]
    try:
        yield worker
    finally:
        if metrics_server:
            await metrics_server.aclose()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await _settle_jobs(worker)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await capacity.leave()
        await worker.close()
        await backend.aclose()


async def run_worker(config: WorkerConfig, *, burst: bool = False) -> None:
    """Run until signalled (or, in burst mode, until the queue is empty)."""
    async with running_worker(config, burst=burst) as worker:
        logger.info(
            "worker %s: %s backend, %d builds at once, queue %s",
            config.worker.name,
            config.worker.backend,
            config.worker.concurrency,
            config.queue.name,
        )
        # arq ends its polling task by cancelling it on SIGTERM/SIGINT: a clean stop.
        with contextlib.suppress(asyncio.CancelledError):
            await worker.async_run()
