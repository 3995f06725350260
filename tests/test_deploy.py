"""The deployment manifests under deploy/: they parse, kustomize renders them, a real
kube-apiserver accepts them, and they keep the promises deploy/README.md makes (least
privilege, no secrets in manifests, a drain that fits in the grace period, scaling on the
real queue).

The rendering uses the kubectl that scripts/setup builds (`tools_dir()/kube-VERSION/bin`);
the server-side checks use the `kube_cluster` fixture (tests/kube.py). KEDA's CRDs are not
installed there, so its objects (keda.sh/*) are checked here by shape, not by the server.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import msgspec
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from buildfleet.config import FleetConfig, load_config
from buildfleet.tools import tool_home
from producer.contract import BuildRequest, GitSource
from producer.gateway.settings import GatewaySettings
from worker.backends.base import BuildJob
from worker.backends.kaniko.manifest import build_job_manifest
from worker.settings import KanikoSettings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
NAMESPACE = "buildfleet"
BUILD_NAMESPACE = "buildfleet-builds"
"""The kaniko backend's: its Namespace, Role, RoleBinding and NetworkPolicy live there."""
BUILD_NAMESPACE_OBJECTS = {
    ("Role", "buildfleet-kaniko"),
    ("RoleBinding", "buildfleet-kaniko"),
    ("NetworkPolicy", "buildfleet-builds"),
}
BASELINE_CAPABILITIES = frozenset(
    {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
     "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
)  # fmt: skip
"""What Pod Security `baseline` lets a container add (kubernetes.io/docs/concepts/security/
pod-security-standards)."""
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"})
KEDA_GROUP = "keda.sh/"
BUILDKITD = "buildkitd"
"""The one workload allowed to run without the restricted profile (rootless BuildKit needs
seccomp/AppArmor Unconfined and its setuid uid-map helpers); deploy/README.md says why."""
SECRETISH = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY", re.IGNORECASE)

Manifest = dict[str, Any]


class Cluster(Protocol):
    """What these tests use of tests/kube.py's KubeCluster."""

    kubeconfig: Path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str: ...


def kubectl_path() -> Path:
    """The kubectl scripts/setup-kube builds, at the version that script pins."""
    path = tool_home("kube", "KUBE_VERSION") / "bin" / "kubectl"
    assert path.is_file(), f"{path} missing: run scripts/setup (it builds kubectl)"
    return path


@pytest.fixture(scope="module")
def rendered() -> list[Manifest]:
    proc = subprocess.run(
        [str(kubectl_path()), "kustomize", str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"kubectl kustomize deploy/ failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert all(isinstance(d, dict) for d in docs)
    return docs


def find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def find_prefixed(docs: list[Manifest], kind: str, prefix: str) -> Manifest:
    """A generated object, whose name kustomize suffixes with a content hash."""
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    assert len(hits) == 1, f"expected one {kind}/{prefix}*, found {len(hits)}"
    return hits[0]


def pod_spec(workload: Manifest) -> Manifest:
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Manifest) -> Iterator[Manifest]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def workloads(docs: list[Manifest]) -> list[Manifest]:
    found = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    assert found, "no workloads rendered"
    return found


def fleet_config(docs: list[Manifest], tmp_path: Path, container: Manifest) -> FleetConfig:
    """The configuration `container` really runs with: the rendered ConfigMap's TOML, then
    the container's literal BUILDFLEET_* variables (Secret-backed ones get a placeholder)."""
    configmap = find_prefixed(docs, "ConfigMap", "buildfleet-config-")
    path = tmp_path / "buildfleet.toml"
    path.write_text(configmap["data"]["buildfleet.toml"])
    environ: dict[str, str] = {}
    for env in container.get("env", []):
        if "value" in env:
            environ[env["name"]] = env["value"]
        elif env["name"] == "BUILDFLEET_REDIS_URL":
            environ[env["name"]] = "redis://placeholder:6379/0"
    environ.pop("BUILDFLEET_CONFIG", None)
    return load_config(path, environ)


# --- files -------------------------------------------------------------------------------


def test_every_yaml_file_under_deploy_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 15, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path}: empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if path.parent.name != "compose":
                assert {"apiVersion", "kind"} <= doc.keys(), f"{path}: not a Kubernetes object"


def test_compose_runs_nothing_privileged_and_buildkitd_rootless(rendered: list[Manifest]) -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services: dict[str, Manifest] = compose["services"]
    assert {"redis", "registry", "buildkitd", "worker", "gateway"} <= services.keys()
    assert services["worker"]["deploy"]["replicas"] == 2
    assert [n for n, s in services.items() if s.get("privileged")] == []
    for name in ("worker", "gateway"):
        service = services[name]
        assert service["cap_drop"] == ["ALL"]
        assert service["read_only"] is True
        assert service["user"].split(":")[0] == "10001"
    buildkitd = services["buildkitd"]
    [statefulset_buildkitd] = pod_spec(find(rendered, "StatefulSet", BUILDKITD))["containers"]
    assert buildkitd["image"] == statefulset_buildkitd["image"]  # rootless, as in Kubernetes
    assert buildkitd["image"].endswith("-rootless")
    assert sorted(buildkitd["security_opt"]) == ["apparmor=unconfined", "seccomp=unconfined"]
    assert "--oci-worker-no-process-sandbox" in buildkitd["command"]
    assert "user" not in buildkitd, "the rootless image's own user (1000)"
    config = load_config(DEPLOY / "compose" / "buildfleet.toml", {})
    grace = services["worker"]["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > config.worker.drain_grace_s + config.buildkit.cancel_grace_s


def test_compose_redis_wants_a_password_that_buildkitd_cannot_reach_for() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services: dict[str, Manifest] = compose["services"]
    redis = services["redis"]
    script = redis["command"][-1]
    assert 'requirepass "$$BUILDFLEET_REDIS_PASSWORD"' in script  # from redis.env, not argv
    assert script.startswith("exec redis-server - ")
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][-1]
    for name in ("redis", "worker", "gateway"):
        assert {"path": "./redis.env", "required": True} in services[name]["env_file"], name
    assert "BUILDFLEET_REDIS_PASSWORD" not in str(compose["x-buildfleet"].get("environment"))
    config = load_config(DEPLOY / "compose" / "buildfleet.toml", {})
    assert config.redis.password is None and "@" not in config.redis.url
    # RUN steps share buildkitd's network: it must not be on Redis's.
    assert not set(services["buildkitd"]["networks"]) & set(redis["networks"])
    assert set(services["worker"]["networks"]) >= {
        *redis["networks"],
        *services["buildkitd"]["networks"],
    }


def test_grafana_dashboard_queries_buildfleet_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "buildfleet.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs
    for expr in exprs:
        metrics = re.findall(r"\b([a-z_]+)\{", expr)
        assert metrics, expr
        assert all(m.startswith("buildfleet_") for m in metrics), expr
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("queue depth", "status", "wait", "duration", "fail"):
        assert topic in titles, f"no panel about {topic!r}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


# --- the rendered objects ----------------------------------------------------------------


def test_kustomize_renders_the_whole_fleet(rendered: list[Manifest]) -> None:
    find(rendered, "Namespace", NAMESPACE)
    find(rendered, "Deployment", "buildfleet-worker")
    find(rendered, "Deployment", "buildfleet-gateway")
    find(rendered, "Service", "buildfleet-gateway")
    find(rendered, "StatefulSet", BUILDKITD)
    find(rendered, "ScaledObject", "buildfleet-worker")
    find(rendered, "Role", "buildfleet-kaniko")  # deploy/kaniko is part of the whole
    find(rendered, "Role", "buildfleet-tekton")  # and deploy/tekton
    for doc in rendered:
        if doc["kind"] != "Namespace":
            key = (doc["kind"], doc["metadata"]["name"])
            expected = BUILD_NAMESPACE if key in BUILD_NAMESPACE_OBJECTS else NAMESPACE
            assert doc["metadata"].get("namespace") == expected, key


def test_every_container_is_least_privilege(rendered: list[Manifest]) -> None:
    checked = 0
    for workload in workloads(rendered):
        name = workload["metadata"]["name"]
        pod = pod_spec(workload)
        pod_ctx = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for container in containers(workload):
            where = f"{name}/{container['name']}"
            ctx = container.get("securityContext", {})
            run_as_non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
            assert run_as_non_root is True, f"{where}: runAsNonRoot"
            assert ctx.get("privileged") in (None, False), f"{where}: privileged"
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), where
            assert {"cpu", "memory"} <= resources.get("limits", {}).keys(), where
            if name == BUILDKITD:
                # The documented exception: rootless BuildKit as BuildKit's examples run it.
                assert ctx["runAsUser"] == 1000, where
                assert ctx["seccompProfile"]["type"] == "Unconfined", where
                assert ctx.get("capabilities", {}).get("add") is None, where
                continue
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: drop ALL"
            assert not ctx.get("capabilities", {}).get("add"), f"{where}: adds capabilities"
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{where}: seccomp"
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"
            checked += 1
    assert checked >= 2  # the worker and the gateway at least


