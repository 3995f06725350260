"""The worker side's configuration sections: frozen, grouped by concern."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

import msgspec

from producer.contract import BuildRequest
from producer.settings import QueueSettings, RedisSettings
from worker.retry import RetrySettings

DEFAULT_BUILD_TIMEOUT_S: Final = 3600.0
"""How long a build attempt may take when its request names no timeout."""

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class WorkerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One worker process."""

    backend: Literal["buildkit", "kaniko", "simulate"] = "buildkit"
    concurrency: PositiveInt = 8
    """Builds this process runs at once (arq's `max_jobs`)."""
    name: str = msgspec.field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    poll_delay_s: PositiveFloat = 0.005
    default_timeout_s: PositiveFloat = DEFAULT_BUILD_TIMEOUT_S
    """A build's timeout when its request names none."""
    drain_grace_s: NonNegativeFloat = 60.0
    """On SIGTERM, how long in-flight builds may go on before they are re-queued."""
    log_cap_bytes: PositiveInt = 1 << 20
    """Log bytes kept per build attempt; past it one marker says how much was dropped."""
    log_tail_lines: PositiveInt = 20
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    """Serve /metrics (Prometheus text), /healthz and /readyz on this port (0: any free
    port); None: no such server."""
    metrics_host: str = "127.0.0.1"
    """Where the metrics server listens; 0.0.0.0 in a pod, so the kubelet and Prometheus
    reach it."""

    def timeout_for(self, request: BuildRequest) -> float:
        """The one build deadline: the request's own timeout, else the default."""
        return request.timeout_s or self.default_timeout_s


class DaemonSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    address: str
    """buildkitd's gRPC address, e.g. tcp://buildkitd-0.buildkitd:1234."""
    max_builds: PositiveInt = 4


class BuildkitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    daemons: tuple[DaemonSettings, ...] = ()
    buildctl: str = "buildctl"
    cancel_grace_s: PositiveFloat = 1.0
    """After SIGINT asks buildctl to cancel the solve, how long until SIGKILL."""
    tls_dir: str | None = None
    """mTLS to the daemons: a directory with ca.pem, cert.pem, key.pem (or ca.crt, tls.crt,
    tls.key), handed to buildctl as --tlsdir for builds and health probes."""

    def connection(self, address: str) -> list[str]:
        """buildctl and its connection flags, ready for a subcommand."""
        tls = ["--tlsdir", self.tls_dir] if self.tls_dir else []
        return [self.buildctl, "--addr", address, *tls]


class SimulateSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A backend that builds nothing: for load tests and capacity planning."""

    duration_s: NonNegativeFloat = 0.0
    outcome: Literal["succeeded", "failed", "temporary"] = "succeeded"
    steps: Annotated[int, msgspec.Meta(ge=0)] = 0
    journal: str | None = None
    """A file each simulated build appends one JSON line to: where it ran, from when to when
    (what tests and capacity planning count concurrency from)."""


class SchedulingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Capacity leases, routing, recovery and health probes, shared by every worker."""

    routing: Literal["rendezvous", "random"] = "rendezvous"
    """rendezvous: a repository goes to the daemon holding its cache while it has room."""
    slot_ttl_s: PositiveFloat = 15.0
    """A capacity slot whose holder stops renewing it frees itself after this long."""
    lease_ttl_s: PositiveFloat = 10.0
    """A running build's lease; when its worker dies, the build is re-run soon after."""
    reap_interval_s: PositiveFloat = 2.0
    health_interval_s: PositiveFloat = 5.0
    probe_timeout_s: PositiveFloat = 5.0
    capacity_poll_max_s: PositiveFloat = 0.25
    """Longest pause between two tries for a slot while every daemon is full."""
    spill_after_s: NonNegativeFloat = 3.0
    """How long a build waits for a slot on the daemon holding its cache before it takes
    one on the next daemon in rank with room (0: spill at once)."""
    affinity_width: PositiveInt = 1
    """How many daemons, first in rank, count as holding a repository's cache."""


