"""The web view's page and the API it reads (GET /v1/builds, /v1/fleet), against a real
gateway application and Redis: what a token may see, what it may not, and the page's
Content-Security-Policy. The page in a real browser: tests/test_ui.py."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from test_gateway_tenancy import REGISTRY, A, B, Http, auth, post, settings

from producer.client import BuildfleetClient
from producer.contract import BuildRequest, BuildResult, LocalSource, Started, Succeeded
from producer.gateway.app import make_app
from producer.gateway.openapi import LIST_MAX
from producer.keys import WORKERS, slot_key, tenant_recent_key
from producer.settings import TelemetrySettings
from producer.store import RECENT_BUILDS_KEPT, Begun
from producer.workers import DaemonBeat, WorkerBeat, worker_beat_encoder

TRACE_LINK = "https://traces.example.com/trace/{trace_id}"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
DAEMON = "tcp://daemon-a:1234"


@contextlib.asynccontextmanager
async def serve(fleet: BuildfleetClient) -> AsyncIterator[Http]:
    app = make_app(settings(), fleet, telemetry=TelemetrySettings(trace_link=TRACE_LINK))
    async with TestClient(TestServer(app)) as http:
        yield http


async def listing(http: Http, token: str, query: str = "") -> tuple[int, Any]:
    response = await http.get(f"/v1/builds{query}", headers=auth(token))
    return response.status, await response.json()


# --- the page ---------------------------------------------------------------------------------


async def test_the_page_is_static_and_allows_only_its_own_inline_script_and_style(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet) as http:
        response = await http.get("/ui")  # no token: the page holds no data
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.read()
        policy = dict(
            directive.split(" ", 1)
            for directive in response.headers["Content-Security-Policy"].split("; ")
        )
        for tag, directive in ((b"script", "script-src"), (b"style", "style-src")):
            bodies = re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), page, re.DOTALL)
            assert len(bodies) == 1
            digest = base64.b64encode(hashlib.sha256(bodies[0]).digest()).decode()
            assert policy[directive] == f"'sha256-{digest}'"
        assert policy["default-src"] == "'none'"
        assert policy["connect-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'"
        assert policy["require-trusted-types-for"] == "'script'"
        assert "unsafe" not in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Cache-Control"] == "no-store"
        # No handler attributes (the policy would block them anyway), no EventSource (it
        # cannot send the token but in its URL), and nothing written as HTML.
        assert not re.search(rb"\son[a-z]+=", page)
        assert b"EventSource" not in page
        assert b"innerHTML" not in page
        assert (await http.post("/ui")).status == 405


# --- the API it reads: tokens and tenants -------------------------------------------------


async def test_without_a_valid_token_the_views_api_answers_401(fleet: BuildfleetClient) -> None:
    async with serve(fleet) as http:
        status, _ = await post(http, A, id="a-1")
        assert status == 202
        for path in ("/v1/builds", "/v1/fleet", "/v1/builds/a-1", "/v1/builds/a-1/events"):
            for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": A}):
                response = await http.get(path, headers=headers)
                assert response.status == 401, (path, headers)
                assert response.headers["WWW-Authenticate"] == 'Bearer realm="buildfleet"'
            # A token in the URL is not a token.
            response = await http.get(path, params={"access_token": A, "token": A})
            assert response.status == 401, path


async def test_a_token_lists_only_its_tenants_builds_newest_first(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet) as http:
        for build_id, token in (("a-1", A), ("b-1", B), ("a-2", A), ("a-3", A)):
            status, _ = await post(http, token, id=build_id)
            assert status == 202
            time.sleep(0.002)  # distinct submit milliseconds: a defined order
        status, answer = await listing(http, A)
        assert status == 200
        assert [row["id"] for row in answer["builds"]] == ["a-3", "a-2", "a-1"]
        status, answer = await listing(http, B)
        assert [row["id"] for row in answer["builds"]] == ["b-1"]
        status, answer = await listing(http, A, "?limit=2")
        assert [row["id"] for row in answer["builds"]] == ["a-3", "a-2"]
        row = answer["builds"][0]
        assert row["status"] == "queued"
        assert row["source"] == "https://example.com/r.git@HEAD"
        assert row["images"] == [f"{REGISTRY}/r:1"]
        assert row["submitted_at"] > 0
        assert "daemon" not in row
        # Another tenant's build: 404 everywhere, as for one that does not exist.
        for path in ("/v1/builds/b-1", "/v1/builds/b-1/events"):
            response = await http.get(path, headers=auth(A))
            assert response.status == 404, path
            assert (await http.get(path.replace("b-1", "nope"), headers=auth(A))).status == 404


async def test_a_listing_limit_outside_1_to_the_maximum_is_refused(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet) as http:
        for limit in ("0", str(LIST_MAX + 1), "-1", "abc", "1e3", "", "٣", "9" * 400):
            status, answer = await listing(http, A, f"?limit={limit}")
            assert status == 400, limit
            assert "limit must be a whole number from 1 to" in answer["error"]
        status, _ = await listing(http, A, f"?limit={LIST_MAX}")
        assert status == 200


async def test_a_running_build_shows_its_daemon_and_an_ended_one_its_duration_and_trace(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet) as http:
        response = await http.post(
            "/v1/builds",
            json={"source": {"type": "git", "url": "https://example.com/r.git"}, "push": False},
            headers={**auth(A), "traceparent": TRACEPARENT},
        )
        build_id = (await response.json())["id"]
        started = Started(build_id=build_id, worker="w-1", backend="buildkit", daemon=DAEMON)
        begun = await fleet.store.start(
            started, "interactive", lease_s=30, slots=[(slot_key(DAEMON), 4)], slot_ttl_s=30
        )
        assert isinstance(begun, Begun) and begun.slot == 1
        await _beat(fleet.redis, builds=(build_id,))
        _, answer = await listing(http, A)
        [row] = answer["builds"]
        assert (row["status"], row["daemon"]) == ("running", DAEMON)
        assert row["started_at"] >= row["submitted_at"]
        trace_url = TRACE_LINK.replace("{trace_id}", TRACEPARENT.split("-")[1])
        assert (row["trace_id"], row["trace_url"]) == (TRACEPARENT.split("-")[1], trace_url)

        finished = time.time()
        result = BuildResult(
            build_id=build_id, status="succeeded", daemon=DAEMON, finished_at=finished
        )
        await fleet.store.publish(
            Succeeded(build_id=build_id, result=result), begun.token, slot=slot_key(DAEMON)
        )
        _, answer = await listing(http, A)
        [row] = answer["builds"]
        assert (row["status"], row["daemon"]) == ("succeeded", DAEMON)
        assert row["finished_at"] == finished
        assert row["duration_s"] == round(finished - row["submitted_at"], 3)
        # One build's own answer carries the same trace link, as `buildfleet get` prints.
        response = await http.get(f"/v1/builds/{build_id}", headers=auth(A))
        state = await response.json()
        assert (state["status"], state["trace_url"]) == ("succeeded", trace_url)


async def test_the_fleet_view_shows_load_but_never_another_tenants_build_ids(
    fleet: BuildfleetClient,
) -> None:
    async with serve(fleet) as http:
        status, _ = await post(http, B, id="b-secret")
        assert status == 202
        await fleet.redis.zadd(slot_key(DAEMON), {"b-secret#1": time.time() * 1000 + 30_000})
        await _beat(fleet.redis, builds=("b-secret",))
        response = await http.get("/v1/fleet", headers=auth(A))
        assert response.status == 200
        body = await response.read()
        assert b"b-secret" not in body
        view = msgspec.json.decode(body)
        assert view["daemons"] == [
            {"address": DAEMON, "healthy": True, "in_flight": 1, "capacity": 4}
        ]
        assert view["workers"][0]["running"] == 1
        assert view["workers"][0]["concurrency"] == 4
        assert view["running"] == 1
        assert view["waiting"] == {"interactive": 1, "batch": 0}
        # Nor does A's listing show B's running build.
        _, answer = await listing(http, A)
        assert answer["builds"] == []


async def test_a_tenants_index_of_recent_builds_keeps_only_the_newest(
    fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    source = LocalSource(path="/src")
    extra = 5
    requests = [
        BuildRequest(source=source, push=False, id=f"r-{n:05d}", tenant="acme", submitted_at=n + 1)
        for n in range(RECENT_BUILDS_KEPT + extra)
    ]
    await fleet.submit_many(requests)
    key = tenant_recent_key("acme")
    assert await redis.zcard(key) == RECENT_BUILDS_KEPT
    assert await redis.ttl(key) > 0
    oldest = await redis.zrange(key, 0, 0)
    assert oldest == [f"r-{extra:05d}".encode()]
    newest = await fleet.recent("acme", 3)
    assert [item.state.build_id for item in newest] == [
        f"r-{n:05d}"
        for n in range(RECENT_BUILDS_KEPT + extra - 1, RECENT_BUILDS_KEPT + extra - 4, -1)
    ]


async def _beat(redis: aioredis.Redis, builds: tuple[str, ...]) -> None:
    beat = WorkerBeat(
        name="w-1",
        at=time.time(),
        builds=builds,
        backend="buildkit",
        concurrency=4,
        daemons={DAEMON: DaemonBeat(healthy=True, capacity=4)},
    )
    await redis.hset(WORKERS, "w-1", worker_beat_encoder.encode(beat))