def test_no_secret_values_in_manifests(rendered: list[Manifest]) -> None:
    for doc in rendered:
        if doc["kind"] == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), doc["metadata"]["name"]
    for workload in workloads(rendered):
        for container in containers(workload):
            for env in container.get("env", []):
                if SECRETISH.search(env["name"]):
                    assert "value" not in env, f"{env['name']} must come from a Secret"
    toml = find_prefixed(rendered, "ConfigMap", "buildfleet-config-")["data"]["buildfleet.toml"]
    for line in toml.splitlines():
        setting = line.split("#", 1)[0]
        assert not re.search(r"tokens|webhook_secrets|secret\s*=|password", setting), line
        assert not re.search(r"rediss?://[^/\s\"]*@", setting), f"credentials in a URL: {line}"


def test_every_referenced_secret_is_documented(rendered: list[Manifest]) -> None:
    names: set[str] = set()
    for workload in workloads(rendered):
        for volume in pod_spec(workload).get("volumes", []):
            if "secret" in volume:
                names.add(volume["secret"]["secretName"])
        for container in containers(workload):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    names.add(ref["name"])
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    names.add(source["secretRef"]["name"])
    for doc in rendered:
        if doc["kind"] == "TriggerAuthentication":
            names.update(ref["name"] for ref in doc["spec"].get("secretTargetRef", []))
    assert {"buildfleet-redis", "buildfleet-gateway", "buildkit-daemon-certs"} <= names
    readme = (DEPLOY / "README.md").read_text()
    undocumented = sorted(n for n in names if f"`{n}`" not in readme)
    assert not undocumented, f"Secrets not documented in deploy/README.md: {undocumented}"


