"""The base image every local fleet and test builds FROM: busybox-static in an image made
FROM scratch, built and pushed by the backend at hand (buildkitd, a Docker daemon, buildah).
Synchronous and stdlib-only."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from buildfleet.processes import ServiceError, find_tool

BASE_IMAGE_NAME = "base/busybox"
DEFAULT_PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _busybox_rootfs(dest: Path) -> None:
    """A minimal root filesystem: static busybox, one symlink per applet, /etc, /tmp."""
    busybox = Path(find_tool("busybox")).resolve()
    bin_dir = dest / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(busybox, bin_dir / "busybox")
    (bin_dir / "busybox").chmod(0o755)
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            (bin_dir / applet).symlink_to("busybox")
    for sub in ("etc", "root", "tmp", "usr/bin", "var/tmp"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")


def push_base_image(buildkitd_addr: str, registry: str, *, timeout: float = 300.0) -> str:
    """Build `REGISTRY/base/busybox:latest` FROM scratch with busybox-static and push it."""
    ref = f"{registry}/{BASE_IMAGE_NAME}:latest"
    with tempfile.TemporaryDirectory(prefix="buildfleet-base-") as tmp:
        context = Path(tmp)
        _base_image_context(context)
        argv = [find_tool("buildctl"), "--addr", buildkitd_addr, "build",
                "--frontend", "dockerfile.v0", "--progress", "plain",
                "--local", f"context={context}", "--local", f"dockerfile={context}",
                "--output", f"type=image,name={ref},push=true,registry.insecure=true"]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise ServiceError(f"pushing {ref} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return ref


def _base_image_context(context: Path) -> None:
    _busybox_rootfs(context / "rootfs")
    (context / "Dockerfile").write_text(
        f'FROM scratch\nCOPY rootfs/ /\nENV PATH={DEFAULT_PATH_ENV}\nCMD ["sh"]\n'
    )


def _run_tool(
    argv: list[str], what: str, timeout: float, env: dict[str, str] | None = None
) -> None:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if result.returncode != 0:
        raise ServiceError(f"{what} failed ({result.returncode}):\n{result.stderr[-4000:]}")


def push_base_image_with_docker(docker_addr: str, registry: str, *, timeout: float = 300) -> str:
    """The base image, built and pushed by a Docker daemon (the docker CLI, with the classic
    builder: a newer CLI wants its buildx plugin for BuildKit, which Debian does not ship)."""
    ref = f"{registry}/{BASE_IMAGE_NAME}:latest"
    env = {**os.environ, "DOCKER_HOST": docker_addr, "DOCKER_BUILDKIT": "0"}
    docker = find_tool("docker")
    with tempfile.TemporaryDirectory(prefix="buildfleet-base-") as tmp:
        _base_image_context(Path(tmp))
        _run_tool([docker, "build", "-q", "-t", ref, tmp], f"building {ref}", timeout, env)
    _run_tool([docker, "push", ref], f"pushing {ref}", timeout, env)
    return ref


def buildah_storage(workdir: Path) -> tuple[Path, Path]:
    """Buildah's --root and --runroot for a local fleet or the tests."""
    return workdir / "buildah" / "root", workdir / "buildah" / "run"


def push_base_image_with_buildah(workdir: Path, registry: str, *, timeout: float = 300) -> str:
    """The base image, built and pushed by buildah (no daemon)."""
    ref = f"{registry}/{BASE_IMAGE_NAME}:latest"
    root, runroot = buildah_storage(workdir)
    buildah = [find_tool("buildah"), "--root", str(root), "--runroot", str(runroot)]
    with tempfile.TemporaryDirectory(prefix="buildfleet-base-") as tmp:
        _base_image_context(Path(tmp))
        _run_tool([*buildah, "build", "--isolation", "chroot", "-t", ref, tmp], ref, timeout)
    _run_tool([*buildah, "push", "--tls-verify=false", ref, f"docker://{ref}"], ref, timeout)
    return ref
