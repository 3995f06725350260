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

from bench_kaniko import kaniko_settings
from kubebench import DIGEST, REPO, percentile, run_builds

from worker.backends.kaniko import KanikoBackend, KanikoSettings
from worker.backends.tekton import TektonBackend, TektonSettings
from worker.kube.api import KubeApi

from kube import DELAY_ANNOTATION, DIGEST_ANNOTATION, OUTCOME_LABEL, KubeCluster

GOAL_P50_S = 0.5
EXECUTOR = KanikoSettings(cpu_request=None, memory_request=None)


async def run(args: argparse.Namespace, cluster: KubeCluster) -> None:
    cluster.install_crd(REPO / "tests" / "tekton" / "taskruns-crd.yaml")
    print(
        f"{args.builds} builds per row through {args.workers} workers; kwok pods run "
        f"{args.pod_seconds}s; kube {cluster.tools.kube_version}"
    )
    for concurrency in args.concurrency:
        namespace = f"bench-tekton-{concurrency}"
        cluster.ensure_namespace(namespace)
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
            tekton = TektonSettings(
                kubeconfig=str(cluster.kubeconfig),
                namespace=namespace,
                labels={OUTCOME_LABEL: "success"},
                annotations={DIGEST_ANNOTATION: DIGEST, DELAY_ANNOTATION: f"{args.pod_seconds}s"},
            )

            def tekton_backend(api: KubeApi, settings: TektonSettings = tekton) -> TektonBackend:
                return TektonBackend(settings, EXECUTOR, api=api)

            row = await run_builds(
                "tekton",
                tekton_backend,
                kubeconfig=str(cluster.kubeconfig),
                workers=args.workers,
                concurrency=concurrency,
                builds=args.builds,
            )
        finally:
            controller.terminate()
            controller.wait()
        print(row.report(args.pod_seconds))

        jobs_namespace = f"bench-kaniko-{concurrency}"
        cluster.ensure_namespace(jobs_namespace)
        settings = kaniko_settings(cluster, jobs_namespace, args.pod_seconds)

        def kaniko_backend(api: KubeApi, settings: KanikoSettings = settings) -> KanikoBackend:
            return KanikoBackend(settings, api=api)

        baseline = await run_builds(
            "kaniko",
            kaniko_backend,
            kubeconfig=str(cluster.kubeconfig),
            workers=args.workers,
            concurrency=concurrency,
            builds=args.builds,
        )
        print(baseline.report(args.pod_seconds))
        p50 = percentile(row.overhead(args.pod_seconds), 50)
        base = percentile(baseline.overhead(args.pod_seconds), 50)
        print(
            f"         TaskRun overhead p50 {p50:.2f}s (goal < {GOAL_P50_S}s: "
            f"{'met' if p50 < GOAL_P50_S else 'not met'}); Kaniko Job p50 {base:.2f}s"
        )
    print(
        "reproduce: .venv/bin/python bench/bench_tekton.py "
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
        default=[4],
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
