"""Does BuildKit reuse a cached step while another build on the same base runs? Plain
buildctl on one fresh buildkitd, no buildfleet in the loop: the check to run when BuildKit
is upgraded (docs/benchmarks.md, "Cache affinity").

A long build on the base image starts; while it runs, two Dockerfiles sharing that `FROM`
(each with its own slow `RUN`) are built once (cold), then built again. Sticky routing
puts a repository's builds on a daemon that is busy with another build on the same base
most of the time, so the second round must find its `RUN` step `CACHED`: BuildKit v0.26.3
re-ran it (cold, about the slow step's time again), v0.34.2 does not.

    .venv/bin/python bench/bench_buildkit_concurrent_cache.py [--slow-step-s 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from buildfleet.services import LocalFleetServices, find_tool


@dataclass(frozen=True)
class Outcome:
    name: str
    seconds: float
    run_step_cached: bool


def make_context(root: Path, name: str, dockerfile: str) -> Path:
    context = root / name
    context.mkdir(parents=True)
    (context / "Dockerfile").write_text(dockerfile)
    return context


def buildctl_build(buildctl: str, daemon: str, name: str, context: Path) -> Outcome:
    """Build with rawjson progress; the RUN step is cached when a status of its vertex
    says so."""
    argv = [
        buildctl, "--addr", daemon, "build",
        "--frontend", "dockerfile.v0",
        "--local", f"context={context}", "--local", f"dockerfile={context}",
        "--progress", "rawjson",
    ]  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - began
    cached: dict[str, bool] = {}
    for line in done.stderr.splitlines():
        try:
            status = json.loads(line)
        except json.JSONDecodeError:
            continue
        for vertex in status.get("vertexes") or ():
            if " RUN " in vertex.get("name", ""):
                cached[vertex["digest"]] = cached.get(vertex["digest"], False) or bool(
                    vertex.get("cached")
                )
    assert cached, f"{name}: no RUN step reported"
    return Outcome(name, seconds, all(cached.values()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slow-step-s", type=float, default=4.0)
    args = parser.parse_args()
    slow = args.slow_step_s
    buildctl = find_tool("buildctl")
    version = subprocess.run(
        [buildctl, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with LocalFleetServices(buildkitd_count=1, redis=False) as services:
        daemon = services.buildkitd_addrs[0]
        base = services.base_image
        root = Path(tempfile.mkdtemp(prefix="bench-concurrent-cache-"))
        # Long enough to run through both rounds.
        long = make_context(root, "long", f"FROM {base}\nRUN sleep {slow * 4} && echo long\n")
        sharing = [
            make_context(root, name, f"FROM {base}\nRUN sleep {slow} && echo {name} > /{name}\n")
            for name in ("app-a", "app-b")
        ]
        rounds: list[list[Outcome]] = []
        with ThreadPoolExecutor(max_workers=3) as pool:
            running = pool.submit(buildctl_build, buildctl, daemon, "long", long)
            time.sleep(1.0)  # the long build holds the base now
            for _ in range(2):
                builds = [pool.submit(buildctl_build, buildctl, daemon, c.name, c) for c in sharing]
                rounds.append([build.result() for build in builds])
            long_still_running = not running.done()
            running.result()
    print(f"{version}; one fresh buildkitd; base image {base}; slow RUN step {slow:g}s")
    print(f"a long build on the same base ran through both rounds: {long_still_running}")
    for number, outcomes in enumerate(rounds, 1):
        for outcome in outcomes:
            state = "CACHED" if outcome.run_step_cached else "ran"
            print(f"round {number}: {outcome.name}: RUN {state:6}  {outcome.seconds:6.2f} s")
    again = rounds[-1]
    verdict = "reused" if all(o.run_step_cached for o in again) else "NOT reused"
    print(f"second round, while the long build runs: the cache is {verdict}")
    print(
        f"reproduce: .venv/bin/python bench/bench_buildkit_concurrent_cache.py --slow-step-s {slow:g}"
    )


if __name__ == "__main__":
    main()
