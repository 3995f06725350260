"""Cache affinity: sticky (rendezvous) routing vs random routing on 3 real buildkitd daemons.

30 builds of 6 repositories, each Dockerfile with a slow cacheable step, submitted at once
to a fleet of 3 cold daemons (max_builds 2 each). Each routing runs on its own fresh
daemons, so both start cold. Reports total time and the share of slow steps found cached.

    .venv/bin/python bench/bench_affinity.py [--repos 6 --builds 30 --slow-step-s 4]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from buildfleet.services import LocalFleetServices, find_tool
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, LocalSource, Step
from producer.settings import QueueSettings, RedisSettings
from worker.app import WorkerConfig, running_worker
from worker.retry import RetrySettings
from worker.routing import Strategy
from worker.settings import (
    BuildkitSettings,
    DaemonSettings,
    SchedulingSettings,
    SimulateSettings,
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
    services: LocalFleetServices, contexts: list[Path], builds: int, strategy: Strategy
) -> tuple[float, int, int]:
    config = WorkerConfig(
        redis=RedisSettings(url=services.redis_url),
        queue=QueueSettings(),
        worker=WorkerSettings(backend="buildkit", concurrency=builds),
        retry=RetrySettings(),
        buildkit=BuildkitSettings(
            daemons=tuple(
                DaemonSettings(address=a, max_builds=2) for a in services.buildkitd_addrs
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
        await fleet.submit_many(requests)
        results = await asyncio.gather(*(fleet.wait(r.id) for r in requests))
        elapsed = time.perf_counter() - began
        polling.cancel()
        assert all(result.ok for result in results), [r.error for r in results if not r.ok]
        hits = misses = 0
        for request in requests:
            async for event in fleet.watch(request.id):
                if isinstance(event, Step) and "RUN sleep" in event.name and event.completed:
                    hits += event.cached
                    misses += not event.cached
    return elapsed, hits, misses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repos", type=int, default=6)
    parser.add_argument("--builds", type=int, default=30)
    parser.add_argument("--slow-step-s", type=float, default=4.0)
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
            figures[strategy] = asyncio.run(run_fleet(services, contexts, args.builds, strategy))
    print(
        f"{args.builds} builds of {args.repos} repositories, slow step {args.slow_step_s:g}s, "
        "3 cold buildkitd daemons (max_builds 2), submitted at once"
    )
    for strategy, (elapsed, hits, misses) in figures.items():
        ratio = hits / (hits + misses)
        print(
            f"{strategy:>10}: {elapsed:6.1f} s, slow step cached in {hits}/{hits + misses} ({ratio:.0%})"
        )
    speedup = figures["random"][0] / figures["rendezvous"][0]
    print(f"sticky speed-up over random: {speedup:.2f}x (goal >= 1.5x)")
    print(
        "reproduce: .venv/bin/python bench/bench_affinity.py"
        f" --repos {args.repos} --builds {args.builds} --slow-step-s {args.slow_step_s:g}"
    )


if __name__ == "__main__":
    main()
