"""The `tekton` backend: each build attempt is one `tekton.dev/v1` TaskRun.

Lifecycle of one attempt (API requests in brackets: 3 for a one-step build):
1. create the TaskRun [1] (`manifest.build_taskrun_manifest`), named from build id +
   attempt; one of that name left by a worker that died is adopted [+1 get], never
   created twice (one cancelled before its attempt was re-queued is replaced);
2. watch it from the version its create returned [1] (resuming after drops, re-listing
   after 410 Gone): Tekton reports its pod and each step's container state there;
3. follow each step's log in the TaskRun's pod once the step runs [1 per step], into `Log`
   events, and the steps into `Step` events;
4. once the `Succeeded` condition is True or False, decide with `verdict.assess`: the
   digest from the IMAGE_DIGEST result, or a classified `BuildError` with the log's tail;
5. on cancellation, set `spec.status: TaskRunCancelled` (Tekton stops the pod and keeps
   the TaskRun for its history) and watch until Tekton reports it finished (bounded by
   `cancel_wait_s`), then re-raise `CancelledError`.

The orphan sweep cancels the unfinished TaskRuns of builds that are no longer live;
finished ones stay for the Tekton Dashboard and Chains (Tekton's own pruning removes
them). Kubernetes errors are mapped to domain errors once, in `build`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from producer.contract import Log
from worker.backends.base import BuildJob, Built, ProgressSink
from worker.backends.capabilities import ensure_capable
from worker.backends.kubeattempt import clean_up_after_cancel, create_or_adopt, wait_until
from worker.backends.kubenames import ANNOTATION_BUILD_ID, MANAGED_SELECTOR, attempt_name
from worker.backends.outcome import to_result
from worker.backends.podlogs import LogPosition, drain, follow_log
from worker.backends.tekton.manifest import build_taskrun_manifest
from worker.backends.tekton.taskrun import CANCELLED, TASKRUNS, StepState, TaskRun
from worker.backends.tekton.verdict import StepTracker, assess
from worker.errors import BuildError, TemporaryBuildError
from worker.kube.api import KubeApi, LazyKubeApi
from worker.kube.errors import KubeError, KubeNotFound, as_build_error
from worker.kube.objects import Applied, Deleted, Listed, Manifest
from worker.kube.watch import list_watch
from worker.settings import DEFAULT_LOG_TAIL_LINES, KanikoSettings, TektonSettings

_CANCEL: Manifest = {"spec": {"status": CANCELLED, "statusMessage": "cancelled by buildfleet"}}


def _cancel_requested(taskrun: TaskRun) -> bool:
    return taskrun.spec.status == CANCELLED


class TektonBackend:
    """Builds each attempt as a Tekton TaskRun (see the module docstring)."""

    name = "tekton"

    def __init__(
        self,
        settings: TektonSettings | None = None,
        kaniko: KanikoSettings | None = None,
        *,
        api: KubeApi | None = None,
        tail_lines: int = DEFAULT_LOG_TAIL_LINES,
    ) -> None:
        """`kaniko`: the executor's settings (`[kaniko]`); `api`: a client to use (and close
        in `aclose`) instead of one from `settings`; `tail_lines`: how many last log lines
        a failure carries."""
        self.settings = settings or TektonSettings()
        self.kaniko = kaniko or KanikoSettings()
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

    async def aclose(self) -> None:
        await self._api.aclose()

    async def reap_orphans(self, live_build_ids: set[str]) -> list[str]:
        """Cancel the unfinished TaskRuns whose build is not live; the names cancelled."""
        namespace = self.settings.namespace
        try:
            api = await self._api.get()
            items, _ = await api.list(TASKRUNS, namespace, label_selector=MANAGED_SELECTOR)
            cancelled = []
            for taskrun in items:
                build_id = taskrun.metadata.annotations.get(ANNOTATION_BUILD_ID)
                if (
                    build_id is None
                    or build_id in live_build_ids
                    or taskrun.finished()
                    or _cancel_requested(taskrun)
                ):
                    continue
                with contextlib.suppress(KubeNotFound):
                    await api.patch(TASKRUNS, namespace, taskrun.metadata.name, _CANCEL)
                    cancelled.append(taskrun.metadata.name)
            return cancelled
        except KubeError as exc:
            raise as_build_error(exc) from exc

    async def build(self, job: BuildJob, progress: ProgressSink) -> Built:
        ensure_capable(job.request, "tekton")
        namespace = job.placement or self.settings.namespace
        manifest = build_taskrun_manifest(job, self.settings, self.kaniko, namespace)
        name = attempt_name(job.request.id, job.attempt)
        try:
            api = await self._api.get()
            try:
                taskrun, _adopted = await create_or_adopt(
                    api,
                    TASKRUNS,
                    namespace,
                    manifest,
                    name=name,
                    build_id=job.request.id,
                    wait_s=self.settings.cancel_wait_s,
                    replace=_cancel_requested,
                )
                run = _Run(api, self.settings, job=job, progress=progress)
                return await run.follow(taskrun, self.tail_lines)
            except asyncio.CancelledError:
                cancelled = _cancel(api, namespace, name, wait_s=self.settings.cancel_wait_s)
                await clean_up_after_cancel(cancelled, f"cancelling TaskRun {namespace}/{name}")
                raise
        except KubeError as exc:
            raise as_build_error(exc) from exc


async def _cancel(api: KubeApi, namespace: str, name: str, *, wait_s: float) -> bool:
    """Ask Tekton to cancel the TaskRun; whether it says it has within `wait_s`."""
    try:
        taskrun = await api.patch(TASKRUNS, namespace, name, _CANCEL)
    except KubeNotFound:
        return True
    return taskrun.finished() or await wait_until(
        api,
        TASKRUNS,
        namespace,
        name,
        resource_version=taskrun.metadata.resource_version,
        done=lambda tr: tr is None or tr.finished(),
        timeout_s=wait_s,
    )


class _Run:
    """Follows one attempt's TaskRun to an outcome."""

    def __init__(
        self, api: KubeApi, settings: TektonSettings, *, job: BuildJob, progress: ProgressSink
    ) -> None:
        self.api = api
        self.settings = settings
        self.build = job
        self.progress = progress
        self.taskrun = TaskRun()
        self.steps = StepTracker(job.request.id, job.attempt)
        self.tail: deque[str] = deque()
        self.logs: dict[str, tuple[asyncio.Task[None], LogPosition]] = {}

    async def follow(self, taskrun: TaskRun, tail_lines: int) -> Built:
        self.taskrun = taskrun
        self.tail = deque(maxlen=tail_lines)
        meta = taskrun.metadata
        events = list_watch(
            self.api,
            TASKRUNS,
            meta.namespace,
            since=meta.resource_version,
            field_selector=f"metadata.name={meta.name}",
            timeout_s=self.settings.watch_timeout_s,
        )
        try:
            result = await self._on_change()  # an adopted TaskRun may have finished
            if result is not None:
                return result
            async with contextlib.aclosing(events):
                async for event in events:
                    match event:
                        case Applied(changed):
                            self.taskrun = changed
                        case Listed(_, (current, *_)):
                            self.taskrun = current
                        case Deleted() | Listed():
                            raise TemporaryBuildError(
                                f"TaskRun {meta.namespace}/{meta.name} was deleted while the "
                                "build ran",
                                error_class="taskrun_lost",
                            )
                    result = await self._on_change()
                    if result is not None:
                        return result
            raise AssertionError("the watch of a build never ends")  # pragma: no cover
        finally:
            tasks = [task for task, _ in self.logs.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_change(self) -> Built | None:
        taskrun = self.taskrun
        for step in self.steps.update(taskrun, time.time()):
            await self.progress(step)
        for state in taskrun.status.steps:
            if taskrun.status.pod_name and (state.running or state.terminated):
                self._follow_log(taskrun.status.pod_name, state)
        outcome = assess(taskrun)
        if outcome is None:
            return None
        settings = self.settings
        for task, position in self.logs.values():
            await drain(task, position, settings.log_drain_s, settings.log_idle_s)
        for step in self.steps.finish(time.time(), None if outcome.ok else outcome.message):
            await self.progress(step)
        result = to_result(outcome, tuple(self.tail))
        if isinstance(result, BuildError):
            raise result
        return result

    def _follow_log(self, pod: str, state: StepState) -> None:
        container = state.container or f"step-{state.name}"
        if container in self.logs:
            return
        request = self.build.request

        async def on_line(text: str) -> None:
            self.tail.append(text)
            await self.progress(Log(build_id=request.id, attempt=self.build.attempt, text=text))

        position = LogPosition()

        def finished() -> bool:
            return self.taskrun.finished()

        task = asyncio.create_task(
            follow_log(
                self.api,
                self.taskrun.metadata.namespace,
                pod,
                container,
                position=position,
                on_line=on_line,
                pod_ended=finished,
            )
        )
        self.logs[container] = (task, position)
