"""The batch/v1 Job of one Kaniko build attempt, and the executor's arguments.

Invariants of every Job built here: it mounts at most one registry Secret, one whose
prefix covers every image it pushes (`registry_secret`), since every RUN step can read
it; unprivileged (no privilege escalation, every
capability dropped but the few the executor needs as root in its container), no
ServiceAccount token mounted, never retried by Kubernetes (`backoffLimit: 0`: retries are
the fleet's), bounded by the attempt's deadline (`activeDeadlineSeconds` from
`BuildJob.timeout_s`), and labelled with the build id and attempt. The digest comes back
through `--digest-file=/dev/termination-log` as the container's termination message.

Pure: no I/O; the API server's acceptance of the result is tested against a real one.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass
from typing import Final

from producer.contract import BuildRequest, GitSource, LocalSource
from worker.backends.base import BuildJob
from worker.backends.kubenames import attempt_annotations, attempt_labels, attempt_name
from worker.errors import PermanentBuildError
from worker.kube.objects import JSONValue, Manifest
from worker.settings import KanikoSettings

CONTAINER: Final = "kaniko"
TERMINATION_LOG: Final = "/dev/termination-log"


def kaniko_git_context(source: GitSource) -> tuple[str, str]:
    """Kaniko's `git://HOST/PATH#REF#COMMIT` context and its GIT_PULL_METHOD (http|https).

    `ref` "HEAD" clones the default branch; "refs/..." is used as given; any other name is
    a branch (`refs/heads/NAME`; tags are passed as `refs/tags/NAME`).
    """
    match = re.match(r"^(https?)://(.+)$", source.url)
    if not match:
        raise PermanentBuildError(
            f"kaniko clones git over http(s) only, not {source.url!r}",
            error_class="invalid_request",
        )
    method, rest = match.groups()
    if "@" in rest.split("/", 1)[0]:
        raise PermanentBuildError(
            "credentials in the git URL would be visible in the Job spec; "
            "give the executor GIT_USERNAME/GIT_TOKEN through a Secret instead",
            error_class="invalid_request",
        )
    if source.ref == "HEAD":
        ref = ""
    elif source.ref.startswith("refs/"):
        ref = source.ref
    else:
        ref = f"refs/heads/{source.ref}"
    context = f"git://{rest}"
    if source.commit:
        context += f"#{ref}#{source.commit}"
    elif ref:
        context += f"#{ref}"
    return context, method


@dataclass(frozen=True, slots=True)
class ExecutorCall:
    """What the Kaniko executor is asked to build, in the parts a Job passes as one
    argument list and a Tekton TaskRun passes as params."""

    context: str
    """The executor's `--context` (`git://HOST/PATH#REF#COMMIT`)."""
    dockerfile: str
    """The executor's `--dockerfile`, relative to the context."""
    pull_method: str
    """GIT_PULL_METHOD for the executor's environment: http or https."""
    flags: list[str]
    """Every other flag but `--digest-file`."""


def executor_call(request: BuildRequest, settings: KanikoSettings) -> ExecutorCall:
    """How the executor builds `request` (refusing what it cannot build)."""
    match request.source:
        case LocalSource():
            raise PermanentBuildError(
                "kaniko cannot build a local directory", error_class="invalid_request"
            )
        case GitSource() as git:
            context, method = kaniko_git_context(git)
    if len(request.platforms) > 1:
        raise PermanentBuildError(
            f"kaniko builds one platform per Job, got {len(request.platforms)}",
            error_class="invalid_request",
        )
    sub = posixpath.normpath(request.context)
    dockerfile = posixpath.normpath(request.dockerfile)
    flags = []
    if sub != ".":
        # request.dockerfile is relative to the source root; kaniko resolves it in the
        # context directory.
        dockerfile = posixpath.relpath(dockerfile, sub)
        flags.append(f"--context-sub-path={sub}")
    if request.push:
        flags.extend(f"--destination={image}" for image in request.images)
    else:
        flags.append("--no-push")
    flags.extend(f"--build-arg={k}={v}" for k, v in sorted(request.build_args.items()))
    if request.target:
        flags.append(f"--target={request.target}")
    if request.platforms:
        flags.append(f"--custom-platform={request.platforms[0]}")
    cache_repo = request.cache.export_ref or settings.cache_repo
    if cache_repo and not request.cache.disabled:
        flags.extend(["--cache=true", f"--cache-repo={cache_repo}"])
    flags.extend(
        [
            f"--push-retry={settings.push_retry}",
            f"--snapshot-mode={settings.snapshot_mode}",
            *settings.extra_args,
        ]
    )
    return ExecutorCall(context, dockerfile, method, flags)


