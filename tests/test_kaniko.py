"""The kaniko backend: pure pieces without a cluster, then against a real control plane
(kube-apiserver, controller-manager, scheduler, etcd) with kwok simulating the node and the
pods' outcomes (tests/kwok/stages.yaml, chosen by the pod label OUTCOME_LABEL)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from producer.contract import BuildRequest, CachePolicy, GitSource, LocalSource, Step
from worker.backends.base import BuildJob
from worker.backends.kaniko import KanikoBackend, KanikoSettings
from worker.backends.kaniko.manifest import build_job_manifest, executor_args, kaniko_git_context
from worker.backends.kaniko.stages import KanikoStages
from worker.backends.kaniko.verdict import assess
from worker.backends.kubeattempt import reap_orphans
from worker.backends.kubenames import (
    ANNOTATION_BUILD_ID,
    LABEL_ATTEMPT,
    LABEL_BUILD_ID,
    LABEL_MANAGED_BY,
    label_value,
)
from worker.backends.kubenames import attempt_name as job_name
from worker.backends.outcome import to_result
from worker.backends.podlogs import LogPosition
from worker.errors import PermanentBuildError, TemporaryBuildError
from worker.kube.api import KubeApi
from worker.kube.errors import (
    KubeError,
    KubeGone,
    KubeUnreachable,
    as_build_error,
    error_for_status,
)
from worker.kube.objects import (
    JOBS,
    PODS,
    Applied,
    Bookmark,
    Deleted,
    Job,
    Listed,
    ObjectMeta,
    Pod,
    WatchEvent,
)
from worker.kube.watch import list_watch
from worker.settings import RegistrySecret

# tests/ is on sys.path (conftest.py loads `kube` as a plugin: the kube_cluster and
# kubeconfig session fixtures come from there).
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

REPO = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BOUND = 120  # seconds: only so that a broken build cannot hang the suite


def make_request(**overrides: Any) -> BuildRequest:
    fields: dict[str, Any] = {
        "source": GitSource(url="https://git.example.test/demo/app.git", ref="main", commit=COMMIT),
        "images": ("127.0.0.1:5000/demo/app:latest",),
        "id": f"b-{uuid.uuid4().hex[:12]}",
        "build_args": {"VERSION": "1.2.3"},
        "timeout_s": 600,
    }
    fields.update(overrides)
    return BuildRequest(**fields)


# --- pure pieces ------------------------------------------------------------------------


def test_job_name_is_deterministic_and_a_dns_label() -> None:
    long_id = "X" * 128
    for build_id in ("0192af-abc", long_id, "a_b.C-d", "z."):
        name = job_name(build_id, 3)
        assert name == job_name(build_id, 3)
        assert name != job_name(build_id, 4)
        assert len(name) <= 63
        assert name.endswith("-3")
        assert all((c.isalnum() and not c.isupper()) or c == "-" for c in name)
    assert job_name("Ab", 1) != job_name("ab", 1)


def test_label_value_keeps_valid_ids_and_hashes_long_ones() -> None:
    assert label_value("0192af-abc") == "0192af-abc"
    long = label_value("x" * 128)
    assert len(long) <= 63
    assert long != label_value("x" * 127)
    assert label_value("ends.")[-1].isalnum()


def test_git_context_pins_ref_and_commit() -> None:
    ctx, method = kaniko_git_context(GitSource(url="https://h/o/r.git", ref="main", commit=COMMIT))
    assert (ctx, method) == (f"git://h/o/r.git#refs/heads/main#{COMMIT}", "https")
    ctx, method = kaniko_git_context(GitSource(url="http://h/r", ref="HEAD", commit=COMMIT))
    assert (ctx, method) == (f"git://h/r##{COMMIT}", "http")
    ctx, _ = kaniko_git_context(GitSource(url="https://h/r", ref="refs/tags/v1"))
    assert ctx == "git://h/r#refs/tags/v1"
    with pytest.raises(PermanentBuildError):
        kaniko_git_context(GitSource(url="ssh://git@h/r"))
    with pytest.raises(PermanentBuildError):
        kaniko_git_context(GitSource(url="https://user:token@h/r"))


def test_local_source_is_permanent() -> None:
    request = make_request(source=LocalSource(path="/src"))
    with pytest.raises(PermanentBuildError, match="local directory") as info:
        build_job_manifest(BuildJob(request, 1), KanikoSettings(), "ns")
    assert info.value.error_class == "invalid_request"


def test_executor_args() -> None:
    request = make_request(
        images=("r/a:1", "r/a:latest"),
        target="final",
        context="svc",
        dockerfile="svc/Dockerfile",
        cache=CachePolicy(export_ref="r/cache"),
        platforms=("linux/arm64",),
    )
    args, _ = executor_args(request, KanikoSettings(push_retry=5, snapshot_mode="redo"))
    assert f"--context=git://git.example.test/demo/app.git#refs/heads/main#{COMMIT}" in args
    assert "--dockerfile=Dockerfile" in args
    assert "--context-sub-path=svc" in args
    assert "--destination=r/a:1" in args
    assert "--destination=r/a:latest" in args
    assert "--build-arg=VERSION=1.2.3" in args
    assert "--target=final" in args
    assert "--cache=true" in args
    assert "--cache-repo=r/cache" in args
    assert "--digest-file=/dev/termination-log" in args
    assert "--push-retry=5" in args
    assert "--snapshot-mode=redo" in args
    assert "--custom-platform=linux/arm64" in args
    no_push, _ = executor_args(make_request(push=False, images=()), KanikoSettings())
    assert "--no-push" in no_push
    assert not any(a.startswith("--cache") for a in no_push)


def test_manifest_is_unprivileged_and_bounded() -> None:
    settings = KanikoSettings(
        registry_secret="regcred",
        service_account="builder",
        node_selector={"pool": "build"},
        tolerations=({"key": "build", "operator": "Exists"},),
    )
    request = make_request(timeout_s=90.5)
    manifest = build_job_manifest(BuildJob(request, 2, timeout_s=90.5), settings, "builds")
    spec = manifest["spec"]
    assert manifest["metadata"]["name"] == job_name(request.id, 2)
    assert manifest["metadata"]["labels"] == {
        LABEL_BUILD_ID: request.id,
        LABEL_ATTEMPT: "2",
        LABEL_MANAGED_BY: "buildfleet",
    }
    assert manifest["metadata"]["annotations"][ANNOTATION_BUILD_ID] == request.id
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 91
    assert spec["ttlSecondsAfterFinished"] == settings.ttl_seconds_after_finished
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "builder"
    assert pod["nodeSelector"] == {"pool": "build"}
    container = pod["containers"][0]
    assert "@sha256:" in container["image"]
    sc = container["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "SYS_ADMIN" not in sc["capabilities"]["add"]
    assert container["volumeMounts"][0]["mountPath"] == "/kaniko/.docker"
    assert pod["volumes"][0]["secret"]["secretName"] == "regcred"
    assert container["resources"]["limits"]["memory"] == settings.memory_limit


REG = "127.0.0.1:5000"
SCOPED = (
    RegistrySecret(prefix=f"{REG}/acme", secret_name="push-acme"),
    RegistrySecret(prefix=f"{REG}/acme/team", secret_name="push-acme-team"),
    RegistrySecret(prefix=f"{REG}/beta", secret_name="push-beta"),
)


def mounted_secrets(manifest: dict[str, Any]) -> list[str]:
    pod = manifest["spec"]["template"]["spec"]
    return [v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v]


@pytest.mark.parametrize(
    ("fields", "secret"),
    [
        ({"images": (f"{REG}/acme/app:1", f"{REG}/acme/app:latest")}, "push-acme"),
        ({"images": (f"{REG}/acme/team/app:1",)}, "push-acme-team"),  # the longest prefix
        ({"images": (f"{REG}/acme/app:1", f"{REG}/acme/team/app:1")}, "push-acme"),
        (
            {"images": (f"{REG}/beta/app:1",), "cache": CachePolicy(export_ref=f"{REG}/beta/c")},
            "push-beta",
        ),
        ({"images": (f"{REG}/acme/app:1",), "push": False}, None),  # pushes nothing
    ],
)
def test_a_builds_pod_mounts_only_the_secret_of_its_own_images(
    fields: dict[str, Any], secret: str | None
) -> None:
    settings = KanikoSettings(registry_secrets=SCOPED)
    manifest = build_job_manifest(BuildJob(make_request(**fields), 1), settings, "builds")
    assert mounted_secrets(manifest) == ([secret] if secret else [])


@pytest.mark.parametrize(
    "fields",
    [
        {"images": (f"{REG}/acmecorp/app:1",)},  # a prefix covers whole path components
        {"images": (f"{REG}/acme/app:1", f"{REG}/beta/app:1")},  # two tenants' images
        {"images": (f"{REG}/acme/app:1",), "cache": CachePolicy(export_ref=f"{REG}/beta/c")},
        {"images": ("docker.io/acme/app:1",)},  # another registry
    ],
)
def test_a_build_no_prefix_covers_is_refused_naming_its_images(fields: dict[str, Any]) -> None:
    settings = KanikoSettings(registry_secrets=SCOPED, cache_repo=f"{REG}/acme/cache")
    with pytest.raises(PermanentBuildError) as info:
        build_job_manifest(BuildJob(make_request(**fields), 1), settings, "builds")
    assert info.value.error_class == "credentials"
    assert "[[kaniko.registry_secrets]]" in info.value.message
    assert fields["images"][-1] in info.value.message or "beta/c" in info.value.message


def test_the_configured_cache_repository_must_be_covered_too() -> None:
    settings = KanikoSettings(registry_secrets=SCOPED, cache_repo=f"{REG}/shared/cache")
    with pytest.raises(PermanentBuildError, match="shared/cache"):
        build_job_manifest(BuildJob(make_request(images=(f"{REG}/acme/a:1",)), 1), settings, "b")


def test_scoped_registry_secrets_are_configured_strictly() -> None:
    with pytest.raises(msgspec.ValidationError, match="one or the other"):
        msgspec.convert(
            {
                "registry_secret": "all",
                "registry_secrets": [{"prefix": "r.io/a", "secret_name": "a"}],
            },
            KanikoSettings,
        )
    for entry, why in (
        ({"prefix": "r.io/a:tag", "secret_name": "a"}, "without tag"),
        ({"prefix": "r.io/a,type=local", "secret_name": "a"}, "image reference"),
        ({"prefix": "r.io/a", "secret_name": "Not_A_Name"}, "secret_name"),
        ({"prefix": "r.io/a", "secret_name": "a", "secret": "x"}, "unknown field"),
    ):
        with pytest.raises(msgspec.ValidationError, match=why):
            msgspec.convert({"registry_secrets": [entry]}, KanikoSettings)


def _pod(phase: str, *, state: dict[str, Any] | None = None, **status: Any) -> Pod:
    containers = [{"name": "kaniko", "state": state}] if state else []
    pod = {
        "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"containers": [{"name": "kaniko", "resources": {"limits": {"memory": "2Gi"}}}]},
        "status": {"phase": phase, "containerStatuses": containers, **status},
    }
    return msgspec.convert(pod, Pod)


def test_assess_classifies_outcomes() -> None:
    digest = "sha256:" + "c" * 64
    ok = assess(None, _pod("Succeeded", state={"terminated": {"exitCode": 0, "message": digest}}))
    assert ok is not None and ok.ok and ok.digest == digest

    failed = assess(None, _pod("Failed", state={"terminated": {"exitCode": 1, "reason": "Error"}}))
    assert failed is not None
    err = to_result(failed, ("step 1", "error building image: boom"))
    assert isinstance(err, PermanentBuildError)
    assert err.error_class == "run_failed"
    assert "code 1" in err.message and "error building image: boom" in err.message
    assert err.log_tail[-1] == "error building image: boom"

    oom = assess(
        None, _pod("Failed", state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}})
    )
    err = to_result(oom)  # type: ignore[arg-type]
    assert isinstance(err, PermanentBuildError) and err.error_class == "oom"
    assert "2Gi" in err.message

    evicted = assess(None, _pod("Failed", reason="Evicted", message="low on memory"))
    err = to_result(evicted)  # type: ignore[arg-type]
    assert isinstance(err, TemporaryBuildError) and err.error_class == "evicted"

    deadline_job = msgspec.convert(
        {
            "spec": {"activeDeadlineSeconds": 5},
            "status": {
                "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]
            },
        },
        Job,
    )
    timeout = assess(deadline_job, None)
    err = to_result(timeout)  # type: ignore[arg-type]
    assert isinstance(err, PermanentBuildError) and err.error_class == "timeout"

    unsched = _pod(
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/1 nodes are available",
            }
        ],
    )
    assert assess(None, unsched, pending_for=1, unschedulable_timeout_s=10) is None
    out = assess(None, unsched, pending_for=11, unschedulable_timeout_s=10)
    assert out is not None and out.delete_job and out.error_class == "unschedulable"
    assert out.temporary

    pull = _pod("Pending", state={"waiting": {"reason": "ImagePullBackOff"}})
    out = assess(None, pull, pending_for=11, image_pull_timeout_s=10)
    assert out is not None and out.temporary and out.error_class == "image_pull"

    lost = _pod(
        "Running",
        conditions=[
            {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
        ],
    )
    out = assess(None, lost)
    assert out is not None and out.temporary and out.error_class == "node_lost"

    assert assess(None, _pod("Running", state={"running": {}})) is None


def test_api_errors_map_to_domain_errors() -> None:
    invalid = as_build_error(error_for_status(422, "create jobs in ns", "status 422"))
    assert isinstance(invalid, PermanentBuildError) and invalid.error_class == "invalid_job"
    assert "status 422" in invalid.message
    forbidden = as_build_error(error_for_status(403, "create jobs in ns", "no"))
    assert isinstance(forbidden, TemporaryBuildError)
    assert forbidden.error_class == "kube_forbidden" and forbidden.daemon_at_fault
    throttled = as_build_error(error_for_status(429, "list", "slow down", retry_after=7.0))
    assert isinstance(throttled, TemporaryBuildError) and throttled.delay == 7.0
    assert isinstance(error_for_status(410, "watch", "too old"), KubeGone)
    down = as_build_error(KubeUnreachable("watch", "connection refused"))
    assert isinstance(down, TemporaryBuildError) and down.error_class == "kube_unreachable"


async def test_unreachable_api_server_is_a_temporary_error(tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    backend = KanikoBackend(KanikoSettings(kubeconfig=str(config)))
    try:
        with pytest.raises(TemporaryBuildError) as info:
            await backend.build(BuildJob(make_request(), 1), EventSink())
    finally:
        await backend.aclose()
    assert info.value.error_class == "kube_unreachable"


def _obj(name: str, rv: str) -> Pod:
    return Pod(metadata=ObjectMeta(name=name, resource_version=rv))


class FakeWatchApi:
    """A fake of KubeApi's list and watch (a real API server cannot be made to drop a
    watch or expire its version on cue): answers from a script, records the requests."""

    def __init__(self, script: list[tuple[Any, ...]]) -> None:
        self.script = script
        self.requests: list[tuple[str, str | None]] = []

    async def list(self, resource: Any, namespace: str, **selectors: str) -> tuple[Any, str]:
        self.requests.append(("list", None))
        kind, items, version = self.script.pop(0)
        assert kind == "list"
        return items, version

    async def watch(self, resource: Any, namespace: str, **kwargs: Any) -> Any:
        self.requests.append(("watch", kwargs["resource_version"]))
        kind, events, end = self.script.pop(0)
        assert kind == "watch"
        for event in events:
            yield event
        if isinstance(end, KubeError):
            raise end
        await asyncio.Event().wait()  # the watch stays open


async def test_watch_resumes_after_drop_and_relists_after_410() -> None:
    api = FakeWatchApi(
        [
            ("list", (_obj("a", "1"),), "1"),
            ("watch", [Applied(_obj("a", "2"))], KubeUnreachable("watch", "dropped")),
            ("watch", [], KubeGone("watch", "too old", status=410)),
            ("list", (_obj("a", "5"),), "5"),
            ("watch", [Bookmark("6"), Applied(_obj("b", "7")), Deleted(_obj("a", "8"))], None),
        ]
    )
    seen: list[WatchEvent[Pod]] = []
    events = list_watch(api, PODS, "ns", label_selector="x=y")  # type: ignore[arg-type]
    async for event in events:
        seen.append(event)
        if len(seen) == 5:
            break
    await events.aclose()
    assert seen == [
        Listed(PODS, (_obj("a", "1"),)),
        Applied(_obj("a", "2")),
        Listed(PODS, (_obj("a", "5"),)),
        Applied(_obj("b", "7")),
        Deleted(_obj("a", "8")),
    ]
    assert api.requests == [
        ("list", None),
        ("watch", "1"),
        ("watch", "2"),
        ("list", None),
        ("watch", "5"),
    ]


def test_kaniko_stages_become_steps() -> None:
    stages = KanikoStages("b1", 2)
    assert stages.on_line("INFO[0000] Retrieving image manifest busybox", 1.0) == []
    (first,) = stages.on_line("INFO[0001] Building stage 'busybox' [idx: '0', base-idx: '-1']", 2.0)
    assert (first.vertex, first.started, first.completed) == ("stage-0", 2.0, None)
    assert first.build_id == "b1" and first.attempt == 2
    done, second = stages.on_line(
        "INFO[0002] Building stage 'alpine' [idx: '1', base-idx: '0']", 3.0
    )
    assert (done.vertex, done.completed, done.error) == ("stage-0", 3.0, None)
    assert second.name == "stage 1 FROM alpine"
    (last,) = stages.finish(4.0, "exit 1")
    assert (last.vertex, last.completed, last.error) == ("stage-1", 4.0, "exit 1")
    assert stages.finish(5.0, None) == []


def test_log_position_skips_replayed_lines() -> None:
    pos = LogPosition()
    first = ["t1 a", "t2 b", "t2 c"]
    pos.new_stream()
    assert [pos.new_text(line) for line in first] == ["a", "b", "c"]
    pos.new_stream()
    again = ["t1 a", "t2 b", "t2 c", "t2 d", "t3 e"]
    assert [pos.new_text(line) for line in again] == [None, None, None, "d", "e"]


# --- against the real control plane -----------------------------------------------------


BUILD_NAMESPACE = yaml.safe_load(
    (Path(__file__).parent.parent / "deploy" / "kaniko" / "namespace.yaml").read_text()
)


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    """A namespace with the Pod Security labels of deploy/'s kaniko build namespace
    (`baseline` enforced): every Job these tests run has its pods admitted under them."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    labels = BUILD_NAMESPACE["metadata"]["labels"]
    kube_cluster.ensure_namespace(name, {k: v for k, v in labels.items() if "pod-security" in k})
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def backend_for(
    kubeconfig_path: Path, namespace: str, outcome: str = "success", **settings: Any
) -> KanikoBackend:
    annotations = settings.pop("pod_annotations", {})
    return KanikoBackend(
        KanikoSettings(
            kubeconfig=str(kubeconfig_path),
            namespace=namespace,
            pod_labels={OUTCOME_LABEL: outcome},
            pod_annotations=annotations,
            unschedulable_timeout_s=settings.pop("unschedulable_timeout_s", 2),
            image_pull_timeout_s=settings.pop("image_pull_timeout_s", 2),
            **settings,
        )
    )


