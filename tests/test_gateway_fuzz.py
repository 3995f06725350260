"""Hypothesis against a real gateway (own thread and event loop, real port) and real Redis.

Random bodies and headers on the webhook routes never get a 5xx; without a valid signature
they never write anything to Redis (no build, no delivery record, no supersede record).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
import os
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import redis as sync_redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_gateway_payloads import (
    body_of,
    gitea_push,
    github_events_without_a_repository,
    github_push,
    gitlab_push,
)

from producer.client import BuildfleetClient
from producer.gateway.auth import hash_token
from producer.gateway.server import GatewayServer, start_gateway
from producer.gateway.settings import GatewaySettings

SECRET = "fuzz-secret-0xdeadbeef"
TOKEN = "fuzz-token"
SCOPED = "fuzz-scoped-token"
FORGES = ("github", "gitlab", "gitea")
SIGNATURE_HEADER = {
    "github": "X-Hub-Signature-256",
    "gitlab": "X-Gitlab-Token",
    "gitea": "X-Gitea-Signature",
}
EVENT_HEADER = {"github": "X-GitHub-Event", "gitlab": "X-Gitlab-Event", "gitea": "X-Gitea-Event"}
EVENTS = {
    "github": ["push", "ping", "issues"],
    "gitlab": ["Push Hook", "Tag Push Hook", "Note Hook"],
    "gitea": ["push", "delete", "create"],
}
OTHER_HEADERS = [
    "X-GitHub-Delivery",
    "X-Gitlab-Event-UUID",
    "X-Gitea-Delivery",
    "X-Forgejo-Signature",
    "X-Forgejo-Event",
    "Content-Type",
    "Content-Encoding",
    "Transfer-Encoding",
    "Expect",
    "traceparent",
    "X-Anything",
]
# In CI the examples are the same on every run (a finding reproduces; a green run stays
# green); locally each run explores new ones.
FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Served:
    def __init__(self, server: GatewayServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop

    def request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def served(redis_url: str) -> Iterator[Served]:
    gateway_settings = msgspec.convert(
        {
            "port": 0,
            "tokens": [
                {"name": "fuzz", "sha256": hash_token(TOKEN), "images": ["*"], "secrets": ["*"]},
                {
                    "name": "scoped",
                    "sha256": hash_token(SCOPED),
                    "images": ["reg.example:5000/team/*"],
                    "sources": ["https://github.com/team/*"],
                    "priorities": ["interactive"],
                    "secrets": ["npm"],
                    "max_queued": 50,
                },
            ],
            "tenants": [{"name": "fuzz", "owners": ["fuzz"], "max_queued": 10_000}],
            "sources": {"hosts": ["git.example:9418"], "local_roots": ["/srv/builds"]},
            "limits": {
                "requests_per_s": 100_000,
                "burst": 100_000,
                "webhooks_per_s": 100_000,
                "webhook_burst": 100_000,
            },
            "body_limit_bytes": 64 * 1024,
            "webhook_secrets": [{"repo": "*", "secret": SECRET}],
            "rules": [
                {
                    "repo": "*",
                    "branches": ["*"],
                    "tags": ["*"],
                    "images": ["reg/{repo}:{ref_name}", "reg/{name}:{short_sha}"],
                }
            ],
        },
        GatewaySettings,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    client: BuildfleetClient = run(_client(redis_url))
    server: GatewayServer = run(start_gateway(gateway_settings, client))
    try:
        yield Served(server, loop)
    finally:
        run(server.aclose())
        run(client.aclose())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


async def _client(redis_url: str) -> BuildfleetClient:
    return BuildfleetClient.from_url(redis_url)


@pytest.fixture(scope="module")
def store(redis_url: str) -> Iterator[sync_redis.Redis]:
    client = sync_redis.Redis.from_url(redis_url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def payloads(draw: st.DrawFn, forge: str) -> bytes:
    """Valid push payloads, the same mutated, random JSON, and random bytes."""
    kind = draw(st.sampled_from(["valid", "mutated", "json", "bytes", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=2048))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":
        depth = draw(st.integers(1, 20_000))
        return b'{"repository":' + b"[" * depth + b"]" * depth + b"}"
    ref = draw(st.sampled_from(["refs/heads/main", "refs/tags/v1", "main", "refs/x"]))
    make = {"github": github_push, "gitlab": gitlab_push, "gitea": gitea_push}[forge]
    repo = "fuzz/" + draw(st.text("abcxyz-_.", min_size=1, max_size=10))
    payload: dict[str, Any] = make(repo, ref, commits=1)
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(sorted(payload)))
            payload[key] = draw(json_values)
    return body_of(payload)


header_text = st.text(
    st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=80
)


@st.composite
def requests(draw: st.DrawFn, signed: bool) -> tuple[str, bytes, dict[str, str]]:
    forge = draw(st.sampled_from(FORGES))
    body = draw(payloads(forge))
    headers = {EVENT_HEADER[forge]: draw(st.sampled_from(EVENTS[forge]) | header_text)}
    for name in draw(st.lists(st.sampled_from(OTHER_HEADERS), max_size=4, unique=True)):
        if name not in ("Transfer-Encoding", "Content-Encoding", "Expect"):
            headers[name] = draw(header_text)
    if signed:
        if forge == "gitlab":
            headers[SIGNATURE_HEADER[forge]] = SECRET
        else:
            digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            prefix = "sha256=" if forge == "github" else ""
            headers[SIGNATURE_HEADER[forge]] = prefix + digest
    else:
        forged = draw(
            st.sampled_from(["absent", "random", "other-secret", "other-body", "truncated"])
        )
        if forged != "absent":
            value = {
                "random": draw(header_text),
                "other-secret": hmac.new(b"not-it", body, hashlib.sha256).hexdigest(),
                "other-body": hmac.new(SECRET.encode(), body + b"x", hashlib.sha256).hexdigest(),
                "truncated": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()[:-1],
            }[forged]
            if forge == "gitlab" and forged != "random":
                value = SECRET[:-1] if forged == "truncated" else value
            if forge == "github" and forged != "random":
                value = "sha256=" + value
            headers[SIGNATURE_HEADER[forge]] = value
    return forge, body, headers


@FUZZ
@given(request=requests(signed=False))
def test_unsigned_webhooks_never_5xx_and_never_write_to_redis(
    served: Served, store: sync_redis.Redis, request: tuple[str, bytes, dict[str, str]]
) -> None:
    forge, body, headers = request
    before = store.dbsize()
    status, reply = served.request("POST", f"/hooks/{forge}", body, headers)
    event(f"status {status}")
    assert status < 500, reply
    assert status in (400, 401, 413), reply
    assert store.dbsize() == before


@FUZZ
@given(request=requests(signed=True))
def test_signed_webhooks_never_5xx(
    served: Served, store: sync_redis.Redis, request: tuple[str, bytes, dict[str, str]]
) -> None:
    forge, body, headers = request
    status, reply = served.request("POST", f"/hooks/{forge}", body, headers)
    event(f"status {status}")
    assert status < 500, reply
    if status == 202:
        for build in json.loads(reply)["builds"]:
            assert store.exists(f"buildfleet:build:{build['id']}")


@FUZZ
@given(body=json_values | st.binary(max_size=512).map(lambda b: b.decode("latin-1")))
def test_random_api_submissions_never_5xx(
    served: Served, store: sync_redis.Redis, body: object
) -> None:
    data = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    status, reply = served.request("POST", "/v1/builds", data, headers)
    assert status in (400, 403, 429) or status == 202, reply


# Values aimed at the policy: the grammar's edges, option characters, other hosts and
# schemes, paths out of the allowed roots, trace contexts, tenants.
hostile_text = st.sampled_from(
    [
        "c,type=local,dest=/tmp/x", "type=s3,bucket=b", "reg.example:5000/team/app:1",
        "reg.example:5000/other/app", "ghcr.io/team/app", "UPPER/x", "a//b", "x\n", "",
        "file:///etc", "https://github.com/team/app.git", "https://github.com/team/app",
        "https://github.com/other/app.git", "http://github.com/team/app.git",
        "git://git.example:9418/team/x", "git://git.example:9419/x", "ext::sh -c id",
        "https://u:p@github.com/team/a.git", "git@github.com:team/app.git", "-oProxyCommand=x",
        "https://169.254.169.254/x.git", "/srv/builds/app", "/srv/builds/../../etc", "/etc",
        "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "00-zz", "k=" + "v" * 600, "linux/amd64",
        "linux/amd64,type=local", "default", "someone-else", "interactive", "batch", "\x00",
    ]
) | st.text(max_size=40)  # fmt: skip


@st.composite
def build_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request the scoped token may make, with up to three of its fields replaced by
    values drawn from hostile ones (and valid ones, so that some get through)."""
    request: dict[str, Any] = {
        "source": {"type": "git", "url": "https://github.com/team/app.git"},
        "images": ["reg.example:5000/team/app:1"],
    }
    fields = {
        "source": st.builds(
            lambda kind, where: {"type": kind, ("url" if kind == "git" else "path"): where},
            st.sampled_from(["git", "local"]),
            hostile_text,
        ),
        "images": st.lists(hostile_text, max_size=3),
        "cache": st.fixed_dictionaries(
            {}, optional={"import_refs": st.lists(hostile_text, max_size=2),
                          "export_ref": hostile_text | st.none()}
        ),
        "timeout_s": st.floats(allow_nan=False, allow_infinity=False) | st.integers() | st.none(),
        "trace": st.fixed_dictionaries(
            {}, optional={"traceparent": hostile_text, "tracestate": hostile_text}
        ),
        "tenant": hostile_text,
        "priority": st.sampled_from(["interactive", "batch"]) | hostile_text,
        "platforms": st.lists(hostile_text, max_size=2),
        "target": hostile_text | st.none(),
        "supersede_key": hostile_text,
        "labels": st.dictionaries(hostile_text, hostile_text, max_size=3),
        "push": st.booleans(),
        "id": hostile_text,
        "secrets": st.lists(st.sampled_from(["npm", "aws", "npm,src=/etc/passwd"]) | hostile_text,
                            max_size=18),
    }  # fmt: skip
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        request[name] = draw(fields[name])
    return request


