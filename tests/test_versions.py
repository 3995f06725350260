"""Every file that cannot read buildfleet/versions.env (the Dockerfile, the compose file,
the Kubernetes manifests) names the same BuildKit version it pins."""

from __future__ import annotations

import re
from pathlib import Path

from buildfleet.tools import versions

REPO = Path(__file__).resolve().parent.parent
BUILDKIT_IMAGE = re.compile(r"moby/buildkit:(v[0-9][^\s\"'-]*)")


def test_the_dockerfile_builds_the_pinned_buildctl() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.findall(r"^ARG BUILDKIT_VERSION=(\S+)$", text, re.MULTILINE) == [
        versions()["BUILDKIT_VERSION"]
    ]


def test_every_buildkit_image_is_the_pinned_release() -> None:
    files = [REPO / "deploy" / "compose" / "docker-compose.yml"]
    files += sorted((REPO / "deploy").rglob("*.yaml"))
    found = {
        (path.relative_to(REPO).as_posix(), tag)
        for path in files
        for tag in BUILDKIT_IMAGE.findall(path.read_text())
    }
    assert found, "no moby/buildkit image in deploy/"
    wrong = {(path, tag) for path, tag in found if tag != versions()["BUILDKIT_VERSION"]}
    assert not wrong, f"pinned {versions()['BUILDKIT_VERSION']}; these differ: {sorted(wrong)}"


def test_every_tool_has_a_version() -> None:
    assert set(versions()) == {
        "BUILDKIT_VERSION",
        "TRACE_VIEWER_VERSION",
        "KUBE_VERSION",
        "KWOK_VERSION",
    }
    assert all(re.fullmatch(r"v\d+\.\d+\.\d+", v) for v in versions().values())