def jobs_of(cluster: KubeCluster, namespace: str, build_id: str) -> list[dict[str, Any]]:
    items = cluster.kubectl_json(
        "get", "jobs", "-n", namespace, "-l", f"{LABEL_BUILD_ID}={label_value(build_id)}"
    )["items"]
    return [j for j in items if not j["metadata"].get("deletionTimestamp")]


def pods_of(cluster: KubeCluster, namespace: str, build_id: str) -> list[dict[str, Any]]:
    return cluster.kubectl_json(
        "get", "pods", "-n", namespace, "-l", f"{LABEL_BUILD_ID}={label_value(build_id)}"
    )["items"]


async def test_job_spec_is_accepted_by_the_api_server(
    kube_cluster: KubeCluster,
    namespace: str,
) -> None:
    settings = KanikoSettings(
        registry_secret="regcred",
        service_account="default",
        cache_repo="r/cache",
        node_selector={"kubernetes.io/os": "linux"},
        cpu_limit="2",
        tolerations=({"key": "build", "operator": "Exists", "effect": "NoSchedule"},),
    )
    request = make_request(
        id="Spec_Check." + "x" * 100, target="final", context="svc", dockerfile="svc/Dockerfile"
    )
    manifest = build_job_manifest(
        BuildJob(request, 7, traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"),
        settings,
        namespace,
    )
    out = kube_cluster.kubectl(
        "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(manifest)
    )
    created = json.loads(out)
    assert created["spec"]["backoffLimit"] == 0
    assert (
        created["spec"]["template"]["spec"]["containers"][0]["securityContext"][
            "allowPrivilegeEscalation"
        ]
        is False
    )


async def test_success_reports_digest_and_streams_logs(
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    namespace: str,
) -> None:
    digest = "sha256:" + "b" * 64
    backend = backend_for(
        kubeconfig,
        namespace,
        "success",
        watch_timeout_s=1,
        pod_annotations={DIGEST_ANNOTATION: digest, DELAY_ANNOTATION: "3s"},
    )
    request = make_request()
    sink = EventSink()
    try:
        built = await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
    finally:
        await backend.aclose()
    assert built.digest == digest
    assert "hello from kaniko" in sink.lines
    assert all(e.build_id == request.id and e.attempt == 1 for e in sink.events)
    steps = [e for e in sink.events if isinstance(e, Step)]
    assert [(s.vertex, s.completed is not None) for s in steps] == [
        ("stage-0", False),
        ("stage-0", True),
    ]
    (job,) = jobs_of(kube_cluster, namespace, request.id)
    assert job["metadata"]["name"] == job_name(request.id, 1)
    assert job["metadata"]["labels"][LABEL_MANAGED_BY] == "buildfleet"
    assert job["metadata"]["labels"][LABEL_ATTEMPT] == "1"


async def test_the_created_job_mounts_only_its_own_images_secret(
    kube_cluster: KubeCluster, kubeconfig: Path, namespace: str
) -> None:
    backend = backend_for(
        kubeconfig,
        namespace,
        "success",
        registry_secrets=SCOPED,
        pod_annotations={DIGEST_ANNOTATION: "sha256:" + "d" * 64},
    )
    allowed = make_request(images=(f"{REG}/acme/team/app:1",))
    refused = make_request(images=(f"{REG}/acme/app:1", f"{REG}/beta/app:1"))
    try:
        await asyncio.wait_for(backend.build(BuildJob(allowed, 1), EventSink()), BOUND)
        with pytest.raises(PermanentBuildError) as info:
            await asyncio.wait_for(backend.build(BuildJob(refused, 1), EventSink()), BOUND)
    finally:
        await backend.aclose()
    (job,) = jobs_of(kube_cluster, namespace, allowed.id)
    assert mounted_secrets(job) == ["push-acme-team"]
    text = json.dumps(job)
    assert 'push-acme"' not in text and "push-beta" not in text  # no other credential
    (mount,) = job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert (mount["mountPath"], mount["readOnly"]) == ("/kaniko/.docker", True)
    assert info.value.error_class == "credentials"
    assert jobs_of(kube_cluster, namespace, refused.id) == []  # refused before any Job


async def test_a_build_costs_at_most_four_api_requests(
    kubeconfig: Path,
    namespace: str,
) -> None:
    digest = "sha256:" + "7" * 64
    backend = backend_for(
        kubeconfig, namespace, "success", pod_annotations={DIGEST_ANNOTATION: digest}
    )
    sink = EventSink()
    try:
        built = await asyncio.wait_for(backend.build(BuildJob(make_request(), 1), sink), BOUND)
        requests = backend.api_calls
    finally:
        await backend.aclose()
    assert built.digest == digest
    assert "hello from kaniko" in sink.lines
    assert requests <= 4  # create the Job, watch it, watch its pod, follow the log


async def test_failure_is_permanent_with_log_tail(
    kube_cluster: KubeCluster,
    kubeconfig: Path,
) -> None:
    kube_cluster.ensure_namespace(FAIL_LOG_NAMESPACE)
    backend = backend_for(kubeconfig, FAIL_LOG_NAMESPACE, "fail")
    sink = EventSink()
    try:
        with pytest.raises(PermanentBuildError) as info:
            await asyncio.wait_for(backend.build(BuildJob(make_request(), 1), sink), BOUND)
    finally:
        await backend.aclose()
    err = info.value
    assert err.error_class == "run_failed"
    assert "exited with code 1" in err.message
    assert "exit status 1" in err.message  # the last log line
    assert any("error building image" in line for line in err.log_tail)
    assert "compiling the thing" in sink.lines


async def test_oom_is_permanent_and_names_the_memory_limit(
    kubeconfig: Path,
    namespace: str,
) -> None:
    backend = backend_for(kubeconfig, namespace, "oom", memory_limit="3Gi")
    try:
        with pytest.raises(PermanentBuildError) as info:
            await asyncio.wait_for(backend.build(BuildJob(make_request(), 1), EventSink()), BOUND)
    finally:
        await backend.aclose()
    assert info.value.error_class == "oom"
    assert "3Gi" in info.value.message


async def test_deadline_fails_with_timeout(
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    namespace: str,
) -> None:
    backend = backend_for(kubeconfig, namespace, "hang")
    request = make_request(timeout_s=2)
    try:
        with pytest.raises(PermanentBuildError) as info:
            await asyncio.wait_for(
                backend.build(BuildJob(request, 1, timeout_s=2), EventSink()), BOUND
            )
    finally:
        await backend.aclose()
    assert info.value.error_class == "timeout"
    (job,) = jobs_of(kube_cluster, namespace, request.id)
    assert job["spec"]["activeDeadlineSeconds"] == 2


async def test_cancel_deletes_job_and_pod(
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    namespace: str,
) -> None:
    backend = backend_for(kubeconfig, namespace, "hang")
    request = make_request()
    task = asyncio.create_task(backend.build(BuildJob(request, 1), EventSink()))
    try:
        await asyncio.to_thread(
            wait_for,
            "the build pod runs",
            lambda: any(
                p["status"].get("phase") == "Running"
                for p in pods_of(kube_cluster, namespace, request.id)
            ),
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await backend.aclose()
    assert kube_cluster.kubectl_json("get", "jobs", "-n", namespace)["items"] == []
    assert pods_of(kube_cluster, namespace, request.id) == []


async def test_unschedulable_is_temporary_and_deletes_the_job(
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    namespace: str,
) -> None:
    backend = backend_for(
        kubeconfig, namespace, "success", node_selector={"buildfleet.io/no-such-pool": "x"}
    )
    request = make_request()
    try:
        with pytest.raises(TemporaryBuildError) as info:
            await asyncio.wait_for(backend.build(BuildJob(request, 1), EventSink()), BOUND)
    finally:
        await backend.aclose()
    assert info.value.error_class == "unschedulable"
    assert jobs_of(kube_cluster, namespace, request.id) == []


async def test_image_pull_failure_is_temporary(
    kubeconfig: Path,
    namespace: str,
) -> None:
    backend = backend_for(kubeconfig, namespace, "imagepull")
    try:
        with pytest.raises(TemporaryBuildError) as info:
            await asyncio.wait_for(backend.build(BuildJob(make_request(), 1), EventSink()), BOUND)
    finally:
        await backend.aclose()
    assert info.value.error_class == "image_pull"
    assert "ErrImagePull" in info.value.message


async def test_eviction_is_temporary(kubeconfig: Path, namespace: str) -> None:
    backend = backend_for(kubeconfig, namespace, "evicted")
    try:
        with pytest.raises(TemporaryBuildError) as info:
            await asyncio.wait_for(backend.build(BuildJob(make_request(), 1), EventSink()), BOUND)
    finally:
        await backend.aclose()
    assert info.value.error_class == "evicted"


async def test_worker_sigkilled_mid_build_job_is_adopted(
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    namespace: str,
) -> None:
    digest = "sha256:" + "d" * 64
    settings = KanikoSettings(
        kubeconfig=str(kubeconfig),
        namespace=namespace,
        pod_labels={OUTCOME_LABEL: "success"},
        pod_annotations={DIGEST_ANNOTATION: digest, DELAY_ANNOTATION: "4s"},
    )
    request = make_request()
    worker = start_build_worker(KanikoBackend, settings, request)
    try:
        await asyncio.to_thread(
            wait_for, "the first worker's Job", lambda: jobs_of(kube_cluster, namespace, request.id)
        )
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
    (orphan,) = jobs_of(kube_cluster, namespace, request.id)

    backend = KanikoBackend(settings)
    sink = EventSink()
    try:
        built = await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
    finally:
        await backend.aclose()
    assert built.digest == digest
    (job,) = jobs_of(kube_cluster, namespace, request.id)
    assert job["metadata"]["uid"] == orphan["metadata"]["uid"]


async def test_two_workers_on_one_attempt_share_one_job(
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    namespace: str,
) -> None:
    digest = "sha256:" + "e" * 64
    backends = [
        backend_for(
            kubeconfig,
            namespace,
            "success",
            pod_annotations={DIGEST_ANNOTATION: digest, DELAY_ANNOTATION: "2s"},
        )
        for _ in range(2)
    ]
    request = make_request()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(b.build(BuildJob(request, 1), EventSink()) for b in backends)), BOUND
        )
    finally:
        for b in backends:
            await b.aclose()
    assert [r.digest for r in results] == [digest, digest]
    assert len(jobs_of(kube_cluster, namespace, request.id)) == 1


