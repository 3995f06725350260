"""What bench_kaniko.py and bench_tekton.py share: N builds through W backends (each with
its own API client, C builds in flight each) against a real control plane whose kwok pods
run for a fixed time, and the figures of such a run.

Overhead per build is `build()`'s wall time (from the create to the terminal event) minus
the pod's own runtime: what the backend, the API server, the controllers and the
scheduler add to the build itself.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from producer.contract import BuildRequest, GitSource, Log, Step  # noqa: E402
from worker.backends.base import BuildJob, Built  # noqa: E402
from worker.kube.api import KubeApi  # noqa: E402
from worker.kube.objects import K, Manifest, Resource  # noqa: E402

DIGEST = "sha256:" + "9" * 64


class TimedApi(KubeApi):
    """Records when each create returned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.created_at: list[float] = []

    async def create(self, resource: Resource[K], namespace: str, body: Manifest) -> K:
        created = await super().create(resource, namespace, body)
        self.created_at.append(time.perf_counter())
        return created


class KubeBackend(Protocol):
    api_calls: int

    async def build(self, job: BuildJob, progress: Any) -> Built: ...

    async def aclose(self) -> None: ...


@dataclass
class Row:
    label: str
    concurrency: int
    builds: int
    wall: float = 0.0
    durations: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    calls: int = 0
    cpu_s: float = 0.0
    """CPU time of this process (the workers) during the run."""
    created_at: list[float] = field(default_factory=list)

    def overhead(self, pod_seconds: float) -> list[float]:
        return [d - pod_seconds for d in self.durations]

    def report(self, pod_seconds: float) -> str:
        created = sorted(self.created_at)
        span = created[-1] - created[0] if len(created) > 1 else float("nan")
        overhead = self.overhead(pod_seconds)
        text = (
            f"{self.label:>8} {self.concurrency:>3} in flight per worker: "
            f"{len(self.durations)} ok, {len(self.failures)} failed, wall {self.wall:.1f}s, "
            f"{(len(created) - 1) / span:.1f} created/s, "
            f"{self.calls / max(1, self.builds):.2f} API requests and "
            f"{1000 * self.cpu_s / max(1, self.builds):.1f} ms worker CPU per build"
        )
        if overhead:
            text += (
                f"\n         overhead beyond the pod's runtime: p50 {percentile(overhead, 50):.2f}s"
                f"  p99 {percentile(overhead, 99):.2f}s  max {max(overhead):.2f}s"
                f"  mean {statistics.fmean(overhead):.2f}s"
            )
        for failure in self.failures[:5]:
            text += f"\n         failed: {failure}"
        return text


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def requests(builds: int) -> list[BuildRequest]:
    return [
        BuildRequest(
            source=GitSource(url="https://git.example.test/app.git", ref="main"),
            images=(f"127.0.0.1:5000/bench/app{i}:latest",),
            id=f"bench-{uuid.uuid4().hex[:12]}",
        )
        for i in range(builds)
    ]


async def run_builds(
    label: str,
    make_backend: Callable[[KubeApi], KubeBackend],
    *,
    kubeconfig: str,
    workers: int,
    concurrency: int,
    builds: int,
) -> Row:
    """Every build must succeed with DIGEST; returns the row of figures."""
    apis = [await TimedApi.connect(kubeconfig=kubeconfig) for _ in range(workers)]
    backends = [make_backend(api) for api in apis]
    queue: asyncio.Queue[BuildRequest] = asyncio.Queue()
    for request in requests(builds):
        queue.put_nowait(request)
    row = Row(label, concurrency, builds)

    async def sink(event: Step | Log) -> None:
        return None

    async def worker_loop(backend: KubeBackend) -> None:
        while not queue.empty():
            request = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                built = await backend.build(BuildJob(request, 1), sink)
                assert built.digest == DIGEST, built
                row.durations.append(time.perf_counter() - t0)
            except Exception as exc:
                row.failures.append(f"{request.id}: {exc!r}")

    start, cpu = time.perf_counter(), _cpu()
    await asyncio.gather(*(worker_loop(b) for b in backends for _ in range(concurrency)))
    row.wall, row.cpu_s = time.perf_counter() - start, _cpu() - cpu
    row.calls = sum(api.calls for api in apis)
    row.created_at = [t for api in apis for t in api.created_at]
    for backend in backends:
        await backend.aclose()
    return row


def prepare_namespace(cluster: Any, namespace: str) -> None:
    """Create `namespace` and wait for its default ServiceAccount: until it exists no pod
    can be made there, and the first build would measure that wait."""
    cluster.ensure_namespace(namespace)
    give_up = time.monotonic() + 60
    while not cluster.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False):
        if time.monotonic() > give_up:
            raise RuntimeError(f"no default ServiceAccount in {namespace}")
        time.sleep(0.1)


def parse_args(doc: str, concurrency: list[int]) -> argparse.Namespace:
    """The options every Kubernetes benchmark takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--builds", type=int, default=100, help="builds per row")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(n) for n in text.split(",")],
        default=concurrency,
        help="builds in flight per worker, comma-separated: one row each",
    )
    parser.add_argument("--pod-seconds", type=int, default=1)
    return parser.parse_args()


def header(args: argparse.Namespace, kube_version: str) -> str:
    return (
        f"{args.builds} builds per row through {args.workers} workers; kwok pods run "
        f"{args.pod_seconds}s; kube {kube_version}"
    )


def reproduce(script: str, args: argparse.Namespace) -> str:
    return (
        f"reproduce: .venv/bin/python bench/{script} --builds {args.builds} "
        f"--workers {args.workers} --concurrency {','.join(map(str, args.concurrency))} "
        f"--pod-seconds {args.pod_seconds}"
    )
