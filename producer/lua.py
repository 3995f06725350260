"""Lua scripts run by sha, many in one pipelined round trip.

redis-py's `Script` in a pipeline costs a SCRIPT EXISTS round trip every time; here each
call goes out as EVALSHA, and only the calls Redis answered NOSCRIPT (it restarted, failed
over or flushed its scripts) are sent again, once their scripts are loaded. A call Redis ran
is never run twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

ScriptCall = tuple[AsyncScript, Sequence[str], Sequence[Any]]
"""A script, its KEYS and its ARGV."""


async def run_scripts(redis: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """The reply of each call, in order; a call that failed has its exception as its reply
    (the caller decides whether one failure fails them all). Redis being unreachable
    raises."""
    replies = await _evalsha(redis, calls)
    missing = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in {calls[index][0].sha: calls[index][0] for index in missing}.values():
            await redis.script_load(script.script)
        again = await _evalsha(redis, [calls[index] for index in missing])
        for index, reply in zip(missing, again, strict=True):
            replies[index] = reply
    return replies


async def _evalsha(redis: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies
