"""Benchmark of the kaniko backend against a real control plane with kwok pods.

N builds go through W workers (each a KanikoBackend with its own API client and at most C
builds in flight, for each C of --concurrency); every kwok pod runs for --pod-seconds then
succeeds with a digest. Prints, per C:
  - Jobs created per second (client side, first to last successful create),
  - overhead per build beyond the pod's own runtime (build() wall time - pod seconds),
    p50 / p99 / max,
  - API requests per build (creates, lists, watch connects, log streams, ...).

Reproduce:  .venv/bin/python bench/bench_kaniko.py --builds 100 --workers 2 --concurrency 2,8,25
(needs scripts/setup-kube's tools; starts and stops its own cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from producer.contract import BuildRequest, GitSource, Log, Step  # noqa: E402
from worker.backends.base import BuildJob  # noqa: E402
from worker.backends.kaniko import KanikoBackend, KanikoSettings  # noqa: E402
from worker.kube.api import KubeApi  # noqa: E402
from worker.kube.objects import K, Manifest, Resource  # noqa: E402

from kube import DELAY_ANNOTATION, DIGEST_ANNOTATION, OUTCOME_LABEL, KubeCluster  # noqa: E402

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


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


async def run_once(
    args: argparse.Namespace, cluster: KubeCluster, concurrency: int
) -> tuple[int, float]:
    namespace = f"bench-{concurrency}"
    cluster.ensure_namespace(namespace)
    settings = KanikoSettings(
        kubeconfig=str(cluster.kubeconfig),
        namespace=namespace,
        pod_labels={OUTCOME_LABEL: "success"},
        pod_annotations={DIGEST_ANNOTATION: DIGEST, DELAY_ANNOTATION: f"{args.pod_seconds}s"},
        cpu_request=None,
        memory_request=None,
    )
    apis = [await TimedApi.connect(kubeconfig=settings.kubeconfig) for _ in range(args.workers)]
    workers = [KanikoBackend(settings, api=api) for api in apis]
    queue: asyncio.Queue[BuildRequest] = asyncio.Queue()
    for i in range(args.builds):
        queue.put_nowait(
            BuildRequest(
                source=GitSource(url="https://git.example.test/app.git", ref="main"),
                images=(f"127.0.0.1:5000/bench/app{i}:latest",),
                id=f"bench-{uuid.uuid4().hex[:12]}",
            )
        )
    durations: list[float] = []
    failures: list[str] = []

    async def sink(event: Step | Log) -> None:
        return None

    async def worker_loop(backend: KanikoBackend) -> None:
        while True:
            try:
                request = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                built = await backend.build(BuildJob(request, 1), sink)
                assert built.digest == DIGEST, built
                durations.append(time.perf_counter() - t0)
            except Exception as exc:
                failures.append(f"{request.id}: {exc!r}")

    start = time.perf_counter()
    await asyncio.gather(*(worker_loop(w) for w in workers for _ in range(concurrency)))
    wall = time.perf_counter() - start
    calls = sum(api.calls for api in apis)
    created = sorted(t for api in apis for t in api.created_at)
    for w in workers:
        await w.aclose()

    overhead = [d - args.pod_seconds for d in durations]
    span = created[-1] - created[0] if len(created) > 1 else float("nan")
    per_build = calls / max(1, args.builds)
    print(
        f"{concurrency:>3} in flight per worker: {len(durations)} ok, {len(failures)} failed, "
        f"wall {wall:.1f}s, {(len(created) - 1) / span:.1f} Jobs created/s, "
        f"{per_build:.2f} API requests per build"
    )
    if overhead:
        print(
            f"    overhead beyond the pod's runtime: p50 {percentile(overhead, 50):.2f}s"
            f"  p99 {percentile(overhead, 99):.2f}s  max {max(overhead):.2f}s"
            f"  mean {statistics.fmean(overhead):.2f}s"
        )
    for failure in failures[:5]:
        print("    failed:", failure)
    return len(failures), per_build


async def run(args: argparse.Namespace, cluster: KubeCluster) -> None:
    print(
        f"{args.builds} builds per row through {args.workers} workers; kwok pods run "
        f"{args.pod_seconds}s; kube {cluster.tools.kube_version}"
    )
    for concurrency in args.concurrency:
        await run_once(args, cluster, concurrency)
    print(
        "reproduce: .venv/bin/python bench/bench_kaniko.py "
        f"--builds {args.builds} --workers {args.workers} "
        f"--concurrency {','.join(map(str, args.concurrency))} --pod-seconds {args.pod_seconds}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[2, 8, 25],
        help="builds in flight per worker, comma-separated: one row each",
    )
    parser.add_argument("--pod-seconds", type=int, default=1)
    args = parser.parse_args()
    cluster = KubeCluster.start()
    try:
        asyncio.run(run(args, cluster))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
