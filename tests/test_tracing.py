"""One trace per build, end to end, read back from a real trace receiver; and the
gateway's span on its own.

A signed GitHub push reaches a `buildfleet gateway` process, a `buildfleet worker` process
builds it on a buildkitd that exports its own spans, and the image is pushed to the registry.
All three export to otel-desktop-viewer; the test asks the viewer's own query API for the
trace and checks its tree, then opens the viewer's page of that trace in headless Chromium.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from test_gateway_payloads import body_of, github_headers, github_push

from buildfleet.services import Service
from buildfleet.traceviewer import TraceViewer
from producer.gateway.auth import hash_token
from producer.gateway.tracing import tracing_middleware

from browser import artifacts_dir, rendered_dom, screenshot
from fleet import exporting_to, start_gateway_process, start_worker_process, worker_config
from gitrepos import GitServer
from registry import served_digest

pytestmark = pytest.mark.timeout(600)

SECRET = "trace-secret"
TOKEN = "trace-token"
Span = dict[str, Any]


def _http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Any:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _service(span: Span) -> str:
    attributes = span["resource"]["attributes"]
    return next(a["value"] for a in attributes if a["key"] == "service.name")


def _attribute(span: Span, key: str) -> Any:
    return next((a["value"] for a in span["attributes"] if a["key"] == key), None)


def _wait_for_state(gateway: str, build_id: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state: dict[str, Any] = _http("GET", f"{gateway}/v1/builds/{build_id}", headers=auth)
        if state["status"] not in ("queued", "running"):
            return state
        time.sleep(0.2)
    raise AssertionError(f"build {build_id} did not end: {state}")


def _steps(gateway: str, build_id: str) -> dict[str, str]:
    """The build's Step events, read over the gateway's SSE stream: vertex -> name."""
    request = urllib.request.Request(
        f"{gateway}/v1/builds/{build_id}/events", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    steps = {}
    with urllib.request.urlopen(request, timeout=60) as response:
        for raw in response:
            line = raw.decode()
            if line.startswith("data: "):
                event = json.loads(line[len("data: ") :])
                if event["type"] == "step":
                    steps[event["vertex"]] = event["name"]
    return steps


def _trace(viewer: TraceViewer, trace_id: str, ready: Any) -> list[Span]:
    """The trace's spans once `ready(spans)` holds (exporters batch; buildkitd's flush last)."""
    deadline = time.monotonic() + 60
    spans: list[Span] = []
    while time.monotonic() < deadline:
        spans = viewer.spans(trace_id)
        if ready(spans):
            return spans
        time.sleep(0.5)
    names = sorted({f"{_service(s)}: {s['name']}" for s in spans})
    raise AssertionError(f"trace {trace_id} incomplete after 60 s; it holds:\n" + "\n".join(names))


@pytest.fixture
def traced_fleet(
    tmp_path: Path,
    empty_redis_url: str,
    registry: str,
    base_image: str,
    traced_buildkitd: str,
    trace_viewer: TraceViewer,
    git_server: GitServer,
) -> Any:
    redis_url = empty_redis_url
    settings = {
        "tokens": [
            {"name": "tracing", "sha256": hash_token(TOKEN), "images": ["*"], "tenant": "acme"}
        ],
        # Webhook builds clone from the configured forge, never from the payload's URL.
        "forges": {"github": {"clone_url": f"{git_server.url}{{repo}}.git"}},
        "webhook_secrets": [{"repo": "acme/*", "secret": SECRET}],
        "rules": [
            {
                "repo": "acme/traced",
                "branches": ["main"],
                "build_args": {"BASE": base_image},
                "images": [f"{registry}/{{repo}}:{{branch}}"],
            }
        ],
    }
    gateway = start_gateway_process(
        redis_url, tmp_path, settings, exporting_to(trace_viewer, "buildfleet-gateway")
    )
    config = worker_config(redis_url, daemons=[traced_buildkitd])
    worker = start_worker_process(
        config, tmp_path, env=exporting_to(trace_viewer, "buildfleet-worker")
    )
    processes: list[Service] = [gateway, worker]
    try:
        yield gateway
    finally:
        for process in processes:
            process.stop()


def test_a_signed_push_is_one_trace_from_the_webhook_to_the_pushed_image(
    traced_fleet: Service, trace_viewer: TraceViewer, git_server: GitServer, registry: str
) -> None:
    repo = git_server.create_repo(
        "acme/traced",  # where the configured forge clones acme/traced from
        {
            "Dockerfile": "ARG BASE\nFROM ${BASE}\nCOPY greeting /greeting\n"
            "RUN cat /greeting\nRUN echo built > /built\n",
            "greeting": "hello from a traced push\n",
        },
    )
    gateway = traced_fleet.address
    body = body_of(github_push("acme/traced", "refs/heads/main", repo.head, clone_url=repo.url))
    reply = _http("POST", f"{gateway}/hooks/github", body, github_headers(body, SECRET))
    [build] = reply["builds"]
    state = _wait_for_state(gateway, build["id"])
    assert state["status"] == "succeeded", state
    assert served_digest(registry, "acme/traced", "main") == state["result"]["digest"]
    steps = _steps(gateway, build["id"])
    assert any(name.startswith("[") and "RUN cat /greeting" in name for name in steps.values())
    assert any(name.startswith("pushing manifest for") for name in steps.values())

    trace_id = state["request"]["trace"]["traceparent"].split("-")[1]

    def complete(spans: list[Span]) -> bool:
        names = {(_service(s), s["name"]) for s in spans}
        step_spans = {_attribute(s, "buildfleet.step") for s in spans} - {None}
        wanted = {
            ("buildfleet-gateway", "POST /hooks/github"),
            ("buildfleet-worker", "build attempt"),
            ("buildkitd-traced", "moby.buildkit.v1.Control/Solve"),
        }
        return wanted <= names and step_spans == set(steps)

    spans = _trace(trace_viewer, trace_id, complete)
    by_id = {s["spanID"]: s for s in spans}
    assert {s["traceID"] for s in spans} == {trace_id}
    # One tree: a single root, and every other span's parent is in the trace.
    [root] = [s for s in spans if not s["parentSpanID"]]
    assert all(s["parentSpanID"] in by_id for s in spans if s is not root)
    assert (root["name"], _service(root), root["kind"]) == (
        "POST /hooks/github", "buildfleet-gateway", "Server",
    )  # fmt: skip

    def children(parent: Span, service: str | None = None) -> list[Span]:
        return [
            s
            for s in spans
            if s["parentSpanID"] == parent["spanID"] and service in (None, _service(s))
        ]

    under_root = {s["name"]: s for s in children(root)}
    assert set(under_root) == {"queue wait", "build attempt"}
    attempt = under_root["build attempt"]
    assert _service(attempt) == "buildfleet-worker"
    assert _attribute(attempt, "buildfleet.build_id") == build["id"]
    assert _attribute(attempt, "buildfleet.status") == "succeeded"

    in_attempt = children(attempt, "buildfleet-worker")
    [capacity] = [s for s in in_attempt if s["name"] == "capacity wait"]
    assert _attribute(capacity, "buildfleet.daemon") == state["result"]["daemon"]
    step_spans = [s for s in in_attempt if _attribute(s, "buildfleet.step") is not None]
    # One span per step the build reported, cached or not, the push included.
    assert sorted(_attribute(s, "buildfleet.step") for s in step_spans) == sorted(steps)
    assert {s["name"] for s in step_spans} == set(steps.values())
    for span in step_spans:
        assert int(attempt["startTime"]) <= int(span["startTime"]) <= int(span["endTime"])

    # BuildKit's own spans hang off the attempt: buildctl's, then the daemon's solve.
    [buildctl] = children(attempt, "buildctl")
    daemon_side = [s for s in spans if _service(s) == "buildkitd-traced"]
    assert any(s["name"] == "moby.buildkit.v1.Control/Solve" for s in daemon_side)
    for span in daemon_side:  # every daemon span descends from buildctl's
        ancestor = span
        while ancestor["parentSpanID"] and ancestor is not buildctl:
            ancestor = by_id[ancestor["parentSpanID"]]
        assert ancestor is buildctl, span["name"]

    # What a person sees: the viewer's page of this trace, rendered by Chromium.
    url = trace_viewer.trace_url(trace_id)
    dom = rendered_dom(url)
    # The span list is virtualised: what is on screen is the top of the tree.
    for shown in (trace_id, "POST /hooks/github", "queue wait", "build attempt", "capacity wait"):
        assert shown in dom, f"{shown!r} not shown on {url}"
    screenshot(url, artifacts_dir() / "trace-viewer.png")


# --- the gateway's span, on its own ---------------------------------------------------------

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"


def _echo_app(provider: trace.TracerProvider) -> web.Application:
    """Answers with the traceparent its handler saw (what the gateway copies into builds)."""

    async def echo(request: web.Request) -> web.Response:
        if request.query.get("fail"):
            return web.json_response({}, status=503)
        return web.json_response({"traceparent": request.headers.get("traceparent")})

    app = web.Application(middlewares=[tracing_middleware(provider)])
    app.router.add_post("/v1/things/{name}", echo)
    app.router.add_get("/v1/things/{name}", echo)
    return app


async def test_the_gateway_span_becomes_the_trace_context_its_handlers_see() -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    async with TestClient(TestServer(_echo_app(provider))) as http:
        fresh = await (await http.post("/v1/things/a")).json()
        joined = await (await http.post("/v1/things/b", headers={"traceparent": CALLER})).json()
        read = await (await http.get("/v1/things/c", headers={"traceparent": CALLER})).json()
        failed = await http.post("/v1/things/d?fail=1")
    first, second, third = spans.get_finished_spans()

    # A request that changes something gets a SERVER span; handlers see its context.
    assert (first.name, first.kind, first.parent) == (
        "POST /v1/things/{name}",
        SpanKind.SERVER,
        None,
    )
    assert first.context is not None
    ids = f"{first.context.trace_id:032x}-{first.context.span_id:016x}"
    assert fresh["traceparent"].split("-")[1:3] == ids.split("-")
    assert first.attributes is not None and first.attributes["http.response.status_code"] == 200
    # A caller's context is the parent: same trace, the gateway's span in between.
    assert second.parent is not None and second.parent.span_id == int(CALLER.split("-")[2], 16)
    assert second.context is not None and f"{second.context.trace_id:032x}" == CALLER_TRACE
    assert joined["traceparent"].split("-")[2] == f"{second.context.span_id:016x}"
    # Reads are not traced and pass the caller's header through; a 5xx is an error.
    assert read["traceparent"] == CALLER
    assert failed.status == 503 and third.status.status_code is StatusCode.ERROR


async def test_without_a_tracer_provider_requests_pass_untouched() -> None:
    async with TestClient(TestServer(_echo_app(trace.NoOpTracerProvider()))) as http:
        assert (await (await http.post("/v1/things/a")).json())["traceparent"] is None
        joined = await http.post("/v1/things/b", headers={"traceparent": CALLER})
        assert (await joined.json())["traceparent"] == CALLER
