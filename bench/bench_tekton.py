"""Benchmark of the tekton backend against a real control plane with kwok pods, with the
kaniko backend in the same run as its baseline.

Tekton's controller cannot run here: tests/tekton_controller.py plays it, in its own
process (as Tekton's runs beside the workers), on the project's TaskRun CRD. N builds go
through W workers with C builds in flight each; every kwok pod runs for --pod-seconds then
succeeds with a digest. Prints, for the tekton backend and then the kaniko backend (Jobs
and the real Job controller, same cluster, same load), the overhead per build beyond the
pod's own runtime (from the create to the terminal event), its p50 against the goal (under
0.5 s with 4 builds in flight per worker), and the API requests per build.

Reproduce:  .venv/bin/python bench/bench_tekton.py --builds 100 --workers 2 --concurrency 4
(needs scripts/setup-kube's tools; starts and stops its own cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from worker.backends.kaniko import KanikoSettings
from worker.backends.tekton import TektonBackend, TektonSettings

from bench_kaniko import kaniko_row
from kube import DELAY_ANNOTATION, DIGEST_ANNOTATION, OUTCOME_LABEL, KubeCluster
from kubebench import (
    DIGEST,
    REPO,
    Row,
    header,
    parse_args,
    percentile,
    prepare_namespace,
    reproduce,
    run_builds,
)

GOAL_P50_S = 0.5
EXECUTOR = KanikoSettings(cpu_request=None, memory_request=None)


async def tekton_row(args: argparse.Namespace, cluster: KubeCluster, concurrency: int) -> Row:
    """The row of the tekton backend, with the stand-in controller in its own process."""
    namespace = f"bench-tekton-{concurrency}"
    prepare_namespace(cluster, namespace)
    controller = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "tekton_controller.py"),
         str(cluster.kubeconfig), namespace],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert controller.stdout is not None
        ready = await asyncio.to_thread(controller.stdout.readline)
        assert ready.strip() == "ready", f"the controller did not start ({ready!r})"
        settings = TektonSettings(
            kubeconfig=str(cluster.kubeconfig),
            namespace=namespace,
            labels={OUTCOME_LABEL: "success"},
            annotations={DIGEST_ANNOTATION: DIGEST, DELAY_ANNOTATION: f"{args.pod_seconds}s"},
        )
        return await run_builds(
            "tekton",
            lambda api: TektonBackend(settings, EXECUTOR, api=api),
            kubeconfig=str(cluster.kubeconfig),
            workers=args.workers,
            concurrency=concurrency,
            builds=args.builds,
        )
    finally:
        controller.terminate()
        controller.wait()


async def run(args: argparse.Namespace, cluster: KubeCluster) -> None:
    cluster.install_crd(REPO / "tests" / "tekton" / "taskruns-crd.yaml")
    print(header(args, cluster.tools.kube_version))
    for concurrency in args.concurrency:
        row = await tekton_row(args, cluster, concurrency)
        print(row.report(args.pod_seconds))
        baseline = await kaniko_row(args, cluster, concurrency)
        print(baseline.report(args.pod_seconds))
        p50 = percentile(row.overhead(args.pod_seconds), 50)
        base = percentile(baseline.overhead(args.pod_seconds), 50)
        print(
            f"         TaskRun overhead p50 {p50:.2f}s (goal < {GOAL_P50_S}s: "
            f"{'met' if p50 < GOAL_P50_S else 'not met'}); Kaniko Job p50 {base:.2f}s"
        )
    print(reproduce("bench_tekton.py", args))


def main() -> None:
    args = parse_args(__doc__ or "", [4])
    cluster = KubeCluster.start()
    try:
        asyncio.run(run(args, cluster))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
