"""The `kaniko` backend: each build attempt is one batch/v1 Job running the Kaniko executor.

Lifecycle of one attempt (API requests in brackets: 4 for a build that runs its course):
1. create the Job [1] (`manifest.build_job_manifest`), named from build id + attempt; a
   Job of that name left by a worker that died is adopted [+1 get], never created twice;
2. watch the Job from the version its create returned [1], and the Job's pods from the
   server's cache [1] (a list first only when adopting): no polling, no reads while the
   watches are open; they resume after a dropped connection and re-list after 410 Gone;
3. once the executor container has started, follow its log [1] into `Log` events, and
   its stages into `Step` events;
4. on every change (and once a second, for the pending timeouts) decide with
   `verdict.assess`: success with the digest from the container's termination message,
   or a classified `BuildError` with the log's tail;
5. on cancellation, delete the Job in the foreground (its pod goes first) and watch until
   it is gone (bounded by `cancel_wait_s`), then re-raise `CancelledError`.

Kubernetes errors are mapped to domain errors once, in `build` (`as_build_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final, TypeAlias

from producer.contract import Log
from worker.backends.base import BuildJob, Built, ProgressSink
from worker.backends.capabilities import ensure_capable
from worker.backends.kaniko.manifest import CONTAINER, build_job_manifest
from worker.backends.kaniko.stages import KanikoStages
from worker.backends.kaniko.verdict import assess, container_started, pending_reason, pod_ended
from worker.backends.kubeattempt import (
    clean_up_after_cancel,
    create_or_adopt,
    delete_and_wait,
    reap_orphans,
)
from worker.backends.kubenames import attempt_name
from worker.backends.outcome import to_result
from worker.backends.podlogs import LogPosition, drain, follow_log
from worker.errors import BuildError, TemporaryBuildError
from worker.kube.api import KubeApi, LazyKubeApi
from worker.kube.errors import KubeError, KubeNotFound, as_build_error
from worker.kube.objects import JOBS, PODS, Applied, Deleted, Job, Listed, Pod, WatchEvent
from worker.kube.watch import list_watch, merge, ticks
from worker.settings import DEFAULT_LOG_TAIL_LINES, KanikoSettings

_TICK_S: Final = 1.0


class _Tick:
    """Time passed (pending timeouts are judged on ticks, not only on events)."""


_TICK: Final = _Tick()
_Event: TypeAlias = WatchEvent[Job] | WatchEvent[Pod] | _Tick


class KanikoBackend:
    """Builds each attempt as a Kaniko Job (see the module docstring)."""

    name = "kaniko"

    def __init__(
        self,
        settings: KanikoSettings | None = None,
        *,
        api: KubeApi | None = None,
        tail_lines: int = DEFAULT_LOG_TAIL_LINES,
    ) -> None:
        """`api`: a client to use (and close in `aclose`) instead of one from `settings`;
        `tail_lines`: how many last log lines a failure carries."""
        self.settings = settings or KanikoSettings()
        self.tail_lines = tail_lines
        self._api = LazyKubeApi(
            kubeconfig=self.settings.kubeconfig,
            context=self.settings.context,
            max_connections=self.settings.max_connections,
            api=api,
        )

    @property
    def api_calls(self) -> int:
        """Requests sent to the API server so far (a watch or log stream counts once)."""
        return self._api.calls

    async def reap_orphans(self, live_build_ids: set[str]) -> list[str]:
        """Delete this backend's Jobs whose build is not live; the names of those deleted."""
        try:
            api = await self._api.get()
            return await reap_orphans(api, JOBS, self.settings.namespace, live_build_ids)
        except KubeError as exc:
            raise as_build_error(exc) from exc

    async def aclose(self) -> None:
        await self._api.aclose()

    async def build(self, job: BuildJob, progress: ProgressSink) -> Built:
        ensure_capable(job.request, "kaniko")
        namespace = job.placement or self.settings.namespace
        manifest = build_job_manifest(job, self.settings, namespace)
        name = attempt_name(job.request.id, job.attempt)
        try:
            api = await self._api.get()
            try:
                created, adopted = await create_or_adopt(
                    api,
                    JOBS,
                    namespace,
                    manifest,
                    name=name,
                    build_id=job.request.id,
                    wait_s=self.settings.cancel_wait_s,
                )
                attempt = _Attempt(
                    api, self.settings, namespace=namespace, name=name, job=job, progress=progress
                )
                return await attempt.follow(created, adopted, self.tail_lines)
            except asyncio.CancelledError:
                # The Pod goes first (foreground); the Job is watched until it is gone.
                deleted = delete_and_wait(
                    api, JOBS, namespace, name, wait_s=self.settings.cancel_wait_s
                )
                await clean_up_after_cancel(deleted, f"deleting Job {namespace}/{name}")
                raise
        except KubeError as exc:
            raise as_build_error(exc) from exc


