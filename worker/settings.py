"""The worker side's configuration sections: frozen, grouped by concern."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Annotated, Final, Literal

import msgspec

from producer import reference
from producer.contract import BuildRequest, SecretId
from producer.fields import NonEmpty, NonNegativeFloat, PositiveFloat, PositiveInt
from producer.settings import QueueSettings, RedisSettings
from worker.retry import RetrySettings

DEFAULT_BUILD_TIMEOUT_S: Final = 3600.0
"""How long a build attempt may take when its request names no timeout."""
DEFAULT_LOG_TAIL_LINES: Final = 20
"""How many last log lines a failed build carries."""


EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
SecretFilePath = Annotated[str, msgspec.Meta(pattern=r"^/[^\x00-\x1f,\"]*$", max_length=4096)]


class SecretSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where the value of one build secret lives on the worker (`[[worker.secrets]]`):
    a file, or a variable of the worker's environment. Requests name the id only; the
    builder reads the value itself (buildctl `--secret id=ID,src=FILE|env=NAME`), so it
    never crosses Redis, an event, a log or a process's argv.

        [[worker.secrets]]
        id = "npm"
        file = "/run/secrets/npmrc"
    """

    id: SecretId
    file: SecretFilePath | None = None
    env: EnvName | None = None

    def __post_init__(self) -> None:
        if (self.file is None) == (self.env is None):
            raise ValueError(f"secrets: {self.id!r} needs exactly one of `file` or `env`")


class WorkerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One worker process."""

    backend: Literal["buildkit", "docker", "buildah", "kaniko", "tekton", "jib", "simulate"] = (
        "buildkit"
    )
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
    progress_interval_s: PositiveFloat = 0.25
    """Step and Log events of a build go out at most this often (each vertex's latest
    state, its log lines together), and all that is held before the build's end."""
    log_tail_lines: PositiveInt = DEFAULT_LOG_TAIL_LINES
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    """Serve /metrics (Prometheus text), /healthz and /readyz on this port (0: any free
    port); None: no such server."""
    metrics_host: str = "127.0.0.1"
    """Where the metrics server listens; 0.0.0.0 in a pod, so the kubelet and Prometheus
    reach it."""
    secrets: tuple[SecretSource, ...] = ()
    """Build secrets this worker can mount (`[[worker.secrets]]`), by id."""

    def __post_init__(self) -> None:
        ids = [secret.id for secret in self.secrets]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"secrets: id {repeated[0]!r} appears more than once")

    def timeout_for(self, request: BuildRequest) -> float:
        """The one build deadline: the request's own timeout, else the default."""
        return request.timeout_s or self.default_timeout_s


class DaemonSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    address: str
    """Where a daemon listens: buildkitd's gRPC address (tcp://buildkitd-0.buildkitd:1234),
    or a Docker daemon's (unix:///run/docker.sock, tcp://dind-0.dind:2376)."""
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


_REPOSITORY_PREFIX: Final = (
    r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$"
)
"""A registry host (and port), then repository path components: where caches are named."""


class CacheSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A registry cache per repository, so that a build that runs away from the daemon
    holding its cache (spilled: that daemon was full) is warm too (worker/registry_cache.py).

    With `registry` set (a repository prefix, `registry.example:5000/buildcache`), every
    BuildKit build that names no cache of its own exports `mode=max` to
    `PREFIX/REPO:REF` and imports that and `PREFIX/REPO:DEFAULT_BRANCH`.
    """

    registry: Annotated[str, msgspec.Meta(pattern=_REPOSITORY_PREFIX)] | None = None
    default_branch: str = "main"


class DockerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the docker backend reaches its daemons through the Engine API.

    - `tls_dir`: TLS to tcp:// daemons, a directory with ca.pem, cert.pem and key.pem (what
      DOCKER_CERT_PATH holds); unix:// daemons never use it.
    - `auth_file`: a Docker config.json whose `auths` give the registry credentials, sent as
      X-Registry-Config (pulls) and X-Registry-Auth (pushes); never logged.
    - `builder`: "buildkit" (the Engine's BuildKit, `version=2`) or "classic". Debian's
      dockerd 20.10 builds a git sub-directory only with the classic builder.
    - `network_mode`: the RUN steps' network ("default" is the daemon's bridge; a daemon
      started with --bridge=none needs "host" or "none").
    """

    daemons: tuple[DaemonSettings, ...] = ()
    tls_dir: str | None = None
    auth_file: str | None = None
    builder: Literal["buildkit", "classic"] = "buildkit"
    network_mode: str = "default"
    connect_timeout_s: PositiveFloat = 5.0
    max_connections: PositiveInt = 64


class BuildahSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the buildah backend runs `buildah build` and `buildah push` on the worker.

    - `root` / `runroot`: buildah's own storage (images, layers, containers) and its
      runtime state, never shared with another tool. Unset: under /var/lib and /run when
      the worker is root, else under the worker user's home and runtime directory
      (buildah then builds rootless, in a user namespace from /etc/subuid and /etc/subgid).
    - `isolation`: "chroot" runs without a daemon or privileges beyond user namespaces;
      "oci" uses runc.
    - `auth_file`: a containers-auth.json (or Docker config.json) for pulls and pushes.
    - `tls_verify`: false only for plain-HTTP or self-signed registries (tests, local
      fleets); the pinned registries of a real fleet verify TLS.
    """

    buildah: str = "buildah"
    root: str | None = None
    runroot: str | None = None
    storage_driver: str = "overlay"
    isolation: Literal["chroot", "oci"] = "chroot"
    auth_file: str | None = None
    tls_verify: bool = True
    cancel_grace_s: PositiveFloat = 2.0
    """After SIGTERM to buildah's process group, how long until SIGKILL."""

    def storage(self) -> tuple[str, str]:
        """buildah's --root and --runroot for the user this worker runs as."""
        uid = os.geteuid()
        if uid == 0:
            root, runroot = "/var/lib/buildfleet/buildah", "/run/buildfleet/buildah"
        else:
            home = os.path.expanduser("~")
            runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/buildfleet-{uid}"  # noqa: S108
            root = os.path.join(home, ".local", "share", "buildfleet", "buildah")
            runroot = os.path.join(runtime, "buildfleet-buildah")
        return self.root or root, self.runroot or runroot


class JibSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the jib backend runs Maven with the Jib plugin on the worker.

    - `maven_repository`: Maven's local repository, one per worker (warm builds download
      nothing); Jib's base-image layer cache lives beside it.
    - `insecure_registries`: registries (host:port) reached over plain HTTP or with a
      self-signed certificate; only for these is Jib allowed insecure connections.
    - `plugin_version`: the jib-maven-plugin the worker runs, whatever the project pins.
    """

    mvn: str = "mvn"
    git: str = "git"
    maven_repository: str = msgspec.field(
        default_factory=lambda: os.path.join(
            os.path.expanduser("~"), ".cache", "buildfleet", "maven", "repository"
        )
    )
    plugin_version: Annotated[str, msgspec.Meta(pattern=r"^[0-9][0-9A-Za-z.-]*$")] = "3.5.2"
    insecure_registries: tuple[str, ...] = ()
    java_home: str | None = None
    """The JDK Maven runs with; unset: Maven's own choice (JAVA_HOME, else `java` on PATH)."""
    cancel_grace_s: PositiveFloat = 2.0
    """After SIGTERM to Maven's process group, how long until SIGKILL."""
    verify_push: bool = True
    """Ask the registry for each pushed tag's digest and compare it with Jib's."""


class SimulateSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A backend that builds nothing: for load tests and capacity planning."""

    duration_s: NonNegativeFloat = 0.0
    outcome: Literal["succeeded", "failed", "temporary"] = "succeeded"
    steps: Annotated[int, msgspec.Meta(ge=0)] = 0
    journal: str | None = None
    """A file simulated builds append JSON lines to, one per stretch of work: which attempt
    ran where, from when to when (what tests and the soak count concurrency from)."""
    slice_s: PositiveFloat = 0.25
    """Simulated work goes in stretches this long at most; each is recorded as it ends."""
    outage_file: str | None = None
    """A file naming the daemons that are down, one per line (the fault soak writes it): a
    build there fails as if its daemon were lost, and the health probe says they are down."""


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
    watchdog_interval_s: PositiveFloat = 15.0
    """How often builds that lost their job are looked for (each is confirmed on a second
    look this much later before it is re-queued)."""
    max_requeues: PositiveInt = 3
    """How many times a build whose job was lost is re-queued before it is dead-lettered."""


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


KubeName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)]


class RegistrySecret(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A `kubernetes.io/dockerconfigjson` Secret for the builds whose every pushed
    reference (images, cache repository) lies under `prefix` (`[[kaniko.registry_secrets]]`).

        [[kaniko.registry_secrets]]
        prefix = "registry.example.com/acme"     # acme/app, acme/team/app; not acmecorp/
        secret_name = "push-acme"
    """

    prefix: NonEmpty
    """A registry/repository name without tag or digest (`registry.example.com/acme`)."""
    secret_name: KubeName

    def __post_init__(self) -> None:
        try:
            parsed = reference.parse(self.prefix)
        except reference.ReferenceError as exc:
            raise ValueError(f"registry_secrets: prefix: {exc}") from None
        if parsed.tag is not None or parsed.digest is not None:
            raise ValueError(
                f"registry_secrets: prefix {self.prefix!r}: expected a name without tag or digest"
            )

    @property
    def name(self) -> str:
        """The prefix as registry/repository (`busybox` is `docker.io/library/busybox`)."""
        return reference.parse(self.prefix).name

    def covers(self, ref: str) -> bool:
        """Whether the reference `ref` lies under the prefix (at a `/` boundary)."""
        name = reference.parse(ref).name
        return name == self.name or name.startswith(self.name + "/")


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
      as /kaniko/.docker/config.json for pushing and pulling, in every build's pod: every
      RUN step of every build can read it. Prefer `registry_secrets`.
    - `registry_secrets`: one Secret per image prefix (`[[kaniko.registry_secrets]]`); a
      build's pod mounts only the Secret with the longest prefix covering every reference
      it pushes (its images and cache repository), so a RUN step can read a credential for
      its own build's images and no other. A build no prefix covers is refused (permanent,
      `credentials`). Give each Secret a registry credential scoped to its prefix (and
      pull rights to the base images its builds use).
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

    A Job's deadline (`activeDeadlineSeconds`) is the build's one deadline, the request's
    timeout or `[worker].default_timeout_s`; a failure carries `[worker].log_tail_lines`
    of the log.
    """

    namespace: str = "buildfleet"
    max_builds: Annotated[int, msgspec.Meta(gt=0)] = 20
    """Jobs at once in the namespace, across the whole fleet (capacity leases)."""
    executor_image: str = DEFAULT_EXECUTOR_IMAGE
    kubeconfig: str | None = None
    context: str | None = None
    service_account: str | None = None
    registry_secret: str | None = None
    registry_secrets: tuple[RegistrySecret, ...] = ()
    cache_repo: str | None = None
    snapshot_mode: Literal["redo", "full", "time"] = "redo"
    push_retry: int = 3
    extra_args: tuple[str, ...] = ()
    cpu_request: str | None = "500m"
    memory_request: str | None = "1Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = "4Gi"
    node_selector: dict[str, str] = msgspec.field(default_factory=dict)
    tolerations: tuple[dict[str, str | int], ...] = ()
    capabilities: tuple[str, ...] = KANIKO_CAPABILITIES
    pod_labels: dict[str, str] = msgspec.field(default_factory=dict)
    pod_annotations: dict[str, str] = msgspec.field(default_factory=dict)
    ttl_seconds_after_finished: int = 600
    unschedulable_timeout_s: float = 300.0
    image_pull_timeout_s: float = 120.0
    log_drain_s: float = 5.0
    log_idle_s: float = 0.5
    cancel_wait_s: float = 30.0
    watch_timeout_s: int = 120
    max_connections: int = 512

    def __post_init__(self) -> None:
        if self.registry_secret is not None and self.registry_secrets:
            raise ValueError(
                "registry_secret, registry_secrets: give one or the other (a shared Secret "
                "would undo the per-prefix scoping)"
            )


class TektonSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the tekton backend creates and follows its TaskRuns (API `tekton.dev/v1`).

    Each attempt is a TaskRun whose one step runs the Kaniko executor: the executor and
    its flags (`executor_image`, `cache_repo`, `snapshot_mode`, `push_retry`,
    `extra_args`, `cpu_*`/`memory_*`, `capabilities`, `registry_secret`) are `[kaniko]`'s,
    said once there; this section says where TaskRuns go and how they are followed.

    - `namespace`, `max_builds`, `kubeconfig`, `context`, `service_account`,
      `node_selector`, `tolerations`, `watch_timeout_s`, `max_connections`: as in
      `[kaniko]`, for TaskRuns (the service account's token is not mounted in the pod).
    - `task_ref`: run this Task of the namespace instead of the inline taskSpec. It takes
      the params CONTEXT, DOCKERFILE, GIT_PULL_METHOD, IMAGES, BUILD_ARGS and
      EXECUTOR_ARGS and gives the result IMAGE_DIGEST (worker/backends/tekton/taskrun.py).
    - `labels` / `annotations`: added to each TaskRun; Tekton copies them to its pod
      (tests choose a kwok outcome with them).
    - `log_drain_s` / `log_idle_s`: once the outcome is known, how long step logs may
      still deliver lines (at most / after the last line).
    - `cancel_wait_s`: after a cancel, how long to wait for Tekton to stop the TaskRun.
    """

    namespace: str = "buildfleet"
    max_builds: PositiveInt = 20
    """TaskRuns at once in the namespace, across the whole fleet (capacity leases)."""
    kubeconfig: str | None = None
    context: str | None = None
    service_account: str | None = None
    task_ref: str | None = None
    node_selector: dict[str, str] = msgspec.field(default_factory=dict)
    tolerations: tuple[dict[str, str | int], ...] = ()
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)
    log_drain_s: NonNegativeFloat = 5.0
    log_idle_s: NonNegativeFloat = 0.5
    cancel_wait_s: NonNegativeFloat = 30.0
    watch_timeout_s: PositiveInt = 120
    max_connections: PositiveInt = 512


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
    cache: CacheSettings = field(default_factory=CacheSettings)
    kaniko: KanikoSettings = field(default_factory=KanikoSettings)
    docker: DockerSettings = field(default_factory=DockerSettings)
    buildah: BuildahSettings = field(default_factory=BuildahSettings)
    tekton: TektonSettings = field(default_factory=TektonSettings)
    jib: JibSettings = field(default_factory=JibSettings)
