"""The HTTP gateway against a real aiohttp server and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from test_gateway_payloads import (
    body_of,
    gitea_delete,
    gitea_headers,
    gitea_push,
    github_headers,
    github_ping,
    github_push,
    gitlab_headers,
    gitlab_push,
    sha_for,
)

from producer.client import BuildfleetClient
from producer.contract import (
    BuildRequest,
    BuildResult,
    Cancelled,
    GitSource,
    Log,
    Started,
    Succeeded,
)
from producer.gateway.app import GATEWAY, make_app
from producer.gateway.auth import hash_token
from producer.gateway.server import event_loop_factory, start_gateway
from producer.gateway.settings import GatewaySettings
from producer.keys import DEFAULT_QUEUE, build_key

GH_SECRET = "gh-secret-value-1234"
OWNER_SECRET = "owner-wide-secret-5678"
GL_TOKEN = "gitlab-token-abcdef"
GT_SECRET = "gitea-secret-ffff"
TOKEN = "api-bearer-token-0001"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUEUE = DEFAULT_QUEUE
REGISTRY = "registry.local:5000"


def make_settings(**overrides: Any) -> GatewaySettings:
    data: dict[str, Any] = {
        "tokens": [
            {"name": "tests", "sha256": hash_token(TOKEN), "images": ["*"], "tenant": "default"}
        ],
        "forges": {
            "gitlab": {"clone_url": "https://gitlab.example.com/{repo}.git"},
            "gitea": {"clone_url": "https://gitea.example.com/{repo}.git"},
        },
        "sources": {"hosts": ["example.com"]},
        "webhook_secrets": [
            {"repo": "acme/*", "secret": OWNER_SECRET},
            {"repo": "acme/api", "secret": GH_SECRET},
            {"repo": "group/*", "secret": GL_TOKEN, "forge": "gitlab"},
            {"repo": "gitea/*", "secret": GT_SECRET, "forge": "gitea"},
        ],
        "rules": [
            {
                "repo": "acme/*",
                "branches": ["main", "release/*"],
                "images": [f"{REGISTRY}/{{repo}}:{{branch}}", f"{REGISTRY}/{{repo}}:{{short_sha}}"],
            },
            {
                "repo": "acme/api",
                "branches": ["main"],
                "dockerfile": "docker/worker.Dockerfile",
                "images": [f"{REGISTRY}/{{repo}}-worker:{{branch}}"],
                "priority": "batch",
            },
            {
                "repo": "*",
                "branches": [],
                "tags": ["v*"],
                "images": [f"{REGISTRY}/{{repo}}:{{tag}}"],
            },
            {"repo": "group/**", "images": [f"{REGISTRY}/{{name}}:{{ref_name}}"]},
            {"repo": "gitea/*", "images": [f"{REGISTRY}/{{repo}}:{{branch}}"]},
        ],
    }
    data.update(overrides)
    return msgspec.convert(data, GatewaySettings)


@contextlib.asynccontextmanager
async def gateway(
    client: BuildfleetClient, settings: GatewaySettings | None = None
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = make_app(settings or make_settings(), client)
    async with TestClient(TestServer(app)) as http:
        yield http


@pytest.fixture
async def http(fleet: BuildfleetClient) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with gateway(fleet) as client:
        yield client


async def queued(redis: aioredis.Redis) -> int:
    return int(await redis.zcard(QUEUE))


async def build_count(redis: aioredis.Redis) -> int:
    return len(
        [k async for k in redis.scan_iter(match="buildfleet:build:*") if b":events" not in k]
    )


async def post_github(
    http: TestClient[web.Request, web.Application],
    payload: Any,
    secret: str | None = GH_SECRET,
    **kwargs: Any,
) -> tuple[int, dict[str, Any]]:
    body = body_of(payload)
    response = await http.post(
        "/hooks/github", data=body, headers=github_headers(body, secret, **kwargs)
    )
    return response.status, await response.json()


# --- webhooks ---------------------------------------------------------------------------------


async def test_a_signed_github_push_enqueues_one_build_per_matching_rule(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    payload = github_push("acme/api", "refs/heads/main")
    status, reply = await post_github(http, payload)
    assert status == 202, reply
    sha = payload["after"]
    assert [b["images"] for b in reply["builds"]] == [
        [f"{REGISTRY}/acme/api:main", f"{REGISTRY}/acme/api:{sha[:7]}"],
        [f"{REGISTRY}/acme/api-worker:main"],
    ]
    assert await queued(redis) == 2
    state = await fleet.get(reply["builds"][0]["id"])
    assert state.status == "queued"
    request = state.request
    assert request is not None
    assert request.source == GitSource(
        url="https://github.com/acme/api.git", ref="refs/heads/main", commit=sha
    )
    assert request.labels["forge"] == "github"
    assert request.supersede_key
    worker_build = await fleet.get(reply["builds"][1]["id"])
    assert worker_build.request is not None
    assert worker_build.request.dockerfile == "docker/worker.Dockerfile"
    assert worker_build.request.priority == "batch"


async def test_a_ping_is_answered_and_builds_nothing(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    status, reply = await post_github(http, github_ping("acme/api"), event="ping")
    assert (status, reply["message"]) == (200, "pong")
    assert await build_count(redis) == 0


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        (None, "missing"),
        ("wrong-secret", "invalid"),
        (OWNER_SECRET, "invalid"),  # acme/api has its own secret: the owner's is not enough
    ],
)
async def test_a_bad_or_missing_signature_is_401_and_enqueues_nothing(
    http: TestClient[web.Request, web.Application],
    redis: aioredis.Redis,
    secret: str | None,
    why: str,
) -> None:
    status, reply = await post_github(http, github_push("acme/api"), secret=secret)
    assert status == 401
    assert why in reply["error"]
    assert await build_count(redis) == 0
    assert await queued(redis) == 0


async def test_a_signature_for_another_body_is_refused(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    signed = body_of(github_push("acme/api", "refs/heads/main"))
    sent = body_of(github_push("acme/api", "refs/heads/release/1.0"))
    headers = github_headers(signed, GH_SECRET)
    response = await http.post("/hooks/github", data=sent, headers=headers)
    assert response.status == 401
    assert await build_count(redis) == 0


async def test_a_repository_without_a_secret_is_refused(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    status, _ = await post_github(http, github_push("stranger/repo"), secret="anything")
    assert status == 401
    assert await build_count(redis) == 0


async def test_an_owner_pattern_secret_covers_the_owners_other_repositories(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient
) -> None:
    status, reply = await post_github(http, github_push("acme/web"), secret=OWNER_SECRET)
    assert status == 202, reply
    assert reply["builds"][0]["images"][0] == f"{REGISTRY}/acme/web:main"


async def test_branch_names_become_valid_image_tags(
    http: TestClient[web.Request, web.Application],
) -> None:
    status, reply = await post_github(http, github_push("acme/web", "refs/heads/release/2.0-RC"),
                                      secret=OWNER_SECRET)  # fmt: skip
    assert status == 202
    assert reply["builds"][0]["images"][0] == f"{REGISTRY}/acme/web:release-2.0-rc"


async def test_a_tag_push_uses_the_tag_rules(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient
) -> None:
    status, reply = await post_github(http, github_push("acme/api", "refs/tags/v1.2.3"))
    assert status == 202
    assert [b["images"] for b in reply["builds"]] == [[f"{REGISTRY}/acme/api:v1.2.3"]]


async def test_a_branch_deletion_is_acknowledged_and_builds_nothing(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    status, reply = await post_github(http, github_push("acme/api", deleted=True))
    assert status == 202
    assert reply["builds"] == []
    assert "deleted" in reply["message"]
    assert await build_count(redis) == 0


async def test_a_push_no_rule_matches_answers_202_and_says_so(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    status, reply = await post_github(http, github_push("acme/api", "refs/heads/feature/x"))
    assert status == 202
    assert reply["builds"] == []
    assert "no rule matches" in reply["message"]
    assert await build_count(redis) == 0


async def test_other_events_are_acknowledged_and_ignored(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    status, reply = await post_github(http, github_push("acme/api"), event="issues")
    assert status == 202
    assert "ignored" in reply["message"]
    assert await build_count(redis) == 0


async def test_gitlab_push_and_tag_push_hooks(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient
) -> None:
    payload = gitlab_push("group/sub/api", "refs/heads/main")
    response = await http.post(
        "/hooks/gitlab", data=body_of(payload), headers=gitlab_headers(GL_TOKEN)
    )
    reply = await response.json()
    assert response.status == 202, reply
    assert reply["builds"][0]["images"] == [f"{REGISTRY}/api:main"]
    state = await fleet.get(reply["builds"][0]["id"])
    assert state.request is not None
    assert state.request.source == GitSource(
        url="https://gitlab.example.com/group/sub/api.git",
        ref="refs/heads/main",
        commit=payload["checkout_sha"],
    )

    tag = gitlab_push("group/sub/api", "refs/tags/v2.0.0", tag=True)
    response = await http.post(
        "/hooks/gitlab", data=body_of(tag), headers=gitlab_headers(GL_TOKEN, "Tag Push Hook")
    )
    reply = await response.json()
    assert response.status == 202
    # only the tag rule: rule 3 matches branches only (its default)
    assert [b["images"] for b in reply["builds"]] == [[f"{REGISTRY}/group/sub/api:v2.0.0"]]


async def test_gitlab_branch_deletion_and_bad_token(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    deleted = gitlab_push("group/sub/api", deleted=True)
    response = await http.post(
        "/hooks/gitlab", data=body_of(deleted), headers=gitlab_headers(GL_TOKEN)
    )
    assert response.status == 202
    assert (await response.json())["builds"] == []
    response = await http.post(
        "/hooks/gitlab", data=body_of(gitlab_push()), headers=gitlab_headers("nope")
    )
    assert response.status == 401
    response = await http.post(
        "/hooks/gitlab", data=body_of(gitlab_push()), headers=gitlab_headers(None)
    )
    assert response.status == 401
    assert await build_count(redis) == 0


@pytest.mark.parametrize("forgejo", [False, True])
async def test_gitea_and_forgejo_pushes(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient, forgejo: bool
) -> None:
    body = body_of(gitea_push("gitea/webhooks", "refs/heads/main"))
    response = await http.post(
        "/hooks/gitea", data=body, headers=gitea_headers(body, GT_SECRET, forgejo=forgejo)
    )
    reply = await response.json()
    assert response.status == 202, reply
    assert reply["builds"][0]["images"] == [f"{REGISTRY}/gitea/webhooks:main"]
    response = await http.post(
        "/hooks/gitea", data=body, headers=gitea_headers(body, "wrong", forgejo=forgejo)
    )
    assert response.status == 401


async def test_a_gitea_delete_event_builds_nothing(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    body = body_of(gitea_delete("gitea/webhooks", "main"))
    response = await http.post(
        "/hooks/gitea", data=body, headers=gitea_headers(body, GT_SECRET, "delete")
    )
    reply = await response.json()
    assert response.status == 202
    assert reply["builds"] == []
    assert "deleted" in reply["message"]
    assert await build_count(redis) == 0


async def test_a_repeated_delivery_answers_200_with_the_same_builds(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    payload = github_push("acme/api")
    status, first = await post_github(http, payload, delivery="d-1")
    assert status == 202
    status, again = await post_github(http, payload, delivery="d-1")
    assert status == 200
    assert again["duplicate"] is True
    assert [b["id"] for b in again["builds"]] == [b["id"] for b in first["builds"]]
    assert await build_count(redis) == 2
    assert await queued(redis) == 2


async def test_a_delivery_recorded_but_never_enqueued_is_enqueued_on_redelivery(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    # As if the first arrival recorded its delivery id and then lost Redis before enqueuing.
    await redis.set("buildfleet:delivery:github:d-lost", json.dumps(["lost-1", "lost-2"]))
    status, reply = await post_github(http, github_push("acme/api"), delivery="d-lost")
    assert status == 202
    assert [b["id"] for b in reply["builds"]] == ["lost-1", "lost-2"]
    assert await queued(redis) == 2


async def test_malformed_json_is_400_with_the_reason(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    body = b'{"ref": "refs/heads/main", "repository": '
    response = await http.post("/hooks/github", data=body, headers=github_headers(body, GH_SECRET))
    assert response.status == 400
    assert "malformed JSON" in (await response.json())["error"]
    body = b'{"ref": 1, "repository": {"full_name": "acme/api"}}'
    response = await http.post("/hooks/github", data=body, headers=github_headers(body, GH_SECRET))
    assert response.status == 400
    assert "$.ref" in (await response.json())["error"]
    assert await build_count(redis) == 0


# --- supersede --------------------------------------------------------------------------------


async def test_a_newer_push_supersedes_the_queued_build_of_the_same_ref_and_image(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    _, first = await post_github(http, github_push("acme/api", after=sha_for("one")))
    _, other_ref = await post_github(
        http, github_push("acme/api", "refs/heads/release/1", after=sha_for("x"))
    )
    _, second = await post_github(http, github_push("acme/api", after=sha_for("two")))
    old = [b["id"] for b in first["builds"]]
    new = [b["id"] for b in second["builds"]]
    assert [b.get("superseded") for b in second["builds"]] == old
    for old_id, new_id in zip(old, new, strict=True):
        state = await fleet.get(old_id)
        assert state.status == "cancelled"
        events = [e async for e in fleet.watch(old_id)]
        assert isinstance(events[-1], Cancelled)
        assert events[-1].reason == f"superseded by {new_id}"
        assert (await fleet.get(new_id)).status == "queued"
    assert (await fleet.get(other_ref["builds"][0]["id"])).status == "queued"
    assert await queued(redis) == 3


async def evalsha_calls(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_push_enqueues_and_cancels_the_build_it_supersedes_in_one_redis_call(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    _, first = await post_github(http, github_push("acme/api", after=sha_for("one")))
    before = await evalsha_calls(redis)
    status, second = await post_github(http, github_push("acme/api", after=sha_for("two")))
    assert status == 202
    assert await evalsha_calls(redis) - before == 1  # claim, enqueue and supersede at once
    assert [b.get("superseded") for b in second["builds"]] == [b["id"] for b in first["builds"]]
    for build in first["builds"]:
        assert (await fleet.get(build["id"])).status == "cancelled"
    assert await queued(redis) == 2


async def test_concurrent_pushes_to_one_ref_leave_exactly_one_queued_build_per_image(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    replies = await asyncio.gather(
        *(post_github(http, github_push("acme/api", after=sha_for(f"c{n}"))) for n in range(16))
    )
    assert {status for status, _ in replies} == {202}
    ids = [b["id"] for _, reply in replies for b in reply["builds"]]
    states = {i: (await fleet.get(i)).status for i in ids}
    assert sorted(states.values()).count("queued") == 2  # one per rule (image)
    assert await queued(redis) == 2
    for build_id, status in states.items():
        if status == "cancelled":
            events = [e async for e in fleet.watch(build_id)]
            assert isinstance(events[-1], Cancelled)
            assert events[-1].reason.startswith("superseded by ")


async def test_more_concurrent_pushes_than_one_ledger_call_takes_each_build_or_supersede_once(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    """40 pushes at once, two to each of 20 repositories: more than one script call holds
    (DELIVERIES_PER_CALL), and every repository still ends with exactly one queued build
    per image."""
    pushes = [
        github_push(f"acme/svc-{repo}", after=sha_for(f"{repo}-{n}"))  # under the rate limit
        for n in range(2)
        for repo in range(20)
    ]
    before = await evalsha_calls(redis)
    replies = await asyncio.gather(*(post_github(http, push, OWNER_SECRET) for push in pushes))
    assert {status for status, _ in replies} == {202}
    assert await evalsha_calls(redis) - before >= 3
    ids = [b["id"] for _, reply in replies for b in reply["builds"]]
    assert len(ids) == len(set(ids)) == 40
    statuses = [(await fleet.get(i)).status for i in ids]
    assert sorted(statuses) == ["cancelled"] * 20 + ["queued"] * 20
    assert await queued(redis) == 20


async def test_a_supersede_record_of_an_expired_build_is_simply_replaced(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient
) -> None:
    _, first = await post_github(http, github_push("acme/api", after=sha_for("one")))
    for build in first["builds"]:
        await fleet.redis.delete(build_key(build["id"]), build_key(build["id"]) + ":events")
    status, second = await post_github(http, github_push("acme/api", after=sha_for("two")))
    assert status == 202
    assert all("superseded" not in b for b in second["builds"])


async def test_a_running_build_is_not_superseded_unless_the_rule_says_so(
    fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    base = make_settings()
    rules = [msgspec.structs.replace(base.rules[0], cancel_running=True), *base.rules[1:]]
    settings = msgspec.structs.replace(base, rules=tuple(rules))
    async with gateway(fleet, settings) as http:
        _, first = await post_github(http, github_push("acme/api", after=sha_for("one")))
        for build in first["builds"]:
            await fleet.store.start(
                Started(build_id=build["id"], worker="w1"), "interactive", lease_s=30
            )
        _, second = await post_github(http, github_push("acme/api", after=sha_for("two")))
    ids = [b["id"] for b in first["builds"]]
    # Rule 0 cancels running builds: its worker is told (the build stays running until it
    # stops); rule 1 does not, so its running build is left alone.
    assert second["builds"][0]["superseded"] == ids[0]
    assert "superseded" not in second["builds"][1]
    recorded = [await fleet.store.cancel_requests([build_id]) for build_id in ids]
    assert [[notice.reason for notice in notices] for notices in recorded] == [
        [f"superseded by {second['builds'][0]['id']}"],
        [],
    ]


# --- REST API ---------------------------------------------------------------------------------


def api_request(**overrides: Any) -> dict[str, Any]:
    request = {
        "source": {"type": "git", "url": "https://example.com/r.git", "ref": "main"},
        "images": [f"{REGISTRY}/r:latest"],
    }
    request.update(overrides)
    return request


async def test_the_api_needs_a_bearer_token(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = await http.post("/v1/builds", json=api_request(), headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    response = await http.get("/v1/builds/x", headers={"Authorization": "Bearer nope"})
    assert response.status == 401
    # Every /v1 route, and any added later, is behind the token.
    assert http.app is not None
    routes = [(r.method, r.resource.canonical) for r in http.app.router.routes() if r.resource]
    api_routes = [(method, path) for method, path in routes if path.startswith("/v1/")]
    assert len(api_routes) >= 6, api_routes
    for method, path in api_routes:
        response = await http.request(method, re.sub(r"\{[^}]+\}", "x", path))
        assert response.status == 401, (method, path)
    assert await build_count(redis) == 0


async def test_submit_get_and_cancel_a_build(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    response = await http.post("/v1/builds", json=api_request(id="api-1"), headers=AUTH)
    assert response.status == 202
    assert await response.json() == {"id": "api-1", "created": True}
    assert response.headers["Location"] == "/v1/builds/api-1"
    again = await http.post("/v1/builds", json=api_request(id="api-1"), headers=AUTH)
    assert (again.status, (await again.json())["created"]) == (200, False)

    response = await http.get("/v1/builds/api-1", headers=AUTH)
    assert response.status == 200
    state = await response.json()
    assert (state["build_id"], state["status"]) == ("api-1", "queued")
    assert state["request"]["images"] == [f"{REGISTRY}/r:latest"]

    response = await http.delete("/v1/builds/api-1", headers=AUTH)
    assert (response.status, await response.json()) == (
        200,
        {"id": "api-1", "outcome": "cancelled"},
    )
    response = await http.delete("/v1/builds/api-1", headers=AUTH)
    assert response.status == 409
    assert "cancelled" in (await response.json())["error"]
    assert await queued(redis) == 0


async def test_unknown_builds_are_404(http: TestClient[web.Request, web.Application]) -> None:
    for method, path in (
        ("GET", "/v1/builds/nope"),
        ("DELETE", "/v1/builds/nope"),
        ("GET", "/v1/builds/nope/events"),
        ("GET", "/v1/builds/..%2f..%2fetc/events"),
    ):
        response = await http.request(method, path, headers=AUTH)
        assert response.status == 404, path


async def test_an_invalid_request_is_400_naming_the_field(
    http: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    cases = [
        (api_request(priority="urgent"), "$.priority"),
        (api_request(images=["UPPER/case"]), "$.images"),
        (api_request(dockerfile="../../etc/passwd"), "$.dockerfile"),
        ({"images": ["a/b"]}, "source"),
    ]
    for body, field in cases:
        response = await http.post("/v1/builds", json=body, headers=AUTH)
        assert response.status == 400
        assert field in (await response.json())["error"]
    response = await http.post("/v1/builds", data=b"{not json", headers=AUTH)
    assert response.status == 400
    assert "malformed" in (await response.json())["error"]
    assert await build_count(redis) == 0


async def test_api_supersede_key_replaces_the_queued_build(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient
) -> None:
    await http.post("/v1/builds", json=api_request(id="k-1", supersede_key="k"), headers=AUTH)
    response = await http.post(
        "/v1/builds", json=api_request(id="k-2", supersede_key="k"), headers=AUTH
    )
    assert (await response.json())["superseded"] == "k-1"
    assert (await fleet.get("k-1")).status == "cancelled"


async def test_backpressure_refuses_batch_submissions_above_the_queue_depth(
    fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    settings = make_settings(max_queue_depth=2, retry_after_s=7)
    async with gateway(fleet, settings) as http:
        for n in range(2):
            response = await http.post("/v1/builds", json=api_request(id=f"f{n}"), headers=AUTH)
            assert response.status == 202
        response = await http.post("/v1/builds", json=api_request(priority="batch"), headers=AUTH)
        assert response.status == 429
        assert response.headers["Retry-After"] == "7"
        assert "queue depth 2" in (await response.json())["error"]
        response = await http.post("/v1/builds", json=api_request(), headers=AUTH)
        assert response.status == 202  # interactive still goes in
        status, _ = await post_github(http, github_push("acme/api"))
        assert status == 202  # pushes are bounded by supersede, never refused
        metrics = await (await http.get("/metrics")).text()
    assert "buildfleet_gateway_backpressure_total 1" in metrics
    assert await queued(redis) == 5


# --- events (SSE) -----------------------------------------------------------------------------


async def read_sse(response: Any) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if current:
                events.append(current)
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            current[name] = value
    return events


async def test_events_stream_live_until_the_build_ends_and_resume(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient
) -> None:
    request = BuildRequest(
        id="sse-1", source=GitSource(url="https://example.com/r.git"), images=("r/x:1",)
    )
    await fleet.submit(request)
    response = await http.get("/v1/builds/sse-1/events", headers=AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    reader = asyncio.ensure_future(read_sse(response))
    await fleet.store.start(Started(build_id="sse-1", worker="w"), "interactive", lease_s=30)
    await fleet.store.publish(Log(build_id="sse-1", text="hello"))
    result = BuildResult(build_id="sse-1", status="succeeded", digest="sha256:" + "a" * 64)
    await fleet.store.publish(Succeeded(build_id="sse-1", result=result))
    events = await reader
    assert [e["event"] for e in events] == ["queued", "started", "log", "succeeded"]
    assert json.loads(events[2]["data"])["text"] == "hello"

    resumed = await http.get(
        "/v1/builds/sse-1/events", headers={**AUTH, "Last-Event-ID": events[1]["id"]}
    )
    assert [e["event"] for e in await read_sse(resumed)] == ["log", "succeeded"]
    via_query = await http.get(f"/v1/builds/sse-1/events?after={events[2]['id']}", headers=AUTH)
    assert [e["event"] for e in await read_sse(via_query)] == ["succeeded"]

    bad = await http.get("/v1/builds/sse-1/events", headers={**AUTH, "Last-Event-ID": "x"})
    assert bad.status == 400
    # A malformed `after` is refused even when a valid Last-Event-ID would win over it.
    both = await http.get(
        "/v1/builds/sse-1/events?after=%0Bm", headers={**AUTH, "Last-Event-ID": events[1]["id"]}
    )
    assert both.status == 400
    assert "after" in (await both.json())["error"]


async def test_an_idle_stream_gets_heartbeats_and_ends_on_shutdown(
    fleet: BuildfleetClient,
) -> None:
    await fleet.submit(
        BuildRequest(id="idle", source=GitSource(url="https://e.com/r.git"), images=("r/x:1",))
    )
    settings = make_settings(sse_heartbeat_s=0.05)
    app = make_app(settings, fleet)
    server = TestServer(app)
    async with TestClient(server) as http:
        response = await http.get("/v1/builds/idle/events", headers=AUTH)
        seen: list[bytes] = []
        async for line in response.content:
            seen.append(line)
            if line.startswith(b": keep-alive"):
                break
        app[GATEWAY].stopping.set()
        rest = await response.content.read()
    assert seen[0].startswith(b"id: ")
    assert b"event: started" not in rest


# --- operations -------------------------------------------------------------------------------


async def test_health_readiness_metrics_and_openapi(
    http: TestClient[web.Request, web.Application],
) -> None:
    assert (await http.get("/healthz")).status == 200
    assert await (await http.get("/readyz")).json() == {"status": "ready"}
    await post_github(http, github_push("acme/api"))
    await post_github(http, github_push("acme/api"), secret="bad")
    metrics = await http.get("/metrics")
    text = await metrics.text()
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert 'route="/hooks/github",method="POST",status="202"' in text
    assert 'route="/hooks/github",method="POST",status="401"' in text
    assert 'buildfleet_gateway_webhooks_total{forge="github",outcome="unauthorized"} 1' in text
    assert "buildfleet_gateway_enqueue_seconds_count 1" in text
    assert 'buildfleet_gateway_builds_enqueued_total{origin="webhook"} 2' in text
    document = await (await http.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")


async def test_the_openapi_document_lists_exactly_the_routes_served(
    http: TestClient[web.Request, web.Application],
) -> None:
    document = await (await http.get("/openapi.json")).json()
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = {
        (route.method, route.resource.canonical)
        for route in http.app.router.routes()
        if route.resource is not None
    }
    assert documented == served
    for item in document["paths"].values():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for ref in json.dumps(operation).split('"$ref": "')[1:]:
                name = ref.split('"')[0].rsplit("/", 1)[-1]
                assert name in document["components"]["schemas"]


async def test_unknown_routes_and_methods_answer_json_errors(
    http: TestClient[web.Request, web.Application],
) -> None:
    response = await http.get("/nope")
    assert response.status == 404
    assert "error" in await response.json()
    response = await http.get("/hooks/github")
    assert response.status == 405
    assert response.headers["Allow"] == "POST"


# --- limits and failures ----------------------------------------------------------------------


async def test_a_body_over_the_limit_is_413(fleet: BuildfleetClient, redis: aioredis.Redis) -> None:
    settings = make_settings(body_limit_bytes=10_000, api_body_limit_bytes=10_000)
    async with gateway(fleet, settings) as http:
        big = body_of(github_push("acme/api", commits=60))
        assert len(big) > 10_000
        response = await http.post(
            "/hooks/github", data=big, headers=github_headers(big, GH_SECRET)
        )
        assert response.status == 413

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            for start in range(0, len(big), 1000):
                yield big[start : start + 1000]

        response = await http.post(
            "/hooks/github", data=chunks(), headers=github_headers(big, GH_SECRET)
        )
        assert response.status == 413
        response = await http.post("/v1/builds", data=big, headers=AUTH)
        assert response.status == 413
    assert await build_count(redis) == 0


async def test_413_comes_before_the_body_is_sent(fleet: BuildfleetClient) -> None:
    """The client announces 100 MB and sends 1 KB: the answer comes without the rest."""
    server = await start_gateway(make_settings(host="127.0.0.1", port=0), fleet)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\n"
            b"Content-Length: 104857600\r\n\r\n" + b"{" * 1024
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=30)
        assert status_line.startswith(b"HTTP/1.1 413")
        writer.close()
    finally:
        await server.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_redis_unreachable_is_503_never_500_nor_a_false_202() -> None:
    dead = BuildfleetClient.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        async with gateway(dead) as http:
            status, reply = await post_github(http, github_push("acme/api"))
            assert status == 503, reply
            body = body_of(github_push("acme/api"))
            response = await http.post(
                "/hooks/github", data=body, headers=github_headers(body, GH_SECRET, delivery=None)
            )
            assert response.status == 503
            for method, path, payload in (
                ("POST", "/v1/builds", api_request()),
                ("POST", "/v1/builds", api_request(priority="batch")),
                ("GET", "/v1/builds/x", None),
                ("DELETE", "/v1/builds/x", None),
                ("GET", "/v1/builds/x/events", None),
                ("GET", "/readyz", None),
            ):
                response = await http.request(method, path, json=payload, headers=AUTH)
                assert response.status == 503, path
            assert (await http.get("/healthz")).status == 200
            # a ping needs no Redis; unsigned requests are still 401
            status, _ = await post_github(http, github_ping("acme/api"), event="ping")
            assert status == 200
            status, _ = await post_github(http, github_push("acme/api"), secret="bad")
            assert status == 401
    finally:
        await dead.aclose()


async def test_secrets_and_tokens_are_never_logged(
    fleet: BuildfleetClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings()
    logging.getLogger("test").info("settings: %r %s", settings, settings)
    async with gateway(fleet, settings) as http:
        await post_github(http, github_push("acme/api"))
        await post_github(http, github_push("acme/api"), secret="bad")
        await http.post("/v1/builds", json=api_request(), headers={"Authorization": "Bearer x"})
        await http.post("/v1/builds", json=api_request(), headers=AUTH)
    for secret in (GH_SECRET, OWNER_SECRET, GL_TOKEN, GT_SECRET, TOKEN):
        assert secret not in caplog.text
        assert secret not in repr(settings)


async def test_start_gateway_serves_on_a_free_port(fleet: BuildfleetClient) -> None:
    server = await start_gateway(make_settings(port=0), fleet)
    try:
        async with ClientSession() as session, session.get(f"{server.url}/healthz") as response:
            assert response.status == 200
    finally:
        await server.aclose()


async def test_a_callers_trace_context_reaches_the_build(
    http: TestClient[web.Request, web.Application], fleet: BuildfleetClient
) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    body = body_of(github_push("acme/api"))
    headers = {**github_headers(body, GH_SECRET), "traceparent": traceparent}
    reply = await (await http.post("/hooks/github", data=body, headers=headers)).json()
    state = await fleet.get(reply["builds"][0]["id"])
    assert state.request is not None
    assert state.request.trace.traceparent == traceparent
    body = body_of(github_push("acme/api", after=sha_for("another commit")))
    headers = {**github_headers(body, GH_SECRET), "traceparent": "garbage"}
    reply = await (await http.post("/hooks/github", data=body, headers=headers)).json()
    state = await fleet.get(reply["builds"][0]["id"])
    assert state.request is not None
    assert state.request.trace.traceparent is None


def test_run_gateway_serves_until_sigterm_then_exits_cleanly(redis_url: str) -> None:
    port = free_port()
    script = (
        "import sys\n"
        "from producer.gateway.server import run_gateway\n"
        "from producer.gateway.settings import load_gateway_settings\n"
        "from producer.settings import RedisSettings\n"
        f"settings = load_gateway_settings({{'port': {port}, 'event_loop': 'asyncio'}})\n"
        f"run_gateway(settings, RedisSettings(url={redis_url!r}),\n"
        "            on_ready=lambda url: print(url, flush=True))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_event_loop_setting() -> None:
    assert event_loop_factory("asyncio") is None
    if importlib.util.find_spec("uvloop") is None:
        assert event_loop_factory("auto") is None
        with pytest.raises(ImportError):
            event_loop_factory("uvloop")
    else:
        assert event_loop_factory("auto") is not None
