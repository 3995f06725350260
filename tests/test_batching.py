"""The shared batching primitive, the EVALSHA helper and batched submits (the latter two
against a real Redis)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from producer.batching import Coalescer
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, LocalSource
from producer.keys import DEFAULT_QUEUE
from producer.lua import run_scripts
from producer.store import SUBMIT_CHUNK


async def test_calls_of_one_turn_share_a_batch_and_get_their_own_results() -> None:
    batches: list[list[int]] = []

    async def run(items: list[int]) -> list[int | Exception]:
        batches.append(items)
        return [ValueError(str(i)) if i == 3 else i * 10 for i in items]

    double: Coalescer[int, int] = Coalescer(run)
    results = await asyncio.gather(*(double(i) for i in range(5)), return_exceptions=True)
    assert batches == [[0, 1, 2, 3, 4]]
    assert results[:3] == [0, 10, 20]
    assert isinstance(results[3], ValueError)
    assert results[4] == 40


async def test_calls_of_one_turn_beyond_max_batch_go_in_several_batches() -> None:
    batches: list[list[int]] = []

    async def run(items: list[int]) -> list[int | Exception]:
        batches.append(items)
        return [i * 10 for i in items]

    double: Coalescer[int, int] = Coalescer(run, max_batch=3)
    results = await asyncio.gather(*(double(i) for i in range(7)))
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert results == [i * 10 for i in range(7)]
    assert await double(7) == 70 and batches[-1] == [7]  # and the next turn batches again


def test_max_batch_is_refused_for_serial_batches() -> None:
    async def run(items: list[int]) -> list[int | Exception]:
        return list(items)

    with pytest.raises(ValueError, match="serial"):
        Coalescer(run, serial=True, max_batch=2)


async def test_a_failing_batch_fails_each_of_its_calls() -> None:
    async def run(items: list[int]) -> list[int | Exception]:
        raise ConnectionError("gone")

    broken: Coalescer[int, int] = Coalescer(run)
    results = await asyncio.gather(broken(1), broken(2), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_serial_batches_go_one_at_a_time_in_order() -> None:
    running = 0
    order: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int | Exception]:
        nonlocal running
        running += 1
        assert running == 1, "two batches at once"
        order.append(items)
        await release.wait()
        running -= 1
        return list(items)

    log: Coalescer[int, int] = Coalescer(run, serial=True)
    first = log.enqueue(1)
    while not order:  # the first batch starts
        await asyncio.sleep(0)
    later = [log.enqueue(n) for n in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert order == [[1]]  # the others wait for it
    release.set()
    assert await asyncio.gather(first, *later) == [1, 2, 3, 4]
    assert order == [[1], [2, 3, 4]]


async def test_concurrent_batches_do_not_wait_for_each_other() -> None:
    started: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int | Exception]:
        started.append(items)
        await release.wait()
        return list(items)

    fast: Coalescer[int, int] = Coalescer(run)
    first = fast.enqueue(1)
    while not started:
        await asyncio.sleep(0)
    second = fast.enqueue(2)
    await asyncio.sleep(0.01)
    assert started == [[1], [2]]
    release.set()
    assert await asyncio.gather(first, second) == [1, 2]


async def test_a_cancelled_caller_does_not_cancel_the_batch() -> None:
    ran: list[list[int]] = []

    async def run(items: list[int]) -> list[int | Exception]:
        await asyncio.sleep(0.01)
        ran.append(items)
        return list(items)

    batcher: Coalescer[int, int] = Coalescer(run)
    leaving = asyncio.ensure_future(batcher(1))
    staying = batcher.enqueue(2)
    await asyncio.sleep(0)
    leaving.cancel()
    assert await staying == 2
    assert [sorted(batch) for batch in ran] == [[1, 2]]


ECHO = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"


async def test_scripts_run_by_sha_and_only_refused_calls_run_again(
    redis: aioredis.Redis,
) -> None:
    script = redis.register_script(ECHO)
    failing = redis.register_script("return redis.error_reply('nope')")
    calls = [(script, ["counter"], ["a"]), (failing, [], []), (script, ["counter"], ["b"])]
    replies = await run_scripts(redis, calls)  # scripts not loaded yet: NOSCRIPT, load, again
    assert replies[0] == [b"counter", b"a", 1]
    assert isinstance(replies[1], Exception)
    assert "nope" in str(replies[1])
    assert replies[2] == [b"counter", b"b", 2]
    await redis.script_flush()  # as after a restart or failover
    replies = await run_scripts(redis, calls[:1])
    assert replies == [[b"counter", b"a", 3]]  # each call ran exactly once


async def test_unreachable_redis_raises() -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    try:
        with pytest.raises(aioredis.ConnectionError):
            await run_scripts(dead, [(dead.register_script(ECHO), ["k"], ["v"])])
    finally:
        await dead.aclose()


async def test_a_long_submit_is_one_round_trip_of_bounded_script_calls(
    fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    def request() -> BuildRequest:
        return BuildRequest(source=LocalSource(path="/src"), push=False)

    await fleet.submit(request())  # the script is loaded
    before = (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"]
    count = 2 * SUBMIT_CHUNK + 1

    submitted = await fleet.submit_many([request() for _ in range(count)])

    assert all(submission.created for submission in submitted)
    assert await redis.zcard(DEFAULT_QUEUE) == count + 1
    after = (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"]
    assert after - before == 3  # no script holds Redis for more than a chunk
