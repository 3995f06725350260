"""Benchmark of the kaniko backend against a real control plane with kwok pods.

N builds go through W workers (each a KanikoBackend with its own API client and at most C
builds in flight); every kwok pod runs for --pod-seconds then succeeds with a digest. Prints:
  - Jobs created per second (client side, first to last successful create),
  - overhead per build beyond the pod's own runtime (build() wall time - pod seconds),
    p50 / p99 / max,
  - API calls per build (requests sent: creates, lists, watch connects, log streams, ...).

Reproduce:  .venv/bin/python bench/bench_kaniko.py --builds 200 --workers 2
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
from worker.backends.kaniko import KanikoBackend  # noqa: E402
from worker.settings import KanikoSettings  # noqa: E402

from kube import DELAY_ANNOTATION, DIGEST_ANNOTATION, OUTCOME_LABEL, KubeCluster  # noqa: E402

DIGEST = "sha256:" + "9" * 64


class TimedBackend(KanikoBackend):
    """Records when each Job create (or adoption) returned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.created_at: list[float] = []

    async def _get_or_create(self, batch: Any, namespace: str, manifest: dict[str, Any]) -> None:
        await super()._get_or_create(batch, namespace, manifest)
        self.created_at.append(time.perf_counter())


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


async def run(args: argparse.Namespace, cluster: KubeCluster) -> None:
    namespace = "bench"
    cluster.ensure_namespace(namespace)
    settings = KanikoSettings(
        kubeconfig=str(cluster.kubeconfig),
        namespace=namespace,
        pod_labels={OUTCOME_LABEL: "success"},
        pod_annotations={DIGEST_ANNOTATION: DIGEST, DELAY_ANNOTATION: f"{args.pod_seconds}s"},
        cpu_request=None,
        memory_request=None,
    )
    workers = [TimedBackend(settings) for _ in range(args.workers)]
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
    await asyncio.gather(*(worker_loop(w) for w in workers for _ in range(args.concurrency)))
    wall = time.perf_counter() - start
    for w in workers:
        await w.aclose()

    created = sorted(t for w in workers for t in w.created_at)
    calls = sum(w.api_calls for w in workers)
    overhead = [d - args.pod_seconds for d in durations]
    span = created[-1] - created[0] if len(created) > 1 else float("nan")
    print(
        f"builds: {len(durations)} ok, {len(failures)} failed, wall {wall:.1f}s "
        f"({args.workers} workers x {args.concurrency} in flight, pods run "
        f"{args.pod_seconds}s, kube {cluster.tools.kube_version})"
    )
    print(f"jobs created per second: {(len(created) - 1) / span:.1f}")
    if overhead:
        print(
            f"overhead per build beyond the pod's runtime: p50 {percentile(overhead, 50):.2f}s"
            f"  p99 {percentile(overhead, 99):.2f}s  max {max(overhead):.2f}s"
            f"  mean {statistics.fmean(overhead):.2f}s"
        )
    print(f"api calls per build: {calls / max(1, args.builds):.1f}")
    for failure in failures[:5]:
        print("  failed:", failure)
    print(
        "reproduce: .venv/bin/python bench/bench_kaniko.py "
        f"--builds {args.builds} --workers {args.workers} --concurrency {args.concurrency} "
        f"--pod-seconds {args.pod_seconds}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=25, help="builds in flight per worker")
    parser.add_argument("--pod-seconds", type=int, default=1)
    args = parser.parse_args()
    cluster = KubeCluster.start()
    try:
        asyncio.run(run(args, cluster))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