class _Attempt:
    """Follows one attempt's Job and Pod to an outcome."""

    def __init__(
        self,
        api: KubeApi,
        settings: KanikoSettings,
        *,
        namespace: str,
        name: str,
        job: BuildJob,
        progress: ProgressSink,
    ) -> None:
        self.api = api
        self.settings = settings
        self.namespace = namespace
        self.name = name
        self.build = job
        self.progress = progress
        self.job: Job | None = None
        self.job_deleted = False
        self.pods: dict[str, Pod] = {}
        self.pods_known = False
        self._pending: tuple[str, str] | None = None
        self._pending_since = 0.0
        self.stages = KanikoStages(job.request.id, job.attempt)
        self.position = LogPosition()
        self.tail: deque[str] = deque()
        self.log_task: asyncio.Task[None] | None = None

    def _events(self, since: str, adopted: bool) -> AsyncGenerator[_Event, None]:
        timeout_s = self.settings.watch_timeout_s
        jobs = list_watch(
            self.api,
            JOBS,
            self.namespace,
            since=since,
            field_selector=f"metadata.name={self.name}",
            timeout_s=timeout_s,
        )
        pods = list_watch(
            self.api,
            PODS,
            self.namespace,
            since=None if adopted else "0",  # a new Job has no pod yet: no list needed
            label_selector=f"job-name={self.name}",
            timeout_s=timeout_s,
        )
        streams: list[AsyncIterator[_Event]] = [jobs, pods, ticks(_TICK_S, _TICK)]
        return merge(*streams)

    async def follow(self, created: Job, adopted: bool, tail_lines: int) -> Built:
        self.job = created
        self.pods_known = not adopted
        self.tail = deque(maxlen=tail_lines)
        events = self._events(created.metadata.resource_version, adopted)
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    self._apply(event)
                    if self.job_deleted:
                        raise TemporaryBuildError(
                            f"Job {self.namespace}/{self.name} was deleted while the build ran",
                            error_class="job_lost",
                        )
                    if not self.pods_known:
                        continue
                    result = await self._assess()
                    if result is not None:
                        return result
            raise AssertionError("the watches of a build never end")  # pragma: no cover
        finally:
            if self.log_task is not None:
                self.log_task.cancel()
                await asyncio.gather(self.log_task, return_exceptions=True)

    def _apply(self, event: _Event) -> None:
        match event:
            case Listed(resource, items) if resource is JOBS:
                self.job = next((j for j in items if isinstance(j, Job)), None)
                self.job_deleted = self.job is None
            case Listed(_, items):
                self.pods = {p.metadata.name: p for p in items if isinstance(p, Pod)}
                self.pods_known = True
            case Applied(Job() as job):
                self.job = job
            case Deleted(Job()):
                self.job, self.job_deleted = None, True
            case Applied(Pod() as pod) | Deleted(Pod() as pod):
                # a deleted pod's last state still tells what happened
                self.pods[pod.metadata.name] = pod
            case _Tick():
                pass

    def latest_pod(self) -> Pod | None:
        """The newest pod of the Job (there is one unless a pod was replaced)."""
        if not self.pods:
            return None
        return max(self.pods.values(), key=lambda p: p.metadata.creation_timestamp)

    def _pending_for(self, pod: Pod | None) -> float:
        """How long `pod` has been stuck for its current pending reason."""
        now = asyncio.get_running_loop().time()
        reason = pending_reason(pod) if pod is not None else None
        key = (pod.metadata.name, reason) if pod is not None and reason else None
        if key != self._pending:
            self._pending, self._pending_since = key, now
        return now - self._pending_since if key else 0.0

    async def _assess(self) -> Built | None:
        settings = self.settings
        pod = self.latest_pod()
        if pod is not None and self.log_task is None and container_started(pod):
            self.log_task = asyncio.create_task(self._follow_log(pod.metadata.name))
        outcome = assess(
            self.job,
            pod,
            pending_for=self._pending_for(pod),
            unschedulable_timeout_s=settings.unschedulable_timeout_s,
            image_pull_timeout_s=settings.image_pull_timeout_s,
        )
        if outcome is None:
            return None
        if self.log_task is not None:
            await drain(self.log_task, self.position, settings.log_drain_s, settings.log_idle_s)
        for step in self.stages.finish(time.time(), None if outcome.ok else outcome.message):
            await self.progress(step)
        if outcome.delete_job:
            with contextlib.suppress(KubeNotFound):
                await self.api.delete(JOBS, self.namespace, self.name, propagation="Background")
        result = to_result(outcome, tuple(self.tail))
        if isinstance(result, BuildError):
            raise result
        return result

    async def _follow_log(self, pod: str) -> None:
        request = self.build.request

        async def on_line(text: str) -> None:
            self.tail.append(text)
            for step in self.stages.on_line(text, time.time()):
                await self.progress(step)
            await self.progress(Log(build_id=request.id, attempt=self.build.attempt, text=text))

        await follow_log(
            self.api,
            self.namespace,
            pod,
            CONTAINER,
            position=self.position,
            on_line=on_line,
            pod_ended=lambda: pod_ended(self.pods.get(pod)),
        )
