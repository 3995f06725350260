"""The `kaniko` backend: each build attempt is one batch/v1 Job running the Kaniko executor.

Lifecycle of one attempt:
1. get-or-create the Job, named deterministically from build id + attempt
   (`job_name`): a 409 Conflict means a worker that died left it, and it is *adopted*
   (watched), never created twice;
2. list+watch the Job and its Pod (resuming from the last resourceVersion after a dropped
   connection, re-listing after 410 Gone), streaming the executor's log lines into `Log`
   events as soon as the container has started;
3. decide from the Job's conditions and the Pod's status (`assess`, a pure function):
   success with the digest from the container's termination message
   (`--digest-file=/dev/termination-log`), or a classified `BuildError`;
4. on cancellation, delete the Job with foreground propagation (its Pod goes first), wait
   until it is gone (bounded by `cancel_wait_s`), then re-raise `CancelledError`.

Pure pieces (`job_name`, `build_job_manifest`, `executor_args`, `assess`, `to_result`)
take and return plain JSON-shaped dicts, so unit tests call them without a cluster. Every
HTTP error is mapped to a domain error in one place: `api_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import aiohttp
import msgspec
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from producer.contract import BuildRequest, GitSource, LocalSource, Log, Step
from worker.backends.base import BuildJob, Built, ProgressSink
from worker.errors import BuildError, PermanentBuildError, TemporaryBuildError
from worker.settings import KanikoSettings

JSON = dict[str, Any]
log = logging.getLogger(__name__)

CONTAINER: Final = "kaniko"
LABEL_BUILD_ID: Final = "buildfleet.io/build-id"
LABEL_ATTEMPT: Final = "buildfleet.io/attempt"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "buildfleet"
ANNOTATION_BUILD_ID: Final = "buildfleet.io/build-id"
"""The full build id (a label value is capped at 63 characters, a build id at 128)."""

_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")
_LABEL_VALUE_RE: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
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


# --- names and labels -------------------------------------------------------------------


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def job_name(build_id: str, attempt: int) -> str:
    """`bf-<slug>-<hash>-<attempt>`: deterministic, a DNS label, at most 63 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", build_id.lower()).strip("-")[:40].strip("-") or "build"
    return f"bf-{slug}-{_short_hash(build_id)}-{attempt}"


def label_value(value: str) -> str:
    """`value` itself when it is a valid label value, else a truncated form with a hash."""
    if _LABEL_VALUE_RE.match(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:50].strip("._-") or "x"
    return f"{cleaned}-{_short_hash(value, 12)}"


def job_labels(build_id: str, attempt: int) -> dict[str, str]:
    return {
        LABEL_BUILD_ID: label_value(build_id),
        LABEL_ATTEMPT: str(attempt),
        LABEL_MANAGED_BY: MANAGED_BY,
    }


# --- the Job spec (pure) ----------------------------------------------------------------


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


def executor_args(request: BuildRequest, settings: KanikoSettings) -> tuple[list[str], str]:
    """The executor's arguments and the GIT_PULL_METHOD for `request`."""
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
    if sub != ".":
        # request.dockerfile is relative to the source root; kaniko resolves it in the
        # context directory.
        dockerfile = posixpath.relpath(dockerfile, sub)
    args = [f"--context={context}", f"--dockerfile={dockerfile}"]
    if sub != ".":
        args.append(f"--context-sub-path={sub}")
    if request.push:
        args.extend(f"--destination={image}" for image in request.images)
    else:
        args.append("--no-push")
    args.extend(f"--build-arg={k}={v}" for k, v in sorted(request.build_args.items()))
    if request.target:
        args.append(f"--target={request.target}")
    if request.platforms:
        args.append(f"--custom-platform={request.platforms[0]}")
    cache_repo = request.cache.export_ref or settings.cache_repo
    if cache_repo and not request.cache.disabled:
        args.extend(["--cache=true", f"--cache-repo={cache_repo}"])
    args.extend(
        [
            "--digest-file=/dev/termination-log",
            f"--push-retry={settings.push_retry}",
            f"--snapshot-mode={settings.snapshot_mode}",
            *settings.extra_args,
        ]
    )
    return args, method


