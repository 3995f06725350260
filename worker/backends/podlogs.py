"""Following a build container's log into the build's events, shared by the Kubernetes
backends: reconnect after a cut without sending a line twice, and once the outcome is
known, let the last lines arrive (but not wait for ever: kwok's log server, unlike a
kubelet, keeps a stream open after the container exits). Log trouble never fails a build.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from worker.kube.api import KubeApi
from worker.kube.errors import KubeError

log = logging.getLogger("buildfleet.kube")

_TRIES: Final = 5


@dataclass
class LogPosition:
    """Where a log stream got to, so a reconnect sends no line twice (by timestamp, and by
    count among lines with the same timestamp)."""

    last_ts: str = ""
    at_last_ts: int = 0
    _replayed: int = 0
    last_activity: float = 0.0
    """Loop time of the last line read (or stream opened): how `drain` sees quiet."""

    def new_stream(self) -> None:
        self._replayed = 0
        self._touch()

    def _touch(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.last_activity = asyncio.get_running_loop().time()

    def new_text(self, line: str) -> str | None:
        """The text of a "TIMESTAMP text" line, None when it was sent before."""
        self._touch()
        ts, _, text = line.partition(" ")
        if ts < self.last_ts:
            return None
        if ts == self.last_ts:
            self._replayed += 1
            if self._replayed <= self.at_last_ts:
                return None
            self.at_last_ts = self._replayed
            return text
        self.last_ts, self.at_last_ts, self._replayed = ts, 1, 1
        return text


async def follow_log(
    api: KubeApi,
    namespace: str,
    pod: str,
    container: str,
    *,
    position: LogPosition,
    on_line: Callable[[str], Awaitable[None]],
    pod_ended: Callable[[], bool],
) -> None:
    """Send each new line of the container's log to `on_line` until the stream ends;
    reconnect after a cut while the pod has not ended (a few tries)."""
    for attempt in range(_TRIES):
        position.new_stream()
        try:
            lines = api.log_lines(namespace, pod, container)
            async with contextlib.aclosing(lines):
                async for line in lines:
                    text = position.new_text(line)
                    if text is not None:
                        await on_line(text)
            return
        except KubeError as exc:
            log.info("log of %s/%s/%s (try %d): %s", namespace, pod, container, attempt + 1, exc)
        if attempt >= 1 and pod_ended():
            return
        await asyncio.sleep(0.5 * (attempt + 1))


async def drain(
    task: asyncio.Task[None], position: LogPosition, limit_s: float, idle_s: float
) -> None:
    """Let a log stream deliver its last lines once the outcome is known: until it ends,
    has been quiet for `idle_s`, or `limit_s` has passed."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit_s
    while not task.done():
        now = loop.time()
        if now >= give_up or now - position.last_activity >= idle_s:
            return
        await asyncio.wait({task}, timeout=min(0.05, give_up - now))
