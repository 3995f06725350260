"""Real local services on free loopback ports: redis, registry, buildkitd, dockerd, git daemon.

Used by the test harness and by `buildfleet up`. Synchronous and stdlib-only. How each
child is started and stopped (its own session, a parent-death signal, the whole group
stopped) is buildfleet.processes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from buildfleet.base_image import (
    BASE_IMAGE_NAME,
    DEFAULT_PATH_ENV,
    buildah_storage,
    push_base_image,
    push_base_image_with_buildah,
    push_base_image_with_docker,
)
from buildfleet.build_network import BuildNetwork
from buildfleet.processes import (
    Service,
    ServiceError,
    ToolMissing,
    find_tool,
    free_port,
    spawn,
    start_on_free_port,
    tcp_open,
    wait_ready,
)
from buildfleet.tools import tools_dir

__all__ = [
    "BASE_IMAGE_NAME",
    "DEFAULT_PATH_ENV",
    "Backend",
    "LocalFleetServices",
    "RunNetwork",
    "Service",
    "ServiceError",
    "ToolMissing",
    "buildah_storage",
    "buildkit_workers_ok",
    "buildkitd_config",
    "docker_ping",
    "find_tool",
    "free_port",
    "push_base_image",
    "push_base_image_with_buildah",
    "push_base_image_with_docker",
    "release_buildah_storage",
    "spawn",
    "start_buildkitd",
    "start_dockerd",
    "start_git_daemon",
    "start_on_free_port",
    "start_redis",
    "start_registry",
    "tcp_open",
    "tools_dir",
    "wait_ready",
]


def _redis_pong(port: int, password: str | None = None) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        if password is not None:
            sock.sendall(_resp("AUTH", password))
            if not sock.recv(64).startswith(b"+OK"):
                return False
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def _resp(*words: str) -> bytes:
    """A command in Redis's protocol (arguments may hold any bytes)."""
    out = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


Fsync = Literal["always", "everysec"]
RunNetwork = Literal["host", "isolated"]


def start_redis(
    workdir: Path,
    *,
    name: str = "redis",
    port: int | None = None,
    password: str | None = None,
    appendfsync: Fsync = "everysec",
    replica_of: int | None = None,
    min_replicas_to_write: int = 0,
    timeout: float = 15.0,
) -> Service:
    """redis-server with an append-only file in `workdir/name` (so a restart on the same
    `port` finds every build where it was), `maxmemory-policy noeviction`; address
    `redis://127.0.0.1:PORT/0`. `replica_of` makes it a replica of the server on that port;
    `min_replicas_to_write` has it refuse writes while fewer replicas are in sync."""
    data = workdir / name
    data.mkdir(parents=True, exist_ok=True)
    binary = find_tool("redis-server")

    auth = data / "auth.conf"  # the password stays out of argv (and the log's first line)
    if password is not None:
        auth.touch(mode=0o600)
        auth.chmod(0o600)
        quoted = _redis_quote(password)
        auth.write_text(f"requirepass {quoted}\nmasterauth {quoted}\n")

    def launch(chosen: int) -> tuple[list[str], str]:
        argv = [binary, *([str(auth)] if password is not None else []),
                "--port", str(chosen), "--bind", "127.0.0.1", "--dir", str(data),
                "--save", "", "--appendonly", "yes", "--appendfsync", appendfsync,
                "--maxmemory-policy", "noeviction"]  # fmt: skip
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        if min_replicas_to_write:
            # A primary cut off from its replicas (a failover promoted one) refuses writes
            # within a second instead of taking writes the failover would lose.
            argv += ["--min-replicas-to-write", str(min_replicas_to_write),
                     "--min-replicas-max-lag", "1"]  # fmt: skip
        return argv, f"redis://127.0.0.1:{chosen}/0"

    log = workdir / "logs" / f"{name}.log"
    ready = functools.partial(_redis_ready, password=password)
    if port is None:
        return start_on_free_port(name, log, launch, ready, timeout=timeout)
    argv, address = launch(port)
    service = spawn(name, argv, log, address)
    wait_ready(service, functools.partial(ready, port), timeout)
    return service


