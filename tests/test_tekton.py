"""The tekton backend: pure pieces without a cluster, then against the real kube-apiserver
of tests/kube.py with the project's own taskruns.tekton.dev CRD (tests/tekton/) installed
and tests/tekton_controller.py playing Tekton's controller (kwok runs the pods; their
outcome is chosen by the TaskRun label OUTCOME_LABEL, which Tekton copies to the pod)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from buildfleet.config import load_config
from producer.contract import BuildRequest, GitSource
from worker.backends.base import BuildJob
from worker.backends.capabilities import ensure_capable
from worker.backends.factory import make_backend, placement_targets
from worker.backends.kubenames import LABEL_ATTEMPT, LABEL_BUILD_ID, attempt_name, label_value
from worker.backends.outcome import to_result
from worker.backends.tekton import TektonBackend, TektonSettings
from worker.backends.tekton.manifest import build_taskrun_manifest
from worker.backends.tekton.taskrun import TaskRun
from worker.backends.tekton.verdict import StepTracker, assess
from worker.errors import PermanentBuildError, TemporaryBuildError
from worker.kube.api import KubeApi
from worker.settings import KanikoSettings, RegistrySecret

from kube import (
    DELAY_ANNOTATION,
    DIGEST_ANNOTATION,
    FAIL_LOG_NAMESPACE,
    OUTCOME_LABEL,
    EventSink,
    KubeCluster,
    start_build_worker,
    wait_for,
)
from tekton_controller import running_controller

REPO = Path(__file__).resolve().parent.parent
CRD = Path(__file__).resolve().parent / "tekton" / "taskruns-crd.yaml"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BOUND = 120  # seconds: only so that a broken build cannot hang the suite


def make_request(**overrides: Any) -> BuildRequest:
    fields: dict[str, Any] = {
        "source": GitSource(url="https://git.example.test/demo/app.git", ref="main", commit=COMMIT),
        "images": ("127.0.0.1:5000/demo/app:latest",),
        "id": f"t-{uuid.uuid4().hex[:12]}",
        "build_args": {"VERSION": "1.2.3"},
        "timeout_s": 600,
    }
    fields.update(overrides)
    return BuildRequest(**fields)


# --- the TaskRun (pure) -----------------------------------------------------------------


def _params(manifest: dict[str, Any]) -> dict[str, Any]:
    return {p["name"]: p["value"] for p in manifest["spec"]["params"]}


def test_taskrun_carries_the_build_as_params_and_the_deadline() -> None:
    request = make_request(images=("r/a:1", "r/a:latest"), target="final")
    job = BuildJob(
        request, 3, timeout_s=90.5, traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    )
    manifest = build_taskrun_manifest(
        job, TektonSettings(service_account="builder"), KanikoSettings(), "builds"
    )
    meta, spec = manifest["metadata"], manifest["spec"]
    assert manifest["apiVersion"] == "tekton.dev/v1"
    assert meta["name"] == attempt_name(request.id, 3)
    assert meta["labels"][LABEL_BUILD_ID] == request.id
    assert meta["labels"][LABEL_ATTEMPT] == "3"
    assert spec["timeout"] == "91s"
    assert spec["serviceAccountName"] == "builder"
    assert "retries" not in spec
    params = _params(manifest)
    assert params["CONTEXT"] == f"git://git.example.test/demo/app.git#refs/heads/main#{COMMIT}"
    assert params["DOCKERFILE"] == "Dockerfile"
    assert params["GIT_PULL_METHOD"] == "https"
    assert params["IMAGES"] == ["r/a:1", "r/a:latest"]
    assert params["BUILD_ARGS"] == ["VERSION=1.2.3"]
    assert "--destination=r/a:1" in params["EXECUTOR_ARGS"]
    assert "--target=final" in params["EXECUTOR_ARGS"]
    (step,) = spec["taskSpec"]["steps"]
    assert step["securityContext"]["allowPrivilegeEscalation"] is False
    assert step["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "@sha256:" in step["image"]
    assert spec["podTemplate"]["automountServiceAccountToken"] is False
    assert [r["name"] for r in spec["taskSpec"]["results"]] == ["IMAGE_DIGEST"]


def test_the_inline_task_mounts_only_the_secret_of_the_builds_images() -> None:
    kaniko = KanikoSettings(
        registry_secrets=(
            RegistrySecret(prefix="r.io/acme", secret_name="push-acme"),
            RegistrySecret(prefix="r.io/beta", secret_name="push-beta"),
        )
    )
    job = BuildJob(make_request(images=("r.io/beta/app:1",)), 1)
    spec = build_taskrun_manifest(job, TektonSettings(), kaniko, "builds")["spec"]["taskSpec"]
    assert [v["secret"]["secretName"] for v in spec["volumes"]] == ["push-beta"]
    both = BuildJob(make_request(images=("r.io/beta/app:1", "r.io/acme/app:1")), 1)
    with pytest.raises(PermanentBuildError, match="registry_secrets"):
        build_taskrun_manifest(both, TektonSettings(), kaniko, "builds")


def test_tekton_refuses_build_secrets_naming_them() -> None:
    with pytest.raises(PermanentBuildError, match=r"cannot mount build secrets.*npm"):
        ensure_capable(make_request(secrets=("npm",)), "tekton")


def test_a_configured_task_replaces_the_inline_spec() -> None:
    manifest = build_taskrun_manifest(
        BuildJob(make_request(), 1), TektonSettings(task_ref="kaniko-build"), KanikoSettings(), "ns"
    )
    assert manifest["spec"]["taskRef"] == {"name": "kaniko-build", "kind": "Task"}
    assert "taskSpec" not in manifest["spec"]
    assert set(_params(manifest)) == {
        "CONTEXT",
        "DOCKERFILE",
        "GIT_PULL_METHOD",
        "IMAGES",
        "BUILD_ARGS",
        "EXECUTOR_ARGS",
    }


_REFERENCE = re.compile(r"\$\((params|results)\.([A-Za-z0-9_-]+)(\[\*\]|\.path)?\)")


def test_request_values_reach_the_step_only_through_params() -> None:
    """Tekton substitutes `$(...)` in a Task's own text, not in param values: a hostile
    build arg or image name must not become part of the taskSpec. And the taskSpec keeps
    the rules Tekton's webhook enforces: every reference declared, arrays expanded whole,
    every param given a value of its type."""
    hostile = "$(params.CONTEXT)$(results.IMAGE_DIGEST.path)"
    request = make_request(build_args={"EVIL": hostile}, target="x$(params.IMAGES[*])")
    manifest = build_taskrun_manifest(
        BuildJob(request, 1), TektonSettings(), KanikoSettings(), "ns"
    )
    task = manifest["spec"]["taskSpec"]
    text = json.dumps(task)
    assert "EVIL" not in text and "x$(params" not in text
    assert f"--build-arg=EVIL={hostile}" in _params(manifest)["EXECUTOR_ARGS"]

    declared = {p["name"]: p["type"] for p in task["params"]}
    results = {r["name"] for r in task["results"]}
    for value in _walk_strings(task):
        for kind, name, suffix in _REFERENCE.findall(value):
            if kind == "results":
                assert name in results and suffix == ".path", value
                continue
            assert name in declared, value
            if declared[name] == "array":
                assert value == f"$(params.{name}[*])", f"array {name} not isolated: {value}"
            else:
                assert suffix == "", value
    given = _params(manifest)
    assert set(given) == set(declared)
    for name, kind in declared.items():
        assert isinstance(given[name], list if kind == "array" else str), name


def _walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _walk_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_strings(value)


# --- the verdict (pure) -----------------------------------------------------------------


def _taskrun(status: str, reason: str = "", **fields: Any) -> TaskRun:
    condition = {"type": "Succeeded", "status": status, "reason": reason, "message": "m"}
    body = {"spec": {"timeout": "60s"}, "status": {"conditions": [condition], **fields}}
    return msgspec.convert(body, TaskRun)


def _failed_step(code: int, reason: str = "Error") -> dict[str, Any]:
    return {"name": "build", "terminated": {"exitCode": code, "reason": reason}}


def test_verdict_reads_the_succeeded_condition() -> None:
    digest = "sha256:" + "c" * 64
    assert assess(_taskrun("Unknown", "Running")) is None
    ok = assess(_taskrun("True", results=[{"name": "IMAGE_DIGEST", "value": digest + "\n"}]))
    assert ok is not None and ok.ok and ok.digest == digest

    failed = assess(_taskrun("False", "Failed", steps=[_failed_step(1)]))
    err = to_result(failed, ("step 1", "error building image: boom"))  # type: ignore[arg-type]
    assert isinstance(err, PermanentBuildError) and err.error_class == "run_failed"
    assert "step build exited with code 1" in err.message and "boom" in err.message

    cases = {
        ("False", "TaskRunTimeout"): (PermanentBuildError, "timeout"),
        ("False", "TaskRunCancelled"): (PermanentBuildError, "cancelled"),
        ("False", "TaskRunImagePullFailed"): (TemporaryBuildError, "image_pull"),
        ("False", "ExceededNodeResources"): (TemporaryBuildError, "unschedulable"),
        ("False", "CouldntGetTask"): (TemporaryBuildError, "task_not_found"),
        ("False", "TaskRunValidationFailed"): (PermanentBuildError, "invalid_task"),
        ("False", "Failed"): (TemporaryBuildError, "taskrun_failed"),
    }
    for (status, reason), (kind, error_class) in cases.items():
        outcome = assess(_taskrun(status, reason))
        assert outcome is not None, reason
        err = to_result(outcome)
        assert isinstance(err, kind) and err.error_class == error_class, reason
    oom = assess(_taskrun("False", "Failed", steps=[_failed_step(137, "OOMKilled")]))
    assert oom is not None and oom.error_class == "oom"


def test_steps_become_step_events() -> None:
    tracker = StepTracker("b1", 2)
    running = msgspec.convert(
        {"status": {"steps": [{"name": "build", "running": {"startedAt": "t"}}]}}, TaskRun
    )
    (started,) = tracker.update(running, 1.0)
    assert (started.vertex, started.started, started.completed) == ("step-build", 1.0, None)
    assert tracker.update(running, 1.5) == []
    done = msgspec.convert({"status": {"steps": [_failed_step(2)]}}, TaskRun)
    (ended,) = tracker.update(done, 2.0)
    assert (ended.completed, ended.error) == (2.0, "exit code 2")
    assert tracker.finish(3.0, None) == []


def test_tekton_workers_lease_capacity_per_namespace(tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text(
        '[worker]\nbackend = "tekton"\nlog_tail_lines = 7\n'
        '[tekton]\nnamespace = "ci"\nmax_builds = 6\n'
        '[kaniko]\nexecutor_image = "registry.example/kaniko@sha256:' + "1" * 64 + '"\n'
    )
    worker = load_config(config, environ={}).for_worker()
    ((target),) = placement_targets(worker)
    assert (target.address, target.max_builds) == ("ci", 6)
    backend = make_backend(worker)
    assert isinstance(backend, TektonBackend)
    assert backend.tail_lines == 7
    assert backend.kaniko.executor_image.startswith("registry.example/kaniko@")


# --- against the real API server ---------------------------------------------------------


@pytest.fixture(scope="session")
def tekton_crd(kube_cluster: KubeCluster) -> None:
    kube_cluster.install_crd(CRD)


@pytest.fixture
def namespace(kube_cluster: KubeCluster, tekton_crd: None) -> Iterator[str]:
    name = f"tk-{uuid.uuid4().hex[:8]}"
    kube_cluster.ensure_namespace(name)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
async def admin(kubeconfig: Path) -> AsyncIterator[KubeApi]:
    api = await KubeApi.connect(kubeconfig=str(kubeconfig))
    try:
        yield api
    finally:
        await api.aclose()


@pytest.fixture
async def controller(admin: KubeApi, namespace: str) -> AsyncIterator[str]:
    """Tekton's controller (played) for `namespace`; yields the namespace."""
    async with running_controller(admin, namespace):
        yield namespace


