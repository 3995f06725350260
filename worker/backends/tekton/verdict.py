"""What a TaskRun came to (`assess`), read from its `Succeeded` condition, and its steps
as `Step` events (`StepTracker`).

| Succeeded | reason                                       | outcome                         |
|-----------|----------------------------------------------|---------------------------------|
| Unknown   | any (Started, Running, Pending, ...)         | still running                   |
| True      | any                                          | success; digest: IMAGE_DIGEST   |
| False     | TaskRunTimeout                               | permanent `timeout`             |
| False     | TaskRunCancelled (by someone else)           | permanent `cancelled`           |
| False     | TaskRunImagePullFailed                       | temporary `image_pull` *        |
| False     | ExceededResourceQuota, ExceededNodeResources | temporary `unschedulable` *     |
| False     | CouldntGetTask, TaskRunResolutionFailed      | temporary `task_not_found` *    |
| False     | *ValidationFailed, InvalidParamValue, ...    | permanent `invalid_task`        |
| False     | Failed, a step exited non-zero               | permanent `run_failed` / `oom`  |
| False     | Failed without a failed step, anything else  | temporary `taskrun_failed` *    |

(* the namespace is at fault: the next attempt goes elsewhere when there is elsewhere)

Pure: no I/O, no clock (the caller gives the time).
"""

from __future__ import annotations

from typing import Final

import msgspec

from producer.contract import Step
from worker.backends.outcome import Outcome, parse_digest
from worker.backends.tekton.taskrun import CANCELLED, RESULT_DIGEST, StepState, TaskRun

_UNSCHEDULABLE: Final = frozenset({"ExceededResourceQuota", "ExceededNodeResources"})
_TASK_NOT_FOUND: Final = frozenset({"CouldntGetTask", "TaskRunResolutionFailed"})
_INVALID: Final = frozenset(
    {
        "TaskRunValidationFailed",
        "TaskValidationFailed",
        "InvalidParamValue",
        "ResourceVerificationFailed",
        "TaskRunResultLargerThanAllowedLimit",
    }
)


def _failed_step(taskrun: TaskRun) -> StepState | None:
    return next(
        (s for s in taskrun.status.steps if s.terminated and s.terminated.exit_code != 0), None
    )


def _step_failure(taskrun: TaskRun, why: str) -> Outcome:
    step = _failed_step(taskrun)
    if step is None or step.terminated is None:
        return Outcome.temporary_(
            "taskrun_failed", f"the TaskRun failed: {why}", daemon_at_fault=True
        )
    if step.terminated.reason == "OOMKilled":
        return Outcome.permanent(
            "oom",
            f"step {step.name} was OOMKilled: it needed more than its memory limit",
            attach_log=True,
        )
    return Outcome.permanent(
        "run_failed",
        f"step {step.name} exited with code {step.terminated.exit_code}",
        attach_log=True,
    )


def assess(taskrun: TaskRun) -> Outcome | None:
    """The attempt's outcome, or None while the TaskRun runs (see the table above)."""
    condition = taskrun.succeeded()
    if condition is None or condition.status not in ("True", "False"):
        return None
    if condition.status == "True":
        return Outcome.success(parse_digest(taskrun.result(RESULT_DIGEST)))
    reason, why = condition.reason, f"{condition.reason}: {condition.message}"
    if reason == "TaskRunTimeout":
        return Outcome.permanent(
            "timeout",
            f"the build exceeded its deadline of {taskrun.spec.timeout or 'unknown'}",
            attach_log=True,
        )
    if reason == CANCELLED:
        return Outcome.permanent("cancelled", f"the TaskRun was cancelled ({why})")
    if reason == "TaskRunImagePullFailed":
        return Outcome.temporary_("image_pull", why, daemon_at_fault=True)
    if reason in _UNSCHEDULABLE:
        return Outcome.temporary_("unschedulable", why, daemon_at_fault=True)
    if reason in _TASK_NOT_FOUND:
        return Outcome.temporary_("task_not_found", why, daemon_at_fault=True)
    if reason in _INVALID:
        return Outcome.permanent("invalid_task", why)
    return _step_failure(taskrun, why)


class StepTracker:
    """The TaskRun's steps as `Step` events: started when Tekton reports a step running,
    completed (with an error for a non-zero exit) when it reports it terminated."""

    def __init__(self, build_id: str, attempt: int) -> None:
        self.build_id = build_id
        self.attempt = attempt
        self._open: dict[str, Step] = {}
        self._done: set[str] = set()

    def _started(self, name: str, now: float) -> Step:
        return Step(
            build_id=self.build_id,
            attempt=self.attempt,
            vertex=f"step-{name}",
            name=f"step {name}",
            started=now,
        )

    def update(self, taskrun: TaskRun, now: float) -> list[Step]:
        """The Steps that started or ended since the last update."""
        events: list[Step] = []
        for state in taskrun.status.steps:
            if state.name in self._done:
                continue
            if (state.running or state.terminated) and state.name not in self._open:
                self._open[state.name] = self._started(state.name, now)
                events.append(self._open[state.name])
            if state.terminated:
                code = state.terminated.exit_code
                error = f"exit code {code}" if code else None
                events.append(self._close(state.name, now, error))
        return events

    def _close(self, name: str, now: float, error: str | None) -> Step:
        self._done.add(name)
        return msgspec.structs.replace(self._open.pop(name), completed=now, error=error)

    def finish(self, now: float, error: str | None) -> list[Step]:
        """Every step still open, completed (with `error` when the build failed)."""
        return [self._close(name, now, error) for name in list(self._open)]
