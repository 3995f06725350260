"""The builders the backend conformance suite (test_conformance.py) runs against.

Each is one `Builder`: how to make its backend (always through `make_backend`, as a worker
does), its sources, and how to look for what a build must not leave behind. BuildKit,
Docker (BuildKit and classic builder) and Buildah build for real against the session's
registry; Kaniko runs on the kwok cluster, which simulates its pods' outcomes, so it shows
what kwok can: the Job's lifecycle, its arguments, its refusals. Jib builds Java projects
from a recipe, not a Dockerfile: `make_jib_builder` is its own, for the suite's recipe cases.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from buildfleet import services
from producer.contract import GitSource, LocalSource
from worker.backends.base import Backend
from worker.backends.capabilities import BY_BACKEND, Capabilities
from worker.backends.docker import capabilities as docker_capabilities
from worker.backends.factory import make_backend
from worker.settings import (
    BuildahSettings,
    DaemonSettings,
    DockerSettings,
    JibSettings,
    KanikoSettings,
    SecretSource,
    WorkerConfig,
)

from fleet import worker_config
from gitrepos import GitServer
from kube import KubeCluster

BUILDERS = ("buildkit", "docker", "docker-classic", "buildah", "kaniko")
KWOK_DIGEST = "sha256:" + "c" * 64


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("docker", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def docker_get(address: str, path: str) -> object:
    """GET from a Docker daemon's Engine API (unversioned), decoded JSON."""
    connection = _UnixHTTP(address.removeprefix("unix://"))
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def processes_mentioning(marker: str) -> list[str]:
    """Live processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


@dataclass
class Builder:
    name: str
    backend_name: str
    capabilities: Capabilities
    registry: str
    base_image: str
    git: GitServer
    workdir: Path
    daemons: list[str] = field(default_factory=list)
    docker: DockerSettings | None = None
    buildah: BuildahSettings | None = None
    kaniko: KanikoSettings | None = None
    jib: JibSettings | None = None
    start_daemon: Callable[[str], services.Service] | None = None
    """Starts one more daemon of this kind (the one a test kills); None: no daemon."""
    cluster: KubeCluster | None = None

    @property
    def simulated(self) -> bool:
        """Kaniko on kwok: pods' outcomes are simulated, nothing is built or pushed."""
        return self.backend_name == "kaniko"

    def config(
        self,
        redis_url: str = "redis://127.0.0.1:9/0",
        *,
        daemons: list[str] | None = None,
        outcome: str = "success",
        log_cap_bytes: int = 1 << 20,
        secrets: tuple[SecretSource, ...] = (),
    ) -> WorkerConfig:
        daemons = self.daemons if daemons is None else daemons
        docker = self.docker
        if docker is not None:
            docker = DockerSettings(
                daemons=tuple(DaemonSettings(address=a, max_builds=2) for a in daemons),
                builder=docker.builder,
                network_mode=docker.network_mode,
            )
        kaniko = self.kaniko
        if kaniko is not None:
            from kube import DIGEST_ANNOTATION, OUTCOME_LABEL

            kaniko = KanikoSettings(
                kubeconfig=kaniko.kubeconfig,
                namespace=kaniko.namespace,
                pod_labels={OUTCOME_LABEL: outcome},
                pod_annotations={DIGEST_ANNOTATION: KWOK_DIGEST},
                unschedulable_timeout_s=5,
                image_pull_timeout_s=5,
            )
        return worker_config(
            redis_url,
            backend=self.backend_name,
            daemons=daemons if self.backend_name == "buildkit" else (),
            docker=docker,
            buildah=self.buildah,
            kaniko=kaniko,
            jib=self.jib,
            log_cap_bytes=log_cap_bytes,
            secrets=secrets,
        )

    def backend(self, outcome: str = "success", secrets: tuple[SecretSource, ...] = ()) -> Backend:
        return make_backend(self.config(outcome=outcome, secrets=secrets))

    def local(self, files: dict[str, str], marker: str = "") -> LocalSource:
        """A fresh local directory holding `files` (its path contains `marker`)."""
        directory = self.workdir / f"src-{marker or uuid.uuid4().hex[:8]}"
        directory.mkdir(parents=True)
        for name, content in files.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(content)
        return LocalSource(path=str(directory))

    def source(self, files: dict[str, str], marker: str = "") -> GitSource | LocalSource:
        """Local where the builder takes a local directory, else a git repository."""
        if self.capabilities.local_source:
            return self.local(files, marker)
        # kwok clones nothing: an http(s) URL (all Kaniko takes) that is never fetched
        name = marker or uuid.uuid4().hex[:8]
        return GitSource(url=f"https://git.example.test/{name}.git", ref="main", commit="0" * 40)

    def image(self, repository: str, tag: str = "1") -> str:
        return f"{self.registry}/conformance/{self.name}/{repository}:{tag}"

    def leftovers(self, marker: str) -> list[str]:
        """Processes and containers of a build (`marker` in its context path and RUN step)."""
        left = processes_mentioning(marker)
        if self.docker is not None:
            containers = docker_get(self.daemons[0], "/containers/json?all=1")
            assert isinstance(containers, list)
            left += [f"container {c['Id'][:12]} {c.get('Command', '')}" for c in containers]
        if self.buildah is not None:
            root, runroot = self.buildah.storage()
            listing = subprocess.run(
                [services.find_tool("buildah"), "--root", root, "--runroot", runroot,
                 "containers", "--quiet"],
                capture_output=True, text=True, check=True,
            ).stdout.split()  # fmt: skip
            left += [f"buildah container {c}" for c in listing]
        return left