def settings_for(
    kubeconfig: Path, namespace: str, outcome: str = "success", **annotations: str
) -> TektonSettings:
    return TektonSettings(
        kubeconfig=str(kubeconfig),
        namespace=namespace,
        labels={OUTCOME_LABEL: outcome},
        annotations=annotations,
    )


def taskruns_of(cluster: KubeCluster, namespace: str, build_id: str) -> list[dict[str, Any]]:
    return cluster.kubectl_json(
        "get",
        "taskruns.tekton.dev",
        "-n",
        namespace,
        "-l",
        f"{LABEL_BUILD_ID}={label_value(build_id)}",
    )["items"]


def succeeded(taskrun: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in taskrun["status"]["conditions"] if c["type"] == "Succeeded")


async def test_success_reports_the_digest_result_and_streams_step_logs(
    kube_cluster: KubeCluster, kubeconfig: Path, controller: str
) -> None:
    digest = "sha256:" + "b" * 64
    settings = settings_for(
        kubeconfig, controller, **{DIGEST_ANNOTATION: digest, DELAY_ANNOTATION: "2s"}
    )
    backend = TektonBackend(settings)
    request = make_request()
    sink = EventSink()
    try:
        built = await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
        requests = backend.api_calls
    finally:
        await backend.aclose()
    assert built.digest == digest
    assert "hello from kaniko" in sink.lines
    assert all(e.build_id == request.id and e.attempt == 1 for e in sink.events)
    assert [(s.vertex, s.completed is not None, s.error) for s in sink.steps] == [
        ("step-build", False, None),
        ("step-build", True, None),
    ]
    assert requests <= 3  # create the TaskRun, watch it, follow the step's log
    (taskrun,) = taskruns_of(kube_cluster, controller, request.id)
    assert taskrun["metadata"]["name"] == attempt_name(request.id, 1)
    assert taskrun["metadata"]["labels"][LABEL_ATTEMPT] == "1"
    assert succeeded(taskrun)["status"] == "True"


