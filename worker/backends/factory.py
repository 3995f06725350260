"""Which backend a worker builds with, where its builds can be placed, and how its daemons
are probed.

The one place that knows every backend: adding one is a case in `make_backend` (and, when
it places builds on daemons or namespaces with capacity, one in `placement_targets`; when
those are daemons it can probe, a `probe` method on the backend).
"""

from __future__ import annotations

from worker.backends.base import Backend, BuildJob, Built, Probed, ProgressSink
from worker.backends.capabilities import ensure_capable
from worker.scheduling import DaemonHealth
from worker.settings import DaemonSettings, WorkerConfig


def make_backend(config: WorkerConfig) -> Backend:
    tail_lines = config.worker.log_tail_lines
    match config.worker.backend:
        case "buildkit":
            from worker.backends.buildkit import BuildkitBackend

            return BuildkitBackend(config.buildkit, tail_lines=tail_lines)
        case "docker":
            from worker.backends.docker import DockerBackend

            return DockerBackend(config.docker, tail_lines=tail_lines)
        case "buildah":
            from worker.backends.buildah import BuildahBackend

            return BuildahBackend(config.buildah, tail_lines=tail_lines)
        case "simulate":
            from worker.backends.simulate import SimulateBackend

            return SimulateBackend(config.simulate)
        case "kaniko":
            return _checked_kaniko(config)


def _checked_kaniko(config: WorkerConfig) -> Backend:
    """The Kaniko backend, refusing what the capability table says Kaniko cannot do (it
    would silently ignore `cache.import_refs`)."""
    from worker.backends.kaniko import KanikoBackend

    class CheckedKanikoBackend(KanikoBackend):
        async def build(self, job: BuildJob, progress: ProgressSink) -> Built:
            ensure_capable(job.request, "kaniko")
            return await super().build(job, progress)

    return CheckedKanikoBackend(config.kaniko)


def placement_targets(config: WorkerConfig) -> tuple[DaemonSettings, ...]:
    """Where builds can go, each with its cap: BuildKit or Docker daemons, or the Kaniko
    namespace. Buildah builds on the worker itself: its `concurrency` is the cap."""
    match config.worker.backend:
        case "kaniko":
            kaniko = config.kaniko
            return (DaemonSettings(address=kaniko.namespace, max_builds=kaniko.max_builds),)
        case "docker":
            return config.docker.daemons
        case "buildah":
            return ()
        case _:
            return config.buildkit.daemons


def make_health(config: WorkerConfig, backend: Backend) -> DaemonHealth:
    """The daemons' health, probed by the backend when it can probe them."""
    addresses = [target.address for target in placement_targets(config)]
    probe = backend.probe if isinstance(backend, Probed) and addresses else None
    return DaemonHealth(addresses, config.scheduling, probe)
