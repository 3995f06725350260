"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and a kwok controller simulating one node, started by `kwokctl` with
`runtime: binary` on free loopback ports, from the binaries `scripts/setup-kube` caches.

Pod outcomes are driven by kwok Stages keyed by the pod label `kwok.buildfleet.io/outcome`
(see tests/kwok/stages.yaml); pod logs are served by kwok ClusterLogs from tests/kwok/logs/.

    cluster = KubeCluster.start()      # or the session fixture `kube_cluster`
    cluster.kubeconfig                 # admin kubeconfig (client certificates)
    cluster.kubectl("get", "pods", "-A")
    cluster.stop()                     # always; component logs are kept in cluster.log_dir

Every cluster lives under $BUILDFLEET_KUBE_ROOT (default /tmp/buildfleet-kube) with the pid
of its owner; a later start deletes clusters whose owner is dead, so a SIGKILLed test run
leaves no processes behind for long. Nothing is written to ~/.kube or ~/.kwok.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from buildfleet.tools import tools_dir, versions
from producer.contract import BuildRequest, Log, Step, encode

REPO = Path(__file__).resolve().parent.parent
KWOK_DIR = Path(__file__).resolve().parent / "kwok"
OUTCOME_LABEL = "kwok.buildfleet.io/outcome"
DIGEST_ANNOTATION = "kwok.buildfleet.io/digest"
DELAY_ANNOTATION = "kwok.buildfleet.io/delay"
DEFAULT_DIGEST = "sha256:" + "a" * 64
NODE_NAME = "kwok-node-0"
FAIL_LOG_NAMESPACE = "bf-fail"
"""Pods in this namespace get tests/kwok/logs/fail.log, every other pod build.log."""


def _setup_kube_version(var: str) -> str:
    """The version scripts/setup-kube built: the pinned one unless overridden, as there."""
    return os.environ.get(var, versions()[var])


@dataclass(frozen=True)
class KubeTools:
    kube_bin: Path
    kwok_bin: Path
    etcd: Path
    kube_version: str

    @classmethod
    def find(cls) -> KubeTools:
        tools = tools_dir()
        kube_version = _setup_kube_version("KUBE_VERSION")
        kwok_version = _setup_kube_version("KWOK_VERSION")
        kube_bin = tools / f"kube-{kube_version}" / "bin"
        kwok_bin = tools / f"kwok-{kwok_version}" / "bin"
        etcd = shutil.which("etcd")
        missing = [
            str(p)
            for p in (
                kube_bin / "kube-apiserver",
                kube_bin / "kube-controller-manager",
                kube_bin / "kube-scheduler",
                kube_bin / "kubectl",
                kwok_bin / "kwok",
                kwok_bin / "kwokctl",
            )
            if not os.access(p, os.X_OK)
        ]
        if etcd is None:
            missing.append("etcd (Debian etcd-server)")
        if missing:
            raise RuntimeError(
                "Kubernetes test tools missing: "
                + ", ".join(missing)
                + ". Run scripts/setup-kube (or scripts/setup) first."
            )
        return cls(kube_bin, kwok_bin, Path(etcd or ""), kube_version)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _root() -> Path:
    return Path(os.environ.get("BUILDFLEET_KUBE_ROOT", "/tmp/buildfleet-kube"))


def _log_root() -> Path:
    return Path(os.environ.get("BUILDFLEET_KUBE_LOGS", "/tmp/buildfleet-kube-logs"))


def _component_pids(cluster_dir: Path) -> list[int]:
    pids = []
    for pidfile in cluster_dir.glob("kwok/clusters/*/pids/*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pids.append(int(pidfile.read_text().strip()))
    return pids


def _kill_components(cluster_dir: Path) -> None:
    """Last resort after `kwokctl delete cluster`: SIGKILL any component still running."""
    for pid in _component_pids(cluster_dir):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, 9)


