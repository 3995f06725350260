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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from worker.backends.kaniko import KanikoBackend, KanikoSettings

from kube import DELAY_ANNOTATION, DIGEST_ANNOTATION, OUTCOME_LABEL, KubeCluster
from kubebench import DIGEST, Row, header, parse_args, prepare_namespace, reproduce, run_builds


def kaniko_settings(cluster: KubeCluster, namespace: str, pod_seconds: int) -> KanikoSettings:
    return KanikoSettings(
        kubeconfig=str(cluster.kubeconfig),
        namespace=namespace,
        pod_labels={OUTCOME_LABEL: "success"},
        pod_annotations={DIGEST_ANNOTATION: DIGEST, DELAY_ANNOTATION: f"{pod_seconds}s"},
        cpu_request=None,
        memory_request=None,
    )


async def kaniko_row(args: argparse.Namespace, cluster: KubeCluster, concurrency: int) -> Row:
    namespace = f"bench-kaniko-{concurrency}"
    prepare_namespace(cluster, namespace)
    settings = kaniko_settings(cluster, namespace, args.pod_seconds)
    return await run_builds(
        "kaniko",
        lambda api: KanikoBackend(settings, api=api),
        kubeconfig=str(cluster.kubeconfig),
        workers=args.workers,
        concurrency=concurrency,
        builds=args.builds,
    )


async def run(args: argparse.Namespace, cluster: KubeCluster) -> None:
    print(header(args, cluster.tools.kube_version))
    for concurrency in args.concurrency:
        row = await kaniko_row(args, cluster, concurrency)
        print(row.report(args.pod_seconds))
    print(reproduce("bench_kaniko.py", args))


def main() -> None:
    args = parse_args(__doc__ or "", [2, 8, 25])
    cluster = KubeCluster.start()
    try:
        asyncio.run(run(args, cluster))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