def executor_args(request: BuildRequest, settings: KanikoSettings) -> tuple[list[str], str]:
    """The executor's arguments in a Job, and the GIT_PULL_METHOD, for `request`."""
    call = executor_call(request, settings)
    args = [
        f"--context={call.context}",
        f"--dockerfile={call.dockerfile}",
        *call.flags,
        f"--digest-file={TERMINATION_LOG}",
    ]
    return args, call.pull_method


def resources(settings: KanikoSettings) -> Manifest:
    """The executor container's resource requests and limits."""
    requests: Manifest = {
        k: v for k, v in (("cpu", settings.cpu_request), ("memory", settings.memory_request)) if v
    }
    limits: Manifest = {
        k: v for k, v in (("cpu", settings.cpu_limit), ("memory", settings.memory_limit)) if v
    }
    out: Manifest = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def security_context(settings: KanikoSettings) -> Manifest:
    """Root in its container (the executor unpacks images), but nothing more."""
    return {
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "runAsUser": 0,
        "capabilities": {"drop": ["ALL"], "add": list(settings.capabilities)},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pushed_references(request: BuildRequest, settings: KanikoSettings) -> list[str]:
    """What the executor writes to: the images (when it pushes) and its cache repository."""
    pushed = list(request.images) if request.push else []
    cache_repo = request.cache.export_ref or settings.cache_repo
    if cache_repo and not request.cache.disabled:
        pushed.append(cache_repo)
    return pushed


def registry_secret(request: BuildRequest, settings: KanikoSettings) -> str | None:
    """The one Secret the build's pod may read: the shared `registry_secret`, or the
    `registry_secrets` entry with the longest prefix covering every reference the build
    writes (none when it writes nothing). A permanent error when no prefix covers them."""
    if not settings.registry_secrets:
        return settings.registry_secret
    pushed = pushed_references(request, settings)
    if not pushed:
        return None
    covering = [
        entry for entry in settings.registry_secrets if all(entry.covers(ref) for ref in pushed)
    ]
    if not covering:
        raise PermanentBuildError(
            f"no [[kaniko.registry_secrets]] prefix covers every reference this build pushes "
            f"({', '.join(pushed)}): a build's pod gets the credential of its own images only; "
            f"push to one prefix, or configure a Secret for it",
            error_class="credentials",
        )
    return max(covering, key=lambda entry: len(entry.name)).secret_name


def docker_config_volume(
    request: BuildRequest, settings: KanikoSettings
) -> tuple[Manifest, Manifest] | None:
    """The build's registry Secret (`registry_secret`) as /kaniko/.docker/config.json:
    (volume, volumeMount); None when it gets none."""
    secret_name = registry_secret(request, settings)
    if secret_name is None:
        return None
    volume: Manifest = {
        "name": "docker-config",
        "secret": {
            "secretName": secret_name,
            "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
        },
    }
    mount: Manifest = {"name": "docker-config", "mountPath": "/kaniko/.docker", "readOnly": True}
    return volume, mount


def deadline_seconds(job: BuildJob) -> int:
    """The attempt's deadline in whole seconds (rounded up, at least 1)."""
    return max(1, math.ceil(job.timeout_s))


def build_job_manifest(job: BuildJob, settings: KanikoSettings, namespace: str) -> Manifest:
    """The batch/v1 Job for one attempt, as the API server takes it."""
    request = job.request
    args, pull_method = executor_args(request, settings)
    labels = attempt_labels(request.id, job.attempt)
    annotations = attempt_annotations(request.id, job.traceparent)
    container: Manifest = {
        "name": CONTAINER,
        "image": settings.executor_image,
        "imagePullPolicy": "IfNotPresent",
        "args": list[JSONValue](args),
        "env": [{"name": "GIT_PULL_METHOD", "value": pull_method}],
        "resources": resources(settings),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "securityContext": security_context(settings),
    }
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict[str, JSONValue](settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in settings.tolerations]
    if docker_config := docker_config_volume(request, settings):
        volume, mount = docker_config
        container["volumeMounts"] = [mount]
        pod_spec["volumes"] = [volume]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": attempt_name(request.id, job.attempt),
            "namespace": namespace,
            "labels": dict[str, JSONValue](labels),
            "annotations": dict[str, JSONValue](annotations),
        },
        "spec": {
            "backoffLimit": 0,
            "completions": 1,
            "parallelism": 1,
            "activeDeadlineSeconds": deadline_seconds(job),
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {
                "metadata": {
                    "labels": {**settings.pod_labels, **labels},
                    "annotations": {**settings.pod_annotations, **annotations},
                },
                "spec": pod_spec,
            },
        },
    }
