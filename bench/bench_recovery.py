"""Recovery after a worker is SIGKILLed mid-build: how long until another worker re-runs it.

buildfleet: two worker processes with default settings (lease 10 s, reaper every 2 s); the
build starts on the first, which is SIGKILLed; the time to the second's Started is measured.
arq: one bare arq worker with the same job timeout as buildfleet's default build timeout
(3600 s) runs a job and is SIGKILLed; its job can run again only when the claim
`arq:in-progress:<id>` expires, whose remaining TTL is read right after the kill.

    .venv/bin/python bench/bench_recovery.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from arq import Worker
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import func

from buildfleet.services import start_redis
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, LocalSource, Started

JOB_TIMEOUT_S = 3600


async def long_job(ctx: dict[str, object]) -> None:
    await asyncio.sleep(JOB_TIMEOUT_S)


def spawn_worker(redis_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BUILDFLEET_REDIS_URL": redis_url, "BUILDFLEET_WORKER_BACKEND": "simulate"}
    return subprocess.Popen(
        [sys.executable, "-m", "buildfleet.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def started_on(fleet: BuildfleetClient, build_id: str, count: int) -> Started:
    seen = 0
    async for event in fleet.watch(build_id):
        if isinstance(event, Started):
            seen += 1
            if seen == count:
                return event
    raise AssertionError("the build ended before it was re-run")


async def buildfleet_recovery(redis_url: str) -> float:
    first = spawn_worker(redis_url)
    second = None
    try:
        async with BuildfleetClient.from_url(redis_url) as fleet:
            request = BuildRequest(
                source=LocalSource(path=tempfile.mkdtemp()),
                push=False,
                labels={"simulate.duration_s": "20"},
            )
            await fleet.submit(request)
            await started_on(fleet, request.id, 1)
            second = spawn_worker(redis_url)
            await asyncio.sleep(2)  # the second worker is up and polling
            first.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await started_on(fleet, request.id, 2)
            return time.monotonic() - killed
    finally:
        for process in (first, second):
            if process is not None:
                process.kill()
                process.wait()


async def arq_recovery(redis_url: str) -> float:
    """Run a bare arq worker in a child, kill it mid-job, read its claim's remaining TTL."""
    redis = ArqRedis.from_url(redis_url)
    job = await redis.enqueue_job("long_job")
    assert job is not None
    child = subprocess.Popen([sys.executable, __file__, "--arq-worker", redis_url])
    try:
        while not await redis.exists(in_progress_key_prefix + job.job_id):
            await asyncio.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
        ttl_ms = await redis.pttl(in_progress_key_prefix + job.job_id)
    finally:
        await redis.aclose()
    return ttl_ms / 1000


def run_arq_worker(redis_url: str) -> None:
    async def main() -> None:
        worker = Worker(
            functions=[func(long_job, name="long_job")],
            redis_pool=ArqRedis.from_url(redis_url),
            job_timeout=JOB_TIMEOUT_S,
            handle_signals=False,
        )
        await worker.main()

    asyncio.run(main())


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--arq-worker":
        run_arq_worker(sys.argv[2])
        return
    redis = start_redis(Path(tempfile.mkdtemp(prefix="bench-recovery-")))
    try:
        fleet_s = asyncio.run(buildfleet_recovery(redis.address))
        arq_s = asyncio.run(arq_recovery(redis.address))
    finally:
        redis.stop()
    print("a worker SIGKILLed mid-build; time until the build runs again elsewhere")
    print(f"buildfleet (lease 10 s, reaper every 2 s): {fleet_s:7.1f} s  (goal: within 20 s)")
    print(f"arq, job timeout {JOB_TIMEOUT_S} s: claim expires in {arq_s:7.1f} s")
    print("reproduce: .venv/bin/python bench/bench_recovery.py")


if __name__ == "__main__":
    main()
