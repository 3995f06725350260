"""The fleet's Lua scripts, and running them: by sha, pipelined, reloaded if Redis lost them.

Each script in producer/lua/ changes a build's record, lease, slots or queue entries in one
atomic step; `common.lua` (helpers shared by several scripts) is prepended to each. Scripts
are loaded once per connection pool; a NOSCRIPT reply (Redis restarted, failed over, or was
flushed) reloads them all and runs the calls again. Running a call twice is safe: every
script checks the state it changes first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Arg = str | bytes | int | float


def _read(name: str) -> str:
    return resources.files("producer").joinpath("lua", f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()  # noqa: S324 - Redis's script id


_COMMON: Final = _read("common")


def _script(name: str) -> Script:
    return Script(name, f"{_COMMON}\n{_read(name)}")


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
ALL: Final = (SUBMIT, START, ACQUIRE, PUBLISH, RESCHEDULE, CANCEL, RENEW, REAP, REQUEUE, ORPHANS)


@dataclass(frozen=True, slots=True)
class Call:
    script: Script
    keys: Sequence[str]
    args: Sequence[Arg]


class ScriptRunner:
    """Runs script calls for one Redis client; shared by everything using that client."""

    def __init__(self, redis: Redis, scripts: Sequence[Script] = ALL) -> None:
        self.redis = redis
        self.scripts = tuple(scripts)
        self._loaded = False

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> object:
        [reply] = await self.run_many([Call(script, keys, args)])
        return reply

    async def run_many(self, calls: Sequence[Call]) -> list[object]:
        """Every call in one pipelined round trip, in order; the first error is raised.

        Calls that found their script missing run again once the scripts are reloaded; the
        others ran exactly once.
        """
        replies: list[object] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            if not self._loaded:
                for script in self.scripts:
                    await self.redis.script_load(script.source)
                self._loaded = True
            async with self.redis.pipeline(transaction=False) as pipe:
                for index in todo:
                    call = calls[index]
                    pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)  # type: ignore[arg-type]
                answers: list[object] = await pipe.execute(raise_on_error=False)
            missing = []
            for index, answer in zip(todo, answers, strict=True):
                replies[index] = answer
                if isinstance(answer, NoScriptError):
                    missing.append(index)
            if not missing:
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply
                return replies
            self._loaded = False
            todo = missing
        raise NoScriptError("the scripts were loaded and are missing again")
