"""Dispatch throughput: builds through the whole pipeline vs bare arq no-op jobs.

Both run in one worker process against the same redis-server in the same run, with arq's
fastest setting (poll_delay 10 ms, max_jobs 100). The queue is filled first; each worker
then drains it in burst mode and reports the time from its first poll to its exit.

    .venv/bin/python bench/bench_dispatch.py [--jobs 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from arq import Worker
from arq.connections import ArqRedis
from arq.worker import func

from buildfleet.services import start_redis
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, LocalSource
from producer.settings import QueueSettings, RedisSettings
from worker.app import running_worker
from worker.retry import RetrySettings
from worker.settings import (
    BuildkitSettings,
    DaemonSettings,
    SimulateSettings,
    WorkerConfig,
    WorkerSettings,
)

POLL_DELAY_S = 0.01
MAX_JOBS = 100


async def noop(ctx: dict[str, object]) -> None:
    return None


async def drain_bare_arq(redis_url: str) -> float:
    redis = ArqRedis.from_url(redis_url)
    worker = Worker(
        functions=[func(noop, name="noop")],
        redis_pool=redis,
        burst=True,
        poll_delay=POLL_DELAY_S,
        max_jobs=MAX_JOBS,
        keep_result=0,
        handle_signals=False,
    )
    began = time.perf_counter()
    await worker.main()
    elapsed = time.perf_counter() - began
    await worker.close()
    return elapsed


async def drain_buildfleet(redis_url: str, leased: bool = False) -> float:
    """Simulated builds; `leased` adds capacity slots and routing over two (fake) daemons
    with room to spare, to measure what they cost."""
    daemons = (
        tuple(DaemonSettings(address=f"tcp://daemon-{n}:1234", max_builds=MAX_JOBS) for n in (1, 2))
        if leased
        else ()
    )
    config = WorkerConfig(
        redis=RedisSettings(url=redis_url),
        queue=QueueSettings(),
        worker=WorkerSettings(backend="simulate", concurrency=MAX_JOBS, poll_delay_s=POLL_DELAY_S),
        retry=RetrySettings(),
        buildkit=BuildkitSettings(daemons=daemons),
        simulate=SimulateSettings(duration_s=0.0),
    )
    async with running_worker(config, burst=True) as worker:
        began = time.perf_counter()
        await worker.main()
        return time.perf_counter() - began


async def fill_bare_arq(redis_url: str, jobs: int) -> None:
    redis = ArqRedis.from_url(redis_url)
    for start in range(0, jobs, 100):
        await asyncio.gather(
            *(redis.enqueue_job("noop") for _ in range(start, min(jobs, start + 100)))
        )
    await redis.aclose()


async def fill_buildfleet(redis_url: str, jobs: int) -> None:
    context = tempfile.mkdtemp()
    async with BuildfleetClient.from_url(redis_url) as fleet:
        for start in range(0, jobs, 500):
            batch = [
                BuildRequest(source=LocalSource(path=context), push=False)
                for _ in range(start, min(jobs, start + 500))
            ]
            await fleet.submit_many(batch)


async def count_terminal(redis_url: str) -> int:
    async with BuildfleetClient.from_url(redis_url) as fleet:
        return int(await fleet.redis.xlen("buildfleet:events"))


def run_child(role: str, redis_url: str) -> float:
    """Drain in a fresh process so neither side inherits the other's memory or loop."""
    output = subprocess.run(
        [sys.executable, __file__, "--child", role, "--redis-url", redis_url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["arq", "buildfleet", "buildfleet-leased"])
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    if args.child:
        drains = {
            "arq": drain_bare_arq,
            "buildfleet": drain_buildfleet,
            "buildfleet-leased": functools.partial(drain_buildfleet, leased=True),
        }
        print(asyncio.run(drains[args.child](args.redis_url)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench-dispatch-"))
    redis = start_redis(workdir)
    arq_runs: list[float] = []
    fleet_runs: list[float] = []
    leased_runs: list[float] = []
    try:
        url = redis.address
        # Alternate the two, so that a noisy neighbour slows both alike.
        for _ in range(args.rounds):
            subprocess.run(["redis-cli", "-u", url, "FLUSHALL"], check=True, capture_output=True)
            asyncio.run(fill_bare_arq(url, args.jobs))
            arq_runs.append(run_child("arq", url))
            subprocess.run(["redis-cli", "-u", url, "FLUSHALL"], check=True, capture_output=True)
            asyncio.run(fill_buildfleet(url, args.jobs))
            fleet_runs.append(run_child("buildfleet", url))
            events = asyncio.run(count_terminal(url))
            assert events == 3 * args.jobs, f"expected {3 * args.jobs} events, saw {events}"
            subprocess.run(["redis-cli", "-u", url, "FLUSHALL"], check=True, capture_output=True)
            asyncio.run(fill_buildfleet(url, args.jobs))
            leased_runs.append(run_child("buildfleet-leased", url))
    finally:
        redis.stop()
    arq_s, fleet_s = statistics.median(arq_runs), statistics.median(fleet_runs)
    leased_s = statistics.median(leased_runs)
    arq_rate, fleet_rate, leased_rate = args.jobs / arq_s, args.jobs / fleet_s, args.jobs / leased_s
    print(
        f"jobs: {args.jobs} x {args.rounds} rounds (medians), one worker process, "
        f"poll_delay {POLL_DELAY_S}s, max_jobs {MAX_JOBS}"
    )
    print(f"bare arq no-op jobs:        {arq_rate:8.0f} jobs/s  ({arq_s:.2f} s)")
    print(f"buildfleet simulate builds: {fleet_rate:8.0f} builds/s ({fleet_s:.2f} s)")
    print(f"ratio buildfleet / arq:     {fleet_rate / arq_rate:8.2f}  (goal >= 0.9)")
    print(f"with capacity and routing:  {leased_rate:8.0f} builds/s ({leased_s:.2f} s)")
    print(f"ratio with / without them:  {leased_rate / fleet_rate:8.2f}  (goal >= 0.8)")
    print("each build: Queued, Started and Succeeded events, result stored")
    print(
        f"reproduce: .venv/bin/python bench/bench_dispatch.py --jobs {args.jobs} --rounds {args.rounds}"
    )


if __name__ == "__main__":
    main()
