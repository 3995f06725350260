"""Cache affinity: sticky (rendezvous) routing vs random routing on 3 real buildkitd daemons.

30 builds of 6 repositories, each Dockerfile with a slow cacheable step, one submitted every
`--interval` seconds to a fleet of 3 cold daemons (`--max-builds` each). Each routing runs
on its own fresh daemons, so both start cold. Reports the mean time to result and the share
of slow steps found cached.

Then the spilled builds: sticky routing with one slot per daemon (`--spill-max-builds`) and
no wait for it (`spill_after_s` 0), so that a build whose daemon is busy runs on another,
once without and once with the per-repository registry cache (`[cache] registry`): how
many builds spilled, and how many of those found their slow step cached (the hit ratio).

    .venv/bin/python bench/bench_affinity.py [--repos 6 --builds 30 --slow-step-s 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from buildfleet.services import LocalFleetServices, find_tool
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, BuildResult, LocalSource
from producer.settings import QueueSettings, RedisSettings
from worker.app import running_worker
from worker.retry import RetrySettings
from worker.routing import Strategy, rank
from worker.settings import (
    BuildkitSettings,
    CacheSettings,
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


@dataclass(frozen=True)
class Scenario:
    strategy: Strategy
    max_builds: int
    spill_after_s: float = SchedulingSettings().spill_after_s
    registry_cache: bool = False


@dataclass(frozen=True)
class Figures:
    mean_latency: float
    elapsed: float
    warm: int
    builds: int
    spilled: int
    spilled_warm: int


async def run_fleet(
    services: LocalFleetServices,
    contexts: list[Path],
    builds: int,
    scenario: Scenario,
    interval: float,
    slow_step_s: float,
) -> Figures:
    daemons = services.buildkitd_addrs
    config = WorkerConfig(
        redis=RedisSettings(url=services.redis_url),
        queue=QueueSettings(),
        worker=WorkerSettings(backend="buildkit", concurrency=builds),
        retry=RetrySettings(),
        buildkit=BuildkitSettings(
            daemons=tuple(
                DaemonSettings(address=a, max_builds=scenario.max_builds) for a in daemons
            ),
            buildctl=find_tool("buildctl"),
        ),
        simulate=SimulateSettings(),
        scheduling=SchedulingSettings(
            routing=scenario.strategy, spill_after_s=scenario.spill_after_s
        ),
        cache=CacheSettings(
            registry=f"{services.registry}/buildcache" if scenario.registry_cache else None
        ),
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
    assert all(result.ok for result in results), [r.error for r in results if not r.ok]
    # A build is warm when its slow step did not run again: found in the cache, or
    # shared with an identical build in flight on the same daemon.
    warm = [result.build_s < slow_step_s / 2 for result in results]
    # Spilled: it ran on a daemon other than the one its repository is routed to.
    spilled = [
        result.daemon != rank(request.cache_key, daemons)[0]
        for request, result in zip(requests, results, strict=True)
    ]
    return Figures(
        mean_latency=statistics.mean(latency for _, latency in outcomes),
        elapsed=elapsed,
        warm=sum(warm),
        builds=len(results),
        spilled=sum(spilled),
        spilled_warm=sum(w and s for w, s in zip(warm, spilled, strict=True)),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repos", type=int, default=6)
    parser.add_argument("--builds", type=int, default=30)
    parser.add_argument("--slow-step-s", type=float, default=4.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--max-builds", type=int, default=4)
    parser.add_argument("--spill-max-builds", type=int, default=1)
    parser.add_argument("--no-spill", action="store_true", help="only sticky vs random")
    args = parser.parse_args()
    scenarios = {
        "sticky": Scenario("rendezvous", args.max_builds),
        "random": Scenario("random", args.max_builds),
    }
    if not args.no_spill:
        spilling = Scenario("rendezvous", args.spill_max_builds, spill_after_s=0.0)
        scenarios["spill, no registry cache"] = spilling
        scenarios["spill, registry cache"] = replace(spilling, registry_cache=True)
    figures: dict[str, Figures] = {}
    for name, scenario in scenarios.items():
        with LocalFleetServices(buildkitd_count=3) as services:
            contexts = make_repos(
                Path(tempfile.mkdtemp(prefix="bench-affinity-")),
                services.base_image,
                args.repos,
                args.slow_step_s,
            )
            figures[name] = asyncio.run(
                run_fleet(
                    services, contexts, args.builds, scenario, args.interval, args.slow_step_s
                )
            )
    arrival = f"one every {args.interval:g}s" if args.interval else "all at once"
    print(
        f"{args.builds} builds of {args.repos} repositories ({arrival}), slow step "
        f"{args.slow_step_s:g}s, 3 cold buildkitd daemons per scenario, machine load "
        f"{os.getloadavg()[0]:.1f}"
    )
    for name, f in figures.items():
        scenario = scenarios[name]
        print(
            f"{name:>26} (max_builds {scenario.max_builds}): mean submit-to-result"
            f" {f.mean_latency:5.2f} s, all done in {f.elapsed:5.1f} s,"
            f" warm {f.warm}/{f.builds} ({f.warm / f.builds:.0%})"
        )
        if scenario.spill_after_s == 0 and f.spilled:
            print(
                f"{'':>28}spilled {f.spilled}, of them warm {f.spilled_warm}"
                f" (hit ratio {f.spilled_warm / f.spilled:.0%})"
            )
    speedup = figures["random"].mean_latency / figures["sticky"].mean_latency
    print(f"sticky speed-up over random (mean time to result): {speedup:.2f}x (goal >= 1.5x)")
    print(f"sticky warm: {figures['sticky'].warm}/{figures['sticky'].builds} (goal >= 24/30)")
    print(
        "reproduce: .venv/bin/python bench/bench_affinity.py --repos"
        f" {args.repos} --builds {args.builds} --slow-step-s {args.slow_step_s:g}"
        f" --interval {args.interval:g} --max-builds {args.max_builds}"
        f" --spill-max-builds {args.spill_max_builds}" + (" --no-spill" if args.no_spill else "")
    )


if __name__ == "__main__":
    main()
