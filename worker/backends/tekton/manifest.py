"""The `tekton.dev/v1` TaskRun of one build attempt.

The TaskRun passes the build as params (CONTEXT, DOCKERFILE, GIT_PULL_METHOD, IMAGES,
BUILD_ARGS, EXECUTOR_ARGS; see `taskrun`) to an inline taskSpec whose one step runs the
Kaniko executor (or to the Task `task_ref` names), and reads the digest from the result
IMAGE_DIGEST. Every
value from the request reaches the step through a param, never spliced into the step's
own text, so Tekton's `$(...)` substitution cannot touch it.

Invariants, as for the Kaniko Job: the step is unprivileged (root in its container, every
capability dropped but the executor's few, no privilege escalation), no ServiceAccount
token is mounted, Tekton never retries (`retries` unset: retries are the fleet's), the
TaskRun's `timeout` is the attempt's deadline, and it is labelled with build id and
attempt. Pure: no I/O.
"""

from __future__ import annotations

from producer.contract import BuildRequest
from worker.backends.base import BuildJob
from worker.backends.kaniko.manifest import (
    deadline_seconds,
    docker_config_volume,
    executor_call,
    resources,
    security_context,
)
from worker.backends.kubenames import attempt_annotations, attempt_labels, attempt_name
from worker.backends.tekton.taskrun import (
    PARAM_BUILD_ARGS,
    PARAM_CONTEXT,
    PARAM_DOCKERFILE,
    PARAM_EXECUTOR_ARGS,
    PARAM_GIT_PULL_METHOD,
    PARAM_IMAGES,
    RESULT_DIGEST,
    STEP,
)
from worker.kube.objects import JSONValue, Manifest
from worker.settings import KanikoSettings, TektonSettings


def _strings(values: list[str] | tuple[str, ...]) -> list[JSONValue]:
    return list(values)


def task_spec(kaniko: KanikoSettings, request: BuildRequest) -> Manifest:
    """The inline Task: declares the params and the result, runs the executor in one step,
    with the one registry Secret that covers `request`'s images (as for a Kaniko Job)."""
    step: Manifest = {
        "name": STEP,
        "image": kaniko.executor_image,
        "imagePullPolicy": "IfNotPresent",
        "args": [
            f"--context=$(params.{PARAM_CONTEXT})",
            f"--dockerfile=$(params.{PARAM_DOCKERFILE})",
            f"$(params.{PARAM_EXECUTOR_ARGS}[*])",
            f"--digest-file=$(results.{RESULT_DIGEST}.path)",
        ],
        "env": [{"name": "GIT_PULL_METHOD", "value": f"$(params.{PARAM_GIT_PULL_METHOD})"}],
        "computeResources": resources(kaniko),
        "securityContext": security_context(kaniko),
    }
    spec: Manifest = {
        "description": "Build with the Kaniko executor (buildfleet)",
        "params": [
            {"name": PARAM_CONTEXT, "type": "string"},
            {"name": PARAM_DOCKERFILE, "type": "string"},
            {"name": PARAM_GIT_PULL_METHOD, "type": "string"},
            {"name": PARAM_IMAGES, "type": "array"},
            {"name": PARAM_BUILD_ARGS, "type": "array"},
            {"name": PARAM_EXECUTOR_ARGS, "type": "array"},
        ],
        "results": [{"name": RESULT_DIGEST, "type": "string", "description": "the image's digest"}],
        "steps": [step],
    }
    if docker_config := docker_config_volume(request, kaniko):
        volume, mount = docker_config
        step["volumeMounts"] = [mount]
        spec["volumes"] = [volume]
    return spec


def pod_template(settings: TektonSettings) -> Manifest:
    template: Manifest = {"automountServiceAccountToken": False, "enableServiceLinks": False}
    if settings.node_selector:
        template["nodeSelector"] = dict[str, JSONValue](settings.node_selector)
    if settings.tolerations:
        template["tolerations"] = [dict(t) for t in settings.tolerations]
    return template


def build_taskrun_manifest(
    job: BuildJob, settings: TektonSettings, kaniko: KanikoSettings, namespace: str
) -> Manifest:
    """The TaskRun for one attempt, as the API server takes it."""
    request = job.request
    call = executor_call(request, kaniko)
    params: list[JSONValue] = [
        {"name": PARAM_CONTEXT, "value": call.context},
        {"name": PARAM_DOCKERFILE, "value": call.dockerfile},
        {"name": PARAM_GIT_PULL_METHOD, "value": call.pull_method},
        {"name": PARAM_IMAGES, "value": _strings(request.images)},
        {
            "name": PARAM_BUILD_ARGS,
            "value": _strings([f"{k}={v}" for k, v in sorted(request.build_args.items())]),
        },
        {"name": PARAM_EXECUTOR_ARGS, "value": _strings(call.flags)},
    ]
    spec: Manifest = {
        "params": params,
        "timeout": f"{deadline_seconds(job)}s",
        "podTemplate": pod_template(settings),
    }
    if settings.task_ref:
        spec["taskRef"] = {"name": settings.task_ref, "kind": "Task"}
    else:
        spec["taskSpec"] = task_spec(kaniko, request)
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    labels = {**settings.labels, **attempt_labels(request.id, job.attempt)}
    annotations = {**settings.annotations, **attempt_annotations(request.id, job.traceparent)}
    return {
        "apiVersion": "tekton.dev/v1",
        "kind": "TaskRun",
        "metadata": {
            "name": attempt_name(request.id, job.attempt),
            "namespace": namespace,
            "labels": dict[str, JSONValue](labels),
            "annotations": dict[str, JSONValue](annotations),
        },
        "spec": spec,
    }