async def test_backend_works_with_only_the_deploy_role(
    kube_cluster: KubeCluster,
    tmp_path: Path,
) -> None:
    # The namespaces deploy/kaniko/ names: the workers' (its ServiceAccount) and the build
    # namespace (its Role, where the Jobs go; it creates that one itself).
    ns, builds = "buildfleet", BUILD_NAMESPACE["metadata"]["name"]
    for name in (ns, builds):  # tests/test_deploy.py deletes them without waiting
        kube_cluster.kubectl(
            "wait", "--for=delete", f"namespace/{name}", "--timeout=120s", check=False
        )
    kube_cluster.ensure_namespace(ns)
    kube_cluster.kubectl("apply", "-k", str(REPO / "deploy" / "kaniko"))
    sa = f"system:serviceaccount:{ns}:buildfleet-kaniko"
    for verb, resource, where, allowed in (
        ("create", "jobs.batch", builds, "yes"),
        ("delete", "jobs.batch", builds, "yes"),
        ("get", "pods --subresource=log", builds, "yes"),  # "pods/log" would mean pod "log"
        ("create", "pods", builds, "no"),
        ("get", "secrets", builds, "no"),
        ("create", "jobs.batch", ns, "no"),  # only in the build namespace
    ):
        answer = kube_cluster.kubectl(
            "auth", "can-i", verb, *resource.split(), "-n", where, "--as", sa, check=False
        ).strip()
        assert answer == allowed, (verb, resource, where, answer)
    sa_kubeconfig = kube_cluster.token_kubeconfig(
        ns, "buildfleet-kaniko", tmp_path / "sa.kubeconfig"
    )
    digest = "sha256:" + "f" * 64
    backend = backend_for(
        sa_kubeconfig, builds, "success", pod_annotations={DIGEST_ANNOTATION: digest}
    )
    sink = EventSink()
    request = make_request()
    try:
        built = await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
        cancelled = make_request()
        task = asyncio.create_task(backend.build(BuildJob(cancelled, 1), EventSink()))
        await asyncio.to_thread(
            wait_for, "a Job to cancel", lambda: jobs_of(kube_cluster, builds, cancelled.id)
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await backend.aclose()
    assert built.digest == digest
    assert "hello from kaniko" in sink.lines
    assert jobs_of(kube_cluster, builds, cancelled.id) == []

    api = await KubeApi.connect(kubeconfig=str(sa_kubeconfig))
    try:
        deleted = await reap_orphans(api, JOBS, builds, live_build_ids=set())
    finally:
        await api.aclose()
    assert job_name(request.id, 1) in deleted


async def test_reap_orphan_jobs_deletes_only_unleased_builds(
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    namespace: str,
) -> None:
    live, orphan = make_request(), make_request()
    settings = KanikoSettings(pod_labels={OUTCOME_LABEL: "hang"})
    for request in (live, orphan):
        kube_cluster.kubectl(
            "create",
            "-f",
            "-",
            input=json.dumps(build_job_manifest(BuildJob(request, 1), settings, namespace)),
        )
    api = await KubeApi.connect(kubeconfig=str(kubeconfig))
    try:
        deleted = await reap_orphans(api, JOBS, namespace, live_build_ids={live.id})
    finally:
        await api.aclose()
    assert deleted == [job_name(orphan.id, 1)]
    assert len(jobs_of(kube_cluster, namespace, live.id)) == 1
    assert jobs_of(kube_cluster, namespace, orphan.id) == []
