"""The fleet's overhead on each backend: the same small warm-cache build, pushed to a local
registry, run directly with the builder's own tool and through buildfleet (submit -> Redis ->
a worker process -> the backend -> pushed, result read back), alternating, median of `--runs`
each, per backend, in one run.

Directly: `buildctl build` (buildkit), the docker CLI's `docker build` + `docker push`
(docker; Debian's CLI, BuildKit on), `buildah build` + `buildah push` (buildah). A third
column times the backend alone (its `build()` called in this process, no Redis, no worker):
fleet minus that is what the queue, the worker and the events cost.

    .venv/bin/python bench/bench_backends.py [--runs 10] [--backends buildkit,docker,buildah]
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

from buildfleet.config import load_config
from buildfleet.local_fleet import _worker_env
from buildfleet.services import LocalFleetServices, buildah_storage, find_tool
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, LocalSource, Log, Step
from worker.backends.base import Backend, BuildJob
from worker.backends.buildah import build_argv, push_argv
from worker.backends.buildkit import buildctl_argv
from worker.backends.factory import make_backend
from worker.settings import BuildahSettings

GOAL = 1.10


def run(argv: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(argv, check=True, capture_output=True, env=env)


def direct_build(
    fleet: LocalFleetServices, request: BuildRequest, scratch: Path
) -> Callable[[], None]:
    """The same build with the builder's own tool, as a user would run it."""
    image = request.images[0]
    context = request.source.path  # type: ignore[union-attr]
    match fleet.backend:
        case "buildkit":
            connection = [find_tool("buildctl"), "--addr", fleet.builders[0]]
            argv = buildctl_argv(connection, request, scratch / "metadata.json")
            return lambda: run(argv)
        case "docker":
            docker = "/usr/bin/docker"  # Debian's CLI: BuildKit built in, no buildx plugin
            env = {**os.environ, "DOCKER_HOST": fleet.builders[0], "DOCKER_BUILDKIT": "1"}

            def docker_build() -> None:
                run([docker, "build", "-q", "--network", "host", "-t", image, context], env)
                run([docker, "push", "-q", image], env)

            return docker_build
        case "buildah":
            root, runroot = buildah_storage(fleet.workdir)
            settings = BuildahSettings(
                buildah=find_tool("buildah"), root=str(root), runroot=str(runroot), tls_verify=False
            )

            def buildah_build() -> None:
                run(build_argv(settings, request, scratch / "iid"))
                run(push_argv(settings, image, scratch / "digest"))

            return buildah_build
    raise AssertionError(fleet.backend)


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
    await backend.build(BuildJob(request, 1, placement=None), _discard)
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


def measure(backend: str, runs: int) -> tuple[float, float, float]:
    with LocalFleetServices(backend=backend) as fleet:  # type: ignore[arg-type]
        context = Path(tempfile.mkdtemp(prefix="bench-backends-"))
        (context / "Dockerfile").write_text(
            f"FROM {fleet.base_image}\nRUN echo warm > /warm.txt\nCOPY . /src\n"
        )
        (context / "payload.txt").write_text("x" * 4096)
        image = f"{fleet.registry}/bench/{backend}:latest"

        def request() -> BuildRequest:
            return BuildRequest(source=LocalSource(path=str(context)), images=(image,))

        direct = direct_build(fleet, request(), Path(tempfile.mkdtemp()))
        direct()  # warm the builder's cache
        log = (fleet.workdir / "logs" / "bench-worker.log").open("ab")
        env = _worker_env(fleet, fleet.redis_url)
        in_process = make_backend(load_config(None, environ=env).for_worker())
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
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--backends", default="buildkit,docker,buildah")
    args = parser.parse_args()
    backends = args.backends.split(",")
    results = {backend: measure(backend, args.runs) for backend in backends}
    print(f"warm-cache build pushed to a local registry, median of {args.runs} each, alternating")
    print(
        f"{'backend':9} {'directly':>11} {'backend alone':>13} {'buildfleet':>11} {'ratio':>6}"
        f"  goal <= {GOAL}"
    )
    for backend, (direct_s, alone_s, fleet_s) in results.items():
        ratio = fleet_s / direct_s
        verdict = "met" if ratio <= GOAL else "not met"
        print(
            f"{backend:9} {direct_s * 1000:8.1f} ms {alone_s * 1000:10.1f} ms"
            f" {fleet_s * 1000:8.1f} ms {ratio:6.3f}  {verdict}"
        )
    print(
        f"reproduce: .venv/bin/python bench/bench_backends.py --runs {args.runs}"
        f" --backends {args.backends}"
    )


if __name__ == "__main__":
    main()
