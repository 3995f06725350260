"""Smoke tests: every harness service is real and does its job."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from buildfleet import services

from gitrepos import GitServer
from registry import served_digest

STEP = re.compile(r"^\[\d+/\d+\] ")


@dataclass
class Build:
    """What one `buildctl build --progress=rawjson --metadata-file` run reported."""

    returncode: int
    metadata: dict[str, object]
    vertexes: dict[str, dict[str, object]] = field(default_factory=dict)
    logs: str = ""
    stderr: str = ""

    def steps(self) -> dict[str, dict[str, object]]:
        """Dockerfile steps ("[2/3] RUN ...") by name."""
        return {str(v["name"]): v for v in self.vertexes.values() if STEP.match(str(v["name"]))}


def buildctl_build(addr: str, context: str, image: str, workdir: Path) -> Build:
    metadata_file = workdir / "metadata.json"
    metadata_file.unlink(missing_ok=True)
    argv = [
        services.find_tool("buildctl"), "--addr", addr, "build",
        "--frontend", "dockerfile.v0",
        "--opt", f"context={context}",
        "--opt", "filename=Dockerfile",
        "--output", f"type=image,name={image},push=true,registry.insecure=true",
        "--metadata-file", str(metadata_file),
        "--progress", "rawjson",
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    build = Build(
        returncode=result.returncode,
        metadata=json.loads(metadata_file.read_text()) if metadata_file.exists() else {},
        stderr=result.stderr,
    )
    logs: list[str] = []
    for line in result.stderr.splitlines():
        if not line.startswith("{"):
            continue
        status = json.loads(line)
        for vertex in status.get("vertexes") or []:  # re-sent on change: merge by digest
            build.vertexes.setdefault(vertex["digest"], {}).update(vertex)
        logs.extend(base64.b64decode(entry["data"]).decode() for entry in status.get("logs") or [])
    build.logs = "".join(logs)
    return build


async def test_redis_answers(redis: aioredis.Redis) -> None:
    assert await redis.ping()
    await redis.set(b"smoke", b"\x00value")
    assert await redis.get(b"smoke") == b"\x00value"
    assert await redis.dbsize() == 1


def test_registry_serves_base_image(registry: str, base_image: str) -> None:
    assert base_image == f"{registry}/base/busybox:latest"
    assert (served_digest(registry, "base/busybox", "latest") or "").startswith("sha256:")


def test_build_from_git_pushes_digest_then_hits_cache(
    buildkitd: str, registry: str, base_image: str, git_server: GitServer, tmp_path: Path
) -> None:
    repo = git_server.create_repo(
        "smoke",
        {
            "Dockerfile": (
                f"FROM {base_image}\n"
                "COPY message.txt /message.txt\n"
                "RUN echo built-by-buildkit && cat /message.txt > /out.txt\n"
            ),
            "message.txt": "hello from git\n",
        },
    )
    image = f"{registry}/smoke/app:1"

    first = buildctl_build(buildkitd, repo.context(), image, tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "built-by-buildkit" in first.logs
    digest = first.metadata["containerimage.digest"]
    assert isinstance(digest, str)
    assert digest.startswith("sha256:")
    assert served_digest(registry, "smoke/app", "1") == digest
    run_steps = [name for name in first.steps() if " RUN " in name]
    assert run_steps, sorted(first.steps())
    assert not any(first.steps()[name].get("cached") for name in run_steps)

    second = buildctl_build(buildkitd, repo.context(), image, tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert second.metadata["containerimage.digest"] == digest
    steps = second.steps()
    assert len(steps) == 3, sorted(steps)  # FROM, COPY, RUN
    # BuildKit never marks an image source (FROM) as cached: it is resolved, not solved.
    uncached = [n for n, v in steps.items() if not v.get("cached") and " FROM " not in n]
    assert not uncached, second.stderr[-4000:]
    assert "built-by-buildkit" not in second.logs


def test_buildkitd_pool_runs_side_by_side(buildkitd_pool: list[str]) -> None:
    assert len(buildkitd_pool) == 2
    assert len(set(buildkitd_pool)) == 2
    for addr in buildkitd_pool:
        assert services.buildkit_workers_ok(addr)


def test_git_daemon_serves_new_commits(git_server: GitServer, tmp_path: Path) -> None:
    repo = git_server.create_repo("served", {"a.txt": "1"})
    first = repo.head
    second = repo.commit({"a.txt": "2"}, message="two")
    assert second != first
    listing = subprocess.run(
        ["git", "ls-remote", repo.url], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert f"{second}\trefs/heads/main" in listing


# --- the harness itself ------------------------------------------------------------------


def test_local_fleet_services_stop_everything(tmp_path: Path) -> None:
    with services.LocalFleetServices(tmp_path, buildkitd_count=1) as fleet:
        processes = [service.process for service in fleet.services]
        assert [s.name for s in fleet.services] == [
            "redis",
            "registry",
            "buildkitd-1",
            "git-daemon",
        ]
        assert fleet.base_image == f"{fleet.registry}/base/busybox:latest"
        assert all(p.poll() is None for p in processes)
        assert all(service.log_path.is_file() for service in fleet.services)
    assert all(p.poll() is not None for p in processes)
    assert fleet.services == ()


def process_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (dead, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_stop_kills_a_process_group_that_ignores_sigterm(tmp_path: Path) -> None:
    service = services.spawn(
        "stubborn",
        ["sh", "-c", "trap '' TERM; sleep 60 & echo child $!; wait"],
        tmp_path / "stubborn.log",
        "",
    )
    services.wait_ready(service, lambda: service.log_tail(1).startswith("child "), timeout=10)
    child = int(service.log_tail(1).split()[1])
    service.stop(grace=0.5)
    assert service.process.returncode == -9
    assert not process_alive(child)


def test_find_tool_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BUILDFLEET_TOOLS", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(services.ToolMissing, match="scripts/setup"):
        services.find_tool("buildkitd")
