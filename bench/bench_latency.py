"""Latency from submit to Started on an idle fleet: p50 and p99 over builds at a steady rate.

One `buildfleet worker` process (simulate backend, default poll delay) against a local
redis-server; builds are submitted one at a time at `--rate` per second, and the latency is
read from the events themselves (Started.at - Queued.at, one clock).

    .venv/bin/python bench/bench_latency.py [--builds 500 --rate 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from arq import Worker
from arq.connections import ArqRedis
from arq.worker import func

from buildfleet.services import start_redis
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, LocalSource, Queued, Started


async def measure(redis_url: str, builds: int, rate: float) -> list[float]:
    context = tempfile.mkdtemp()
    async with BuildfleetClient.from_url(redis_url) as fleet:
        ids = []
        began = time.perf_counter()
        for n in range(builds):
            await asyncio.sleep(max(0.0, began + n / rate - time.perf_counter()))
            ids.append(
                await fleet.submit(BuildRequest(source=LocalSource(path=context), push=False))
            )
        latencies = []
        for build_id in ids:
            queued = started = None
            async for event in fleet.watch(build_id):
                if isinstance(event, Queued):
                    queued = event.at
                elif isinstance(event, Started):
                    started = event.at
            assert queued is not None and started is not None
            latencies.append(started - queued)
        return latencies


async def record_start(ctx: dict[str, object]) -> None:
    enqueued = ctx["enqueue_time"]
    assert isinstance(enqueued, datetime)
    redis = ctx["redis"]
    assert isinstance(redis, ArqRedis)
    await redis.rpush("bench:latency", time.time() - enqueued.timestamp())


async def measure_bare_arq(redis_url: str, builds: int, rate: float) -> list[float]:
    """The baseline: arq with its defaults (0.5 s poll delay), a no-op job."""
    redis = ArqRedis.from_url(redis_url)
    worker = Worker(
        functions=[func(record_start, name="record_start")],
        redis_pool=redis,
        handle_signals=False,
        keep_result=0,
    )
    polling = asyncio.create_task(worker.main())
    began = time.perf_counter()
    for n in range(builds):
        await asyncio.sleep(max(0.0, began + n / rate - time.perf_counter()))
        await redis.enqueue_job("record_start")
    while await redis.llen("bench:latency") < builds:
        await asyncio.sleep(0.1)
    latencies = [float(x) for x in await redis.lrange("bench:latency", 0, -1)]
    polling.cancel()
    await asyncio.gather(polling, return_exceptions=True)
    await redis.aclose()
    return latencies


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.99) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--builds", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    redis = start_redis(Path(tempfile.mkdtemp(prefix="bench-latency-")))
    env = {
        **os.environ,
        "BUILDFLEET_REDIS_URL": redis.address,
        "BUILDFLEET_WORKER_BACKEND": "simulate",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "buildfleet.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2)  # the worker's imports and first poll
        latencies = asyncio.run(measure(redis.address, args.builds, args.rate))
        baseline = asyncio.run(measure_bare_arq(redis.address, args.builds, args.rate))
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        redis.stop()
    p50, p99 = percentiles(latencies)
    arq_p50, arq_p99 = percentiles(baseline)
    print(
        f"builds: {args.builds} at {args.rate:g}/s, one worker process (simulate, default poll delay)"
    )
    print(
        f"submit -> Started: p50 {p50:.1f} ms, p99 {p99:.1f} ms  (goal: p50 < 10 ms, p99 < 25 ms)"
    )
    print(f"bare arq, default settings: p50 {arq_p50:.1f} ms, p99 {arq_p99:.1f} ms (baseline)")
    print(
        f"reproduce: .venv/bin/python bench/bench_latency.py --builds {args.builds} --rate {args.rate:g}"
    )


if __name__ == "__main__":
    main()
