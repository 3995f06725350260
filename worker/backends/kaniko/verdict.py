"""What a Kaniko attempt came to, read from its Job and its Pod (`assess`), and the
`Built` or `BuildError` that says so (`to_result`).

| seen                                              | outcome                             |
|---------------------------------------------------|-------------------------------------|
| Job DeadlineExceeded                              | permanent `timeout`                 |
| pod's node lost (taint manager, pod GC, NodeLost) | temporary `node_lost` (elsewhere)   |
| pod evicted, preempted, killed by the kubelet     | temporary `evicted` (elsewhere)     |
| container exit 0 (or pod Succeeded)               | success; digest: termination message|
| container OOMKilled                               | permanent `oom`, names memory limit |
| container exit code N                             | permanent `run_failed`, last line   |
| pod Failed without a container status             | temporary `pod_failed`              |
| pod unschedulable for `unschedulable_timeout_s`   | temporary `unschedulable`, Job gone |
| executor not started for `image_pull_timeout_s`   | temporary `image_pull`/`pod_config` |
| Job Complete, pod gone (or never seen)            | success without a digest            |
| Job Complete, pod not ended yet                   | wait: the pod's status is coming    |
| Job Failed, no outcome from a pod                 | temporary `node_lost`/`pod_failed`  |

Pure: no I/O, no clock (the caller says how long a pod has been pending).
"""

from __future__ import annotations

import math
from typing import Final, Literal

from worker.backends.kaniko.manifest import CONTAINER
from worker.backends.outcome import Outcome, parse_digest
from worker.kube.objects import ContainerStateTerminated, Job, Pod

_IMAGE_PULL_REASONS: Final = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "RegistryUnavailable",
    }
)
_CONFIG_REASONS: Final = frozenset({"CreateContainerConfigError", "CreateContainerError"})
_EVICTION_REASONS: Final = frozenset(
    {"TerminationByKubelet", "EvictionByEvictionAPI", "PreemptionByScheduler"}
)
_NODE_LOST_REASONS: Final = frozenset({"DeletionByTaintManager", "DeletionByPodGC"})
POD_ENDED: Final = frozenset({"Succeeded", "Failed"})

PendingReason = Literal["unschedulable", "image_pull", "pod_config"]


def _terminated(pod: Pod) -> ContainerStateTerminated | None:
    status = pod.container_status(CONTAINER)
    return status.state.terminated if status else None


def container_started(pod: Pod) -> bool:
    """The executor container is running or has run: its logs can be read."""
    status = pod.container_status(CONTAINER)
    return status is not None and (
        status.state.running is not None or status.state.terminated is not None
    )


def pod_ended(pod: Pod | None) -> bool:
    return pod is not None and pod.status.phase in POD_ENDED


def pending_reason(pod: Pod) -> PendingReason | None:
    """Why a pod is stuck before its container runs, if it is."""
    status = pod.container_status(CONTAINER)
    waiting = status.state.waiting if status else None
    if waiting is not None and waiting.reason in _IMAGE_PULL_REASONS:
        return "image_pull"
    if waiting is not None and waiting.reason in _CONFIG_REASONS:
        return "pod_config"
    scheduled = pod.condition("PodScheduled")
    if scheduled and scheduled.status == "False" and scheduled.reason == "Unschedulable":
        return "unschedulable"
    return None


