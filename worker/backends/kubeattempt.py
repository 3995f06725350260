"""The life of one attempt's object on Kubernetes (a Kaniko Job, a Tekton TaskRun): create
it or adopt the one a dead worker left, delete it and wait until it is gone, and sweep the
ones whose build has ended.

These raise `worker.kube.errors.KubeError` (the backend maps it once, at its edge) and
`TemporaryBuildError` for what only they can tell: a name taken by another build, or an
object still being deleted when a new attempt needs the name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from worker.backends.kubenames import ANNOTATION_BUILD_ID, MANAGED_SELECTOR
from worker.errors import TemporaryBuildError
from worker.kube.api import KubeApi
from worker.kube.errors import KubeConflict, KubeError, KubeNotFound
from worker.kube.objects import Applied, Deleted, K, Listed, Manifest, Resource
from worker.kube.watch import list_watch

log = logging.getLogger("buildfleet.kube")


async def create_or_adopt(
    api: KubeApi,
    resource: Resource[K],
    namespace: str,
    manifest: Manifest,
    *,
    name: str,
    build_id: str,
    wait_s: float,
    replace: Callable[[K], bool] = lambda _: False,
) -> tuple[K, bool]:
    """The attempt's object, and whether it was adopted rather than created now.

    A 409 Conflict means an object of this name exists: a worker that died left it, or
    another worker runs the same attempt. It is adopted (followed, never created twice)
    when it belongs to `build_id`, unless `replace` says it is spent (a TaskRun cancelled
    before its attempt was re-queued): that one is deleted. One being deleted is waited
    out for at most `wait_s`, then created afresh.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + wait_s
    noun = resource.view.__name__
    while True:
        try:
            return await api.create(resource, namespace, manifest), False
        except KubeConflict:
            pass
        try:
            existing = await api.get(resource, namespace, name)
        except KubeNotFound:
            continue  # deleted in between: create it
        meta = existing.metadata
        owner = meta.annotations.get(ANNOTATION_BUILD_ID)
        if owner != build_id:
            raise TemporaryBuildError(
                f"{noun} {namespace}/{name} exists for another build ({owner!r})",
                error_class=f"{noun.lower()}_conflict",
            )
        if meta.deletion_timestamp is None and not replace(existing):
            log.info("adopting %s %s/%s", noun, namespace, name)
            return existing, True
        if meta.deletion_timestamp is None:
            log.info("replacing %s %s/%s", noun, namespace, name)
            with contextlib.suppress(KubeNotFound):
                await api.delete(resource, namespace, name, propagation="Background")
        remaining = give_up - loop.time()
        if remaining <= 0 or not await wait_gone(
            api,
            resource,
            namespace,
            name,
            resource_version=meta.resource_version,
            timeout_s=remaining,
        ):
            raise TemporaryBuildError(
                f"{noun} {namespace}/{name} is still being deleted",
                error_class=f"{noun.lower()}_conflict",
            )


async def wait_until(
    api: KubeApi,
    resource: Resource[K],
    namespace: str,
    name: str,
    *,
    resource_version: str,
    done: Callable[[K | None], bool],
    timeout_s: float,
) -> bool:
    """Whether the object, as it was at `resource_version`, comes to satisfy `done` (given
    None once it is deleted) within `timeout_s`: one watch, no polling."""

    async def reached() -> None:
        events = list_watch(
            api,
            resource,
            namespace,
            since=resource_version or None,
            field_selector=f"metadata.name={name}",
        )
        async with contextlib.aclosing(events):
            async for event in events:
                match event:
                    case Applied(obj) if done(obj):
                        return
                    case Deleted() if done(None):
                        return
                    case Listed(_, items) if done(items[0] if items else None):
                        return

    try:
        await asyncio.wait_for(reached(), timeout_s)
    except TimeoutError:
        return False
    return True


async def wait_gone(
    api: KubeApi,
    resource: Resource[K],
    namespace: str,
    name: str,
    *,
    resource_version: str,
    timeout_s: float,
) -> bool:
    """Whether the object, as it was at `resource_version`, is deleted within `timeout_s`."""
    return await wait_until(
        api,
        resource,
        namespace,
        name,
        resource_version=resource_version,
        done=lambda obj: obj is None,
        timeout_s=timeout_s,
    )


async def delete_and_wait(
    api: KubeApi, resource: Resource[K], namespace: str, name: str, *, wait_s: float
) -> bool:
    """Delete the object in the foreground (its dependents, such as its pods, go first)
    and wait until it is gone; whether it went within `wait_s`."""
    try:
        being_deleted = await api.delete(resource, namespace, name, propagation="Foreground")
    except KubeNotFound:
        return True
    if being_deleted is None:
        return True
    return await wait_gone(
        api,
        resource,
        namespace,
        name,
        resource_version=being_deleted.metadata.resource_version,
        timeout_s=wait_s,
    )


async def reap_orphans(
    api: KubeApi, resource: Resource[K], namespace: str, live_build_ids: set[str]
) -> list[str]:
    """Delete the buildfleet objects in `namespace` whose build is not live (no longer
    queued, running or waiting to retry); the names of those deleted."""
    items, _ = await api.list(resource, namespace, label_selector=MANAGED_SELECTOR)
    deleted = []
    for item in items:
        meta = item.metadata
        build_id = meta.annotations.get(ANNOTATION_BUILD_ID)
        if build_id is None or build_id in live_build_ids or meta.deletion_timestamp:
            continue
        with contextlib.suppress(KubeNotFound):
            await api.delete(resource, namespace, meta.name, propagation="Background")
        deleted.append(meta.name)
    return deleted


async def clean_up_after_cancel(cleanup: Awaitable[bool], what: str) -> None:
    """Run a cancelled attempt's `cleanup` (true when it finished in time) to its end even
    if the task awaiting it is cancelled again; its trouble is logged, never raised."""
    task = asyncio.ensure_future(cleanup)
    try:
        if not await asyncio.shield(task):
            log.warning("cancel: %s has not finished yet", what)
    except KubeError as exc:
        log.warning("cancel: %s: %s", what, exc)
    except asyncio.CancelledError:
        log.warning("cancel: %s goes on in the background", what)
