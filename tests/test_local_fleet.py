"""`buildfleet up` as a user runs it: a whole fleet, a build through its REST API, its trace
in the fleet's trace viewer, `buildfleet get` pointing at it, Ctrl-C."""

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
from typing import Any

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


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "buildfleet.cli", *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _spans_when(viewer: str, trace_id: str, names: set[str]) -> list[dict[str, Any]]:
    """The trace's spans, from the viewer's own query API, once `names` are all there."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "searchSpans", "params": [trace_id]})
    spans: list[dict[str, Any]] = []
    for _ in range(100):
        request = urllib.request.Request(f"{viewer}/rpc", data=body.encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
        spans = [entry["spanData"] for entry in (answer.get("result") or {}).get("spans") or []]
        if names <= {span["name"] for span in spans}:
            return spans
        time.sleep(0.2)
    raise AssertionError(f"trace {trace_id} lacks {names}: {[s['name'] for s in spans]}")


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
        # trace viewer, redis, registry, git daemon, worker, gateway, and buildkitd or dockerd
        assert len(spawned) >= (6 if backend == "buildah" else 7)
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

        # The build's trace: `get` names it and links to it, the viewer holds it.
        trace_id = str(state["request"]["trace"]["traceparent"]).split("-")[1]  # type: ignore[index]
        link = fleet["trace_link"].replace("{trace_id}", trace_id)
        assert link == f"{fleet['trace_viewer']}/traces/{trace_id}"
        assert state["trace_url"] == link  # the gateway links it too, for its web view
        with urllib.request.urlopen(fleet["web_view"], timeout=10) as page:
            assert (page.status, fleet["web_view"]) == (200, f"{gateway}/ui")
        cli_env = {
            **env,
            "BUILDFLEET_REDIS_URL": fleet["redis_url"],
            "BUILDFLEET_REDIS_PASSWORD": Path(fleet["redis_password_file"]).read_text().strip(),
            "BUILDFLEET_TELEMETRY_TRACE_LINK": fleet["trace_link"],
        }
        shown = _cli(cli_env, "get", build_id)
        assert f"  trace  {trace_id}\n" in shown and f"   link  {link}\n" in shown
        answer = json.loads(_cli(cli_env, "get", build_id, "--json"))
        assert (answer["status"], answer["trace_id"], answer["trace_url"]) == (
            "succeeded", trace_id, link,
        )  # fmt: skip
        spans = _spans_when(fleet["trace_viewer"], trace_id, {"POST /v1/builds", "build attempt"})
        [root] = [span for span in spans if not span["parentSpanID"]]
        assert root["name"] == "POST /v1/builds"
        assert any(span["name"] == "build attempt" for span in spans)
        # A build submitted from the command line, tracing on: its trace starts there.
        cli_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = fleet["otlp_endpoint"]
        submitted = _cli(
            cli_env, "submit", str(EXAMPLE), "--image", f"{registry}/demo/hello:cli",
            "--build-arg", f"BASE={fleet['base_image']}", "--wait", "--json",
        )  # fmt: skip
        cli_build = json.loads(submitted)["build_id"]
        cli_trace = json.loads(_cli(cli_env, "get", cli_build, "--json"))["trace_id"]
        spans = _spans_when(
            fleet["trace_viewer"], cli_trace, {"buildfleet submit", "build attempt"}
        )
        [root] = [span for span in spans if not span["parentSpanID"]]
        assert root["name"] == "buildfleet submit"
        [metrics] = fleet["worker_metrics"]
        with urllib.request.urlopen(metrics, timeout=10) as response:
            text = response.read().decode()
        assert 'buildfleet_builds_total{error_class="",status="succeeded"} 2.0' in text
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
