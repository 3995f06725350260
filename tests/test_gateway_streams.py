"""Event streams (SSE): one shared Redis reader fans out to every client; limits per token
and in all. Real gateway, real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from test_gateway import read_sse

from producer.client import BuildfleetClient
from producer.contract import BuildRequest, BuildResult, GitSource, Log, Started, Succeeded
from producer.errors import FleetUnavailable
from producer.gateway.app import make_app
from producer.gateway.auth import hash_token
from producer.gateway.settings import GatewaySettings
from producer.gateway.streams import EventHub, Overflow

TOKEN, OTHER = "streams-token-1", "streams-token-2"
Http = TestClient[web.Request, web.Application]


def settings(**limits: Any) -> GatewaySettings:
    tokens = [
        {"name": name, "sha256": hash_token(token), "images": ["*"], "tenant": "default"}
        for name, token in (("one", TOKEN), ("two", OTHER))
    ]
    return msgspec.convert(
        {"tokens": tokens, "limits": limits, "sse_heartbeat_s": 0.2}, GatewaySettings
    )


@contextlib.asynccontextmanager
async def serve(fleet: BuildfleetClient, **limits: Any) -> AsyncIterator[Http]:
    async with TestClient(TestServer(make_app(settings(**limits), fleet))) as http:
        yield http


async def queue_build(fleet: BuildfleetClient, build_id: str) -> None:
    await fleet.submit(
        BuildRequest(id=build_id, source=GitSource(url="https://e.com/r.git"), images=("r/x:1",))
    )


async def finish(fleet: BuildfleetClient, build_id: str, lines: int = 0) -> None:
    await fleet.store.start(Started(build_id=build_id, worker="w"), "interactive", lease_s=30)
    for n in range(lines):
        await fleet.store.publish(Log(build_id=build_id, text=f"line {n}"))
    result = BuildResult(build_id=build_id, status="succeeded", digest="sha256:" + "a" * 64)
    await fleet.store.publish(Succeeded(build_id=build_id, result=result))


async def blocked_readers(redis: aioredis.Redis) -> int:
    """Connections now blocked in XREAD: the gateway's event readers."""
    clients = await redis.client_list()
    return sum(1 for c in clients if c.get("cmd") == "xread" and "b" in c.get("flags", ""))


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_many_streams_of_many_builds_share_one_redis_reader(
    fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    builds = [f"fan-{n}" for n in range(4)]
    for build_id in builds:
        await queue_build(fleet, build_id)
    async with serve(fleet) as http:
        responses = [
            await http.get(f"/v1/builds/{build_id}/events", headers=auth(token))
            for build_id in builds
            for token in (TOKEN, OTHER, TOKEN)
        ]
        readers = [asyncio.ensure_future(read_sse(r)) for r in responses]
        for _ in range(100):
            if await blocked_readers(redis) == 1:
                break
            await asyncio.sleep(0.05)
        assert await blocked_readers(redis) == 1  # twelve streams, one XREAD
        for build_id in builds:
            await finish(fleet, build_id, lines=3)
        streams = await asyncio.gather(*readers)
    for stream in streams:
        assert [e["event"] for e in stream] == [
            "queued",
            "started",
            "log",
            "log",
            "log",
            "succeeded",
        ]
        assert [json.loads(e["data"]).get("text") for e in stream][2:5] == [
            "line 0",
            "line 1",
            "line 2",
        ]
    assert {json.loads(s[0]["data"])["build_id"] for s in streams} == set(builds)


async def test_a_late_client_resuming_behind_the_others_misses_nothing(
    fleet: BuildfleetClient,
) -> None:
    await queue_build(fleet, "late")
    async with serve(fleet) as http:
        first = await http.get("/v1/builds/late/events", headers=auth())
        early = asyncio.ensure_future(read_sse(first))
        await fleet.store.start(Started(build_id="late", worker="w"), "interactive", lease_s=30)
        for n in range(5):
            await fleet.store.publish(Log(build_id="late", text=f"{n}"))
        await asyncio.sleep(0.2)  # the first client has read them; the reader is past them
        second = await http.get("/v1/builds/late/events", headers=auth(OTHER))
        late = asyncio.ensure_future(read_sse(second))
        await asyncio.sleep(0.1)
        await finish(fleet, "late")
        a, b = await early, await late
    assert [e["id"] for e in a] == [e["id"] for e in b]
    assert len(a) == 9  # queued, started, 5 logs, started, succeeded
    assert a[-1]["event"] == "succeeded"


async def test_streams_are_limited_per_token_and_in_all(fleet: BuildfleetClient) -> None:
    await queue_build(fleet, "limited")
    async with serve(fleet, streams_per_token=2, streams=3) as http:
        held = [await http.get("/v1/builds/limited/events", headers=auth()) for _ in range(2)]
        assert [r.status for r in held] == [200, 200]
        third = await http.get("/v1/builds/limited/events", headers=auth())
        assert third.status == 429
        assert "2 event streams" in (await third.json())["error"]
        assert int(third.headers["Retry-After"]) >= 1
        other = await http.get("/v1/builds/limited/events", headers=auth(OTHER))
        assert other.status == 200
        fourth = await http.get("/v1/builds/limited/events", headers=auth(OTHER))
        assert fourth.status == 429
        assert "3 event streams are open" in (await fourth.json())["error"]
        metrics = await (await http.get("/metrics")).text()
        assert "buildfleet_gateway_event_streams 3" in metrics
        await finish(fleet, "limited")
        for response in [*held, other]:
            await read_sse(response)
        again = await http.get("/v1/builds/limited/events", headers=auth())
        assert again.status == 200  # the slots came back when the streams ended
        assert [e["event"] for e in await read_sse(again)][-1] == "succeeded"


async def test_losing_the_reader_connection_ends_streams_with_an_error_event(
    fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    await queue_build(fleet, "cut")
    async with serve(fleet) as http:
        response = await http.get("/v1/builds/cut/events", headers=auth())
        reader = asyncio.ensure_future(read_sse(response))
        for _ in range(100):
            readers = [c for c in await redis.client_list() if c.get("cmd") == "xread"]
            if readers:
                break
            await asyncio.sleep(0.05)
        await redis.client_kill_filter(_id=readers[0]["id"])
        events = await reader
        assert events[-1]["event"] == "error"
        assert "unreachable" in json.loads(events[-1]["data"])["error"]
        again = await http.get("/v1/builds/cut/events", headers=auth())  # a new reader starts
        resumed = asyncio.ensure_future(read_sse(again))
        await finish(fleet, "cut")
        assert [e["event"] for e in await resumed][-1] == "succeeded"


# --- the hub itself ------------------------------------------------------------------------


async def test_a_subscriber_that_stops_reading_is_dropped_not_waited_for(
    fleet: BuildfleetClient,
) -> None:
    await queue_build(fleet, "slow")
    hub = EventHub(fleet.redis, "test-slow", buffer=4)

    async def drain(subscription: Any) -> list[str]:
        kinds = []
        while (entry := await subscription.next()) is not None:
            kinds.append(entry.kind)
        return kinds

    try:
        slow = await hub.subscribe("slow")
        fast = await hub.subscribe("slow")
        reading = asyncio.ensure_future(drain(fast))
        for n in range(10):  # one at a time: the fast reader keeps up, the slow one does not
            await fleet.store.publish(Log(build_id="slow", text=f"{n}"))
            await asyncio.sleep(0.02)
        await finish(fleet, "slow")
        assert await reading == ["queued", *["log"] * 10, "started", "succeeded"]
        with pytest.raises(Overflow):
            await drain(slow)
    finally:
        await hub.aclose()


async def test_a_hub_on_a_dead_redis_fails_its_subscribers() -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    hub = EventHub(dead, "test-dead")
    try:
        subscription = await hub.subscribe("any")
        with pytest.raises(FleetUnavailable):
            await subscription.next()
    finally:
        await hub.aclose()
        await dead.aclose()
