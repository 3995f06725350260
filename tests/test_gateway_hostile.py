"""Hostile requests through the REST API and the webhooks, against a real gateway and Redis.

Each one is refused with a 4xx whose message names the field (or header) at fault; nothing
is queued and no build record is made; Redis gains no key but the fleet's own admission
counters.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from test_gateway_payloads import body_of, github_headers, github_push, sha_for

from producer.client import BuildfleetClient
from producer.gateway.app import make_app
from producer.gateway.auth import hash_token
from producer.gateway.settings import GatewaySettings
from producer.keys import DEFAULT_QUEUE

ALPHA, BETA = "alpha-token-0123456789", "beta-token-9876543210"
ORG_SECRET, API_SECRET = "alpha-org-secret", "alpha-api-secret"
REGISTRY = "registry.local:5000"
Http = TestClient[web.Request, web.Application]


def settings() -> GatewaySettings:
    return msgspec.convert(
        {
            "tokens": [
                {
                    "name": "alpha-ci",
                    "sha256": hash_token(ALPHA),
                    "tenant": "alpha",
                    "images": [f"{REGISTRY}/alpha/*"],
                    "sources": ["https://github.com/alpha/*"],
                    "priorities": ["interactive"],
                    "secrets": ["npm", "pip-*"],
                },
                {
                    "name": "beta-ci",
                    "sha256": hash_token(BETA),
                    "tenant": "beta",
                    "images": [f"{REGISTRY}/beta/*"],
                    "sources": ["https://github.com/beta/*"],
                },
            ],
            "tenants": [{"name": "alpha", "owners": ["alpha"], "max_queued": 100}],
            "api_body_limit_bytes": 64 * 1024,
            "body_limit_bytes": 256 * 1024,
            "webhook_secrets": [
                {"repo": "alpha/*", "secret": ORG_SECRET},
                {"repo": "alpha/api", "secret": API_SECRET},
            ],
            "rules": [{"repo": "alpha/*", "images": [f"{REGISTRY}/{{repo}}:{{branch}}"]}],
        },
        GatewaySettings,
    )


@contextlib.asynccontextmanager
async def serve(fleet: BuildfleetClient) -> AsyncIterator[Http]:
    async with TestClient(TestServer(make_app(settings(), fleet))) as http:
        yield http


def good_request(**overrides: Any) -> dict[str, Any]:
    return {
        "source": {"type": "git", "url": "https://github.com/alpha/app.git", "ref": "main"},
        "images": [f"{REGISTRY}/alpha/app:1"],
        **overrides,
    }


def submit(body: Any, token: str | None = ALPHA, **headers: str) -> Send:
    async def send(http: Http) -> ClientResponse:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await http.post(
            "/v1/builds", data=data, headers={**auth, "Content-Type": "application/json", **headers}
        )

    return send


def call(method: str, path: str, token: str | None = ALPHA) -> Send:
    async def send(http: Http) -> ClientResponse:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return await http.request(method, path, headers=auth)

    return send


def hook(payload: Any, secret: str = API_SECRET, **kwargs: Any) -> Send:
    async def send(http: Http) -> ClientResponse:
        body = payload if isinstance(payload, bytes) else body_of(payload)
        headers = github_headers(body, secret, **kwargs)
        return await http.post("/hooks/github", data=body, headers=headers)

    return send


def hook_without_delivery_id() -> Send:
    async def send(http: Http) -> ClientResponse:
        body = body_of(github_push("alpha/api"))
        headers = github_headers(body, API_SECRET)
        del headers["X-GitHub-Delivery"]
        return await http.post("/hooks/github", data=body, headers=headers)

    return send


def signed_for_another_body() -> Send:
    async def send(http: Http) -> ClientResponse:
        signed, sent = body_of(github_push("alpha/api")), body_of(github_push("alpha/web"))
        return await http.post(
            "/hooks/github", data=sent, headers=github_headers(signed, API_SECRET)
        )

    return send


Send = Callable[[Http], Awaitable[ClientResponse]]
OLD, NEW = sha_for("old commit"), sha_for("new commit")


def push_from(before: str, after: str, repo: str = "alpha/api") -> dict[str, Any]:
    return {**github_push(repo, "refs/heads/main", after), "before": before}


async def beta_has_a_build(http: Http) -> None:
    body = {
        **good_request(id="beta-build-1"),
        "source": {"type": "git", "url": "https://github.com/beta/app.git"},
        "images": [f"{REGISTRY}/beta/app:1"],
    }
    response = await submit(body, BETA)(http)
    assert response.status == 202, await response.text()


async def alpha_pushed_old_then_new(http: Http) -> None:
    for payload in (push_from(sha_for("older still"), OLD), push_from(OLD, NEW)):
        response = await hook(payload)(http)
        assert response.status == 202, await response.text()


async def alpha_pushed_new_first(http: Http) -> None:
    response = await hook(push_from(OLD, NEW))(http)
    assert response.status == 202, await response.text()


@dataclass(frozen=True)
class Case:
    send: Send
    status: int
    names: str
    """What the error message must name (a field, a header)."""
    setup: Callable[[Http], Awaitable[None]] | None = None


def git(url: str) -> dict[str, Any]:
    return good_request(source={"type": "git", "url": url, "ref": "main"})


def beta_request(**overrides: Any) -> dict[str, Any]:
    source = {"type": "git", "url": "https://github.com/beta/app.git", "ref": "main"}
    return {"source": source, "images": [f"{REGISTRY}/beta/app:1"], **overrides}


NESTED = b'{"unknown": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}"
CASES: dict[str, Case] = {
    # --- sources -----------------------------------------------------------------------------
    "local source /etc": Case(
        submit(good_request(source={"type": "local", "path": "/etc"})), 403, "$.source"
    ),
    "local source reading a worker file as a Dockerfile": Case(
        submit(good_request(source={"type": "local", "path": "/etc"}, dockerfile="passwd")),
        403,
        "$.source",
    ),
    "file:// URL": Case(submit(git("file:///etc")), 403, "$.source.url"),
    "http context that is not a repository": Case(
        submit(git("https://github.com/alpha/app")), 403, "$.source.url"
    ),
    "cloud metadata as a context": Case(
        submit(git("https://169.254.169.254/latest/meta-data.git")), 403, "$.source.url"
    ),
    "disallowed host": Case(submit(git("https://evil.example/alpha/app.git")), 403, "$.source.url"),
    "unencrypted http": Case(submit(git("http://github.com/alpha/app.git")), 403, "$.source.url"),
    "credentials in the URL": Case(
        submit(git("https://me:pw@github.com/alpha/app.git")), 403, "$.source.url"
    ),
    "ref smuggled in a fragment": Case(
        submit(git("https://github.com/alpha/app.git#main:../../")), 403, "$.source.url"
    ),
    "ext:: transport": Case(submit(git("ext::sh%20-c%20touch%20x")), 403, "$.source.url"),
    "git option as a URL": Case(submit(git("--upload-pack=touch /tmp/x")), 403, "$.source.url"),
    "another owner's repository": Case(
        submit(git("https://github.com/beta/app.git")), 403, "$.source"
    ),
    # --- destinations and cache --------------------------------------------------------------
    "option characters in an image": Case(
        submit(good_request(images=["c,type=local,dest=/tmp/out"])), 400, "$.images[0]"
    ),
    "option characters in the cache export": Case(
        submit(good_request(cache={"export_ref": "c,type=local,dest=DIR"})),
        400,
        "$.cache.export_ref",
    ),
    "s3 cache import": Case(
        submit(good_request(cache={"import_refs": ["type=s3,bucket=b,region=x"]})),
        400,
        "$.cache.import_refs[0]",
    ),
    "foreign registry": Case(
        submit(good_request(images=["ghcr.io/alpha/app:1"])), 403, "$.images[0]"
    ),
    "another tenant's repository": Case(
        submit(good_request(images=[f"{REGISTRY}/beta/app:1"])), 403, "$.images[0]"
    ),
    "cache exported to a foreign registry": Case(
        submit(good_request(cache={"export_ref": "docker.io/attacker/cache"})),
        403,
        "$.cache.export_ref",
    ),
    # --- options -----------------------------------------------------------------------------
    "timeout beyond the maximum": Case(
        submit(good_request(timeout_s=10 * 24 * 3600)), 403, "$.timeout_s"
    ),
    "malformed trace context": Case(
        submit(good_request(trace={"traceparent": "00-xyz"})), 403, "$.trace.traceparent"
    ),
    "oversized trace state": Case(
        submit(good_request(trace={"tracestate": "k=" + "v" * 5000})), 403, "$.trace.tracestate"
    ),
    "a priority the token may not use": Case(
        submit(good_request(priority="batch")), 403, "$.priority"
    ),
    "another tenant named": Case(submit(good_request(tenant="beta")), 403, "$.tenant"),
    "option characters in a platform": Case(
        submit(good_request(platforms=["linux/amd64,type=local"])), 403, "$.platforms[0]"
    ),
    "a newline in the build id": Case(submit(good_request(id="x\n")), 403, "$.id"),
    "oversized body": Case(
        submit(good_request(labels={"pad": "x" * 70_000})), 413, "request body larger"
    ),
    "deeply nested body": Case(submit(NESTED), 400, "nested too deeply"),
    # --- build secrets -----------------------------------------------------------------------
    "a secret the token may not use": Case(
        submit(good_request(secrets=["npm", "aws"])), 403, "$.secrets[1]"
    ),
    "a secret for a token allowed none": Case(
        submit(beta_request(secrets=["npm"]), BETA), 403, "$.secrets[0]"
    ),
    "option characters in a secret id": Case(
        submit(good_request(secrets=["npm,src=/etc/passwd"])), 400, "$.secrets[0]"
    ),
    "a secret id that is a path": Case(
        submit(good_request(secrets=["../../run/secrets/x"])), 400, "$.secrets[0]"
    ),
    "too many secrets": Case(
        submit(good_request(secrets=[f"pip-{n}" for n in range(17)])), 400, "$.secrets"
    ),
    "a secret named twice": Case(submit(good_request(secrets=["npm", "npm"])), 400, "$.secrets"),
    # --- tokens and tenants ------------------------------------------------------------------
    "no token": Case(submit(good_request(), token=None), 401, "Authorization"),
    "wrong token": Case(submit(good_request(), token="guess"), 401, "Authorization"),
    "another tenant's build, read": Case(
        call("GET", "/v1/builds/beta-build-1"), 404, "beta-build-1", beta_has_a_build
    ),
    "another tenant's build, cancelled": Case(
        call("DELETE", "/v1/builds/beta-build-1"), 404, "beta-build-1", beta_has_a_build
    ),
    "another tenant's build, followed": Case(
        call("GET", "/v1/builds/beta-build-1/events"), 404, "beta-build-1", beta_has_a_build
    ),
    "another tenant's build id, taken over": Case(
        submit(good_request(id="beta-build-1")), 409, "build id", beta_has_a_build
    ),
    # --- webhooks ----------------------------------------------------------------------------
    "forged signature": Case(hook(github_push("alpha/api"), "guessed"), 401, "X-Hub-Signature-256"),
    "signature of another body": Case(signed_for_another_body(), 401, "X-Hub-Signature-256"),
    "the owner's secret where the repository has its own": Case(
        hook(github_push("alpha/api"), ORG_SECRET), 401, "alpha/api"
    ),
    "no delivery id": Case(hook_without_delivery_id(), 400, "X-GitHub-Delivery"),
    "replayed push under a fresh delivery id": Case(
        hook(push_from(OLD, NEW)), 409, "(after) was already built", alpha_pushed_old_then_new
    ),
    "re-ordered push (older after newer)": Case(
        hook(push_from(sha_for("older still"), OLD)), 409, "moved past", alpha_pushed_new_first
    ),
    "oversized webhook": Case(hook(github_push("alpha/api", commits=1000)), 413, "request body"),
    "deeply nested signed webhook": Case(
        hook(b'{"repository": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"), 400, "payload"
    ),
    "a repository path with ..": Case(
        hook({**github_push("alpha/api"), "repository": {"full_name": "alpha/../../etc"}}),
        400,
        "repository.full_name",
    ),
}


async def keys(redis: aioredis.Redis) -> set[bytes]:
    return {key async for key in redis.scan_iter()}


@pytest.mark.parametrize("name", list(CASES))
async def test_a_hostile_request_is_refused_naming_the_field_and_changes_nothing(
    name: str, fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    case = CASES[name]
    async with serve(fleet) as http:
        if case.setup is not None:
            await case.setup(http)
        before, queued = await keys(redis), await redis.zcard(DEFAULT_QUEUE)
        response = await case.send(http)
        text = await response.text()
        assert response.status == case.status, text
        assert case.names in json.loads(text)["error"], text
    assert await redis.zcard(DEFAULT_QUEUE) == queued
    added = await keys(redis) - before
    counters = (b"buildfleet:tenant:", b"buildfleet:token:")
    assert all(key.startswith(counters) for key in added), added
    assert all(key.startswith((b"buildfleet:", b"arq:")) for key in await keys(redis))


def test_the_table_is_as_long_as_promised() -> None:
    assert len(CASES) >= 30
    assert {case.status for case in CASES.values()} == {400, 401, 403, 404, 409, 413}
