"""`buildfleet up` as a user runs it: a whole fleet, a build through its REST API, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from registry import served_digest

pytestmark = pytest.mark.timeout(300)

EXAMPLE = Path(__file__).parent.parent / "config" / "example"


def _call(method: str, url: str, token: str, body: object = None) -> dict[str, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, object] = json.load(response)
        return answer


def _descendants(pid: int) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    children = {int(line) for line in found.stdout.split()}
    return children.union(*(_descendants(child) for child in children)) if children else set()


@pytest.mark.parametrize("backend", ["buildkit", "docker", "buildah"])
def test_up_builds_through_its_gateway_and_ctrl_c_leaves_nothing_behind(
    tmp_path: Path, backend: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BUILDFLEET_REDIS_URL"}
    env["BUILDFLEET_WORKDIR"] = str(tmp_path)
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "buildfleet.cli",
            "up",
            "--json",
            "--workers",
            "1",
            "--backend",
            backend,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "up.log").open("wb"),
        text=True,
    )
    try:
        assert up.stdout is not None
        fleet = json.loads(up.stdout.readline())
        spawned = _descendants(up.pid)
        assert fleet["backend"] == backend
        # redis, registry, git daemon, worker, gateway, and buildkitd or dockerd
        assert len(spawned) >= (5 if backend == "buildah" else 6)
        gateway, token, registry = fleet["gateway"], fleet["api_token"], fleet["registry"]
        answer = _call(
            "POST",
            f"{gateway}/v1/builds",
            token,
            {
                "source": {"type": "local", "path": str(EXAMPLE)},
                "images": [f"{registry}/demo/hello:up"],
                "build_args": {"BASE": fleet["base_image"]},
            },
        )
        build_id = answer["id"]
        # Local directories only under the one `up` runs in; images only to its registry.
        for refused in (
            {"source": {"type": "local", "path": "/etc"}, "images": [f"{registry}/x:1"]},
            {"source": {"type": "local", "path": str(EXAMPLE)}, "images": ["docker.io/x/y"]},
        ):
            with pytest.raises(urllib.error.HTTPError) as caught:
                _call("POST", f"{gateway}/v1/builds", token, refused)
            assert caught.value.code == 403
        for _ in range(600):
            state = _call("GET", f"{gateway}/v1/builds/{build_id}", token)
            if state["status"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        assert state["status"] == "succeeded", state
        result = state["result"]
        assert isinstance(result, dict)
        assert served_digest(registry, "demo/hello", "up") == result["digest"]
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=120)
    assert code == 0
    assert [pid for pid in spawned if _alive(pid)] == []


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for init to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
