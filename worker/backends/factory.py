"""Which backend a worker builds with, where its builds can be placed, and how its daemons
are probed.

The one place that knows every backend: adding one is a case in `make_backend` (and, when
it places builds on daemons or namespaces with capacity, one in `placement_targets`; when
those are daemons it can probe, a `probe` method on the backend).
"""

from __future__ import annotations

from worker.backends.base import Backend, Probed
from worker.scheduling import DaemonHealth
from worker.settings import DaemonSettings, WorkerConfig


def make_backend(config: WorkerConfig) -> Backend:
    tail_lines = config.worker.log_tail_lines
    secrets = config.worker.secrets  # only the backends that can mount them get them
    match config.worker.backend:
        case "buildkit":
            from worker.backends.buildkit import BuildkitBackend

            return BuildkitBackend(
                config.buildkit, tail_lines=tail_lines, secrets=secrets, cache=config.cache
            )
        case "docker":
            from worker.backends.docker import DockerBackend

            return DockerBackend(config.docker, tail_lines=tail_lines)
        case "buildah":
            from worker.backends.buildah import BuildahBackend

            return BuildahBackend(config.buildah, tail_lines=tail_lines, secrets=secrets)
        case "simulate":
            from worker.backends.simulate import SimulateBackend

            return SimulateBackend(config.simulate)
        case "kaniko":
            from worker.backends.kaniko import KanikoBackend

            return KanikoBackend(config.kaniko, tail_lines=tail_lines)
        case "tekton":
            from worker.backends.tekton import TektonBackend

            return TektonBackend(config.tekton, config.kaniko, tail_lines=tail_lines)
        case "jib":
            from worker.backends.jib import JibBackend

            return JibBackend(config.jib, tail_lines=tail_lines)


def placement_targets(config: WorkerConfig) -> tuple[DaemonSettings, ...]:
    """Where builds can go, each with its cap: BuildKit or Docker daemons, or the Kaniko
    (Tekton) namespace. Buildah and Jib build on the worker itself: its `concurrency` is the
    cap."""
    match config.worker.backend:
        case "kaniko":
            kaniko = config.kaniko
            return (DaemonSettings(address=kaniko.namespace, max_builds=kaniko.max_builds),)
        case "tekton":
            tekton = config.tekton
            return (DaemonSettings(address=tekton.namespace, max_builds=tekton.max_builds),)
        case "docker":
            return config.docker.daemons
        case "buildah" | "jib":
            return ()
        case _:
            return config.buildkit.daemons


def make_health(config: WorkerConfig, backend: Backend) -> DaemonHealth:
    """The daemons' health, probed by the backend when it can probe them."""
    addresses = [target.address for target in placement_targets(config)]
    probe = backend.probe if isinstance(backend, Probed) and addresses else None
    return DaemonHealth(addresses, config.scheduling, probe)
