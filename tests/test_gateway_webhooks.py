"""Organization and GitHub App webhooks, events that name no repository, clone URLs, and
pushes replayed or re-ordered, against a real gateway and Redis."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from test_gateway_payloads import (
    body_of,
    gitea_headers,
    github_events_without_a_repository,
    github_headers,
    github_ping,
    github_push,
    gitlab_headers,
    sha_for,
)

from producer.client import BuildfleetClient
from producer.contract import GitSource
from producer.gateway.app import make_app
from producer.gateway.settings import GatewaySettings
from producer.keys import DEFAULT_QUEUE

ORG, APP, GL, GT = "org-secret-acme", "app-secret-xyz", "gitlab-token", "gitea-secret"
INSTALLATION = 4242
Http = TestClient[web.Request, web.Application]


def settings() -> GatewaySettings:
    return msgspec.convert(
        {
            "webhook_secrets": [
                {"repo": "acme/*", "secret": ORG, "forge": "github"},
                {"installation": INSTALLATION, "secret": APP, "forge": "github"},
                {"repo": "group/*", "secret": GL, "forge": "gitlab"},
                {"repo": "gitea/*", "secret": GT, "forge": "gitea"},
            ],
            "rules": [{"repo": "*", "images": ["registry.local:5000/{repo}:{branch}"]}],
        },
        GatewaySettings,
    )


@contextlib.asynccontextmanager
async def serve(fleet: BuildfleetClient) -> AsyncIterator[Http]:
    async with TestClient(TestServer(make_app(settings(), fleet))) as http:
        yield http


async def github(
    http: Http, payload: Any, secret: str, event: str = "push", **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    body = body_of(payload)
    response = await http.post(
        "/hooks/github", data=body, headers=github_headers(body, secret, event, **kwargs)
    )
    return response.status, await response.json()


@pytest.mark.parametrize("secret", [ORG, APP])
async def test_signed_events_that_name_no_repository_are_acknowledged_never_refused(
    fleet: BuildfleetClient, redis: aioredis.Redis, secret: str
) -> None:
    async with serve(fleet) as http:
        for event, payload in github_events_without_a_repository("acme", INSTALLATION).items():
            status, reply = await github(http, payload, secret, event)
            assert status == 202, (event, reply)
            assert reply["builds"] == []
            assert "names no repository" in reply["message"], event
        # The same events unsigned (or signed with an unknown secret) are still 401.
        status, _ = await github(http, {"action": "created"}, "not-configured", "installation")
        assert status == 401
    assert await redis.dbsize() == 0


async def test_an_organization_webhook_pings_and_builds_every_repository_of_the_owner(
    fleet: BuildfleetClient,
) -> None:
    org_ping = {**github_ping("acme/x"), "hook": {"type": "Organization", "id": 1}}
    del org_ping["repository"]
    org_ping["organization"] = {"login": "acme"}
    async with serve(fleet) as http:
        assert (await github(http, org_ping, ORG, "ping"))[0] == 200
        for repo in ("acme/api", "acme/web"):
            status, reply = await github(http, github_push(repo), ORG)
            assert (status, len(reply["builds"])) == (202, 1), reply
        status, _ = await github(http, github_push("other/api"), ORG)
        assert status == 401


async def test_a_github_app_secret_signs_the_events_of_its_installation(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet) as http:
        installed = {**github_push("stranger/tool"), "installation": {"id": INSTALLATION}}
        status, reply = await github(http, installed, APP)
        assert status == 202, reply
        foreign = {**github_push("stranger/tool"), "installation": {"id": INSTALLATION + 1}}
        assert (await github(http, foreign, APP))[0] == 401


async def test_gitlab_and_gitea_events_without_a_project_are_acknowledged(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet) as http:
        body = body_of({"object_kind": "group_member", "group_name": "group", "user_id": 1})
        response = await http.post(
            "/hooks/gitlab", data=body, headers=gitlab_headers(GL, "Member Hook")
        )
        assert response.status == 202
        body = body_of({"action": "created", "sender": {"login": "x"}})
        response = await http.post(
            "/hooks/gitea", data=body, headers=gitea_headers(body, GT, "package")
        )
        assert response.status == 202


async def test_a_push_builds_from_the_forges_url_never_the_payloads(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet) as http:
        payload = github_push("acme/api", clone_url="file:///etc/shadow")
        status, reply = await github(http, payload, ORG)
        assert status == 202
    state = await fleet.get(reply["builds"][0]["id"])
    assert state.request is not None
    assert state.request.source == GitSource(
        url="https://github.com/acme/api.git", ref="refs/heads/main", commit=payload["after"]
    )


async def test_pushes_move_forward_only(fleet: BuildfleetClient, redis: aioredis.Redis) -> None:
    a, b, c, d = (sha_for(x) for x in "abcd")

    def push(before: str, after: str) -> dict[str, Any]:
        return {**github_push("acme/api", after=after), "before": before}

    async with serve(fleet) as http:
        assert (await github(http, push(a, b), ORG))[0] == 202
        assert (await github(http, push(b, c), ORG))[0] == 202
        status, reply = await github(http, push(a, b), ORG)  # replayed, fresh delivery id
        assert (status, "already built" in reply["error"]) == (409, True)
        status, reply = await github(http, push(sha_for("z"), a), ORG)  # late, older
        assert (status, "moved past" in reply["error"]) == (409, True)
        status, _ = await github(http, push(b, c), ORG, delivery="same-id")
        assert status == 409
        assert (await github(http, push(c, d), ORG, delivery="next"))[0] == 202
        status, repeat = await github(http, push(c, d), ORG, delivery="next")
        assert (status, repeat["duplicate"]) == (200, True)  # a redelivery is not a replay
        # Another branch has its own history.
        other = {**push(a, b), "ref": "refs/heads/release"}
        assert (await github(http, other, ORG))[0] == 202
    assert await redis.zcard(DEFAULT_QUEUE) == 2  # d on main (c superseded) and b on release
