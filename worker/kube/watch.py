"""List+watch that lasts: an async generator of typed events that survives the server
ending a watch, a dropped connection and an expired resourceVersion.

    async for event in list_watch(api, PODS, "ns", label_selector="job-name=x", since="0"):
        match event:
            case Listed(_, items): ...   # the whole state (first list, or a re-list)
            case Applied(pod): ...       # created or changed
            case Deleted(pod): ...       # gone; its last state

Where it starts (`since`): None lists first (a `Listed` event) and watches from the list's
version; "0" watches from the server's cache, the current objects arriving as `Applied`
(no list request); a resourceVersion watches from there (the caller knows the state then,
e.g. the object it just created).

Failure policy:
| what happens                                | then                                         |
|---------------------------------------------|----------------------------------------------|
| the server ends the watch (its timeout)     | watch again from the last version seen       |
| connection refused, dropped, cut mid-stream | the same, after a backoff (0.2 s doubling,   |
| 429 (Retry-After), 5xx                      |   at most 5 s; Retry-After when given)       |
| 410 Gone: the version is too old            | list again (a `Listed` event), watch on      |
| any other KubeError (403, 404, ...)         | raised to the follower                       |
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final, Protocol, TypeVar

from worker.kube.errors import RETRYABLE, KubeGone
from worker.kube.objects import Applied, Bookmark, Deleted, K, Listed, Resource, WatchEvent

log = logging.getLogger("buildfleet.kube")

_BACKOFF_START_S: Final = 0.2
_BACKOFF_MAX_S: Final = 5.0

T = TypeVar("T")


class Watchable(Protocol):
    """What `list_watch` needs of an API client (`worker.kube.api.KubeApi` is one)."""

    async def list(
        self,
        resource: Resource[K],
        namespace: str,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> tuple[tuple[K, ...], str]: ...

    def watch(
        self,
        resource: Resource[K],
        namespace: str,
        *,
        resource_version: str,
        label_selector: str = "",
        field_selector: str = "",
        timeout_s: int = 120,
    ) -> AsyncGenerator[Applied[K] | Deleted[K] | Bookmark, None]: ...


async def list_watch(
    api: Watchable,
    resource: Resource[K],
    namespace: str,
    *,
    since: str | None = None,
    label_selector: str = "",
    field_selector: str = "",
    timeout_s: int = 120,
) -> AsyncGenerator[WatchEvent[K], None]:
    """Follow the matching objects until the caller stops (see the module docstring)."""
    cursor = since
    backoff = _BACKOFF_START_S
    what = f"watch {resource} in {namespace} ({label_selector or field_selector or 'all'})"
    while True:
        try:
            if cursor is None:
                items, cursor = await api.list(
                    resource,
                    namespace,
                    label_selector=label_selector,
                    field_selector=field_selector,
                )
                yield Listed(resource, items)
            events = api.watch(
                resource,
                namespace,
                resource_version=cursor,
                label_selector=label_selector,
                field_selector=field_selector,
                timeout_s=timeout_s,
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    backoff = _BACKOFF_START_S
                    match event:
                        case Bookmark(resource_version):
                            cursor = resource_version
                        case Applied(obj) | Deleted(obj):
                            cursor = obj.metadata.resource_version or cursor
                            yield event
            continue  # the server ended the watch: resume from the cursor
        except KubeGone:
            log.info("%s: resourceVersion %s is gone; listing again", what, cursor)
            cursor = None
            continue
        except RETRYABLE as exc:
            pause = exc.retry_after or backoff
            log.info("%s: %s; again in %.1fs", what, exc, pause)
        await asyncio.sleep(pause)
        backoff = min(backoff * 2, _BACKOFF_MAX_S)


async def merge(*streams: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """The items of several async iterators as they come; ends when all have ended. An
    error of one is raised here (the others are closed)."""
    pending = {asyncio.ensure_future(anext(s)): s for s in streams}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                stream = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(stream))] = stream
                yield item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            if isinstance(stream, AsyncGenerator):
                with contextlib.suppress(Exception):
                    await stream.aclose()


async def ticks(every_s: float, tick: T) -> AsyncGenerator[T, None]:
    """`tick` every `every_s` seconds, for ever: lets a follower notice time passing."""
    while True:
        await asyncio.sleep(every_s)
        yield tick
