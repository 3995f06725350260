"""Connections to Redis: a command is sent in its caller's task, bounded by the socket
timeout (redis-py's own bound starts a task per send on Python 3.11)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.connection import connect
from producer.settings import RedisSettings


async def test_commands_and_pipelines_start_no_task_of_their_own(redis_url: str) -> None:
    client = connect(RedisSettings(url=redis_url), Redis)
    try:
        await client.ping()  # connected
        loop = asyncio.get_running_loop()
        created: list[object] = []
        default = loop.get_task_factory()

        def counting(loop: asyncio.AbstractEventLoop, coro, **kwargs):  # type: ignore[no-untyped-def]
            created.append(coro)
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(counting)
        try:
            for n in range(50):
                await client.set(f"connection-test:{n}", n)
                async with client.pipeline(transaction=False) as pipe:
                    pipe.get(f"connection-test:{n}").delete(f"connection-test:{n}")
                    assert await pipe.execute() == [str(n).encode(), 1]
        finally:
            loop.set_task_factory(default)
        assert created == []
    finally:
        await client.aclose()


async def test_a_server_that_stops_answering_fails_the_command_with_a_timeout(
    tmp_path: object,
) -> None:
    """A listener that accepts and never reads: the send fills the socket, then times out."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect(RedisSettings(url=f"redis://127.0.0.1:{port}", socket_timeout_s=0.5), Redis)
    try:
        with pytest.raises(RedisTimeoutError):
            await client.set("k", b"x" * (64 << 20))
    finally:
        await client.aclose()
        server.close()
