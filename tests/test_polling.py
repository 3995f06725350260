"""The worker's loop against real Redis: claims of polled jobs made in one Lua call, a
worker told of queued builds polling at once instead of at its next poll, a build's
terminal event finishing its arq job in the same call, and a watcher woken once by a
build's last progress and its end."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from producer import jobcodec, lua
from producer.client import BuildfleetClient
from producer.contract import (
    BuildRequest,
    BuildResult,
    LocalSource,
    Log,
    Retrying,
    Started,
    Succeeded,
    decode_event,
)
from producer.keys import (
    ARQ_IN_PROGRESS_PREFIX,
    ARQ_JOB_PREFIX,
    DEFAULT_QUEUE,
    EVENT_FIELD,
    events_key,
    in_progress_key,
    job_key,
    queued_channel,
)
from producer.store import Begun, PublishOutcome

from fleet import worker_config, worker_in_task

pytestmark = pytest.mark.timeout(120)

_CLAIM_TTL_MS = 60_000


async def claim(
    redis: aioredis.Redis, queue: str, *, room: int = 1000, scan: int = 1000
) -> dict[str, bytes]:
    """The jobs a poll with `room` places claimed, by id, with their jobs."""
    now_ms = int(time.time() * 1000)
    args = [now_ms, _CLAIM_TTL_MS, room, scan, ARQ_IN_PROGRESS_PREFIX, ARQ_JOB_PREFIX]
    claimed = await lua.run(redis, lua.CLAIM, [queue], args)
    return {job_id.decode(): job for job_id, job in zip(claimed[::2], claimed[1::2], strict=True)}


async def enqueue(redis: aioredis.Redis, queue: str, scores: dict[str, int]) -> None:
    """Jobs in the queue, each with a job that names it."""
    await redis.zadd(queue, scores)
    await redis.mset({job_key(job_id): f"job {job_id}".encode() for job_id in scores})


async def test_a_claim_takes_only_due_queued_jobs_no_one_holds(redis: aioredis.Redis) -> None:
    queue = "buildfleet:test-claims"
    now_ms = int(time.time() * 1000)
    await enqueue(redis, queue, {"due": now_ms - 1, "held": now_ms - 1, "later": now_ms + 60_000})
    await redis.set(in_progress_key("held"), b"another worker", px=_CLAIM_TTL_MS)

    taken = await claim(redis, queue)

    assert taken == {"due": b"job due"}  # read in the same call
    assert await redis.get(in_progress_key("held")) == b"another worker"  # left alone
    assert await redis.pttl(in_progress_key("due")) > 0  # arq's claim, with its expiry
    assert await redis.exists(in_progress_key("later")) == 0


async def test_a_claim_stops_when_the_worker_is_full(redis: aioredis.Redis) -> None:
    queue = "buildfleet:test-claims-room"
    now_ms = int(time.time() * 1000)
    await enqueue(redis, queue, {"running": now_ms - 3, "first": now_ms - 2, "second": now_ms - 1})
    await redis.set(in_progress_key("running"), b"1", px=_CLAIM_TTL_MS)

    taken = await claim(redis, queue, room=1)

    assert taken == {"first": b"job first"}  # past the held job, up to the room there is
    assert await redis.exists(in_progress_key("second")) == 0
    assert await claim(redis, queue, scan=2) == {}  # no deeper than the scan


async def test_a_claim_drops_a_queued_id_whose_job_expired(redis: aioredis.Redis) -> None:
    queue = "buildfleet:test-claims-expired"
    now_ms = int(time.time() * 1000)
    await enqueue(redis, queue, {"live": now_ms - 2})
    await redis.zadd(queue, {"expired": now_ms - 1})

    taken = await claim(redis, queue)

    assert taken == {"live": b"job live", "expired": b""}  # for the worker to say so
    assert await redis.zrange(queue, 0, -1) == [b"live"]
    assert await redis.exists(in_progress_key("expired")) == 0


async def test_two_workers_claiming_the_same_poll_split_it_and_never_share_a_job(
    redis: aioredis.Redis,
) -> None:
    queue = "buildfleet:test-claims-race"
    ids = [f"job-{n}" for n in range(200)]
    await enqueue(redis, queue, dict.fromkeys(ids, int(time.time() * 1000) - 1))

    first, second = await asyncio.gather(claim(redis, queue), claim(redis, queue, room=150))

    assert first.keys().isdisjoint(second.keys())
    assert first.keys() | second.keys() == set(ids)


async def test_a_worker_drops_a_job_that_names_no_function_it_has(
    redis: aioredis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    job = jobcodec.serialize({"t": None, "f": "mine_bitcoin", "a": [], "k": {}, "et": 0})
    await redis.set(job_key("stray"), job)
    await redis.zadd(DEFAULT_QUEUE, {"stray": int(time.time() * 1000) - 1})

    async with worker_in_task(worker_config(redis_url, backend="simulate")):
        while await redis.exists(job_key("stray")):
            await asyncio.sleep(0.02)

    assert await redis.zscore(DEFAULT_QUEUE, "stray") is None
    assert await redis.exists(in_progress_key("stray")) == 0
    assert "job stray calls 'mine_bitcoin', which this worker has not: dropped" in caplog.text


async def test_an_idle_worker_starts_a_submitted_build_without_waiting_for_its_poll(
    fleet: BuildfleetClient, redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    config = worker_config(redis_url, backend="simulate")
    # Ten minutes between polls: only the queued notice can start the build in time.
    config = dataclasses.replace(
        config, worker=msgspec.structs.replace(config.worker, poll_delay_s=600.0)
    )
    channel = queued_channel(DEFAULT_QUEUE)
    async with worker_in_task(config):
        while (await redis.pubsub_numsub(channel))[0][1] == 0:  # the worker is listening
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # ...and napping after its first poll
        request = BuildRequest(source=LocalSource(path=str(tmp_path)), push=False)
        await fleet.submit(request)
        result = await fleet.wait(request.id)
    assert result.status == "succeeded"


async def test_a_batch_of_submissions_wakes_the_workers_once(
    fleet: BuildfleetClient, redis: aioredis.Redis, tmp_path: Path
) -> None:
    requests = [
        BuildRequest(source=LocalSource(path=str(tmp_path / str(n))), push=False) for n in range(5)
    ]
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(queued_channel(DEFAULT_QUEUE))
        await fleet.submit_many(requests)
        messages = [await pubsub.get_message(timeout=1.0) for _ in range(3)]
    notices = [m for m in messages if m is not None and m["type"] == "message"]
    assert len(notices) == 1


async def test_a_job_of_the_wrong_shape_is_dead_lettered_as_unreadable(
    fleet: BuildfleetClient, redis: aioredis.Redis, redis_url: str
) -> None:
    job = jobcodec.serialize({"t": None, "f": "build", "a": [b"{}"], "k": ["not", "a", "map"]})
    await redis.set(job_key("misshapen"), job)
    await redis.zadd(DEFAULT_QUEUE, {"misshapen": int(time.time() * 1000) - 1})

    async with worker_in_task(worker_config(redis_url, backend="simulate")), asyncio.timeout(10):
        while not await redis.exists(events_key("misshapen")):  # its only event is the last
            await asyncio.sleep(0.02)
        result = await fleet.wait("misshapen")

    assert (result.status, result.error_class) == ("dead_lettered", "unreadable")
    assert await redis.zscore(DEFAULT_QUEUE, "misshapen") is None
    assert await redis.exists(job_key("misshapen"), in_progress_key("misshapen")) == 0


async def test_a_build_s_terminal_event_finishes_its_arq_job_in_the_same_call(
    fleet: BuildfleetClient, redis: aioredis.Redis, tmp_path: Path
) -> None:
    request = BuildRequest(source=LocalSource(path=str(tmp_path)), push=False)
    await fleet.submit(request)
    arq_job = [job_key(request.id), in_progress_key(request.id)]
    await redis.set(in_progress_key(request.id), b"1")  # as a worker's claim
    await fleet.store.start(Started(build_id=request.id, worker="w"), "interactive", lease_s=30)
    await fleet.store.publish(Log(build_id=request.id, text="building"))
    assert await redis.exists(*arq_job) == 2  # progress leaves the job to its worker
    assert await redis.zscore(DEFAULT_QUEUE, request.id) is not None

    await fleet.store.publish(
        Succeeded(build_id=request.id, result=BuildResult(build_id=request.id, status="succeeded"))
    )

    assert await redis.exists(*arq_job) == 0
    assert await redis.zscore(DEFAULT_QUEUE, request.id) is None


async def test_a_build_s_retrying_defers_its_job_and_drops_the_claim_in_the_same_call(
    fleet: BuildfleetClient, redis: aioredis.Redis, tmp_path: Path
) -> None:
    request = BuildRequest(source=LocalSource(path=str(tmp_path)), push=False)
    await fleet.submit(request)
    await redis.set(in_progress_key(request.id), b"1")  # as a worker's claim
    begun = await fleet.store.start(
        Started(build_id=request.id, worker="w"), "interactive", lease_s=30
    )
    assert isinstance(begun, Begun)
    next_attempt_at = time.time() + 30

    outcome = await fleet.store.reschedule(
        Retrying(build_id=request.id, reason="daemon gone", next_attempt_at=next_attempt_at),
        request,
        begun.token,
        next_attempt=2,
    )

    assert outcome is PublishOutcome.PUBLISHED
    assert await redis.zscore(DEFAULT_QUEUE, request.id) == int(next_attempt_at * 1000)
    assert await redis.exists(in_progress_key(request.id)) == 0  # any worker may take it then
    job = jobcodec.deserialize(await redis.get(job_key(request.id)))
    assert job["a"][1] == 2  # as its next attempt


async def test_a_watcher_wakes_once_to_a_build_s_last_progress_and_its_end(
    fleet: BuildfleetClient, redis: aioredis.Redis, tmp_path: Path
) -> None:
    request = BuildRequest(source=LocalSource(path=str(tmp_path)), push=False)
    await fleet.submit(request)
    await fleet.store.start(Started(build_id=request.id, worker="w"), "interactive", lease_s=30)
    stream = events_key(request.id)
    [[_, seen]] = await redis.xread({stream: "0-0"})
    watcher = asyncio.create_task(redis.xread({stream: seen[-1][0]}, block=10_000))
    await asyncio.sleep(0.2)  # blocked on the stream

    result = BuildResult(build_id=request.id, status="succeeded")
    fleet.store.publish_soon(Log(build_id=request.id, text="last line"))
    await fleet.store.publish(Succeeded(build_id=request.id, result=result))

    [[_, woken_with]] = await watcher
    events = [decode_event(fields[EVENT_FIELD]) for _, fields in woken_with]
    assert [type(event) for event in events] == [Log, Succeeded]