def reap_stale_clusters(tools: KubeTools) -> None:
    """Delete clusters whose owning process is gone (a test run that was SIGKILLed)."""
    root = _root()
    if not root.is_dir():
        return
    for cluster_dir in root.iterdir():
        owner = cluster_dir / "owner.pid"
        try:
            pid = int(owner.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and _pid_alive(pid):
            continue
        _delete_cluster_dir(tools, cluster_dir)


def _delete_cluster_dir(tools: KubeTools, cluster_dir: Path) -> None:
    subprocess.run(
        [
            str(tools.kwok_bin / "kwokctl"),
            "--name",
            cluster_dir.name,
            "delete",
            "cluster",
            "--kubeconfig",
            str(cluster_dir / "kubeconfig.yaml"),
        ],
        env={**os.environ, "KWOK_WORKDIR": str(cluster_dir / "kwok")},
        capture_output=True,
        timeout=120,
        check=False,
    )
    _kill_components(cluster_dir)
    shutil.rmtree(cluster_dir, ignore_errors=True)


def _watchdog(owner: int, cluster_dir: Path) -> None:
    """Runs detached next to a cluster: deletes it as soon as its owner process is gone
    (SIGKILL, a CI timeout), so no control plane outlives the test run."""
    tools = KubeTools.find()
    while cluster_dir.exists():
        if not _pid_alive(owner):
            _delete_cluster_dir(tools, cluster_dir)
            return
        time.sleep(1)


def _config_documents(tools: KubeTools, ports: dict[str, int]) -> list[dict[str, Any]]:
    kwokctl_config = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokctlConfiguration",
        "options": {
            "runtime": "binary",
            "kubeApiserverPort": ports["apiserver"],
            "etcdPort": ports["etcd"],
            "etcdPeerPort": ports["etcd_peer"],
            "kubeControllerManagerPort": ports["kcm"],
            "kubeSchedulerPort": ports["scheduler"],
            "kwokControllerPort": ports["kwok"],
            "bindAddress": "127.0.0.1",
            "securePort": True,
            "kubeAuthorization": True,
            "kubeApiserverBinary": str(tools.kube_bin / "kube-apiserver"),
            "kubeControllerManagerBinary": str(tools.kube_bin / "kube-controller-manager"),
            "kubeSchedulerBinary": str(tools.kube_bin / "kube-scheduler"),
            "kubectlBinary": str(tools.kube_bin / "kubectl"),
            "etcdBinary": str(tools.etcd),
            "kwokControllerBinary": str(tools.kwok_bin / "kwok"),
            "kubeVersion": tools.kube_version,
            "quietPull": True,
            # etcd 3.4 lacks what streaming lists (WatchList) need: the 1.32 controllers
            # would try them, fail and re-list every few seconds, delaying every event.
            "kubeFeatureGates": "WatchList=false,WatchListClient=false",
            # kube-controller-manager's default 20 QPS, not the backend, would bound how
            # fast Jobs run here.
            "disableQPSLimits": True,
        },
        "componentsPatches": [
            {
                "name": "kwok-controller",
                "extraEnvs": [{"name": "KUBE_FEATURE_WatchListClient", "value": "false"}],
            }
        ],
    }
    docs: list[dict[str, Any]] = [kwokctl_config]
    docs.extend(d for d in yaml.safe_load_all((KWOK_DIR / "stages.yaml").read_text()) if d)
    docs.append(_cluster_logs("fail-logs", KWOK_DIR / "logs" / "fail.log", [FAIL_LOG_NAMESPACE]))
    docs.append(_cluster_logs("build-logs", KWOK_DIR / "logs" / "build.log", None))
    return docs


def _cluster_logs(name: str, path: Path, namespaces: list[str] | None) -> dict[str, Any]:
    selector: dict[str, Any] = {"matchNamespaces": namespaces} if namespaces else {}
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "ClusterLogs",
        "metadata": {"name": name},
        "spec": {
            "selector": selector,
            "logs": [{"containers": [], "logsFile": str(path), "follow": False}],
        },
    }


NODE_MANIFEST = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": NODE_NAME,
        "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        "labels": {
            "kubernetes.io/hostname": NODE_NAME,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
        },
    },
    "status": {
        "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "1000"},
        "capacity": {"cpu": "32", "memory": "256Gi", "pods": "1000"},
    },
}