async def test_a_failed_step_is_permanent_with_its_log(
    kube_cluster: KubeCluster, kubeconfig: Path, admin: KubeApi, tekton_crd: None
) -> None:
    kube_cluster.ensure_namespace(FAIL_LOG_NAMESPACE)  # kwok serves fail.log there
    backend = TektonBackend(settings_for(kubeconfig, FAIL_LOG_NAMESPACE, "fail"))
    sink = EventSink()
    async with running_controller(admin, FAIL_LOG_NAMESPACE):
        try:
            with pytest.raises(PermanentBuildError) as info:
                await asyncio.wait_for(backend.build(BuildJob(make_request(), 1), sink), BOUND)
        finally:
            await backend.aclose()
    err = info.value
    assert err.error_class == "run_failed"
    assert "step build exited with code 1" in err.message
    assert "exit status 1" in err.message  # the step's last log line
    assert "compiling the thing" in sink.lines
    assert sink.steps[-1].error is not None


async def test_timeout_is_the_builds_deadline(
    kube_cluster: KubeCluster, kubeconfig: Path, controller: str
) -> None:
    backend = TektonBackend(settings_for(kubeconfig, controller, "hang"))
    request = make_request(timeout_s=2)
    try:
        with pytest.raises(PermanentBuildError) as info:
            await asyncio.wait_for(
                backend.build(BuildJob(request, 1, timeout_s=2), EventSink()), BOUND
            )
    finally:
        await backend.aclose()
    assert info.value.error_class == "timeout"
    (taskrun,) = taskruns_of(kube_cluster, controller, request.id)
    assert taskrun["spec"]["timeout"] == "2s"
    assert succeeded(taskrun)["reason"] == "TaskRunTimeout"


