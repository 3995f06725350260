"""Scoped tokens, tenants, caps and rate limits, against a real gateway and Redis."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from test_gateway_payloads import body_of, github_headers, github_push, sha_for

from producer.client import BuildfleetClient
from producer.contract import Started
from producer.gateway.app import make_app
from producer.gateway.auth import hash_token
from producer.gateway.settings import GatewaySettings
from producer.keys import DEFAULT_QUEUE

A, A2, B = "token-a-000000000001", "token-a-000000000002", "token-b-000000000003"
SECRET = "acme-org-secret"
REGISTRY = "registry.local:5000"
Http = TestClient[web.Request, web.Application]


def settings(**overrides: Any) -> GatewaySettings:
    data: dict[str, Any] = {
        "tokens": [
            {"name": "a", "sha256": hash_token(A), "tenant": "acme", "images": ["*"]},
            {"name": "a2", "sha256": hash_token(A2), "tenant": "acme", "images": ["*"]},
            {"name": "b", "sha256": hash_token(B), "images": ["*"]},
        ],
        "sources": {"hosts": ["example.com"]},
        "webhook_secrets": [{"repo": "acme/*", "secret": SECRET}],
        "rules": [{"repo": "acme/*", "images": [f"{REGISTRY}/{{repo}}:{{branch}}"]}],
        **overrides,
    }
    return msgspec.convert(data, GatewaySettings)


@contextlib.asynccontextmanager
async def serve(fleet: BuildfleetClient, **overrides: Any) -> AsyncIterator[Http]:
    async with TestClient(TestServer(make_app(settings(**overrides), fleet))) as http:
        yield http


def build(**fields: Any) -> dict[str, Any]:
    return {
        "source": {"type": "git", "url": "https://example.com/r.git"},
        "images": [f"{REGISTRY}/r:1"],
        **fields,
    }


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(http: Http, token: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    response = await http.post("/v1/builds", json=build(**fields), headers=auth(token))
    return response.status, await response.json()


async def push(http: Http, repo: str = "acme/api", **kwargs: Any) -> tuple[int, dict[str, Any]]:
    body = body_of(github_push(repo, **kwargs))
    response = await http.post("/hooks/github", data=body, headers=github_headers(body, SECRET))
    return response.status, await response.json()


# --- scoped tokens ---------------------------------------------------------------------------


async def test_token_b_cannot_read_cancel_follow_or_supersede_token_as_build(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet) as http:
        status, _ = await post(http, A, id="a-1", supersede_key="main")
        assert status == 202
        for method, path in (
            ("GET", "/v1/builds/a-1"),
            ("DELETE", "/v1/builds/a-1"),
            ("GET", "/v1/builds/a-1/events"),
        ):
            response = await http.request(method, path, headers=auth(B))
            assert response.status == 404, (method, path)
            assert "a-1" in (await response.json())["error"]
        # The same supersede key under another tenant is another key: a-1 stays queued.
        status, answer = await post(http, B, id="b-1", supersede_key="main")
        assert (status, "superseded" in answer) == (202, False)
        status, _ = await post(http, B, id="a-1")  # nor can it take over the id
        assert status == 409
        assert (await fleet.get("a-1")).status == "queued"
        # A token of the same tenant sees, supersedes and cancels it.
        assert (await http.get("/v1/builds/a-1", headers=auth(A2))).status == 200
        status, answer = await post(http, A2, id="a-2", supersede_key="main")
        assert answer["superseded"] == "a-1"
        response = await http.delete("/v1/builds/a-2", headers=auth(A2))
        assert response.status == 200
    assert (await fleet.get("a-1")).status == "cancelled"
    assert (await fleet.get("b-1")).status == "queued"


async def test_a_build_carries_its_tokens_tenant_whatever_the_request_says(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet) as http:
        status, answer = await post(http, A, tenant="default")
        assert status == 202
        state = await fleet.get(answer["id"])
        assert state.request is not None
        assert state.request.tenant == "acme"
        status, answer = await post(http, A, tenant="someone-else")
        assert status == 403
        assert "$.tenant" in answer["error"]


async def test_webhook_builds_belong_to_the_repository_owners_tenant(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet) as http:
        status, reply = await push(http, "acme/api")
        assert status == 202, reply
        build_id = reply["builds"][0]["id"]
        assert (await http.get(f"/v1/builds/{build_id}", headers=auth(A))).status == 200
        assert (await http.get(f"/v1/builds/{build_id}", headers=auth(B))).status == 404


# --- caps and backpressure -------------------------------------------------------------------


async def test_a_tokens_queued_cap_answers_429_until_its_builds_start(
    fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    tokens = [{"name": "capped", "sha256": hash_token(A), "images": ["*"], "max_queued": 2}]
    async with serve(fleet, tokens=tokens, retry_after_s=11) as http:
        assert [(await post(http, A, id=f"c-{n}"))[0] for n in range(2)] == [202, 202]
        response = await http.post("/v1/builds", json=build(id="c-2"), headers=auth(A))
        assert response.status == 429
        assert response.headers["Retry-After"] == "11"
        assert "this token has 2 builds queued" in (await response.json())["error"]
        assert not await redis.exists("buildfleet:build:c-2")
        await fleet.store.start(Started(build_id="c-0", worker="w"), "interactive", lease_s=30)
        assert (await post(http, A, id="c-2"))[0] == 202


async def test_a_tenants_cap_covers_its_webhooks_and_its_tokens_together(
    fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    tenants = [{"name": "acme", "owners": ["acme"], "max_queued": 2}]
    async with serve(fleet, tenants=tenants) as http:
        assert (await push(http, "acme/api", after=sha_for("1")))[0] == 202
        assert (await post(http, A))[0] == 202
        body = body_of(github_push("acme/web", after=sha_for("2")))
        headers = github_headers(body, SECRET, delivery="refused-then-redelivered")
        response = await http.post("/hooks/github", data=body, headers=headers)
        assert response.status == 429
        assert "tenant has 2 builds queued" in (await response.json())["error"]
        assert int(response.headers["Retry-After"]) >= 1
        assert (await post(http, B))[0] == 202  # another tenant is not held back
        await fleet.cancel((await fleet.store.redis.zrange(DEFAULT_QUEUE, 0, 0))[0].decode())
        # Nothing was recorded for the refused delivery: the forge's redelivery builds.
        response = await http.post("/hooks/github", data=body, headers=headers)
        assert response.status == 202, await response.text()


async def test_interactive_submissions_and_pushes_meet_backpressure_at_a_higher_depth(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet, max_queue_depth=1, max_queue_depth_interactive=2) as http:
        assert (await post(http, A))[0] == 202
        status, answer = await post(http, A, priority="batch")
        assert (status, "queue depth 1" in answer["error"]) == (429, True)
        assert (await post(http, A))[0] == 202
        status, answer = await post(http, A)
        assert (status, "queue depth 2" in answer["error"]) == (429, True)
        status, reply = await push(http)
        assert (status, "queue depth 2" in reply["error"]) == (429, True)
        metrics = await (await http.get("/metrics")).text()
    assert "buildfleet_gateway_backpressure_total 3" in metrics


# --- rate limits -----------------------------------------------------------------------------


async def test_requests_per_token_are_rate_limited_with_retry_after(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet, limits={"requests_per_s": 0.5, "burst": 3}) as http:
        statuses = [(await http.get("/v1/builds/x", headers=auth(A))).status for _ in range(3)]
        assert statuses == [404, 404, 404]
        limited = await http.get("/v1/builds/x", headers=auth(A))
        assert limited.status == 429
        assert limited.headers["Retry-After"] == "2"
        assert (await http.get("/v1/builds/x", headers=auth(B))).status == 404  # its own bucket
        metrics = await (await http.get("/metrics")).text()
    assert 'buildfleet_gateway_limited_total{limit="rate"} 1' in metrics


async def test_webhooks_are_rate_limited_per_repository(fleet: BuildfleetClient) -> None:
    async with serve(fleet, limits={"webhooks_per_s": 0.1, "webhook_burst": 2}) as http:
        statuses = [(await push(http, "acme/api", after=sha_for(f"{n}")))[0] for n in range(3)]
        assert statuses == [202, 202, 429]
        assert (await push(http, "acme/web"))[0] == 202