def test_worker_grace_period_covers_its_drain(rendered: list[Manifest], tmp_path: Path) -> None:
    worker = find(rendered, "Deployment", "buildfleet-worker")
    [container] = pod_spec(worker)["containers"]
    assert container["args"] == ["worker"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert env["BUILDFLEET_CONFIG"] in mounts, "BUILDFLEET_CONFIG is not where the TOML is"
    config = fleet_config(rendered, tmp_path, container)
    grace = pod_spec(worker)["terminationGracePeriodSeconds"]
    # drain, then cancel buildctl and re-queue what is left, with a margin for that I/O
    needed = config.worker.drain_grace_s + config.buildkit.cancel_grace_s + 10
    assert grace >= needed, f"terminationGracePeriodSeconds {grace} < {needed}"


def test_worker_routes_to_every_buildkitd_replica(rendered: list[Manifest], tmp_path: Path) -> None:
    worker = find(rendered, "Deployment", "buildfleet-worker")
    config = fleet_config(rendered, tmp_path, pod_spec(worker)["containers"][0])
    statefulset = find(rendered, "StatefulSet", BUILDKITD)
    service = find(rendered, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "buildkitd needs a headless Service"
    [port] = service["spec"]["ports"]
    name = statefulset["metadata"]["name"]
    expected = [
        f"tcp://{name}-{i}.{service['metadata']['name']}:{port['port']}"
        for i in range(statefulset["spec"]["replicas"])
    ]
    assert [d.address for d in config.buildkit.daemons] == expected
    [daemon] = pod_spec(statefulset)["containers"]
    args = daemon["args"]
    assert f"tcp://0.0.0.0:{port['port']}" in args
    assert "--oci-worker-no-process-sandbox" in args
    for flag in ("--tlscacert", "--tlscert", "--tlskey"):
        assert flag in args, f"buildkitd without {flag}"
    probe = ["buildctl", "debug", "workers"]
    assert daemon["readinessProbe"]["exec"]["command"] == probe
    assert daemon["livenessProbe"]["exec"]["command"] == probe
    claims = [c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]]
    mounted = {m["name"] for m in daemon["volumeMounts"]}
    assert set(claims) <= mounted, "each daemon's cache is a PVC of its own"


def test_gateway_serves_its_configured_port(rendered: list[Manifest], tmp_path: Path) -> None:
    gateway = find(rendered, "Deployment", "buildfleet-gateway")
    [container] = pod_spec(gateway)["containers"]
    assert container["args"] == ["gateway"]
    config = fleet_config(rendered, tmp_path, container)
    settings = msgspec.convert(config.gateway, GatewaySettings, strict=False)
    assert settings.host == "0.0.0.0"
    [port] = container["ports"]
    assert port["containerPort"] == settings.port == 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    service = find(rendered, "Service", "buildfleet-gateway")
    assert service["spec"]["ports"][0]["port"] == 8080
    assert pod_spec(gateway)["terminationGracePeriodSeconds"] > settings.shutdown_timeout_s
    secret_env = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"BUILDFLEET_GATEWAY_TOKENS", "BUILDFLEET_GATEWAY_WEBHOOK_SECRETS"} <= secret_env


def test_keda_scales_the_worker_on_the_queue(rendered: list[Manifest], tmp_path: Path) -> None:
    scaled = find(rendered, "ScaledObject", "buildfleet-worker")
    target = scaled["spec"]["scaleTargetRef"]
    worker = find(rendered, target.get("kind", "Deployment"), target["name"])
    assert "replicas" not in worker["spec"], "a fixed replica count fights the autoscaler"
    config = fleet_config(rendered, tmp_path, pod_spec(worker)["containers"][0])
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == config.queue.name
    assert int(trigger["metadata"]["listLength"]) == config.worker.concurrency
    auth = find(rendered, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    params = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert "address" in params
    assert scaled["spec"]["minReplicaCount"] >= 1, "a live worker reaps dead workers' leases"


def test_kaniko_builds_run_in_a_baseline_namespace_of_their_own(
    rendered: list[Manifest], tmp_path: Path
) -> None:
    namespace = find(rendered, "Namespace", BUILD_NAMESPACE)
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert "pod-security.kubernetes.io/enforce-version" not in labels  # the server's latest
    worker = find(rendered, "Deployment", "buildfleet-worker")
    config = fleet_config(rendered, tmp_path, pod_spec(worker)["containers"][0])
    assert config.kaniko.namespace == BUILD_NAMESPACE
    assert set(config.kaniko.capabilities) <= BASELINE_CAPABILITIES
    # The workers' identity is in the fleet's namespace, its rights in the build namespace.
    binding = find(rendered, "RoleBinding", "buildfleet-kaniko")
    assert binding["metadata"]["namespace"] == BUILD_NAMESPACE
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "buildfleet-kaniko", "namespace": NAMESPACE}
    ]
    assert (
        find(rendered, "ServiceAccount", "buildfleet-kaniko")["metadata"]["namespace"] == NAMESPACE
    )
    role = find(rendered, "Role", "buildfleet-kaniko")
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert not {r for r, _ in granted} & {"secrets", "pods/exec", "pods/attach"}
    assert ("pods", "create") not in granted


def test_build_pods_reach_dns_the_registry_and_git_only(rendered: list[Manifest]) -> None:
    policy = find(rendered, "NetworkPolicy", "buildfleet-builds")
    spec = policy["spec"]
    assert policy["metadata"]["namespace"] == BUILD_NAMESPACE
    assert spec["podSelector"] == {}, "every pod of the build namespace"
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    assert spec["ingress"] == [], "no connection into a build pod"
    [dns, *others] = spec["egress"]
    [kube_dns] = dns["to"]
    assert kube_dns["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert kube_dns["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
    }
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert len(others) == 2, "the registry and the git hosts"
    for rule in others:
        assert rule["to"] and all(set(peer) == {"ipBlock"} for peer in rule["to"]), rule
        for peer in rule["to"]:
            cidr = peer["ipBlock"]["cidr"]
            assert not cidr.endswith("/0"), f"egress to everywhere: {cidr}"
        assert [(p["port"], p["protocol"]) for p in rule["ports"]] == [(443, "TCP")]


# --- a real API server -------------------------------------------------------------------


