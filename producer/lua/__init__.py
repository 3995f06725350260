"""The fleet's Lua scripts, and running them by sha, many in one pipelined round trip.

Each `.lua` file here changes a build's record, lease, slots or queue entries in one atomic
step, and opens by naming its KEYS and ARGV; `common.lua` (helpers several of them share)
is prepended to each. A call goes out as EVALSHA; only the calls Redis answered NOSCRIPT (it
restarted, failed over or flushed its scripts) are sent again, once their scripts are
loaded, so a call Redis ran is never run twice. (redis-py's own `Script` in a pipeline costs
a SCRIPT EXISTS round trip every time.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final, Protocol

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Arg = str | bytes | int | float


class Runnable(Protocol):
    """A script Redis can run by sha (this module's `Script`, or redis-py's)."""

    @property
    def sha(self) -> str: ...

    @property
    def script(self) -> str | bytes: ...


ScriptCall = tuple[Runnable, Sequence[str], Sequence[Any]]
"""A script, its KEYS and its ARGV."""


@dataclass(frozen=True, slots=True)
class Frame:
    """Part of a script call's KEYS and ARGV: what one caller, or one item of a batch, puts
    in a call that others put their parts in too."""

    keys: list[str]
    args: list[Arg]


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    script: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        sha = hashlib.sha1(self.script.encode()).hexdigest()  # noqa: S324 - Redis's script id
        object.__setattr__(self, "sha", sha)  # once: every call names its script by it


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.lua").read_text()


_COMMON: Final = _read("common")


def with_common(name: str, body: str) -> Script:
    """A script made elsewhere that uses the helpers of `common.lua`."""
    return Script(name, f"{_COMMON}\n{body}")


def _script(name: str) -> Script:
    return with_common(name, _read(name))


SUBMIT: Final = _script("submit")
START: Final = _script("start")
ACQUIRE: Final = _script("acquire")
PUBLISH: Final = _script("publish")
RESCHEDULE: Final = _script("reschedule")
CANCEL: Final = _script("cancel")
RENEW: Final = _script("renew")
REAP: Final = _script("reap")
REQUEUE: Final = _script("requeue")
ORPHANS: Final = _script("orphans")
CLAIM: Final = _script("claim")


async def run_scripts(
    redis: Redis, calls: Sequence[ScriptCall], *, together: bool = False
) -> list[Any]:
    """The reply of each call, in order; a call that failed has its exception as its reply
    (the caller decides whether one failure fails them all). Redis being unreachable
    raises. `together`: the calls run as one transaction, so that a reader blocked on
    what they write wakes once, to all of it."""
    replies = await _evalsha(redis, calls, together)
    missing = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in {calls[index][0].sha: calls[index][0] for index in missing}.values():
            await redis.script_load(script.script)
        again = await _evalsha(redis, [calls[index] for index in missing], together)
        for index, reply in zip(missing, again, strict=True):
            replies[index] = reply
    return replies


async def run_all(redis: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """The reply of each call, in order; the first failure is raised."""
    replies = await run_scripts(redis, calls)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


async def run(redis: Redis, script: Runnable, keys: Sequence[str], args: Sequence[Any]) -> Any:
    [reply] = await run_all(redis, [(script, keys, args)])
    return reply


async def _evalsha(redis: Redis, calls: Sequence[ScriptCall], together: bool) -> list[Any]:
    async with redis.pipeline(transaction=together) as pipe:
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies
