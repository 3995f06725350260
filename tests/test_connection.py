"""Connections to Redis: a server that accepts and then stops answering (a half-open
connection, a hung peer) fails the command within the socket timeout instead of hanging it;
a connection lost in the middle of a transaction reads as Redis going away; commands are
packed in C and arrive as they were given."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import DataError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from producer.connection import HiredisPacking, connect
from producer.resilience import is_transient
from producer.settings import RedisSettings


async def _serve_silently() -> asyncio.Server:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)
        writer.close()

    return await asyncio.start_server(swallow, "127.0.0.1", 0)


@pytest.mark.parametrize("size", [16, 64 << 20], ids=["read-blocks", "send-blocks"])
async def test_a_server_that_stops_answering_fails_the_command_with_a_timeout(size: int) -> None:
    server = await _serve_silently()
    port = server.sockets[0].getsockname()[1]
    client = connect(RedisSettings(url=f"redis://127.0.0.1:{port}", socket_timeout_s=0.5), Redis)
    try:
        with pytest.raises(RedisTimeoutError):
            await asyncio.wait_for(client.set("k", b"x" * size), timeout=20)
    finally:
        await client.aclose()
        server.close()


async def test_a_connection_lost_under_watch_counts_as_redis_going_away(
    redis: Redis, redis_url: str
) -> None:
    """redis-py reports a connection dropped under WATCH (arq claiming a job) as a
    WatchError; the worker's poll loop must treat it as an outage, not as a bug."""
    client = connect(RedisSettings(url=redis_url), Redis)
    try:
        async with client.pipeline(transaction=True) as pipe:
            await pipe.watch("claimed")
            await redis.client_kill_filter(_type="normal", skipme=True)
            with pytest.raises(WatchError) as lost:
                await pipe.exists("claimed")
        assert is_transient(lost.value)
    finally:
        await client.aclose()


async def test_a_watched_key_that_changed_is_not_an_outage(redis: Redis, redis_url: str) -> None:
    client = connect(RedisSettings(url=redis_url), Redis)
    try:
        async with client.pipeline(transaction=True) as pipe:
            await pipe.watch("claimed")
            await redis.set("claimed", b"elsewhere")
            pipe.multi()
            pipe.set("claimed", b"here")
            with pytest.raises(WatchError) as conflict:
                await pipe.execute()
        assert not is_transient(conflict.value)
    finally:
        await client.aclose()


async def test_commands_packed_in_c_reach_redis_byte_for_byte(redis: Redis, redis_url: str) -> None:
    """hiredis packs every command (see producer/connection.py): values of every kind a
    script call sends arrive as redis-py's own packer would send them."""
    client = connect(RedisSettings(url=redis_url), Redis)
    values: list[EncodableT] = ["é ünïcode", b"\x00\xff\r\n", 12345678901234567890, 0.1, -2]
    try:
        await client.rpush("packed", *values)
        assert await client.lrange("packed", 0, -1) == [
            "é ünïcode".encode(),
            b"\x00\xff\r\n",
            b"12345678901234567890",
            b"0.1",
            b"-2",
        ]
        with pytest.raises(DataError):  # refused before it is sent, as redis-py refuses it
            await client.set("packed-none", None)  # type: ignore[arg-type]
        assert await client.ping()  # and the connection is still good
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://127.0.0.1:6379/0",
        "unix:///run/redis.sock?db=1",
        "redis+sentinel://127.0.0.1:26379/primary",
    ],
)
def test_every_kind_of_connection_packs_in_c(url: str) -> None:
    client = connect(RedisSettings(url=url), Redis)
    assert issubclass(client.connection_pool.connection_class, HiredisPacking)