def _redis_quote(value: str) -> str:
    """`value` as a double-quoted string of redis.conf."""
    if not value.isprintable():
        raise ServiceError("a Redis password must be printable")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _redis_ready(port: int, password: str | None = None) -> bool:
    """Answers PING and has finished loading its append-only file."""
    if not _redis_pong(port, password):
        return False
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        if password is not None:
            sock.sendall(_resp("AUTH", password))
            sock.recv(64)
        sock.sendall(_resp("INFO", "persistence"))
        return b"loading:0" in sock.recv(65536)


def start_sentinel(
    workdir: Path,
    primary_port: int,
    *,
    service: str = "buildfleet",
    password: str | None = None,
    timeout: float = 15.0,
) -> Service:
    """A Sentinel watching the primary on `primary_port` (quorum 1, down after 1 s);
    address `127.0.0.1:PORT`. Use the URL `redis+sentinel://127.0.0.1:PORT/SERVICE/0`.

    It is redis-server in sentinel mode (`--sentinel`), which is what `redis-sentinel` is:
    Debian ships that name in a package of its own, and redis-server is installed anyway."""
    home = workdir / "sentinel"
    home.mkdir(parents=True, exist_ok=True)
    binary = find_tool("redis-server")

    def launch(port: int) -> tuple[list[str], str]:
        config = home / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {home}\n"
            f"sentinel monitor {service} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {service} 1000\n"
            f"sentinel failover-timeout {service} 5000\n"
            f"sentinel parallel-syncs {service} 1\n"
            + (f"sentinel auth-pass {service} {password}\n" if password else "")
        )
        return [binary, str(config), "--sentinel"], f"127.0.0.1:{port}"

    log = workdir / "logs" / "sentinel.log"
    return start_on_free_port("sentinel", log, launch, _redis_pong, timeout=timeout)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2.0) as response:  # noqa: S310 - loopback http
        return int(response.status) == 200


def _http_answers(url: str) -> bool:
    """True when `url` answers 200, or 401 (a registry that wants credentials)."""
    try:
        return _http_ok(url)
    except urllib.error.HTTPError as exc:
        return exc.code == 401


def start_registry(
    workdir: Path,
    *,
    name: str = "registry",
    htpasswd: Path | None = None,
    timeout: float = 15.0,
) -> Service:
    """Debian's docker-registry (distribution 2.8), deletes enabled; address `127.0.0.1:PORT`.
    With `htpasswd` (bcrypt entries) every request needs basic auth."""
    storage = workdir / name
    storage.mkdir(parents=True, exist_ok=True)
    binary = find_tool("docker-registry")

    def launch(port: int) -> tuple[list[str], str]:
        config = workdir / f"{name}.yml"
        # JSON is YAML: no YAML library needed.
        settings: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{port}"},
        }
        if htpasswd is not None:
            settings["auth"] = {"htpasswd": {"realm": name, "path": str(htpasswd)}}
        config.write_text(json.dumps(settings, indent=2) + "\n")
        return [binary, "serve", str(config)], f"127.0.0.1:{port}"

    def ready(port: int) -> bool:
        return _http_answers(f"http://127.0.0.1:{port}/v2/")

    log = workdir / "logs" / f"{name}.log"
    return start_on_free_port(name, log, launch, ready, timeout=timeout)


def buildkitd_config(
    registries: Sequence[str], otel_socket: Path, network: BuildNetwork | None = None
) -> str:
    """buildkitd.toml marking each registry (`host:port`) plain-HTTP and insecure; RUN
    steps on `network`, or on the host's network."""
    lines = ["[otel]", f"  socketPath = {json.dumps(str(otel_socket))}", ""]
    if network is None:
        lines += ["[worker.oci]", '  networkMode = "host"', ""]
    else:
        lines += [network.buildkitd_toml()]
    for registry in registries:
        lines += [f"[registry.{json.dumps(registry)}]", "  http = true", "  insecure = true", ""]
    return "\n".join(lines)


