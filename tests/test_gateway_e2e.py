"""A signed push reaches a worker and builds for real: gateway -> Redis -> worker -> buildkitd
-> registry, with the result followed over the gateway's own Server-Sent Events."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_gateway_payloads import body_of, github_headers, github_push

from producer.client import BuildfleetClient
from producer.gateway.app import make_app
from producer.gateway.auth import hash_token
from producer.gateway.settings import GatewaySettings

from fleet import worker_config, worker_in_task
from gitrepos import GitServer
from registry import served_digest

pytestmark = pytest.mark.timeout(600)

SECRET = "e2e-secret"
TOKEN = "e2e-token"


async def sse_events(http: TestClient[Any, Any], build_id: str) -> list[dict[str, Any]]:
    response = await http.get(
        f"/v1/builds/{build_id}/events", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status == 200
    events = []
    async for raw in response.content:
        line = raw.decode()
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: ") :]))
    return events


async def test_a_signed_push_is_built_by_a_worker_and_pushed_to_the_registry(
    fleet: BuildfleetClient,
    redis_url: str,
    buildkitd: str,
    registry: str,
    base_image: str,
    git_server: GitServer,
) -> None:
    repo = git_server.create_repo(
        "acme/gateway-e2e",
        {
            "Dockerfile": "ARG BASE\nFROM ${BASE}\nCOPY greeting /greeting\nRUN cat /greeting\n",
            "greeting": "hello from a push\n",
        },
    )
    settings = msgspec.convert(
        {
            "tokens": [
                {"name": "e2e", "sha256": hash_token(TOKEN), "images": ["*"], "tenant": "acme"}
            ],
            # The build clones from the configured forge, never from the payload's URL.
            "forges": {"github": {"clone_url": f"{git_server.url}{{repo}}.git"}},
            "webhook_secrets": [{"repo": "acme/*", "secret": SECRET}],
            "rules": [
                {
                    "repo": "acme/gateway-e2e",
                    "branches": ["main"],
                    "build_args": {"BASE": base_image},
                    "images": [f"{registry}/{{repo}}:{{branch}}", f"{registry}/{{repo}}:{{sha}}"],
                }
            ],
        },
        GatewaySettings,
    )
    payload = github_push(
        "acme/gateway-e2e", "refs/heads/main", repo.head, clone_url="https://evil.example/x.git"
    )
    body = body_of(payload)
    async with (
        TestClient(TestServer(make_app(settings, fleet))) as http,
        worker_in_task(worker_config(redis_url, daemons=[buildkitd])),
    ):
        response = await http.post("/hooks/github", data=body, headers=github_headers(body, SECRET))
        reply = await response.json()
        assert response.status == 202, reply
        [build] = reply["builds"]
        events = await sse_events(http, build["id"])

    assert [e["type"] for e in events][:2] == ["queued", "started"]
    final = events[-1]
    assert final["type"] == "succeeded", final
    digest = final["result"]["digest"]
    assert digest.startswith("sha256:")
    assert served_digest(registry, "acme/gateway-e2e", "main") == digest
    assert served_digest(registry, "acme/gateway-e2e", repo.head) == digest
    state = await fleet.get(build["id"])
    assert state.request is not None
    assert state.request.source.url == repo.url  # type: ignore[union-attr]
    logs = "".join(e.get("text", "") for e in events if e["type"] == "log")
    assert "hello from a push" in logs
