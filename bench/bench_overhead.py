"""Overhead of the fleet on a real build: the same small warm-cache build through buildfleet
(submit -> queue -> worker -> buildctl -> pushed, result read back) and by calling buildctl
directly, alternating, median of `--runs` each, against one local buildkitd and registry.

    .venv/bin/python bench/bench_overhead.py [--runs 10]
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
from collections.abc import Callable
from pathlib import Path

from buildfleet.services import LocalFleetServices, find_tool
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, LocalSource
from worker.backends.buildkit import buildctl_argv


def direct_build(buildctl: str, daemon: str, request: BuildRequest, scratch: Path) -> float:
    argv = buildctl_argv([buildctl, "--addr", daemon], request, scratch / "metadata.json")
    began = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - began


PHASES: dict[str, list[float]] = {"pickup": [], "in the worker": [], "result to client": []}
"""Where a fleet build's time goes: submitted to started (the queue), started to ended (the
build, with Started and its progress), ended to the client holding the result."""


async def fleet_build(fleet: BuildfleetClient, request: BuildRequest) -> float:
    began, submitted = time.perf_counter(), time.time()
    result = await fleet.wait(await fleet.submit(request))
    elapsed, received = time.perf_counter() - began, time.time()
    assert result.ok, result
    PHASES["pickup"].append(result.queue_wait_s)
    PHASES["in the worker"].append(result.finished_at - submitted - result.queue_wait_s)
    PHASES["result to client"].append(received - result.finished_at)
    return elapsed


async def alternate(
    redis_url: str, runs: int, direct: Callable[[], float], request: Callable[[], BuildRequest]
) -> tuple[list[float], list[float]]:
    """One client for the whole run, as a producer keeps one."""
    direct_s, fleet_s = [], []
    async with BuildfleetClient.from_url(redis_url) as fleet:
        await fleet_build(fleet, request())  # the worker's first build loads its scripts
        for _ in range(runs):
            direct_s.append(await asyncio.to_thread(direct))
            fleet_s.append(await fleet_build(fleet, request()))
    return direct_s, fleet_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="record the worker with py-spy: a flame graph (.svg) or collapsed stacks (.txt)",
    )
    args = parser.parse_args()
    with LocalFleetServices(buildkitd_count=1) as services:
        daemon = services.buildkitd_addrs[0]
        buildctl = find_tool("buildctl")
        context = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
        (context / "Dockerfile").write_text(
            f"FROM {services.base_image}\nRUN echo warm > /warm.txt\nCOPY . /src\n"
        )
        (context / "payload.txt").write_text("x" * 4096)
        image = f"{services.registry}/bench/overhead:latest"

        def request() -> BuildRequest:
            return BuildRequest(source=LocalSource(path=str(context)), images=(image,))

        env = {
            **os.environ,
            "BUILDFLEET_REDIS_URL": services.redis_url,
            "BUILDFLEET_BUILDKIT_BUILDCTL": buildctl,
            "BUILDFLEET_BUILDKIT_DAEMONS": f'[{{"address": "{daemon}"}}]',
        }
        command = [sys.executable, "-m", "buildfleet.cli", "worker"]
        if args.profile:
            spy = str(Path(sys.executable).with_name("py-spy"))
            form = "raw" if args.profile.endswith(".txt") else "flamegraph"
            command = [spy, "record", "--nonblocking", "-r", "250", "--format", form,
                       "-o", args.profile, "--", *command]  # fmt: skip
        worker = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            scratch = Path(tempfile.mkdtemp())
            direct_build(buildctl, daemon, request(), scratch)  # warm the cache
            direct, fleet = asyncio.run(
                alternate(
                    services.redis_url,
                    args.runs,
                    lambda: direct_build(buildctl, daemon, request(), scratch),
                    request,
                )
            )
        finally:
            if args.profile:  # py-spy writes its profile when the worker it runs ends
                subprocess.run(["pkill", "-TERM", "-P", str(worker.pid)], check=False)
            else:
                worker.terminate()
            worker.wait(timeout=60)
    direct_s, fleet_s = statistics.median(direct), statistics.median(fleet)
    print(f"warm-cache build pushed to a local registry, median of {args.runs} each, alternating")
    print(f"buildctl directly:  {direct_s * 1000:7.1f} ms")
    print(
        f"through buildfleet: {fleet_s * 1000:7.1f} ms  (submit to result, via Redis and a worker)"
    )
    print(f"ratio: {fleet_s / direct_s:.3f}  (goal <= 1.10)")
    print(
        "fleet build, medians: "
        + ", ".join(f"{name} {statistics.median(s) * 1000:.1f} ms" for name, s in PHASES.items())
    )
    print(f"machine load average {os.getloadavg()[0]:.1f} (2 cores, shared)")
    print(f"reproduce: .venv/bin/python bench/bench_overhead.py --runs {args.runs}")


if __name__ == "__main__":
    main()