def _own_pid_namespace() -> list[str]:
    """A prefix running the command as PID 1 of a new PID (and mount) namespace.

    When buildkitd dies, even by SIGKILL, the kernel kills everything in its namespace:
    the RUN containers too, which would otherwise outlive it. Needs root; [] otherwise.
    """
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return []
    return [unshare, "--pid", "--fork", "--kill-child", "--mount-proc"]


def buildkit_workers_ok(addr: str, timeout: float = 10.0) -> bool:
    """True when the daemon at `addr` answers `buildctl debug workers`."""
    from worker.telemetry import unsampled_traceparent

    result = subprocess.run(
        [find_tool("buildctl"), "--addr", addr, "debug", "workers"],
        capture_output=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "TRACEPARENT": unsampled_traceparent()},  # no trace per probe
    )
    return result.returncode == 0


def start_buildkitd(
    workdir: Path,
    registries: Sequence[str] = (),
    *,
    name: str = "buildkitd",
    timeout: float = 60.0,
    otlp_endpoint: str | None = None,
    run_network: RunNetwork = "host",
) -> Service:
    """A buildkitd with the OCI (runc) worker; address `tcp://127.0.0.1:PORT`.

    Each call gets its own root under `workdir/name`, so several daemons can run side by
    side. The root must be on a filesystem that supports overlayfs (not tmpfs). With
    `otlp_endpoint` (OTLP/gRPC) it exports its own spans there, and those buildctl hands it.
    `run_network="isolated"` gives RUN steps a bridge of their own that cannot reach this
    host (buildfleet.build_network); "host" shares the host's network with them.
    """
    home = workdir / name
    root = home / "root"
    root.mkdir(parents=True, exist_ok=True)
    config = home / "buildkitd.toml"
    binary = find_tool("buildkitd")
    find_tool("runc")
    network = BuildNetwork(home) if run_network == "isolated" else None

    def launch(port: int) -> tuple[list[str], str]:
        if network is not None:
            network.open()
        config.write_text(buildkitd_config(registries, home / "otel-grpc.sock", network))
        addr = f"tcp://127.0.0.1:{port}"
        flags = ["--config", str(config), "--addr", addr, "--root", str(root),
                 "--containerd-worker=false"]  # fmt: skip
        argv = [*_own_pid_namespace(), binary, *flags]
        return argv, addr

    def ready(port: int) -> bool:
        return tcp_open(port) and buildkit_workers_ok(f"tcp://127.0.0.1:{port}")

    log = workdir / "logs" / f"{name}.log"
    env = None
    if otlp_endpoint:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
               "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_SERVICE_NAME": name}  # fmt: skip
    release = network.close if network is not None else None
    return start_on_free_port(name, log, launch, ready, timeout=timeout, env=env, release=release)


