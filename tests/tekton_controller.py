"""A stand-in for Tekton Pipelines' controller (a FAKE: Tekton's own cannot run here, see
issue 13), reconciling TaskRuns against the real API server of tests/kube.py the way Tekton
does, so that the tekton backend is tested against real watches, status patches and pods:

- a new TaskRun gets its pod `<name>-pod` (one container `step-<name>` per step of its
  taskSpec, one `step-build` for a taskRef), labelled `tekton.dev/taskRun` and with the
  TaskRun's own labels and annotations (so kwok's Stages choose the pod's outcome), owned
  by the TaskRun; then `status.podName`, `startTime`, and `Succeeded` Unknown;
- the pod's container states are mirrored into `status.steps` (Running while it runs);
- the pod Succeeded: `Succeeded` True and the result IMAGE_DIGEST from the step's
  termination message; Failed: `Succeeded` False, reason Failed, `"step-x" exited with
  code N`;
- past `spec.timeout`: the pod is deleted, `Succeeded` False, reason TaskRunTimeout;
- `spec.status: TaskRunCancelled`: the pod is deleted, `Succeeded` False, reason
  TaskRunCancelled.

In a test:   `async with running_controller(api, namespace): ...`
Standalone:  `python tests/tekton_controller.py KUBECONFIG NAMESPACE` (benchmarks; prints
             "ready" once it follows the namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from worker.backends.tekton.taskrun import CANCELLED, RESULT_DIGEST  # noqa: E402
from worker.kube.api import KubeApi  # noqa: E402
from worker.kube.errors import KubeConflict, KubeNotFound  # noqa: E402
from worker.kube.objects import (  # noqa: E402
    PODS,
    Applied,
    Condition,
    Deleted,
    JSONValue,
    Listed,
    Manifest,
    Object,
    Pod,
    Resource,
    View,
)
from worker.kube.watch import list_watch, merge, ticks  # noqa: E402

TASKRUN_LABEL = "tekton.dev/taskRun"


class _StepSpec(View, frozen=True):
    name: str = ""
    image: str = ""


class _TaskSpec(View, frozen=True):
    steps: tuple[_StepSpec, ...] = ()


class _Spec(View, frozen=True):
    status: str = ""
    timeout: str = ""
    task_spec: _TaskSpec | None = None


class _Status(View, frozen=True):
    conditions: tuple[Condition, ...] = ()


class ControlledTaskRun(Object, frozen=True):
    """What the controller reads of a TaskRun."""

    spec: _Spec = _Spec()
    status: _Status = _Status()

    def finished(self) -> bool:
        return any(c.type == "Succeeded" and c.status != "Unknown" for c in self.status.conditions)


TASKRUNS = Resource("tekton.dev", "v1", "taskruns", ControlledTaskRun)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owned_by(pod: Pod, uid: str) -> bool:
    return any(owner.uid == uid for owner in pod.metadata.owner_references)


def _seconds(duration: str) -> float:
    """A Go duration as the backend writes it ("90s"); other forms mean no timeout here."""
    return float(duration[:-1]) if duration.endswith("s") and duration[:-1].isdigit() else 1e9


class TektonController:
    """Reconciles the TaskRuns of one namespace (see the module docstring)."""

    def __init__(self, api: KubeApi, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.taskruns: dict[str, ControlledTaskRun] = {}
        self.pods: dict[str, Pod] = {}
        self.started: dict[str, float] = {}
        self.ended: set[str] = set()
        self._patched: dict[str, str] = {}
        self.ready = asyncio.Event()
        """Set once the controller has listed the TaskRuns and pods it follows."""

    async def run(self) -> None:
        runs = list_watch(self.api, TASKRUNS, self.namespace)
        pods = list_watch(self.api, PODS, self.namespace, label_selector=TASKRUN_LABEL)
        streams: list[AsyncIterator[object]] = [runs, pods, ticks(0.2, None)]
        listed = 0
        async for event in merge(*streams):
            match event:
                case Listed(_, items):
                    for item in items:
                        self._remember(item)
                    listed += 1
                    if listed >= 2:
                        self.ready.set()
                case Applied(obj):
                    self._remember(obj)
                case Deleted(ControlledTaskRun() as gone):
                    self.taskruns.pop(gone.metadata.name, None)
                case Deleted(Pod() as gone):
                    self.pods.pop(gone.metadata.name, None)
            for name in list(self.taskruns):
                await self._reconcile(name)

    def _remember(self, obj: object) -> None:
        match obj:
            case ControlledTaskRun():
                self.taskruns[obj.metadata.name] = obj
            case Pod():
                self.pods[obj.metadata.name] = obj

    async def _reconcile(self, name: str) -> None:
        run = self.taskruns[name]
        uid = run.metadata.uid  # a TaskRun deleted and made again keeps its name, not its uid
        if uid in self.ended or run.finished():
            return
        pod_name = f"{name}-pod"
        if run.spec.status == CANCELLED:
            message = f'TaskRun "{name}" was cancelled. cancelled by buildfleet'
            await self._end(run, pod_name, "False", CANCELLED, message)
            return
        if uid not in self.started:
            if not await self._create_pod(run, pod_name):
                return  # the pod of a TaskRun of the same name is still going: next time
            self.started[uid] = time.monotonic()
            fields: Manifest = {"podName": pod_name, "startTime": _now()}
            await self._patch(run, fields, "Unknown", "Pending")
            return
        if time.monotonic() - self.started[uid] > _seconds(run.spec.timeout):
            message = f'TaskRun "{name}" failed to finish within "{run.spec.timeout}"'
            await self._end(run, pod_name, "False", "TaskRunTimeout", message)
            return
        pod = self.pods.get(pod_name)
        if pod is None or not _owned_by(pod, uid):
            return
        await self._mirror(run, pod)

    async def _mirror(self, run: ControlledTaskRun, pod: Pod) -> None:
        steps: list[JSONValue] = []
        failed = ""
        digest = ""
        for status in pod.status.container_statuses:
            step: Manifest = {"name": status.name.removeprefix("step-"), "container": status.name}
            state = status.state
            if state.terminated is not None:
                ended = state.terminated
                step["terminated"] = {
                    "exitCode": ended.exit_code,
                    "reason": ended.reason,
                    "message": ended.message,
                }
                if ended.exit_code and not failed:
                    failed = f'"{status.name}" exited with code {ended.exit_code}'
                digest = digest or ended.message
            elif state.running is not None:
                step["running"] = {"startedAt": state.running.started_at or _now()}
            elif state.waiting is not None:
                step["waiting"] = {"reason": state.waiting.reason}
            steps.append(step)
        fields: Manifest = {"podName": pod.metadata.name, "steps": steps}
        match pod.status.phase:
            case "Succeeded":
                fields["results"] = [{"name": RESULT_DIGEST, "type": "string", "value": digest}]
                fields["completionTime"] = _now()
                self.ended.add(run.metadata.uid)
                await self._patch(run, fields, "True", "Succeeded", "All Steps have completed")
            case "Failed":
                fields["completionTime"] = _now()
                self.ended.add(run.metadata.uid)
                message = failed or pod.status.message or "the pod failed"
                await self._patch(run, fields, "False", "Failed", message)
            case "Running":
                await self._patch(run, fields, "Unknown", "Running")
            case _:
                await self._patch(run, fields, "Unknown", "Pending")

    async def _create_pod(self, run: ControlledTaskRun, pod_name: str) -> bool:
        steps = run.spec.task_spec.steps if run.spec.task_spec else ()
        containers: list[JSONValue] = [
            {"name": f"step-{step.name}", "image": step.image or "registry.invalid/step"}
            for step in steps or (_StepSpec(name="build"),)
        ]
        meta = run.metadata
        pod: Manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "labels": {**meta.labels, TASKRUN_LABEL: meta.name},
                "annotations": dict[str, JSONValue](meta.annotations),
                "ownerReferences": [
                    {
                        "apiVersion": "tekton.dev/v1",
                        "kind": "TaskRun",
                        "name": meta.name,
                        "uid": meta.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "containers": containers,
            },
        }
        try:
            await self.api.create(PODS, self.namespace, pod)
        except KubeConflict:
            return False
        return True

    async def _end(
        self, run: ControlledTaskRun, pod_name: str, status: str, reason: str, message: str
    ) -> None:
        self.ended.add(run.metadata.uid)
        with contextlib.suppress(KubeNotFound):
            await self.api.delete(PODS, self.namespace, pod_name)
        await self._patch(run, {"completionTime": _now()}, status, reason, message)

    async def _patch(
        self, run: ControlledTaskRun, fields: Manifest, status: str, reason: str, message: str = ""
    ) -> None:
        uid, name = run.metadata.uid, run.metadata.name
        key = repr((fields.get("steps"), fields.get("results"), status, reason, message))
        if self._patched.get(uid) == key:
            return
        self._patched[uid] = key
        condition: Manifest = {
            "type": "Succeeded",
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": _now(),
        }
        body: Manifest = {"status": {**fields, "conditions": [condition]}}
        with contextlib.suppress(KubeNotFound):
            await self.api.patch(TASKRUNS, self.namespace, name, body, subresource="status")


@asynccontextmanager
async def running_controller(api: KubeApi, namespace: str) -> AsyncIterator[TektonController]:
    """The controller reconciling `namespace` while the block runs."""
    controller = TektonController(api, namespace)
    task = asyncio.create_task(controller.run())
    try:
        yield controller
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _main(kubeconfig: str, namespace: str) -> None:
    api = await KubeApi.connect(kubeconfig=kubeconfig)
    try:
        controller = TektonController(api, namespace)
        task = asyncio.create_task(controller.run())
        await controller.ready.wait()
        print("ready", flush=True)
        await task
    finally:
        await api.aclose()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(sys.argv[1], sys.argv[2]))
