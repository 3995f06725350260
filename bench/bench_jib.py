"""A Jib build through the fleet vs the same `mvn ... jib:build` run directly, warm.

The same one-class Maven project (tests/javaproject.py), FROM the busybox base image in a
local registry, pushed to that registry, with the same warm Maven repository and Jib base
image cache: `mvn` run directly on a fresh copy of the project (the same argument list the
backend runs), the backend's `build()` called in this process ("backend alone": the copy,
Maven, the registry's digest check), and through buildfleet (submit -> Redis -> a worker
process -> the jib backend -> pushed, result read back). Alternating, median of `--runs`.

    .venv/bin/python bench/bench_jib.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from buildfleet.config import load_config
from buildfleet.local_fleet import _worker_env
from buildfleet.services import LocalFleetServices
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, JibRecipe, LocalSource, Log, Step
from worker.backends.base import Backend, BuildJob
from worker.backends.factory import make_backend
from worker.backends.jib.maven import maven_argv
from worker.settings import JibSettings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from javaproject import MAIN_CLASS, maven_project

GOAL = 1.10


def direct_build(settings: JibSettings, request: BuildRequest, project: Path) -> Callable[[], None]:
    """`mvn ... jib:build` as the backend runs it, on a fresh copy of the project."""
    assert isinstance(request.recipe, JibRecipe)
    recipe = request.recipe

    def build() -> None:
        with tempfile.TemporaryDirectory(prefix="bench-jib-direct-") as scratch:
            copy = Path(scratch, "source")
            shutil.copytree(project, copy)
            digest = Path(scratch, "digest")
            argv = maven_argv(settings, recipe, request, copy / "pom.xml", digest)
            subprocess.run(argv, check=True, capture_output=True, cwd=copy)

    return build


async def fleet_build(client: BuildfleetClient, request: BuildRequest) -> float:
    began = time.perf_counter()
    result = await client.wait(await client.submit(request))
    elapsed = time.perf_counter() - began
    assert result.ok, result
    return elapsed


async def _discard(event: Step | Log) -> None:
    return None


async def alone(backend: Backend, request: BuildRequest) -> float:
    began = time.perf_counter()
    await backend.build(BuildJob(request, 1), _discard)
    return time.perf_counter() - began


async def alternate(
    redis_url: str,
    runs: int,
    direct: Callable[[], None],
    backend: Backend,
    request: Callable[[], BuildRequest],
) -> tuple[list[float], list[float], list[float]]:
    direct_s, alone_s, fleet_s = [], [], []
    async with BuildfleetClient.from_url(redis_url) as client:
        await fleet_build(client, request())  # the worker's first build loads its scripts
        for _ in range(runs):
            began = time.perf_counter()
            await asyncio.to_thread(direct)
            direct_s.append(time.perf_counter() - began)
            alone_s.append(await alone(backend, request()))
            fleet_s.append(await fleet_build(client, request()))
    await backend.aclose()
    return direct_s, alone_s, fleet_s


def measure(runs: int) -> tuple[float, float, float]:
    with LocalFleetServices(backend="buildah") as fleet:  # buildah: the base image, no daemon
        project = Path(tempfile.mkdtemp(prefix="bench-jib-"))
        for name, text in maven_project().items():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            (project / name).write_text(text)
        image = f"{fleet.registry}/bench/jib:latest"
        recipe = JibRecipe(base_image=fleet.base_image, main_class=MAIN_CLASS)

        def request() -> BuildRequest:
            return BuildRequest(
                source=LocalSource(path=str(project)), images=(image,), recipe=recipe
            )

        env = {
            **_worker_env(fleet, fleet.redis_url),
            "BUILDFLEET_WORKER_BACKEND": "jib",
            "BUILDFLEET_JIB_INSECURE_REGISTRIES": f'["{fleet.registry}"]',
        }
        config = load_config(None, environ=env).for_worker()
        direct = direct_build(config.jib, request(), project)
        direct()  # warm Maven's repository and Jib's base image cache
        in_process = make_backend(config)
        log = (fleet.workdir / "logs" / "bench-worker.log").open("ab")
        worker = subprocess.Popen(
            [sys.executable, "-m", "buildfleet.cli", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            times = asyncio.run(alternate(fleet.redis_url, runs, direct, in_process, request))
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    direct_s, alone_s, fleet_s = (statistics.median(series) for series in times)
    return direct_s, alone_s, fleet_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    direct_s, alone_s, fleet_s = measure(args.runs)
    ratio = fleet_s / direct_s
    print(f"warm Jib build pushed to a local registry, median of {args.runs} each, alternating")
    print(f"{'directly':>11} {'backend alone':>13} {'buildfleet':>11} {'ratio':>6}  goal <= {GOAL}")
    print(
        f"{direct_s * 1000:8.1f} ms {alone_s * 1000:10.1f} ms {fleet_s * 1000:8.1f} ms"
        f" {ratio:6.3f}  {'met' if ratio <= GOAL else 'not met'}"
    )
    print(f"reproduce: .venv/bin/python bench/bench_jib.py --runs {args.runs}")


if __name__ == "__main__":
    main()
