"""The `tekton.dev/v1` TaskRun as the tekton backend reads it, and the names it shares with
the Task it runs (params, result, step).

Only the fields read are declared (see `worker.kube.objects`): the cancel request in the
spec; the `Succeeded` condition, the pod, the steps' container states and the results in
the status. Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

from worker.kube.objects import (
    Condition,
    ContainerStateRunning,
    ContainerStateTerminated,
    ContainerStateWaiting,
    Object,
    Resource,
    View,
)

# The interface between a TaskRun and its Task (inline, or a configured `task_ref`).
PARAM_CONTEXT: Final = "CONTEXT"
"""string: the Kaniko build context (`git://HOST/PATH#REF#COMMIT`)."""
PARAM_DOCKERFILE: Final = "DOCKERFILE"
"""string: the Dockerfile, relative to the context."""
PARAM_IMAGES: Final = "IMAGES"
"""array: the image names to push."""
PARAM_BUILD_ARGS: Final = "BUILD_ARGS"
"""array: KEY=VALUE build arguments."""
PARAM_GIT_PULL_METHOD: Final = "GIT_PULL_METHOD"
"""string: http or https, how the executor fetches the git context."""
PARAM_EXECUTOR_ARGS: Final = "EXECUTOR_ARGS"
"""array: every executor flag but --context, --dockerfile and --digest-file (IMAGES and
BUILD_ARGS among them as --destination and --build-arg: the executor image has no shell
to turn an array into flags)."""
RESULT_DIGEST: Final = "IMAGE_DIGEST"
"""The pushed image's digest (the name Tekton Chains reads)."""
STEP: Final = "build"
"""The inline Task's one step (its container is `step-build`)."""
CANCELLED: Final = "TaskRunCancelled"
"""`spec.status` that asks Tekton to cancel, and the reason of the condition it sets."""


class TaskRunSpec(View, frozen=True):
    status: str = ""
    timeout: str = ""


class StepState(View, frozen=True):
    """A step's container state, as Tekton copies it from the pod."""

    name: str = ""
    container: str = ""
    waiting: ContainerStateWaiting | None = None
    running: ContainerStateRunning | None = None
    terminated: ContainerStateTerminated | None = None


class TaskRunResult(View, frozen=True):
    name: str = ""
    value: str | list[str] | dict[str, str] = ""


class TaskRunStatus(View, frozen=True):
    conditions: tuple[Condition, ...] = ()
    pod_name: str = ""
    steps: tuple[StepState, ...] = ()
    results: tuple[TaskRunResult, ...] = ()


class TaskRun(Object, frozen=True):
    spec: TaskRunSpec = TaskRunSpec()
    status: TaskRunStatus = TaskRunStatus()

    def succeeded(self) -> Condition | None:
        """The `Succeeded` condition (status True, False, or Unknown while running)."""
        return next((c for c in self.status.conditions if c.type == "Succeeded"), None)

    def finished(self) -> bool:
        condition = self.succeeded()
        return condition is not None and condition.status in ("True", "False")

    def result(self, name: str) -> str | None:
        for result in self.status.results:
            if result.name == name and isinstance(result.value, str):
                return result.value
        return None


TASKRUNS: Resource[TaskRun] = Resource("tekton.dev", "v1", "taskruns", TaskRun)
