"""A worker process: arq takes jobs off the queue, the runner builds them.

arq is configured for this fleet: msgpack envelopes instead of pickle, no arq results (the
build store keeps ours), a short poll delay, our own attempt counting, and on SIGTERM a
drain (`job_completion_wait`) after which unfinished builds go back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from arq import Worker
from arq.connections import ArqRedis
from arq.worker import func
from redis.exceptions import RedisError

from producer import jobcodec
from producer.keys import CANCEL_CHANNEL
from producer.store import BuildStore, cancel_notice_decoder
from worker.backends.base import Backend
from worker.backends.factory import make_backend, placement_targets
from worker.backends.kaniko import KanikoBackend
from worker.capacity import Capacity, Reaper
from worker.errors import BuildError
from worker.metrics_server import serve_metrics
from worker.runner import BuildRunner
from worker.scheduling import DaemonHealth, FixedPlacer, LeasedPlacer, Placer
from worker.settings import (
    WorkerConfig,
)
from worker.telemetry import Telemetry

logger = logging.getLogger("buildfleet.worker")

# arq's own retry limit and timeout are set out of the way: attempts and timeouts are ours.
_ARQ_MAX_TRIES: Final = 1_000_000
_ARQ_TIMEOUT_SLACK_S: Final = 600.0
_ORPHAN_SWEEP_S: Final = 60.0
_QUEUE_SAMPLE_S: Final = 5.0
_RESUBSCRIBE_S: Final = 1.0
_CANCEL_SWEEP_S: Final = 2.0


def make_placer(config: WorkerConfig, capacity: Capacity, health: DaemonHealth) -> Placer:
    """Targets configured: leased, cache-affine placement; none: no capacity accounting."""
    targets = placement_targets(config)
    if not targets:
        return FixedPlacer(None)
    return LeasedPlacer(targets, capacity, health, config.scheduling)


async def _sample_queue_depth(redis: ArqRedis, queue: str, telemetry: Telemetry) -> None:
    while True:
        with contextlib.suppress(RedisError):
            telemetry.queue_depth = int(await redis.zcard(queue))
        await asyncio.sleep(_QUEUE_SAMPLE_S)


async def _reap_orphan_jobs(redis: ArqRedis, queue: str, backend: KanikoBackend) -> None:
    """Delete Kaniko Jobs whose build is no longer queued, running or waiting to retry.

    A build keeps its arq job in the queue until it ends, so the queue is the set of live
    builds. A build whose worker died stays live: its re-run adopts the Job.
    """
    while True:
        await asyncio.sleep(_ORPHAN_SWEEP_S)
        try:
            live = {member.decode() for member in await redis.zrange(queue, 0, -1)}
            for name in await backend.reap_orphans(live):
                logger.info("deleted orphaned Kaniko Job %s", name)
        except (RedisError, BuildError) as exc:
            logger.warning("orphaned Job sweep failed: %s", exc)


async def _listen_for_cancels(redis: ArqRedis, runner: BuildRunner) -> None:
    """Cancel requests for running builds arrive on a pub/sub channel; resubscribe after
    Redis goes away (a notice sent meanwhile is missed: cancelling again works)."""
    while True:
        try:
            async with redis.pubsub() as pubsub:
                await pubsub.subscribe(CANCEL_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        notice = cancel_notice_decoder.decode(message["data"])
                        if runner.cancel(notice.build_id, notice.reason):
                            logger.info("cancelling %s: %s", notice.build_id, notice.reason)
        except RedisError as exc:
            logger.warning("cancel channel lost (%s); resubscribing", exc)
            await asyncio.sleep(_RESUBSCRIBE_S)


async def _sweep_cancels(store: BuildStore, runner: BuildRunner) -> None:
    """Catch cancels whose notice this worker missed (its channel was down): the build
    record keeps every cancel request."""
    while True:
        await asyncio.sleep(_CANCEL_SWEEP_S)
        if not (running := runner.running):
            continue
        try:
            for notice in await store.cancel_requests(running):
                if runner.cancel(notice.build_id, notice.reason):
                    logger.info("cancelling %s: %s", notice.build_id, notice.reason)
        except RedisError as exc:
            logger.warning("cancel sweep failed: %s", exc)


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
) -> AsyncIterator[Worker]:
    """An arq worker wired to a runner, with its cancel listener; closed on exit."""
    redis = ArqRedis.from_url(
        config.redis.url, socket_connect_timeout=config.redis.connect_timeout_s
    )
    backend = backend or make_backend(config)
    capacity = Capacity(redis, config.scheduling)
    health = DaemonHealth(config.buildkit, config.scheduling)
    telemetry = Telemetry()
    store = BuildStore(redis, config.queue)
    runner = BuildRunner(
        store=store,
        backend=backend,
        placer=make_placer(config, capacity, health),
        capacity=capacity,
        settings=config.worker,
        retry=config.retry,
        scheduling=config.scheduling,
        telemetry=telemetry,
    )
    chores = [
        _sample_queue_depth(redis, config.queue.name, telemetry),
        _listen_for_cancels(redis, runner),
        _sweep_cancels(store, runner),
        capacity.heartbeat(),
        Reaper(redis, config.scheduling).run(),
    ]
    if config.worker.backend == "buildkit" and config.buildkit.daemons:
        await health.probe_all()
        chores.append(health.run())
    if isinstance(backend, KanikoBackend):
        chores.append(_reap_orphan_jobs(redis, config.queue.name, backend))
    if metrics_server := await serve_metrics(config, redis, health):
        logger.info("metrics, health and readiness on %s", metrics_server.url)
    background = [asyncio.create_task(chore) for chore in chores]
    worker = Worker(
        functions=[
            func(
                runner.run,
                name=jobcodec.BUILD_FUNCTION,
                max_tries=_ARQ_MAX_TRIES,
                timeout=config.worker.default_timeout_s + _ARQ_TIMEOUT_SLACK_S,
            )
        ],
        redis_pool=redis,
        queue_name=config.queue.name,
        max_jobs=config.worker.concurrency,
        poll_delay=config.worker.poll_delay_s,
        keep_result=0,
        max_tries=_ARQ_MAX_TRIES,
        job_serializer=jobcodec.serialize,
        job_deserializer=jobcodec.deserialize,
        burst=burst,
        handle_signals=handle_signals and not burst,
        job_completion_wait=int(config.worker.drain_grace_s),
        health_check_interval=10,
        log_results=False,
    )
    try:
        yield worker
    finally:
        if metrics_server:
            await metrics_server.aclose()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await _settle_jobs(worker)
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