def _resources(settings: KanikoSettings) -> JSON:
    requests = {
        k: v for k, v in (("cpu", settings.cpu_request), ("memory", settings.memory_request)) if v
    }
    limits = {
        k: v for k, v in (("cpu", settings.cpu_limit), ("memory", settings.memory_limit)) if v
    }
    resources: JSON = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def build_job_manifest(job: BuildJob, settings: KanikoSettings, namespace: str) -> JSON:
    """The batch/v1 Job for one attempt, as the API server takes it (JSON-shaped)."""
    request = job.request
    args, pull_method = executor_args(request, settings)
    name = job_name(request.id, job.attempt)
    labels = job_labels(request.id, job.attempt)
    annotations = {ANNOTATION_BUILD_ID: request.id}
    if job.traceparent:
        annotations["buildfleet.io/traceparent"] = job.traceparent
    timeout = request.timeout_s or settings.default_timeout_s
    container: JSON = {
        "name": CONTAINER,
        "image": settings.executor_image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": [{"name": "GIT_PULL_METHOD", "value": pull_method}],
        "resources": _resources(settings),
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "securityContext": {
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "runAsUser": 0,
            "capabilities": {"drop": ["ALL"], "add": list(settings.capabilities)},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod_spec: JSON = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.registry_secret:
        container["volumeMounts"] = [
            {"name": "docker-config", "mountPath": "/kaniko/.docker", "readOnly": True}
        ]
        pod_spec["volumes"] = [
            {
                "name": "docker-config",
                "secret": {
                    "secretName": settings.registry_secret,
                    "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
                },
            }
        ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "backoffLimit": 0,
            "completions": 1,
            "parallelism": 1,
            "activeDeadlineSeconds": max(1, math.ceil(timeout)),
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


# --- classification (pure) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to, before the log tail is attached."""

    ok: bool
    digest: str | None = None
    error_class: str = ""
    message: str = ""
    temporary: bool = False
    daemon_at_fault: bool = False
    delete_job: bool = False
    """The Job is still alive (stuck pending): delete it before reporting."""
    attach_log: bool = False

    @classmethod
    def success(cls, digest: str | None) -> Outcome:
        return cls(ok=True, digest=digest)

    @classmethod
    def permanent(cls, error_class: str, message: str, *, attach_log: bool = False) -> Outcome:
        return cls(ok=False, error_class=error_class, message=message, attach_log=attach_log)

    @classmethod
    def temporary_(
        cls,
        error_class: str,
        message: str,
        *,
        daemon_at_fault: bool = False,
        delete_job: bool = False,
    ) -> Outcome:
        return cls(
            ok=False,
            error_class=error_class,
            message=message,
            temporary=True,
            daemon_at_fault=daemon_at_fault,
            delete_job=delete_job,
        )


def _conditions(obj: JSON | None) -> dict[str, JSON]:
    if not obj:
        return {}
    return {
        c["type"]: c
        for c in (obj.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


def _container_status(pod: JSON) -> JSON | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return cast(JSON, status)
    return None


def _memory_limit(pod: JSON) -> str | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == CONTAINER:
            limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
            return str(limit) if limit else None
    return None


def parse_digest(message: str | None) -> str | None:
    match = _DIGEST_RE.search(message or "")
    return match.group(0) if match else None


def container_started(pod: JSON) -> bool:
    """The executor container is running or has run: its logs can be read."""
    status = _container_status(pod)
    state = (status or {}).get("state") or {}
    return "running" in state or "terminated" in state


def pending_reason(pod: JSON) -> Literal["unschedulable", "image_pull", "pod_config"] | None:
    """Why a pod is stuck before its container runs, if it is."""
    status = _container_status(pod)
    waiting = ((status or {}).get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in _IMAGE_PULL_REASONS:
        return "image_pull"
    if waiting.get("reason") in _CONFIG_REASONS:
        return "pod_config"
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return "unschedulable"
    return None


def pod_outcome(pod: JSON) -> Outcome | None:
    """What a pod's own status says, if it says the attempt is over."""
    status = pod.get("status") or {}
    disruption = _conditions(pod).get("DisruptionTarget")
    if disruption and disruption.get("reason") in _NODE_LOST_REASONS:
        return Outcome.temporary_(
            "node_lost",
            f"the build pod's node was lost ({disruption.get('reason')}: "
            f"{disruption.get('message', '')})".rstrip(": )")
            + ")",
            daemon_at_fault=True,
        )
    if status.get("reason") == "NodeLost":
        return Outcome.temporary_(
            "node_lost", "the build pod's node was lost", daemon_at_fault=True
        )
    phase = status.get("phase")
    if phase not in ("Succeeded", "Failed"):
        return None
    if status.get("reason") == "Evicted" or (
        disruption and disruption.get("reason") in _EVICTION_REASONS
    ):
        why = status.get("message") or (disruption or {}).get("message") or "evicted"
        return Outcome.temporary_(
            "evicted", f"the build pod was evicted: {why}", daemon_at_fault=True
        )
    terminated = ((_container_status(pod) or {}).get("state") or {}).get("terminated")
    if phase == "Succeeded" or (terminated and terminated.get("exitCode") == 0):
        return Outcome.success(parse_digest((terminated or {}).get("message")))
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None  # killed by the Job controller (deadline): the Job says why
    if not terminated:
        return Outcome.temporary_(
            "pod_failed",
            f"the build pod failed without a container status "
            f"({status.get('reason', '')}: {status.get('message', '')})",
        )
    exit_code = terminated.get("exitCode")
    if terminated.get("reason") == "OOMKilled":
        limit = _memory_limit(pod)
        return Outcome.permanent(
            "oom",
            f"the Kaniko executor was OOMKilled: it needed more than its memory limit of {limit}"
            if limit
            else "the Kaniko executor was OOMKilled (no memory limit set)",
            attach_log=True,
        )
    return Outcome.permanent(
        "run_failed",
        f"the Kaniko executor exited with code {exit_code}"
        + (f" ({terminated['reason']})" if terminated.get("reason") else ""),
        attach_log=True,
    )


def assess(
    job: JSON | None,
    pod: JSON | None,
    *,
    pending_for: float = 0.0,
    unschedulable_timeout_s: float = math.inf,
    image_pull_timeout_s: float = math.inf,
) -> Outcome | None:
    """The attempt's outcome from the Job and its (latest) Pod, or None while it runs.

    `pending_for` is how long the pod has been stuck for its current `pending_reason`.
    """
    conditions = _conditions(job)
    for kind in ("Failed", "FailureTarget"):
        cond = conditions.get(kind)
        if cond and cond.get("reason") == "DeadlineExceeded":
            deadline = ((job or {}).get("spec") or {}).get("activeDeadlineSeconds")
            return Outcome.permanent(
                "timeout", f"the build exceeded its deadline of {deadline}s", attach_log=True
            )
    if pod is not None:
        outcome = pod_outcome(pod)
        if outcome is not None:
            return outcome
        reason = pending_reason(pod)
        if reason == "unschedulable" and pending_for >= unschedulable_timeout_s:
            cond = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
            return Outcome.temporary_(
                "unschedulable",
                f"the build pod stayed unschedulable for {pending_for:.0f}s: "
                f"{cond.get('message', '')}",
                daemon_at_fault=True,
                delete_job=True,
            )
        if reason in ("image_pull", "pod_config") and pending_for >= image_pull_timeout_s:
            waiting = (_container_status(pod) or {})["state"]["waiting"]
            return Outcome.temporary_(
                "image_pull" if reason == "image_pull" else "pod_config",
                f"the build pod could not start the executor for {pending_for:.0f}s: "
                f"{waiting.get('reason')}: {waiting.get('message', '')}",
                daemon_at_fault=True,
                delete_job=True,
            )
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        return Outcome.success(None)
    for kind in ("Failed", "FailureTarget"):
        cond = conditions.get(kind)
        if cond:
            return Outcome.temporary_(
                "node_lost" if pod is None else "pod_failed",
                f"the Job failed ({cond.get('reason')}: {cond.get('message', '')}) "
                "without an outcome from its pod",
                daemon_at_fault=True,
            )
    return None


def to_result(outcome: Outcome, log_tail: tuple[str, ...] = ()) -> Built | BuildError:
    """The `Built` or the `BuildError` to raise for `outcome`."""
    if outcome.ok:
        return Built(digest=outcome.digest)
    message = outcome.message
    tail = log_tail if outcome.attach_log else ()
    last = next((line for line in reversed(tail) if line.strip()), None)
    if last and outcome.error_class == "run_failed":
        message = f"{message}: {last.strip()}"
    if outcome.temporary:
        return TemporaryBuildError(
            message,
            error_class=outcome.error_class,
            daemon_at_fault=outcome.daemon_at_fault,
            log_tail=tail,
        )
    return PermanentBuildError(message, error_class=outcome.error_class, log_tail=tail)


_STAGE_RE: Final = re.compile(r"Building stage '(?P<base>[^']*)' \[idx: '(?P<idx>\d+)'")


class KanikoStages:
    """Kaniko's build stages as `Step` events, read from its log lines (the caller gives
    the time, so this stays pure): a stage starts at its "Building stage" line and ends
    when the next one starts or the build ends."""

    def __init__(self, build_id: str, attempt: int) -> None:
        self.build_id = build_id
        self.attempt = attempt
        self._open: Step | None = None

    def on_line(self, text: str, now: float) -> list[Step]:
        match = _STAGE_RE.search(text)
        if match is None:
            return []
        closed = self.finish(now, None)
        self._open = Step(
            build_id=self.build_id,
            attempt=self.attempt,
            vertex=f"stage-{match['idx']}",
            name=f"stage {match['idx']} FROM {match['base']}",
            started=now,
        )
        return [*closed, self._open]

    def finish(self, now: float, error: str | None) -> list[Step]:
        if self._open is None:
            return []
        done = msgspec.structs.replace(self._open, completed=now, error=error)
        self._open = None
        return [done]


# --- HTTP -> domain errors, in one place ------------------------------------------------


def _retry_after(exc: ApiException) -> float | None:
    headers = getattr(exc, "headers", None) or {}
    try:
        return float(headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None


def api_error(exc: BaseException, what: str) -> BuildError:
    """Map an error from the Kubernetes API (or reaching it) to a domain error."""
    if isinstance(exc, ApiException):
        status = exc.status or 0
        detail = str(exc.reason or "")
        with contextlib.suppress(ValueError, TypeError):
            detail = json.loads(str(exc.body)).get("message", detail)
        text = f"kubernetes API: {what}: {status} {detail}".strip()
        if status in (400, 422):
            return PermanentBuildError(text, error_class="invalid_job")
        if status in (401, 403):
            return TemporaryBuildError(text, error_class="kube_forbidden", daemon_at_fault=True)
        if status == 404:
            return TemporaryBuildError(text, error_class="kube_not_found", daemon_at_fault=True)
        if status == 429:
            return TemporaryBuildError(text, error_class="kube_throttled", delay=_retry_after(exc))
        return TemporaryBuildError(text, error_class="kube_api", daemon_at_fault=status >= 500)
    if isinstance(exc, k8s_config.ConfigException):
        return TemporaryBuildError(
            f"kubernetes config: {exc}", error_class="kube_config", daemon_at_fault=True
        )
    return TemporaryBuildError(
        f"kubernetes API unreachable: {what}: {type(exc).__name__}: {exc}",
        error_class="kube_unreachable",
        daemon_at_fault=True,
    )


_TRANSPORT_ERRORS: Final = (aiohttp.ClientError, TimeoutError, ConnectionError, OSError)


async def _request(
    what: str, fn: Callable[..., Awaitable[Any]], *args: Any, stream: bool = False, **kwargs: Any
) -> Any:
    """One API request without kubernetes_asyncio's models: the parsed JSON body, or with
    `stream` the open aiohttp response (a watch, a log). A non-2xx status raises
    ApiException (kept for the caller to map: 404, 409 and 410 mean something there); a
    transport failure raises the mapped TemporaryBuildError."""
    try:
        resp = await fn(*args, _preload_content=False, **kwargs)
        if not 200 <= resp.status <= 299:
            body = await resp.read()
            resp.release()
            exc = ApiException(status=resp.status, reason=resp.reason)
            exc.body = body.decode("utf-8", "replace")
            exc.headers = resp.headers
            raise exc
        if stream:
            return resp
        try:
            return json.loads(await resp.read())
        finally:
            resp.release()
    except _TRANSPORT_ERRORS as exc:
        raise api_error(exc, what) from exc


def _is_gone(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 410


# --- the backend ------------------------------------------------------------------------


@dataclass
class _Observed:
    job: JSON | None = None
    job_seen: bool = False
    job_deleted: bool = False
    pods: dict[str, JSON] | None = None
    pending: tuple[str, str] | None = None
    pending_since: float = 0.0

    def apply(self, kind: str, event: str, payload: Any) -> None:
        if kind == "job":
            if event == "SYNC":
                items = cast(list[JSON], payload)
                self.job = items[0] if items else None
                self.job_deleted = not items  # it was created or adopted before the list
            elif event == "DELETED":
                self.job, self.job_deleted = None, True
            else:
                self.job = cast(JSON, payload)
            self.job_seen = self.job_seen or self.job is not None
        else:
            if self.pods is None:
                self.pods = {}
            if event == "SYNC":
                self.pods = {p["metadata"]["name"]: p for p in cast(list[JSON], payload)}
            elif event == "DELETED":
                # keep the last state: a deleted pod's last status still tells what happened
                self.pods[payload["metadata"]["name"]] = payload
            else:
                self.pods[payload["metadata"]["name"]] = payload

    def pending_for(self, pod: JSON | None) -> float:
        """How long `pod` has been stuck for its current `pending_reason`."""
        now = asyncio.get_running_loop().time()
        reason = pending_reason(pod) if pod is not None else None
        key = (pod["metadata"]["name"], reason) if pod is not None and reason else None
        if key != self.pending:
            self.pending, self.pending_since = key, now
        return now - self.pending_since if key else 0.0

    def pod(self) -> JSON | None:
        """The newest pod of the Job (there is one unless a pod was replaced)."""
        if not self.pods:
            return None
        return max(self.pods.values(), key=lambda p: p["metadata"].get("creationTimestamp") or "")


class KanikoBackend:
    """Builds each attempt as a Kaniko Job (see the module docstring)."""

    name = "kaniko"

    def __init__(
        self, settings: KanikoSettings | None = None, *, api_client: Any | None = None
    ) -> None:
        self.settings = settings or KanikoSettings()
        self._api: Any | None = api_client
        self._owns_api = api_client is None
        self._lock = asyncio.Lock()
        self.api_calls = 0
        """Requests sent to the API server (watches and log streams count once each)."""

    # -- client --

    async def _client(self) -> Any:
        if self._api is not None:
            return self._api
        async with self._lock:
            if self._api is None:
                self._api = await load_api_client(self.settings)
            return self._api

    async def reap_orphans(self, live_build_ids: set[str]) -> list[str]:
        """Delete this backend's Jobs whose build has ended or is gone (see reap_orphan_jobs)."""
        return await reap_orphan_jobs(await self._client(), self.settings.namespace, live_build_ids)

    async def aclose(self) -> None:
        if self._api is not None and self._owns_api:
            await self._api.close()
        self._api = None

    async def _call(
        self,
        what: str,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        stream: bool = False,
        **kwargs: Any,
    ) -> Any:
        self.api_calls += 1
        return await _request(what, fn, *args, stream=stream, **kwargs)

    # -- build --

    async def build(self, job: BuildJob, progress: ProgressSink) -> Built:
        namespace = job.placement or self.settings.namespace
        manifest = build_job_manifest(job, self.settings, namespace)
        name = manifest["metadata"]["name"]
        api = await self._client()
        batch = k8s.BatchV1Api(api)
        try:
            await self._get_or_create(batch, namespace, manifest)
            return await self._follow(api, namespace, name, job, progress)
        except asyncio.CancelledError:
            await self._delete_after_cancel(batch, namespace, name)
            raise

    async def _get_or_create(self, batch: Any, namespace: str, manifest: JSON) -> None:
        name = manifest["metadata"]["name"]
        build_id = manifest["metadata"]["annotations"][ANNOTATION_BUILD_ID]
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.cancel_wait_s
        while True:
            try:
                await self._call("create Job", batch.create_namespaced_job, namespace, manifest)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise api_error(exc, f"create Job {namespace}/{name}") from exc
            # Conflict: a Job for this build and attempt exists (its worker died): adopt it.
            existing = await self._read_job(batch, namespace, name)
            if existing is None:
                continue  # deleted in between: create it
            meta = existing.get("metadata") or {}
            owner = (meta.get("annotations") or {}).get(ANNOTATION_BUILD_ID)
            if owner != build_id:
                raise TemporaryBuildError(
                    f"Job {namespace}/{name} exists for another build ({owner!r})",
                    error_class="job_conflict",
                )
            if not meta.get("deletionTimestamp"):
                log.info("adopting Job %s/%s", namespace, name)
                return
            # Being deleted (a cancel): wait until it is gone, then create a fresh one.
            if loop.time() > give_up:
                raise TemporaryBuildError(
                    f"Job {namespace}/{name} is still being deleted",
                    error_class="job_conflict",
                )
            await asyncio.sleep(0.5)

    async def _read_job(self, batch: Any, namespace: str, name: str) -> JSON | None:
        try:
            return cast(
                JSON, await self._call("read Job", batch.read_namespaced_job, name, namespace)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(exc, f"read Job {namespace}/{name}") from exc

    async def _delete_job(self, batch: Any, namespace: str, name: str, propagation: str) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            await self._call("delete Job", batch.delete_namespaced_job, name, namespace, body=body)
        except ApiException as exc:
            if exc.status != 404:
                raise api_error(exc, f"delete Job {namespace}/{name}") from exc

    async def _delete_after_cancel(self, batch: Any, namespace: str, name: str) -> None:
        """Foreground delete (the Pod goes first), then wait until the Job is gone."""

        async def delete_and_wait() -> None:
            await self._delete_job(batch, namespace, name, "Foreground")
            while True:
                if await self._read_job(batch, namespace, name) is None:
                    return
                await asyncio.sleep(0.2)

        task = asyncio.ensure_future(delete_and_wait())
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.settings.cancel_wait_s)
        except (BuildError, TimeoutError) as exc:
            log.warning("cancel: deleting Job %s/%s: %s", namespace, name, exc)
        except asyncio.CancelledError:
            log.warning("cancel: deleting Job %s/%s goes on in the background", namespace, name)

    async def _follow(
        self, api: Any, namespace: str, name: str, job: BuildJob, progress: ProgressSink
    ) -> Built:
        settings = self.settings
        batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
        queue: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
        watchers = [
            asyncio.create_task(
                self._list_watch(
                    "job",
                    batch.list_namespaced_job,
                    namespace,
                    queue,
                    {"field_selector": f"metadata.name={name}"},
                )
            ),
            asyncio.create_task(
                self._list_watch(
                    "pod",
                    core.list_namespaced_pod,
                    namespace,
                    queue,
                    {"label_selector": f"job-name={name}"},
                )
            ),
        ]
        tail: deque[str] = deque(maxlen=settings.log_tail_lines)
        stages = KanikoStages(job.request.id, job.attempt)
        log_task: asyncio.Task[None] | None = None
        position = _LogPosition()
        state = _Observed()
        try:
            while True:
                await _next_events(queue, state, watchers)
                if state.job_deleted:
                    raise TemporaryBuildError(
                        f"Job {namespace}/{name} was deleted while the build ran",
                        error_class="job_lost",
                    )
                if state.pods is None or not state.job_seen:
                    continue  # both initial lists first
                pod = state.pod()
                if pod is not None and log_task is None and container_started(pod):
                    log_task = asyncio.create_task(
                        self._stream_logs(
                            core,
                            namespace,
                            pod["metadata"]["name"],
                            job=job,
                            progress=progress,
                            tail=tail,
                            state=state,
                            seen=position,
                            stages=stages,
                        )
                    )
                outcome = assess(
                    state.job,
                    pod,
                    pending_for=state.pending_for(pod),
                    unschedulable_timeout_s=settings.unschedulable_timeout_s,
                    image_pull_timeout_s=settings.image_pull_timeout_s,
                )
                if outcome is None:
                    continue
                if log_task is not None:
                    await _drain_logs(log_task, position, settings.log_drain_s, settings.log_idle_s)
                for step in stages.finish(time.time(), None if outcome.ok else outcome.message):
                    await progress(step)
                if outcome.delete_job:
                    await self._delete_job(batch, namespace, name, "Background")
                result = to_result(outcome, tuple(tail))
                if isinstance(result, BuildError):
                    raise result
                return result
        finally:
            tasks = [*watchers, *([log_task] if log_task else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _list_watch(
        self,
        kind: str,
        list_fn: Callable[..., Awaitable[Any]],
        namespace: str,
        queue: asyncio.Queue[tuple[str, str, Any]],
        selector: dict[str, str],
    ) -> None:
        """List, then watch from the list's resourceVersion, for ever: reconnect after a
        dropped connection or the server's timeout, re-list after 410 Gone."""
        cursor: list[str | None] = [None]  # the last resourceVersion seen
        backoff = 0.2
        what = f"watch {kind}s in {namespace} ({selector})"
        while True:
            try:
                if cursor[0] is None:
                    body = await self._call(
                        what, list_fn, namespace, **cast(dict[str, Any], selector)
                    )
                    cursor[0] = cast(str, body["metadata"]["resourceVersion"])
                    await queue.put((kind, "SYNC", body.get("items") or []))
                await self._watch_once(
                    kind, list_fn, namespace, queue, selector=selector, cursor=cursor
                )
                backoff = 0.2
                continue
            except ApiException as exc:
                if _is_gone(exc):
                    cursor[0] = None
                    continue
                if exc.status not in _RETRY_STATUSES:
                    raise api_error(exc, what) from exc
                reason: object = exc
            except TemporaryBuildError as exc:
                if exc.error_class != "kube_unreachable":
                    raise
                reason = exc
            except (*_TRANSPORT_ERRORS, ValueError) as exc:
                reason = exc
            log.info("%s: %s; reconnecting in %.1fs", what, reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _watch_once(
        self,
        kind: str,
        list_fn: Callable[..., Awaitable[Any]],
        namespace: str,
        queue: asyncio.Queue[tuple[str, str, Any]],
        *,
        selector: dict[str, str],
        cursor: list[str | None],
    ) -> None:
        """One watch request from `cursor[0]`, which follows every event (so that a
        dropped connection resumes where it was)."""
        resp = await self._call(
            f"watch {kind}s in {namespace}",
            list_fn,
            namespace,
            watch=True,
            resource_version=cursor[0],
            allow_watch_bookmarks=True,
            timeout_seconds=self.settings.watch_timeout_s,
            stream=True,
            _request_timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=30, sock_read=self.settings.watch_timeout_s + 30
            ),
            **cast(dict[str, Any], selector),
        )
        async with resp:
            async for raw in resp.content:
                if not raw.strip():
                    continue
                event = json.loads(raw)
                etype, obj = event.get("type"), event.get("object") or {}
                if etype == "ERROR":
                    raise ApiException(status=obj.get("code") or 500, reason=obj.get("message"))
                cursor[0] = (obj.get("metadata") or {}).get("resourceVersion") or cursor[0]
                if etype != "BOOKMARK":
                    await queue.put((kind, etype, obj))

    async def _stream_logs(
        self,
        core: Any,
        namespace: str,
        pod: str,
        *,
        job: BuildJob,
        progress: ProgressSink,
        tail: deque[str],
        state: _Observed,
        seen: _LogPosition,
        stages: KanikoStages,
    ) -> None:
        """Follow the executor's log into Log events; reconnect (skipping lines already
        sent, by timestamp) while the pod has not ended. Log trouble never fails a build."""
        for attempt in range(5):
            seen.new_stream()
            try:
                resp = await self._call(
                    "read pod log",
                    core.read_namespaced_pod_log,
                    pod,
                    namespace,
                    container=CONTAINER,
                    follow=True,
                    timestamps=True,
                    stream=True,
                    _request_timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
                )
                async with resp:
                    async for raw in resp.content:
                        text = seen.new_text(raw.decode("utf-8", "replace").rstrip("\r\n"))
                        if text is None:
                            continue
                        tail.append(text)
                        for step in stages.on_line(text, time.time()):
                            await progress(step)
                        await progress(Log(build_id=job.request.id, attempt=job.attempt, text=text))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # logs are best effort: the build's outcome is not
                log.info("logs of %s/%s (try %d): %s", namespace, pod, attempt + 1, exc)
            current = (state.pods or {}).get(pod) or {}
            if attempt >= 1 and (current.get("status") or {}).get("phase") in _POD_ENDED:
                return
            await asyncio.sleep(0.5 * (attempt + 1))


_RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
_POD_ENDED: Final = frozenset({"Succeeded", "Failed"})


@dataclass
class _LogPosition:
    """Where a log stream got to, so a reconnect sends no line twice (by timestamp, and by
    count among lines with the same timestamp)."""

    last_ts: str = ""
    at_last_ts: int = 0
    _replayed: int = 0
    last_activity: float = 0.0
    """Loop time of the last line read (or stream opened): how `_drain_logs` sees quiet."""

    def new_stream(self) -> None:
        self._replayed = 0
        self._touch()

    def _touch(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.last_activity = asyncio.get_running_loop().time()

    def new_text(self, line: str) -> str | None:
        self._touch()
        ts, _, text = line.partition(" ")
        if ts < self.last_ts:
            return None
        if ts == self.last_ts:
            self._replayed += 1
            if self._replayed <= self.at_last_ts:
                return None
            self.at_last_ts = self._replayed
            return text
        self.last_ts, self.at_last_ts, self._replayed = ts, 1, 1
        return text


async def _drain_logs(
    task: asyncio.Task[None], position: _LogPosition, limit_s: float, idle_s: float
) -> None:
    """Let the log stream deliver the executor's last lines once the outcome is known: until
    it ends, has been quiet for `idle_s`, or `limit_s` has passed (a kubelet ends the stream
    when the container exits; kwok's log server keeps it open)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit_s
    while not task.done():
        now = loop.time()
        if now >= give_up or now - position.last_activity >= idle_s:
            return
        await asyncio.wait({task}, timeout=min(0.05, give_up - now))


async def _next_events(
    queue: asyncio.Queue[tuple[str, str, Any]],
    state: _Observed,
    watchers: list[asyncio.Task[None]],
) -> None:
    """Apply what the watches saw (waiting at most 1 s); re-raise a watch's error."""
    with contextlib.suppress(TimeoutError):
        state.apply(*await asyncio.wait_for(queue.get(), timeout=1.0))
        while not queue.empty():
            state.apply(*queue.get_nowait())
    for watcher in watchers:
        if watcher.done():
            watcher.result()


async def load_api_client(settings: KanikoSettings) -> Any:
    """An ApiClient from `settings.kubeconfig`, else in-cluster, else the default kubeconfig."""
    configuration = k8s.Configuration()
    # Each build in flight holds two watches and a log stream open.
    configuration.connection_pool_maxsize = settings.max_connections
    try:
        if settings.kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            load_incluster: Any = k8s_config.load_incluster_config
            load_incluster(client_configuration=configuration)
        else:
            await k8s_config.load_kube_config(
                config_file=settings.kubeconfig,
                context=settings.context,
                client_configuration=configuration,
            )
    except (k8s_config.ConfigException, OSError) as exc:
        raise api_error(exc, "load config") from exc
    return k8s.ApiClient(configuration=configuration)


async def reap_orphan_jobs(api: Any, namespace: str, live_build_ids: set[str]) -> list[str]:
    """Delete the buildfleet Jobs in `namespace` whose build holds no lease any more.

    `api` is a kubernetes_asyncio ApiClient. Returns the names of the Jobs deleted.
    """
    batch = k8s.BatchV1Api(api)
    what = f"list Jobs in {namespace}"
    try:
        body = await _request(
            what,
            batch.list_namespaced_job,
            namespace,
            label_selector=f"{LABEL_MANAGED_BY}={MANAGED_BY}",
        )
    except ApiException as exc:
        raise api_error(exc, what) from exc
    items = body.get("items") or []
    deleted = []
    for item in items:
        meta = item.get("metadata") or {}
        build_id = (meta.get("annotations") or {}).get(ANNOTATION_BUILD_ID)
        if build_id is None or build_id in live_build_ids or meta.get("deletionTimestamp"):
            continue
        try:
            await _request(
                "delete Job",
                batch.delete_namespaced_job,
                meta["name"],
                namespace,
                body={
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "propagationPolicy": "Background",
                },
            )
        except ApiException as exc:
            if exc.status != 404:
                raise api_error(exc, f"delete Job {namespace}/{meta['name']}") from exc
        deleted.append(meta["name"])
    return deleted
