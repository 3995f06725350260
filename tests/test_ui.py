"""The web view in a real browser: headless Chromium opens a `buildfleet gateway` process's
/ui while a `buildfleet worker` process (simulate backend, one build at a time, two
daemons' capacity) runs builds, and watches the page change by itself.

The list shows a finished build with its trace link, the running one with its daemon and
the queued one behind it, the daemons' load, and never another tenant's build; the running
build then turns `succeeded` without a reload. A build's page follows its steps, its log
and its end over the event stream. The token is typed into the page once and travels only
in Authorization headers: no URL the page requests holds it. Screenshots are kept as test
artifacts (browser.artifacts_dir); docs/ui.png is one of them.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from producer.connection import connect
from producer.contract import Log
from producer.gateway.auth import hash_token
from producer.settings import QueueSettings, RedisSettings
from producer.store import BuildStore
from worker.settings import SimulateSettings

from browser import Page, artifacts_dir, open_page
from fleet import start_gateway_process, start_worker_process, worker_config

pytestmark = pytest.mark.timeout(300)

TOKEN = "ui-token-acme-0123456789abcdef"
RIVAL = "ui-token-rival-0123456789abcdef"
DAEMONS = ("tcp://builder-a:1234", "tcp://builder-b:1234")
TRACE_LINK = "http://127.0.0.1:16686/traces/{trace_id}"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
STEPS = 3


@dataclass
class Fleet:
    gateway: str
    redis_url: str
    source: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, empty_redis_url: str) -> Iterator[Fleet]:
    logs = tmp_path_factory.mktemp("ui")
    source = logs / "context"
    source.mkdir()
    settings = {
        "tokens": [
            {"name": "acme", "sha256": hash_token(TOKEN), "images": ["*"], "tenant": "acme"},
            {"name": "rival", "sha256": hash_token(RIVAL), "images": ["*"], "tenant": "rival"},
        ],
        "sources": {"local_roots": [str(logs)]},
    }
    config = worker_config(
        empty_redis_url,
        backend="simulate",
        daemons=DAEMONS,
        max_builds=2,
        concurrency=1,
        simulate=SimulateSettings(steps=STEPS),
    )
    env = {"BUILDFLEET_TELEMETRY_TRACE_LINK": TRACE_LINK}
    gateway = start_gateway_process(empty_redis_url, logs, settings, env=env)
    worker = start_worker_process(config, logs, steps=STEPS)
    try:
        yield Fleet(gateway.address, empty_redis_url, source)
    finally:
        worker.stop()
        gateway.stop()


def _submit(fleet: Fleet, token: str, build_id: str, seconds: float, **headers: str) -> None:
    request = {
        "id": build_id,
        "source": {"type": "local", "path": str(fleet.source)},
        "images": [f"registry.example.com/acme/app:{build_id}"],
        "push": False,
        "labels": {"simulate.duration_s": str(seconds)},
    }
    call = urllib.request.Request(
        f"{fleet.gateway}/v1/builds",
        data=json.dumps(request).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", **headers},
    )
    with urllib.request.urlopen(call, timeout=30) as response:
        assert response.status == 202


def _wait_succeeded(fleet: Fleet, token: str, build_id: str) -> None:
    deadline = time.monotonic() + 60
    call = urllib.request.Request(
        f"{fleet.gateway}/v1/builds/{build_id}", headers={"Authorization": f"Bearer {token}"}
    )
    while True:
        with urllib.request.urlopen(call, timeout=30) as response:
            if json.load(response)["status"] == "succeeded":
                return
        assert time.monotonic() < deadline, f"{build_id} did not succeed"
        time.sleep(0.1)


def _row_status(build_id: str) -> str:
    return f"document.querySelector('tr[data-build=\"{build_id}\"]')?.dataset.status"


def _publish_log(fleet: Fleet, build_id: str, text: str) -> None:
    """A log line of the running build, published as a worker publishes one (the simulate
    backend writes steps but no log)."""

    async def publish() -> None:
        redis = connect(RedisSettings(url=fleet.redis_url), Redis)
        try:
            await BuildStore(redis, QueueSettings()).publish(Log(build_id=build_id, text=text))
        finally:
            await redis.aclose()

    asyncio.run(publish())


def _sign_in(page: Page) -> None:
    page.wait_for("!!document.getElementById('token')", what="the sign-in form")
    page.evaluate(
        f"document.getElementById('token').value = {json.dumps(TOKEN)};"
        "document.getElementById('signin').requestSubmit(); true"
    )
    page.evaluate("window.sameDocument = true")  # gone if the page reloads


def test_the_web_view_follows_builds_live_without_a_reload(fleet: Fleet) -> None:
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    _submit(fleet, TOKEN, "ui-done", 0.2, traceparent=traceparent)
    _wait_succeeded(fleet, TOKEN, "ui-done")
    _submit(fleet, RIVAL, "ui-rival", 0.2)
    _wait_succeeded(fleet, RIVAL, "ui-rival")
    _submit(fleet, TOKEN, "ui-running", 12.0)
    _submit(fleet, TOKEN, "ui-next", 4.0)

    with open_page(f"{fleet.gateway}/ui", size=(1300, 720)) as page:
        _sign_in(page)
        page.wait_for(f"{_row_status('ui-running')} === 'running'", what="ui-running running")
        assert page.evaluate(_row_status("ui-next")) == "queued"
        assert page.evaluate(_row_status("ui-done")) == "succeeded"
        link = 'document.querySelector(\'tr[data-build="ui-done"] a[target="_blank"]\').href'
        assert page.evaluate(link) == TRACE_LINK.replace("{trace_id}", TRACE_ID)
        running_on = page.evaluate(
            "document.querySelector('tr[data-build=\"ui-running\"]').cells[3].textContent"
        )
        assert running_on in DAEMONS
        page.wait_for(
            "[...document.querySelectorAll('#daemons tbody tr')].map(r => r.cells[3].textContent)"
            ".sort().join(',') === '0 / 2,1 / 2'",
            what="one daemon's load at 1 of 2",
        )
        assert "ui-rival" not in page.evaluate("document.body.innerText")
        page.screenshot(artifacts_dir() / "ui.png")

        page.wait_for(f"{_row_status('ui-running')} === 'succeeded'", what="ui-running succeeded")
        assert page.evaluate("window.sameDocument") is True

        # One build's page: its steps, its log and its end, live over the event stream.
        page.evaluate("location.hash = '#/builds/ui-next'; true")
        page.wait_for(
            f"document.querySelectorAll('#steps tr').length === {STEPS}", what="the steps"
        )
        assert page.evaluate("document.querySelector('#status').textContent") == "running"
        _publish_log(fleet, "ui-next", "#4 exporting layers")
        page.wait_for(
            "document.getElementById('log').textContent.includes('#4 exporting layers')",
            what="the log line",
        )
        page.wait_for(
            "document.querySelector('#status').textContent === 'succeeded'", what="its end"
        )
        assert page.evaluate("window.sameDocument") is True
        page.screenshot(artifacts_dir() / "ui-build.png")

        # The page may not read another tenant's build, token or not.
        rival = page.evaluate(
            f"fetch('/v1/builds/ui-rival', {{headers: {{Authorization: 'Bearer {TOKEN}'}}}})"
            ".then(r => r.status)"
        )
        assert rival == 404

    _assert_token_only_in_headers(page.requests)


def _assert_token_only_in_headers(requests: list[dict[str, Any]]) -> None:
    urls = [request["url"] for request in requests]
    assert all(TOKEN not in url for url in urls), urls
    api = [request for request in requests if "/v1/" in request["url"]]
    assert any(request["url"].endswith("/events") for request in api), urls
    for request in api:
        assert request["headers"].get("Authorization") == f"Bearer {TOKEN}", request