def pod_outcome(pod: Pod) -> Outcome | None:
    """What a pod's own status says, if it says the attempt is over."""
    status = pod.status
    disruption = pod.condition("DisruptionTarget")
    if disruption and disruption.status != "True":
        disruption = None
    if disruption and disruption.reason in _NODE_LOST_REASONS:
        detail = f": {disruption.message}" if disruption.message else ""
        return Outcome.temporary_(
            "node_lost",
            f"the build pod's node was lost ({disruption.reason}{detail})",
            daemon_at_fault=True,
        )
    if status.reason == "NodeLost":
        return Outcome.temporary_(
            "node_lost", "the build pod's node was lost", daemon_at_fault=True
        )
    if status.phase not in POD_ENDED:
        return None
    if status.reason == "Evicted" or (disruption and disruption.reason in _EVICTION_REASONS):
        why = status.message or (disruption.message if disruption else "") or "evicted"
        return Outcome.temporary_(
            "evicted", f"the build pod was evicted: {why}", daemon_at_fault=True
        )
    terminated = _terminated(pod)
    if status.phase == "Succeeded" or (terminated and terminated.exit_code == 0):
        return Outcome.success(parse_digest(terminated.message if terminated else None))
    if pod.metadata.deletion_timestamp:
        return None  # killed by the Job controller (deadline): the Job says why
    if not terminated:
        return Outcome.temporary_(
            "pod_failed",
            f"the build pod failed without a container status ({status.reason}: {status.message})",
        )
    if terminated.reason == "OOMKilled":
        container = pod.container(CONTAINER)
        limit = container.resources.limits.get("memory") if container else None
        return Outcome.permanent(
            "oom",
            f"the Kaniko executor was OOMKilled: it needed more than its memory limit of {limit}"
            if limit
            else "the Kaniko executor was OOMKilled (no memory limit set)",
            attach_log=True,
        )
    return Outcome.permanent(
        "run_failed",
        f"the Kaniko executor exited with code {terminated.exit_code}"
        + (f" ({terminated.reason})" if terminated.reason else ""),
        attach_log=True,
    )


def _stuck(
    pod: Pod, pending_for: float, unschedulable_s: float, image_pull_s: float
) -> Outcome | None:
    reason = pending_reason(pod)
    if reason == "unschedulable" and pending_for >= unschedulable_s:
        scheduled = pod.condition("PodScheduled")
        return Outcome.temporary_(
            "unschedulable",
            f"the build pod stayed unschedulable for {pending_for:.0f}s: "
            f"{scheduled.message if scheduled else ''}",
            daemon_at_fault=True,
            delete_job=True,
        )
    if reason in ("image_pull", "pod_config") and pending_for >= image_pull_s:
        status = pod.container_status(CONTAINER)
        waiting = status.state.waiting if status else None
        return Outcome.temporary_(
            "image_pull" if reason == "image_pull" else "pod_config",
            f"the build pod could not start the executor for {pending_for:.0f}s: "
            f"{waiting.reason if waiting else ''}: {waiting.message if waiting else ''}",
            daemon_at_fault=True,
            delete_job=True,
        )
    return None


def assess(
    job: Job | None,
    pod: Pod | None,
    *,
    pending_for: float = 0.0,
    unschedulable_timeout_s: float = math.inf,
    image_pull_timeout_s: float = math.inf,
) -> Outcome | None:
    """The attempt's outcome from the Job and its (latest) Pod, or None while it runs.

    `pending_for` is how long the pod has been stuck for its current `pending_reason`.
    """
    for kind in ("Failed", "FailureTarget"):
        cond = job.condition(kind) if job else None
        if cond and cond.reason == "DeadlineExceeded":
            deadline = job.spec.active_deadline_seconds if job else None
            return Outcome.permanent(
                "timeout", f"the build exceeded its deadline of {deadline}s", attach_log=True
            )
    if pod is not None:
        outcome = pod_outcome(pod) or _stuck(
            pod, pending_for, unschedulable_timeout_s, image_pull_timeout_s
        )
        if outcome is not None:
            return outcome
    if job is None:
        return None
    if job.condition("Complete") or job.condition("SuccessCriteriaMet"):
        # The pod's own status carries the digest; its event may come after the Job's.
        return None if pod is not None and not pod_ended(pod) else Outcome.success(None)
    for kind in ("Failed", "FailureTarget"):
        cond = job.condition(kind)
        if cond:
            return Outcome.temporary_(
                "node_lost" if pod is None else "pod_failed",
                f"the Job failed ({cond.reason}: {cond.message}) without an outcome from its pod",
                daemon_at_fault=True,
            )
    return None
