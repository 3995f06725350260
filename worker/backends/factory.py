"""Which backend a worker builds with, and where its builds can be placed.

The one place that knows every backend: adding one is a case in `make_backend` (and, when
it places builds on daemons or namespaces with capacity, one in `placement_targets`).
"""

from __future__ import annotations

from worker.backends.base import Backend
from worker.settings import DaemonSettings, WorkerConfig


def make_backend(config: WorkerConfig) -> Backend:
    match config.worker.backend:
        case "buildkit":
            from worker.backends.buildkit import BuildkitBackend

            return BuildkitBackend(config.buildkit, tail_lines=config.worker.log_tail_lines)
        case "simulate":
            from worker.backends.simulate import SimulateBackend

            return SimulateBackend(config.simulate)
        case "kaniko":
            from worker.backends.kaniko import KanikoBackend

            return KanikoBackend(config.kaniko, tail_lines=config.worker.log_tail_lines)
        case "tekton":
            from worker.backends.tekton import TektonBackend

            return TektonBackend(
                config.tekton, config.kaniko, tail_lines=config.worker.log_tail_lines
            )


def placement_targets(config: WorkerConfig) -> tuple[DaemonSettings, ...]:
    """Where builds can go, each with its cap: BuildKit daemons, or the Kaniko (Tekton)
    namespace."""
    match config.worker.backend:
        case "kaniko":
            kaniko = config.kaniko
            return (DaemonSettings(address=kaniko.namespace, max_builds=kaniko.max_builds),)
        case "tekton":
            tekton = config.tekton
            return (DaemonSettings(address=tekton.namespace, max_builds=tekton.max_builds),)
    return config.buildkit.daemons