def forget_containers(builder: Builder) -> None:
    """Remove the working containers a SIGKILLed buildah leaves in its storage (it had no
    chance to clean up; nothing else runs in the session's storage meanwhile)."""
    if builder.buildah is not None:
        root, runroot = builder.buildah.storage()
        subprocess.run(
            [services.find_tool("buildah"), "--root", root, "--runroot", runroot, "rm", "--all"],
            capture_output=True, check=True,
        )  # fmt: skip


def kill_builder_of(builder: Builder, daemon: services.Service | None, marker: str) -> None:
    """What the 'daemon lost' case does: SIGKILL the daemon, or buildah itself (not its group:
    as the kernel's OOM killer would)."""
    if daemon is not None:
        os.killpg(daemon.process.pid, signal.SIGKILL)
        return
    for line in processes_mentioning(marker):
        pid, _, cmdline = line.partition(": ")
        if cmdline.split()[0].endswith("buildah") and " build " in cmdline:
            os.kill(int(pid), signal.SIGKILL)
            return
    raise AssertionError(f"no buildah process for {marker}")


def make_jib_builder(request: pytest.FixtureRequest, workdir: Path) -> Builder:
    """The jib backend: Maven and Jib on this machine, the session's registry (plain HTTP,
    so configured insecure) and its busybox base image."""
    registry: str = request.getfixturevalue("registry")
    return Builder(
        name="jib",
        backend_name="jib",
        capabilities=BY_BACKEND["jib"],
        registry=registry,
        base_image=request.getfixturevalue("base_image"),
        git=request.getfixturevalue("git_server"),
        workdir=workdir,
        jib=JibSettings(insecure_registries=(registry,), cancel_grace_s=1.0),
    )


def make_builder(name: str, request: pytest.FixtureRequest, workdir: Path) -> Builder:
    """The builder `name`, starting (once per session) only the services it needs."""
    git: GitServer = request.getfixturevalue("git_server")
    registry: str = request.getfixturevalue("registry")
    services_dir: Path = request.getfixturevalue("services_dir")
    common = {"registry": registry, "git": git, "workdir": workdir}
    if name == "kaniko":
        cluster: KubeCluster = request.getfixturevalue("kube_cluster")
        kubeconfig: Path = request.getfixturevalue("kubeconfig")
        namespace = f"conf-{uuid.uuid4().hex[:8]}"
        cluster.ensure_namespace(namespace)
        return Builder(
            name=name,
            backend_name="kaniko",
            capabilities=BY_BACKEND["kaniko"],
            base_image=f"{registry}/base/busybox:latest",
            kaniko=KanikoSettings(kubeconfig=str(kubeconfig), namespace=namespace),
            cluster=cluster,
            **common,  # type: ignore[arg-type]
        )
    base_image: str = request.getfixturevalue("base_image")
    if name == "buildkit":
        buildkitd: str = request.getfixturevalue("buildkitd")

        def start_buildkitd(tag: str) -> services.Service:
            return services.start_buildkitd(services_dir, [registry], name=f"buildkitd-{tag}")

        return Builder(
            name=name,
            backend_name="buildkit",
            capabilities=BY_BACKEND["buildkit"],
            base_image=base_image,
            daemons=[buildkitd],
            start_daemon=start_buildkitd,
            **common,  # type: ignore[arg-type]
        )
    if name in ("docker", "docker-classic"):
        dockerd: str = request.getfixturevalue("dockerd")
        settings = DockerSettings(
            builder="classic" if name == "docker-classic" else "buildkit", network_mode="host"
        )

        def start_dockerd(tag: str) -> services.Service:
            return services.start_dockerd(services_dir, name=f"dockerd-{tag}")

        return Builder(
            name=name,
            backend_name="docker",
            capabilities=docker_capabilities(settings),
            base_image=base_image,
            daemons=[dockerd],
            docker=settings,
            start_daemon=start_dockerd,
            **common,  # type: ignore[arg-type]
        )
    assert name == "buildah", name
    root, runroot = request.getfixturevalue("buildah_storage")
    return Builder(
        name=name,
        backend_name="buildah",
        capabilities=BY_BACKEND["buildah"],
        base_image=base_image,
        buildah=BuildahSettings(
            buildah=services.find_tool("buildah"),
            root=str(root),
            runroot=str(runroot),
            tls_verify=False,
            cancel_grace_s=1.0,
        ),
        **common,  # type: ignore[arg-type]
    )
