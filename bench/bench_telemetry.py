"""What observability costs: dispatch throughput with tracing and metrics exporting to the
real trace receiver vs both off, in the same run.

One worker process drains a pre-filled queue of simulated builds in burst mode, as in
bench_dispatch.py (which they are with `--steps 0`, the default; `--steps N` adds N build
steps, each a Step event and, traced, a span). "off": no OpenTelemetry SDK (the API's no-op providers).
"on": the SDK installed by `configure_from_environment`, spans (queue wait, attempt, one per
step) and metrics exported over OTLP/HTTP to otel-desktop-viewer on loopback,
and the worker's Prometheus endpoint served (and scraped once a second during the drain).
The two alternate, fresh processes each time; medians are compared.

    .venv/bin/python bench/bench_telemetry.py [--jobs 5000] [--rounds 3] [--steps 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench_dispatch import MAX_JOBS, POLL_DELAY_S, fill_buildfleet

from buildfleet.services import free_port, start_redis
from buildfleet.traceviewer import TraceViewer, start_trace_viewer
from producer.settings import QueueSettings, RedisSettings
from worker.app import running_worker
from worker.retry import RetrySettings
from worker.settings import BuildkitSettings, SimulateSettings, WorkerConfig, WorkerSettings
from worker.telemetry import configure_from_environment

GOAL = 0.85


def _scrape_every_second(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()


async def drain(redis_url: str, observed: bool, steps: int) -> tuple[float, float]:
    """Seconds to drain the queue, and the worker process's CPU seconds meanwhile (all its
    threads: the exporters' too)."""
    port = free_port() if observed else None
    if observed:
        configure_from_environment(prometheus=True)
    config = WorkerConfig(
        redis=RedisSettings(url=redis_url),
        queue=QueueSettings(),
        worker=WorkerSettings(
            backend="simulate",
            concurrency=MAX_JOBS,
            poll_delay_s=POLL_DELAY_S,
            metrics_port=port,
        ),
        retry=RetrySettings(),
        buildkit=BuildkitSettings(),
        simulate=SimulateSettings(duration_s=0.0, steps=steps),
    )
    stop = threading.Event()
    async with running_worker(config, burst=True) as worker:
        if port is not None:
            url = f"http://127.0.0.1:{port}/metrics"
            threading.Thread(target=_scrape_every_second, args=(url, stop), daemon=True).start()
        began, cpu = time.perf_counter(), time.process_time()
        await worker.main()
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    stop.set()
    return elapsed, cpu


def run_child(role: str, redis_url: str, viewer: TraceViewer, steps: int) -> tuple[float, float]:
    """Drain in a fresh process: neither side inherits the other's providers or memory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if role == "on":
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": viewer.otlp_http, "OTEL_SERVICE_NAME": "bench"}
    output = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            role,
            "--redis-url",
            redis_url,
            "--steps",
            str(steps),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    elapsed, cpu = output.strip().splitlines()[-1].split()
    return float(elapsed), float(cpu)


def spans_received(viewer: TraceViewer) -> int:
    return int(viewer.call("getStats", [])["traces"]["spanCount"])


def flush(url: str) -> None:
    subprocess.run(["redis-cli", "-u", url, "FLUSHALL"], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--child", choices=["off", "on"])
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    if args.child:
        print(*asyncio.run(drain(args.redis_url, observed=args.child == "on", steps=args.steps)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    redis = start_redis(workdir)
    viewer = start_trace_viewer(workdir)
    off_runs: list[tuple[float, float]] = []
    on_runs: list[tuple[float, float]] = []
    received: list[int] = []
    try:
        url = redis.address
        for _ in range(args.rounds):  # alternate, so a noisy neighbour slows both alike
            flush(url)
            asyncio.run(fill_buildfleet(url, args.jobs))
            off_runs.append(run_child("off", url, viewer, args.steps))
            flush(url)
            asyncio.run(fill_buildfleet(url, args.jobs))
            before = spans_received(viewer)
            on_runs.append(run_child("on", url, viewer, args.steps))
            time.sleep(2)  # the receiver's ingest trails the exporter's last batch
            received.append(spans_received(viewer) - before)
    finally:
        viewer.stop()
        redis.stop()
    off_s, on_s = (statistics.median(wall for wall, _ in runs) for runs in (off_runs, on_runs))
    off_cpu, on_cpu = (statistics.median(cpu for _, cpu in runs) for runs in (off_runs, on_runs))
    off_rate, on_rate = args.jobs / off_s, args.jobs / on_s
    per_build = 1e6 / args.jobs
    expected = args.jobs * (2 + args.steps)  # queue wait, attempt, steps (no slots, no wait)
    print(
        f"jobs: {args.jobs} x {args.rounds} rounds (medians), one worker process, simulate "
        f"backend with {args.steps} steps, poll_delay {POLL_DELAY_S}s, max_jobs {MAX_JOBS}"
    )
    print(f"telemetry off (no SDK):           {off_rate:8.0f} builds/s ({off_s:.2f} s)")
    print(f"traces + metrics to the receiver: {on_rate:8.0f} builds/s ({on_s:.2f} s)")
    print(f"ratio on / off:                   {on_rate / off_rate:8.2f}  (goal >= {GOAL})")
    print(
        f"worker CPU per build: off {off_cpu * per_build:.0f} us, on {on_cpu * per_build:.0f} us"
        f" (ratio off / on {off_cpu / on_cpu:.2f}: the throughput ratio if CPU-bound)"
    )
    pairs = [(round(off[0], 2), round(on[0], 2)) for off, on in zip(off_runs, on_runs, strict=True)]
    print(f"each round, off / on seconds: {pairs}")
    print(f"spans received per round: {received} (expected {expected} each)")
    print(
        "reproduce: .venv/bin/python bench/bench_telemetry.py "
        f"--jobs {args.jobs} --rounds {args.rounds} --steps {args.steps}"
    )


if __name__ == "__main__":
    main()