@FUZZ
@given(body=build_requests(), scoped=st.booleans())
def test_hostile_build_requests_never_5xx_and_what_is_refused_leaves_no_build(
    served: Served, store: sync_redis.Redis, body: dict[str, Any], scoped: bool
) -> None:
    token = SCOPED if scoped else TOKEN
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    builds = len(list(store.scan_iter("buildfleet:build:*", count=1000)))
    status, reply = served.request("POST", "/v1/builds", json.dumps(body).encode(), headers)
    event(f"status {status}")
    assert status in (200, 202, 400, 403, 409, 429), reply
    if status >= 400:
        assert "error" in json.loads(reply)
        assert len(list(store.scan_iter("buildfleet:build:*", count=1000))) == builds
    else:
        created = json.loads(reply)["id"]
        request = json.loads(store.hget(f"buildfleet:build:{created}", "request") or b"{}")
        assert request["tenant"] == ("scoped" if scoped else "fuzz")
        if scoped:  # what the scoped token got through is inside its scope
            assert all(i.startswith("reg.example:5000/team/") for i in request.get("images", []))
            assert request["source"]["url"].startswith("https://github.com/team/")
            assert set(request.get("secrets", [])) <= {"npm"}


@FUZZ
@given(authorization=header_text | st.sampled_from([f"Bearer {TOKEN}x", f"bearer  {TOKEN} "]))
def test_random_authorization_headers_never_5xx(served: Served, authorization: str) -> None:
    status, reply = served.request(
        "GET", "/v1/builds/some-build", None, {"Authorization": authorization}
    )
    assert status in (401, 404), reply


