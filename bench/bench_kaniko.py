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

from kubebench import DIGEST, run_builds

from worker.backends.kaniko import KanikoBackend, KanikoSettings
from worker.kube.api import KubeApi

from kube import DELAY_ANNOTATION, DIGEST_ANNOTATION, OUTCOME_LABEL, KubeCluster


def kaniko_settings(cluster: KubeCluster, namespace: str, pod_seconds: int) -> KanikoSettings:
    return KanikoSettings(
        kubeconfig=str(cluster.kubeconfig),
        namespace=namespace,
        pod_labels={OUTCOME_LABEL: "success"},
        pod_annotations={DIGEST_ANNOTATION: DIGEST, DELAY_ANNOTATION: f"{pod_seconds}s"},
        cpu_request=None,
        memory_request=None,
    )


async def run(args: argparse.Namespace, cluster: KubeCluster) -> None:
    print(
        f"{args.builds} builds per row through {args.workers} workers; kwok pods run "
        f"{args.pod_seconds}s; kube {cluster.tools.kube_version}"
    )
    for concurrency in args.concurrency:
        namespace = f"bench-kaniko-{concurrency}"
        cluster.ensure_namespace(namespace)
        settings = kaniko_settings(cluster, namespace, args.pod_seconds)

        def backend(api: KubeApi, settings: KanikoSettings = settings) -> KanikoBackend:
            return KanikoBackend(settings, api=api)

        row = await run_builds(
            "kaniko",
            backend,
            kubeconfig=str(cluster.kubeconfig),
            workers=args.workers,
            concurrency=concurrency,
            builds=args.builds,
        )
        print(row.report(args.pod_seconds))
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