def _dry_run(cluster: Cluster, docs: list[Manifest]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(kubectl_path()),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-f",
            "-",
        ],
        input=yaml.safe_dump_all(docs),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_api_server_accepts_the_manifests(rendered: list[Manifest], kube_cluster: Cluster) -> None:
    namespaces = [find(rendered, "Namespace", name) for name in (NAMESPACE, BUILD_NAMESPACE)]
    kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(namespaces))
    try:
        # KEDA's CRDs are not installed in the test cluster: its objects are left out here.
        docs = [d for d in rendered if not d["apiVersion"].startswith(KEDA_GROUP)]
        assert len(docs) < len(rendered)
        proc = _dry_run(kube_cluster, docs)
        assert proc.returncode == 0, proc.stderr
        for doc in docs:
            assert f"{doc['metadata']['name']} " in proc.stdout, proc.stdout
    finally:
        for name in (NAMESPACE, BUILD_NAMESPACE):
            kube_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_only_buildkitd_falls_short_of_pod_security_restricted(
    rendered: list[Manifest], kube_cluster: Cluster
) -> None:
    """The API server's own Pod Security admission judges each workload."""
    scratch = "bf-deploy-psa"
    kube_cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": scratch,
                    "labels": {"pod-security.kubernetes.io/warn": "restricted"},
                },
            }
        ),
    )
    try:
        verdicts: dict[str, bool] = {}
        for workload in workloads(rendered):
            doc = json.loads(json.dumps(workload))
            doc["metadata"]["namespace"] = scratch
            proc = _dry_run(kube_cluster, [doc])
            assert proc.returncode == 0, proc.stderr
            verdicts[doc["metadata"]["name"]] = "would violate PodSecurity" in proc.stderr
        assert verdicts.pop(BUILDKITD) is True, "PSA did not judge (buildkitd must violate)"
        assert verdicts, "no other workload was checked"
        assert not any(verdicts.values()), f"violate restricted: {verdicts}"
    finally:
        kube_cluster.kubectl("delete", "namespace", scratch, "--wait=false", check=False)


def test_workers_are_probed_and_scraped_on_their_metrics_port(
    rendered: list[Manifest], tmp_path: Path
) -> None:
    worker = find(rendered, "Deployment", "buildfleet-worker")
    [container] = pod_spec(worker)["containers"]
    config = fleet_config(rendered, tmp_path, container)
    assert config.worker.metrics_host == "0.0.0.0"  # the kubelet and Prometheus reach it
    [port] = container["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", config.worker.metrics_port)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    for name, workload_port in (
        ("buildfleet-worker", port["containerPort"]),
        ("buildfleet-gateway", 8080),
    ):
        annotations = find(rendered, "Deployment", name)["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(workload_port)
        assert annotations["prometheus.io/path"] == "/metrics"
    policy = find(rendered, "NetworkPolicy", "buildfleet-worker")
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": port["containerPort"], "protocol": "TCP"}]
    assert "from" not in rule or rule["from"], "the metrics port only"


def _kaniko_pod(namespace: str, **container_changes: Any) -> Manifest:
    """The pod of a Kaniko build Job (worker/backends/kaniko/manifest.py, default settings)."""
    request = BuildRequest(
        source=GitSource(url="https://git.example.test/demo/app.git", ref="main"),
        images=("registry.example.test/demo/app:1",),
    )
    job = build_job_manifest(BuildJob(request, 1), KanikoSettings(), namespace)
    template = job["spec"]["template"]
    [container] = template["spec"]["containers"]
    container.update(container_changes)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kaniko-psa", "namespace": namespace, **template["metadata"]},
        "spec": template["spec"],
    }


def test_the_build_namespace_admits_kaniko_pods_and_refuses_privileged_ones(
    rendered: list[Manifest], kube_cluster: Cluster
) -> None:
    """The API server's Pod Security admission judges pods in a namespace labelled as
    deploy/'s build namespace (a scratch name: an earlier test's may still be terminating)."""
    namespace = json.loads(json.dumps(find(rendered, "Namespace", BUILD_NAMESPACE)))
    scratch = f"bf-builds-{uuid.uuid4().hex[:8]}"
    namespace["metadata"]["name"] = scratch
    kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(namespace))
    try:
        proc = _dry_run(kube_cluster, [_kaniko_pod(scratch)])
        assert proc.returncode == 0, proc.stderr
        assert "PodSecurity" not in proc.stderr, proc.stderr
        privileged = {"privileged": True, "allowPrivilegeEscalation": True}
        host_path = [{"name": "host", "mountPath": "/host"}]
        for changes in (
            {"securityContext": privileged},
            {"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}},
            {"volumeMounts": host_path},
        ):
            pod = _kaniko_pod(scratch, **changes)
            if "volumeMounts" in changes:
                pod["spec"]["volumes"] = [{"name": "host", "hostPath": {"path": "/"}}]
            proc = _dry_run(kube_cluster, [pod])
            assert proc.returncode != 0, f"admitted: {changes}"
            assert 'violates PodSecurity "baseline:' in proc.stderr, proc.stderr
    finally:
        kube_cluster.kubectl("delete", "namespace", scratch, "--wait=false", check=False)
