"""Cache affinity: sticky (rendezvous) routing vs random routing on 3 real buildkitd daemons.

30 builds of 6 repositories, each Dockerfile with a slow cacheable step, submitted at once
to a fleet of 3 cold daemons (`--max-builds` each). Each routing runs on its own fresh
daemons, so both start cold. Reports total time and the share of slow steps found cached.

    .venv/bin/python bench/bench_affinity.py [--repos 6 --builds 30 --slow-step-s 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from buildfleet.services import LocalFleetServices, find_tool
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, BuildResult, LocalSource
from producer.settings import QueueSettings, RedisSettings
from worker.app import running_worker
from worker.retry import RetrySettings
from worker.routing import Strategy
from worker.settings import (
    BuildkitSettings,
    DaemonSettings,
    SchedulingSettings,
    SimulateSettings,
    WorkerConfig,
    WorkerSettings,
)


def make_repos(root: Path, base_image: str, repos: int, slow_step_s: float) -> list[Path]:
    contexts = []
    for n in range(repos):
        context = root / f"repo-{n}"
        context.mkdir(parents=True)
        (context / "Dockerfile").write_text(
            f"FROM {base_image}\n"
            f"RUN sleep {slow_step_s} && echo dependencies of repo {n} > /deps\n"
            "COPY . /src\n"
        )
        (context / "main.txt").write_text(f"repo {n}\n")
        contexts.append(context)
    return contexts


async def run_fleet(
    services: LocalFleetServices,
    contexts: list[Path],
    builds: int,
    strategy: Strategy,
    interval: float,
    max_builds: int,
    slow_step_s: float,
) -> tuple[float, float, int, int]:
    config = WorkerConfig(
        redis=RedisSettings(url=services.redis_url),
        queue=QueueSettings(),
        worker=WorkerSettings(backend="buildkit", concurrency=builds),
        retry=RetrySettings(),
        buildkit=BuildkitSettings(
            daemons=tuple(
                DaemonSettings(address=a, max_builds=max_builds) for a in services.buildkitd_addrs
            ),
            buildctl=find_tool("buildctl"),
        ),
        simulate=SimulateSettings(),
        scheduling=SchedulingSettings(routing=strategy),
    )
    requests = [
        BuildRequest(source=LocalSource(path=str(contexts[n % len(contexts)])), push=False)
        for n in range(builds)
    ]
    async with (
        running_worker(config, handle_signals=False) as worker,
        BuildfleetClient.from_url(services.redis_url) as fleet,
    ):
        polling = asyncio.create_task(worker.main())
        began = time.perf_counter()

        async def submit_and_wait(n: int, request: BuildRequest) -> tuple[BuildResult, float]:
            await asyncio.sleep(n * interval)
            submitted = time.perf_counter()
            await fleet.submit(request)
            result = await fleet.wait(request.id)
            return result, time.perf_counter() - submitted

        outcomes = await asyncio.gather(*(submit_and_wait(n, r) for n, r in enumerate(requests)))
        elapsed = time.perf_counter() - began
        polling.cancel()
        results = [result for result, _ in outcomes]
        mean_latency = statistics.mean(latency for _, latency in outcomes)
        assert all(result.ok for result in results), [r.error for r in results if not r.ok]
        # A build is warm when its slow step did not run again: found in the cache, or
        # shared with an identical build in flight on the same daemon.
        hits = sum(result.build_s < slow_step_s / 2 for result in results)
        misses = len(results) - hits
    return mean_latency, elapsed, hits, misses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repos", type=int, default=6)
    parser.add_argument("--builds", type=int, default=30)
    parser.add_argument("--slow-step-s", type=float, default=4.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--max-builds", type=int, default=4)
    args = parser.parse_args()
    figures = {}
    for strategy in ("rendezvous", "random"):
        with LocalFleetServices(buildkitd_count=3) as services:
            contexts = make_repos(
                Path(tempfile.mkdtemp(prefix=f"bench-affinity-{strategy}-")),
                services.base_image,
                args.repos,
                args.slow_step_s,
            )
            figures[strategy] = asyncio.run(
                run_fleet(
                    services,
                    contexts,
                    args.builds,
                    strategy,
                    args.interval,
                    args.max_builds,
                    args.slow_step_s,
                )
            )
    arrival = f"one every {args.interval:g}s" if args.interval else "all at once"
    print(
        f"{args.builds} builds of {args.repos} repositories ({arrival}), slow step "
        f"{args.slow_step_s:g}s, 3 cold buildkitd daemons (max_builds {args.max_builds})"
    )
    for strategy, (latency, elapsed, hits, misses) in figures.items():
        print(
            f"{strategy:>10}: mean submit-to-result {latency:5.2f} s, all done in {elapsed:5.1f} s,"
            f" warm {hits}/{hits + misses} ({hits / (hits + misses):.0%})"
        )
    speedup = figures["random"][0] / figures["rendezvous"][0]
    print(f"sticky speed-up over random (mean time to result): {speedup:.2f}x (goal >= 1.5x)")
    print(
        "reproduce: .venv/bin/python bench/bench_affinity.py --repos"
        f" {args.repos} --builds {args.builds} --slow-step-s {args.slow_step_s:g}"
        f" --interval {args.interval:g} --max-builds {args.max_builds}"
    )


if __name__ == "__main__":
    main()