async def test_cancel_sets_spec_status_and_keeps_the_taskrun(
    kube_cluster: KubeCluster, kubeconfig: Path, controller: str
) -> None:
    backend = TektonBackend(settings_for(kubeconfig, controller, "hang"))
    request = make_request()
    task = asyncio.create_task(backend.build(BuildJob(request, 1), EventSink()))
    name = attempt_name(request.id, 1)
    try:
        await asyncio.to_thread(
            wait_for,
            "the step runs",
            lambda: any(
                p["status"].get("phase") == "Running"
                for p in kube_cluster.kubectl_json("get", "pods", "-n", controller)["items"]
            ),
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await backend.aclose()
    (taskrun,) = taskruns_of(kube_cluster, controller, request.id)
    assert taskrun["metadata"]["name"] == name
    assert taskrun["spec"]["status"] == "TaskRunCancelled"
    assert succeeded(taskrun)["reason"] == "TaskRunCancelled"  # reached before cancel returned

    # The attempt re-queued after the cancel (a drain) builds afresh, not the cancelled run.
    digest = "sha256:" + "5" * 64
    again = TektonBackend(settings_for(kubeconfig, controller, **{DIGEST_ANNOTATION: digest}))
    try:
        built = await asyncio.wait_for(again.build(BuildJob(request, 1), EventSink()), BOUND)
    finally:
        await again.aclose()
    assert built.digest == digest
    (rerun,) = taskruns_of(kube_cluster, controller, request.id)
    assert rerun["metadata"]["uid"] != taskrun["metadata"]["uid"]


async def test_worker_killed_while_the_taskrun_runs_is_adopted(
    kube_cluster: KubeCluster, kubeconfig: Path, controller: str
) -> None:
    digest = "sha256:" + "d" * 64
    settings = settings_for(
        kubeconfig, controller, **{DIGEST_ANNOTATION: digest, DELAY_ANNOTATION: "4s"}
    )
    request = make_request()
    worker = start_build_worker(TektonBackend, settings, request)
    try:
        await asyncio.to_thread(
            wait_for,
            "the first worker's TaskRun runs",
            lambda: [
                t
                for t in taskruns_of(kube_cluster, controller, request.id)
                if succeeded_reason(t) == "Running"
            ],
        )
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
    (orphan,) = taskruns_of(kube_cluster, controller, request.id)

    backend = TektonBackend(settings)
    sink = EventSink()
    try:
        built = await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
    finally:
        await backend.aclose()
    assert built.digest == digest
    (taskrun,) = taskruns_of(kube_cluster, controller, request.id)
    assert taskrun["metadata"]["uid"] == orphan["metadata"]["uid"]
    assert "hello from kaniko" in sink.lines


def succeeded_reason(taskrun: dict[str, Any]) -> str | None:
    conditions = (taskrun.get("status") or {}).get("conditions") or []
    return next((c.get("reason") for c in conditions if c["type"] == "Succeeded"), None)


async def test_orphan_sweep_cancels_only_unfinished_runs_of_dead_builds(
    kube_cluster: KubeCluster, kubeconfig: Path, controller: str
) -> None:
    live, orphan, finished = make_request(), make_request(), make_request()
    settings = settings_for(kubeconfig, controller, "hang")
    for request in (live, orphan):
        manifest = build_taskrun_manifest(
            BuildJob(request, 1), settings, KanikoSettings(), controller
        )
        kube_cluster.kubectl("create", "-f", "-", input=json.dumps(manifest))
    done = TektonBackend(settings_for(kubeconfig, controller))
    try:
        await asyncio.wait_for(done.build(BuildJob(finished, 1), EventSink()), BOUND)
    finally:
        await done.aclose()
    backend = TektonBackend(settings)
    try:
        cancelled = await backend.reap_orphans(live_build_ids={live.id})
    finally:
        await backend.aclose()
    assert cancelled == [attempt_name(orphan.id, 1)]
    (kept,) = taskruns_of(kube_cluster, controller, live.id)
    assert "status" not in kept["spec"]
    (stopped,) = taskruns_of(kube_cluster, controller, orphan.id)
    assert stopped["spec"]["status"] == "TaskRunCancelled"
    (history,) = taskruns_of(kube_cluster, controller, finished.id)
    assert succeeded(history)["status"] == "True"


async def test_backend_works_with_only_the_deploy_role(
    kube_cluster: KubeCluster, admin: KubeApi, tekton_crd: None, tmp_path: Path
) -> None:
    ns = "buildfleet"  # the namespace deploy/tekton/kustomization.yaml names
    kube_cluster.ensure_namespace(ns)
    kube_cluster.kubectl("apply", "-k", str(REPO / "deploy" / "tekton"))
    sa = f"system:serviceaccount:{ns}:buildfleet-tekton"
    for verb, resource, allowed in (
        ("create", "taskruns.tekton.dev", "yes"),
        ("patch", "taskruns.tekton.dev", "yes"),
        ("watch", "taskruns.tekton.dev", "yes"),
        ("get", "pods --subresource=log", "yes"),
        ("get", "pods", "no"),
        ("patch", "taskruns.tekton.dev --subresource=status", "no"),
        ("create", "pods", "no"),
        ("delete", "pods", "no"),
        ("get", "secrets", "no"),
        ("create", "jobs.batch", "no"),
    ):
        answer = kube_cluster.kubectl(
            "auth", "can-i", verb, *resource.split(), "-n", ns, "--as", sa, check=False
        ).strip()
        assert answer == allowed, (verb, resource, answer)
    sa_kubeconfig = kube_cluster.token_kubeconfig(
        ns, "buildfleet-tekton", tmp_path / "sa.kubeconfig"
    )
    digest = "sha256:" + "f" * 64
    backend = TektonBackend(settings_for(sa_kubeconfig, ns, **{DIGEST_ANNOTATION: digest}))
    request, cancelled = make_request(), make_request()
    sink = EventSink()
    async with running_controller(admin, ns):
        try:
            built = await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
            task = asyncio.create_task(backend.build(BuildJob(cancelled, 1), EventSink()))
            await asyncio.to_thread(
                wait_for, "a TaskRun to cancel", lambda: taskruns_of(kube_cluster, ns, cancelled.id)
            )
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            orphan = make_request()
            manifest = build_taskrun_manifest(
                BuildJob(orphan, 1), settings_for(sa_kubeconfig, ns, "hang"), KanikoSettings(), ns
            )
            kube_cluster.kubectl("create", "-f", "-", input=json.dumps(manifest))
            swept = await backend.reap_orphans(live_build_ids=set())
        finally:
            await backend.aclose()
    assert built.digest == digest
    assert "hello from kaniko" in sink.lines
    (stopped,) = taskruns_of(kube_cluster, ns, cancelled.id)
    assert stopped["spec"]["status"] == "TaskRunCancelled"
    assert attempt_name(orphan.id, 1) in swept