@FUZZ
@given(
    # Any named event; a blank name is a missing header (HTTP strips the spaces): a 400.
    event_name=st.sampled_from(sorted(github_events_without_a_repository("fuzz", 1)))
    | header_text.filter(str.strip),
    mutate=st.booleans(),
    extra=json_values.filter(lambda v: "Infinity" not in json.dumps(v)),  # valid JSON only
)
def test_signed_github_events_of_every_kind_are_never_refused_as_failures(
    served: Served, store: sync_redis.Redis, event_name: str, mutate: bool, extra: Any
) -> None:
    payloads = github_events_without_a_repository("fuzz", 1)
    payload = dict(payloads.get(event_name, {"action": "x"}))
    if mutate:
        payload["extra"] = extra
    body = body_of(payload)
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "X-GitHub-Event": event_name,
        "X-GitHub-Delivery": "fuzz-event",
        "X-Hub-Signature-256": f"sha256={digest}",
    }
    before = store.dbsize()
    status, reply = served.request("POST", "/hooks/github", body, headers)
    assert status in (200, 202), reply
    assert store.dbsize() == before


@FUZZ
@given(
    method=st.sampled_from(["GET", "DELETE", "POST", "PUT"]),
    build_id=st.text(max_size=60),
    suffix=st.sampled_from(["", "/events", "/x"]),
    last_event_id=header_text,
)
def test_random_build_paths_never_5xx(
    served: Served, method: str, build_id: str, suffix: str, last_event_id: str
) -> None:
    path = "/v1/builds/" + urllib.parse.quote(build_id, safe="") + suffix
    headers = {"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": last_event_id}
    status, reply = served.request(method, path, None, headers)
    assert status < 500, reply