DEFAULT_EXECUTOR_IMAGE: Final = (
    "ghcr.io/osscontainertools/kaniko:v1.28.2"
    "@sha256:4ea0e7301e3f6806de15150e4982c73018351e28c1dca6947bd3b4afb5ae3c60"
)
KANIKO_CAPABILITIES: Final = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "SETUID",
    "SETGID",
    "SETFCAP",
    "KILL",
)
"""What the executor needs as root in its container: unpack layers with their owners and
modes, and run RUN steps as other users. Everything else is dropped."""


class KanikoSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the kaniko backend creates and follows its Jobs.

    The default `executor_image` is the osscontainertools/kaniko fork
    (github.com/osscontainertools/kaniko, published as ghcr.io/osscontainertools/kaniko),
    pinned by the digest of its v1.28.2 index. GoogleContainerTools/kaniko was archived
    on 2025-06-03; of its forks, osscontainertools keeps fixing bugs (chainguard-forks only
    bumps dependencies). Always pin by digest; check a new one with `crane digest IMAGE:TAG`.

    - `namespace`: where Jobs go when the scheduler's placement names none.
    - `kubeconfig` / `context`: a kubeconfig file (and context); when unset, the in-cluster
      config if running in a pod, else the default kubeconfig ($KUBECONFIG, ~/.kube/config).
    - `service_account`: the build pod's ServiceAccount (its token is never mounted).
    - `registry_secret`: a `kubernetes.io/dockerconfigjson` Secret in the namespace, mounted
      as /kaniko/.docker/config.json for pushing and pulling.
    - `cache_repo`: `--cache=true --cache-repo=` when the request names no cache export ref.
    - `cpu_*`/`memory_*`: the executor's resources (the OOM message names `memory_limit`).
    - `unschedulable_timeout_s` / `image_pull_timeout_s`: how long a pod may stay
      unschedulable / unable to pull the executor image before the attempt is given up as a
      temporary failure (and the Job deleted).
    - `pod_labels` / `pod_annotations`: added to the pod template (tests use them to choose
      a kwok outcome).
    - `log_drain_s` / `log_idle_s`: once the outcome is known, how long the log stream may
      still deliver lines (at most / after the last line).
    - `watch_timeout_s`: the server-side timeout of one watch request (then it resumes).
    - `max_connections`: the API client's connection pool; each build in flight keeps
      three connections open (two watches, one log stream).
    """

    namespace: str = "buildfleet"
    max_builds: Annotated[int, msgspec.Meta(gt=0)] = 20
    """Jobs at once in the namespace, across the whole fleet (capacity leases)."""
    executor_image: str = DEFAULT_EXECUTOR_IMAGE
    kubeconfig: str | None = None
    context: str | None = None
    service_account: str | None = None
    registry_secret: str | None = None
    cache_repo: str | None = None
    snapshot_mode: Literal["redo", "full", "time"] = "redo"
    push_retry: int = 3
    extra_args: tuple[str, ...] = ()
    cpu_request: str | None = "500m"
    memory_request: str | None = "1Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = "4Gi"
    node_selector: dict[str, str] = msgspec.field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    capabilities: tuple[str, ...] = KANIKO_CAPABILITIES
    pod_labels: dict[str, str] = msgspec.field(default_factory=dict)
    pod_annotations: dict[str, str] = msgspec.field(default_factory=dict)
    default_timeout_s: float = 3600.0
    ttl_seconds_after_finished: int = 600
    unschedulable_timeout_s: float = 300.0
    image_pull_timeout_s: float = 120.0
    log_tail_lines: int = 50
    log_drain_s: float = 5.0
    log_idle_s: float = 0.5
    cancel_wait_s: float = 30.0
    watch_timeout_s: int = 120
    max_connections: int = 512


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything one worker process needs, grouped by concern."""

    redis: RedisSettings
    queue: QueueSettings
    worker: WorkerSettings
    retry: RetrySettings
    buildkit: BuildkitSettings
    simulate: SimulateSettings
    scheduling: SchedulingSettings = field(default_factory=SchedulingSettings)
    kaniko: KanikoSettings = field(default_factory=KanikoSettings)