def docker_ping(socket_path: Path) -> bool:
    """True when the Docker daemon on this unix socket answers `GET /_ping`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(str(socket_path))
        sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        return sock.recv(1024).startswith(b"HTTP/1.0 200")


def start_dockerd(
    workdir: Path, *, name: str = "dockerd", tls_dir: Path | None = None, timeout: float = 60.0
) -> Service:
    """A Docker daemon of our own (data root, socket, containerd), on loopback with no bridge
    and no iptables rules; address `unix://WORKDIR/NAME/docker.sock`, or with `tls_dir`
    (ca.pem, server-cert.pem, server-key.pem) `tcp://127.0.0.1:PORT`, TLS with client
    certificates required.

    Loopback registries count as insecure by default. The exec root is a short directory
    under /tmp: containerd's shim sockets live below it and a unix socket path must stay
    under 108 bytes. Like buildkitd, it runs as PID 1 of its own PID namespace when root,
    so a killed daemon takes its containerd and build containers with it.
    """
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    (home / "daemon.json").write_text("{}\n")
    sock = home / "docker.sock"
    sock.unlink(missing_ok=True)
    exec_root = Path(tempfile.mkdtemp(prefix="bfd-", dir="/tmp"))
    flags = ["--config-file", str(home / "daemon.json"), "--host", f"unix://{sock}",
             "--data-root", str(home / "data"), "--exec-root", str(exec_root),
             "--pidfile", str(home / "docker.pid"), "--bridge=none", "--iptables=false",
             "--ip6tables=false", "--storage-driver=overlay2"]  # fmt: skip
    address = f"unix://{sock}"
    if tls_dir is not None:
        address = f"tcp://127.0.0.1:{free_port()}"
        flags += ["--host", address, "--tlsverify", "--tlscacert", str(tls_dir / "ca.pem"),
                  "--tlscert", str(tls_dir / "server-cert.pem"),
                  "--tlskey", str(tls_dir / "server-key.pem")]  # fmt: skip
    argv = [*_own_pid_namespace(), find_tool("dockerd"), *flags]
    service = spawn(name, argv, workdir / "logs" / f"{name}.log", address, scratch=exec_root)
    wait_ready(service, lambda: docker_ping(sock), timeout)
    return service


def _git_exec_path() -> str:
    result = subprocess.run(
        [find_tool("git"), "--exec-path"], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def start_git_daemon(root: Path, *, log_path: Path | None = None, timeout: float = 15.0) -> Service:
    """`git daemon` exporting every repository under `root`; address `git://127.0.0.1:PORT/`."""
    root.mkdir(parents=True, exist_ok=True)
    log = log_path or root.parent / "logs" / "git-daemon.log"
    # git-daemon itself, not `git daemon`, which would fork it out of PDEATHSIG's reach.
    binary = str(Path(_git_exec_path()) / "git-daemon")
    log_start = [0]  # ignore what earlier runs wrote to the same log

    def launch(port: int) -> tuple[list[str], str]:
        log_start[0] = log.stat().st_size if log.exists() else 0
        argv = [binary, "--verbose", "--informative-errors", "--reuseaddr",
                f"--base-path={root}", "--export-all", "--enable=receive-pack",
                "--listen=127.0.0.1", f"--port={port}", str(root)]  # fmt: skip
        return argv, f"git://127.0.0.1:{port}/"

    def ready(port: int) -> bool:  # with --verbose it says so once it listens
        with log.open("rb") as output:
            output.seek(log_start[0])
            return b"Ready to rumble" in output.read()

    return start_on_free_port("git-daemon", log, launch, ready, timeout=timeout, cwd=root)


def release_buildah_storage(workdir: Path) -> None:
    """Remove buildah's working containers and unmount what its storage left mounted (its
    overlay root is a mount of its own): nothing of it outlives a local fleet or a test run."""
    root, runroot = buildah_storage(workdir)
    if not root.exists():
        return
    with contextlib.suppress(ToolMissing):
        argv = [find_tool("buildah"), "--root", str(root), "--runroot", str(runroot)]
        subprocess.run([*argv, "rm", "--all"], capture_output=True, check=False, timeout=60)
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        mounted = [line.split()[4] for line in mountinfo]
    for point in sorted((m for m in mounted if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


Backend = Literal["buildkit", "docker", "buildah"]


class LocalFleetServices:
    """Redis, a registry, the builders of one backend, a git daemon and the base image.

    Builders: `buildkitd_count` buildkitd daemons (buildkit), `dockerd_count` Docker daemons
    (docker), or buildah's storage under the workdir (buildah: no daemon). The base image is
    built by the same backend. Use as a context manager; everything stops in reverse order
    on exit, also on errors. Logs go to `workdir/logs/`; a temporary `workdir` is made (and
    removed) if none is given.

    With `otlp_endpoint` (OTLP/gRPC), the daemons export their spans there. With
    `redis_password` Redis refuses clients that do not give it (`redis_url` holds no
    password); `run_network` is that of the buildkitd daemons' RUN steps.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        backend: Backend = "buildkit",
        buildkitd_count: int = 1,
        dockerd_count: int = 1,
        redis: bool = True,
        base_image: bool = True,
        otlp_endpoint: str | None = None,
        redis_password: str | None = None,
        run_network: RunNetwork = "host",
    ) -> None:
        self._own_workdir = workdir is None
        self._redis_password = redis_password
        self.run_network: RunNetwork = run_network
        self.otlp_endpoint = otlp_endpoint
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="buildfleet-services-"))
        self.backend = backend
        self.buildkitd_count = buildkitd_count if backend == "buildkit" else 0
        self.dockerd_count = dockerd_count if backend == "docker" else 0
        self._want_redis = redis
        self._want_base_image = base_image
        self._services: list[Service] = []
        self.redis_url = ""
        self.registry = ""
        self.buildkitd_addrs: list[str] = []
        self.dockerd_addrs: list[str] = []
        self.git_root = self.workdir / "git"
        self.git_url = ""
        self.base_image = ""

    @property
    def services(self) -> tuple[Service, ...]:
        return tuple(self._services)

    @property
    def builders(self) -> list[str]:
        """Where builds run: the daemons' addresses (buildah: none)."""
        return self.buildkitd_addrs or self.dockerd_addrs

    def _track(self, service: Service) -> Service:
        self._services.append(service)
        return service

    def start(self) -> Self:
        try:
            if self._want_redis:
                redis = start_redis(self.workdir, password=self._redis_password)
                self.redis_url = self._track(redis).address
            self.registry = self._track(start_registry(self.workdir)).address
            for _ in range(self.buildkitd_count):
                self.add_buildkitd()
            for n in range(1, self.dockerd_count + 1):
                dockerd = start_dockerd(self.workdir, name=f"dockerd-{n}")
                self.dockerd_addrs.append(self._track(dockerd).address)
            self.git_url = self._track(start_git_daemon(self.git_root)).address
            if self._want_base_image:
                self.base_image = self._push_base_image()
        except BaseException:
            self.stop()
            raise
        return self

    def _push_base_image(self) -> str:
        if self.backend == "docker":
            return push_base_image_with_docker(self.dockerd_addrs[0], self.registry)
        if self.backend == "buildah":
            return push_base_image_with_buildah(self.workdir, self.registry)
        return push_base_image(self.buildkitd_addrs[0], self.registry)

    def add_buildkitd(self) -> Service:
        """Start one more buildkitd (trusting the registry) and add it to the pool."""
        name = f"buildkitd-{len(self.buildkitd_addrs) + 1}"
        registries = [self.registry] if self.registry else []
        service = self._track(
            start_buildkitd(
                self.workdir,
                registries,
                name=name,
                otlp_endpoint=self.otlp_endpoint,
                run_network=self.run_network,
            )
        )
        self.buildkitd_addrs.append(service.address)
        return service

    def stop(self) -> None:
        while self._services:
            self._services.pop().stop()
        if self.backend == "buildah":
            release_buildah_storage(self.workdir)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def addresses(self) -> dict[str, object]:
        """Every address, e.g. for `buildfleet up --json`."""
        return {
            "redis_url": self.redis_url,
            "registry": self.registry,
            "backend": self.backend,
            "buildkitd": list(self.buildkitd_addrs),
            "dockerd": list(self.dockerd_addrs),
            "git_url": self.git_url,
            "git_root": str(self.git_root),
            "base_image": self.base_image,
            "logs": {s.name: str(s.log_path) for s in self._services},
        }

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
