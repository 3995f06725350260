"""Connections to Redis: a server that accepts and then stops answering (a half-open
connection, a hung peer) fails the command within the socket timeout instead of hanging it."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.connection import connect
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