@dataclass
class KubeCluster:
    name: str
    dir: Path
    tools: KubeTools
    ports: dict[str, int]
    log_dir: Path
    kubeconfig: Path = field(init=False)
    _stopped: bool = False

    def __post_init__(self) -> None:
        self.kubeconfig = self.dir / "kubeconfig.yaml"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def _env(self) -> dict[str, str]:
        return {**os.environ, "KWOK_WORKDIR": str(self.dir / "kwok")}

    @classmethod
    def start(cls, tools: KubeTools | None = None, *, timeout_s: float = 300) -> KubeCluster:
        tools = tools or KubeTools.find()
        reap_stale_clusters(tools)
        name = f"bf-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        cluster_dir = _root() / name
        cluster_dir.mkdir(parents=True)
        (cluster_dir / "owner.pid").write_text(str(os.getpid()))
        keys = ["apiserver", "etcd", "etcd_peer", "kcm", "scheduler", "kwok"]
        ports = dict(zip(keys, _free_ports(len(keys)), strict=True))
        cluster = cls(name, cluster_dir, tools, ports, _log_root() / name)
        subprocess.Popen(
            [sys.executable, __file__, "--watchdog", str(os.getpid()), str(cluster_dir)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        config = cluster_dir / "kwokctl.yaml"
        config.write_text(yaml.safe_dump_all(_config_documents(tools, ports), sort_keys=False))
        try:
            cluster._kwokctl(
                "create",
                "cluster",
                "--config",
                str(config),
                "--runtime",
                "binary",
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--wait",
                f"{int(timeout_s)}s",
                timeout=timeout_s + 60,
            )
            cluster.apply(NODE_MANIFEST)
            cluster._wait_node_ready(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _kwokctl(self, *args: str, timeout: float = 120) -> str:
        cmd = [str(self.tools.kwok_bin / "kwokctl"), "--name", self.name, *args]
        proc = subprocess.run(
            cmd, env=self._env, capture_output=True, text=True, timeout=timeout, check=False
        )
        (self.dir / "kwokctl.log").open("a").write(
            f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n"
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"kwokctl {' '.join(args)} failed ({proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}\n(logs in {self.dir})"
            )
        return proc.stdout

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(
            [str(self.tools.kube_bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, *manifests: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(manifests))

    def install_crd(self, path: Path) -> None:
        """Apply a CustomResourceDefinition and wait until the API server serves it."""
        crd = yaml.safe_load(path.read_text())
        self.kubectl("apply", "-f", str(path))
        self.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd['metadata']['name']}"
        )

    def ensure_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        metadata: dict[str, Any] = {"name": name, "labels": labels or {}}
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})

    def _wait_node_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            node = json.loads(
                self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False) or "{}"
            )
            conditions = node.get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"kwok node {NODE_NAME} not Ready after {timeout_s}s")
            time.sleep(0.5)

    def token_kubeconfig(self, namespace: str, service_account: str, path: Path) -> Path:
        """A kubeconfig that authenticates as a ServiceAccount (TokenRequest API)."""
        token = self.kubectl(
            "create", "token", service_account, "-n", namespace, "--duration", "1h"
        ).strip()
        admin = yaml.safe_load(self.kubeconfig.read_text())
        ctx_name = admin["current-context"]
        ctx = next(c for c in admin["contexts"] if c["name"] == ctx_name)["context"]
        cluster = next(c for c in admin["clusters"] if c["name"] == ctx["cluster"])
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kwok", "cluster": cluster["cluster"]}],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "sa",
                    "context": {"cluster": "kwok", "user": service_account, "namespace": namespace},
                }
            ],
            "current-context": "sa",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def save_logs(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for log in self.dir.glob("kwok/clusters/*/logs/*.log"):
            with contextlib.suppress(OSError):
                shutil.copy(log, self.log_dir / log.name)
        for extra in ("kwokctl.log", "kwokctl.yaml"):
            with contextlib.suppress(OSError):
                shutil.copy(self.dir / extra, self.log_dir / extra)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.save_logs()
        with contextlib.suppress(Exception):
            self._kwokctl("delete", "cluster", "--kubeconfig", str(self.kubeconfig))
        _kill_components(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- what the Kubernetes backends' tests share ----------------------------------------------


class EventSink:
    """A backend's progress sink that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[Step | Log] = []

    async def __call__(self, event: Step | Log) -> None:
        self.events.append(event)

    @property
    def lines(self) -> list[str]:
        return [e.text for e in self.events if isinstance(e, Log)]

    @property
    def steps(self) -> list[Step]:
        return [e for e in self.events if isinstance(e, Step)]


def wait_for(what: str, predicate: Callable[[], Any], bound: float = 120) -> Any:
    """`predicate()` once it is truthy (polled); AssertionError after `bound` seconds."""
    give_up = time.monotonic() + bound
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.2)


_BUILD_WORKER = """
import asyncio, importlib, sys
import msgspec
from producer.contract import decode_request
from worker.backends.base import BuildJob

module = importlib.import_module(sys.argv[1])
backend_class, settings_class = getattr(module, sys.argv[2]), getattr(module, sys.argv[3])

async def main():
    settings = msgspec.json.decode(sys.argv[4], type=settings_class)
    async def sink(event):
        print("event", flush=True)
    await backend_class(settings).build(BuildJob(decode_request(sys.argv[5]), 1), sink)

asyncio.run(main())
"""


def start_build_worker(backend: type, settings: msgspec.Struct, request: BuildRequest) -> Any:
    """A separate process building attempt 1 of `request` with `backend(settings)` (to be
    SIGKILLed mid-build); the caller kills and waits for it."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [
        sys.executable,
        "-c",
        _BUILD_WORKER,
        backend.__module__.rsplit(".", 1)[0],
        backend.__name__,
        type(settings).__name__,
        msgspec.json.encode(settings).decode(),
        encode(request).decode(),
    ]
    return subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """A real control plane with one kwok node, for the whole test session."""
    cluster = KubeCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kubeconfig(kube_cluster: KubeCluster) -> Path:
    """Path of an admin kubeconfig for `kube_cluster`."""
    return kube_cluster.kubeconfig


if __name__ == "__main__" and sys.argv[1:2] == ["--watchdog"]:
    _watchdog(int(sys.argv[2]), Path(sys.argv[3]))
