"""Real local services on free loopback ports: redis, registry, buildkitd, git daemon.

Used by the test harness and by `buildfleet up`. Synchronous and stdlib-only.

Every child runs in its own session (so `stop()` reaches its whole process group) and
with PR_SET_PDEATHSIG=SIGKILL, so nothing outlives its parent, even a SIGKILLed one.
The death signal fires when the *thread* that started the child exits: start services
from the main thread or another thread that lives as long as they should.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from worker.subprocesses import die_with_this_process

BUILDKIT_VERSION = "v0.34.2"
BASE_IMAGE_NAME = "base/busybox"
DEFAULT_PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_PORT_RETRIES = 3


class ServiceError(RuntimeError):
    """A local service could not be started or used."""


class ToolMissing(ServiceError):
    """A required executable is not installed."""


def tools_dir() -> Path:
    """Where scripts/setup caches the tools it builds."""
    default = Path.home() / ".cache" / "buildfleet" / "tools"
    return Path(os.environ.get("BUILDFLEET_TOOLS") or default)


def find_tool(name: str) -> str:
    """Path of executable `name`: the pinned BuildKit build first, then PATH."""
    pinned = tools_dir() / f"buildkit-{BUILDKIT_VERSION}" / "bin" / name
    if pinned.is_file() and os.access(pinned, os.X_OK):
        return str(pinned)
    found = shutil.which(name)
    if found is None:
        raise ToolMissing(
            f"{name} not found in {pinned.parent} nor on PATH; run scripts/setup to install it"
        )
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Service:
    """A running service: its process, where it logs, and how to reach it."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    address: str

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds. Idempotent."""
        with _LIVE_LOCK:
            _LIVE.pop(self.process.pid, None)
        if self.process.returncode is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            if not _exited(self.process.pid, grace):
                _signal_group(self.process.pid, signal.SIGKILL)
                _exited(self.process.pid, None)
            # The leader is a zombie, so its pid (the group id) cannot be reused yet:
            # kill whatever it left in its group (git daemon's per-connection children).
            _signal_group(self.process.pid, signal.SIGKILL)
        else:  # reaped earlier (it died on its own): its group may still hold children
            _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log_tail(self, lines: int = 50) -> str:
        """The last `lines` lines of the service's log."""
        try:
            data = self.log_path.read_bytes()
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"
        text = data[-256 * 1024 :].decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


_LIVE: dict[int, Service] = {}
_LIVE_LOCK = threading.Lock()
# A forked child must never stop its parent's services from its own atexit.
os.register_at_fork(after_in_child=_LIVE.clear)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _exited(pid: int, timeout: float | None) -> bool:
    """Wait until child `pid` exits, without reaping it; False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # already reaped
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.02)


@atexit.register
def stop_all() -> None:
    """Stop every service this process started and has not stopped yet."""
    with _LIVE_LOCK:
        live = list(_LIVE.values())
    for service in reversed(live):
        service.stop(grace=5.0)


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    address: str,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Service:
    """Start `argv` in a new session with its output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_this_process(),  # noqa: PLW1509 - prctl only
        )
    service = Service(name=name, process=process, log_path=log_path, address=address)
    with _LIVE_LOCK:
        _LIVE[process.pid] = service
    return service


def wait_ready(service: Service, ready: Callable[[], bool], timeout: float) -> None:
    """Poll `ready()` until true; stop the service and raise if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        code = service.process.poll()
        if code is not None:
            service.stop()
            raise ServiceError(
                f"{service.name} exited with status {code} before it was ready; "
                f"log {service.log_path}:\n{service.log_tail()}"
            )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if ready():
                return
        if time.monotonic() > deadline:
            service.stop()
            raise ServiceError(
                f"{service.name} not ready at {service.address} after {timeout:.0f}s; "
                f"log {service.log_path}:\n{service.log_tail()}"
            )
        time.sleep(0.05)


def start_on_free_port(
    name: str,
    log_path: Path,
    launch: Callable[[int], tuple[list[str], str]],
    ready: Callable[[int], bool],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Service:
    """Start a service on a fresh port, retrying when another process took the port first."""
    for attempt in range(1, _PORT_RETRIES + 1):
        port = free_port()
        argv, address = launch(port)
        service = spawn(name, argv, log_path, address, cwd=cwd, env=env)
        try:
            wait_ready(service, functools.partial(ready, port), timeout)
        except ServiceError as exc:
            if attempt < _PORT_RETRIES and _port_taken(str(exc)):
                continue
            raise
        return service
    raise AssertionError("unreachable")


def _port_taken(message: str) -> bool:
    text = message.lower()
    # redis, registry and buildkitd say the first; git daemon the second
    return "address already in use" in text or "unable to allocate any listen sockets" in text


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.create_connection((host, port), timeout=1.0):
        return True


def _redis_pong(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2.0) as response:  # noqa: S310 - loopback http
        return int(response.status) == 200


def start_redis(workdir: Path, *, timeout: float = 15.0) -> Service:
    """redis-server without persistence; address is `redis://127.0.0.1:PORT/0`."""
    data = workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    binary = find_tool("redis-server")

    def launch(port: int) -> tuple[list[str], str]:
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(data)]  # fmt: skip
        return argv, f"redis://127.0.0.1:{port}/0"

    log = workdir / "logs" / "redis.log"
    return start_on_free_port("redis", log, launch, _redis_pong, timeout=timeout)


def start_registry(workdir: Path, *, timeout: float = 15.0) -> Service:
    """Debian's docker-registry (distribution 2.8), deletes enabled; address `127.0.0.1:PORT`."""
    storage = workdir / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    binary = find_tool("docker-registry")

    def launch(port: int) -> tuple[list[str], str]:
        config = workdir / "registry.yml"
        # JSON is YAML: no YAML library needed.
        settings = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{port}"},
        }
        config.write_text(json.dumps(settings, indent=2) + "\n")
        return [binary, "serve", str(config)], f"127.0.0.1:{port}"

    def ready(port: int) -> bool:
        return _http_ok(f"http://127.0.0.1:{port}/v2/")

    log = workdir / "logs" / "registry.log"
    return start_on_free_port("registry", log, launch, ready, timeout=timeout)


def buildkitd_config(registries: Sequence[str], otel_socket: Path) -> str:
    """buildkitd.toml marking each registry (`host:port`) plain-HTTP and insecure."""
    lines = ["[otel]", f"  socketPath = {json.dumps(str(otel_socket))}", ""]
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
) -> Service:
    """A buildkitd with the OCI (runc) worker; address `tcp://127.0.0.1:PORT`.

    Each call gets its own root under `workdir/name`, so several daemons can run side by
    side. The root must be on a filesystem that supports overlayfs (not tmpfs). With
    `otlp_endpoint` (OTLP/gRPC) it exports its own spans there, and those buildctl hands it.
    """
    home = workdir / name
    root = home / "root"
    root.mkdir(parents=True, exist_ok=True)
    config = home / "buildkitd.toml"
    config.write_text(buildkitd_config(registries, home / "otel-grpc.sock"))
    binary = find_tool("buildkitd")
    find_tool("runc")

    def launch(port: int) -> tuple[list[str], str]:
        addr = f"tcp://127.0.0.1:{port}"
        flags = ["--config", str(config), "--addr", addr, "--root", str(root),
                 "--oci-worker-net=host", "--containerd-worker=false"]  # fmt: skip
        argv = [*_own_pid_namespace(), binary, *flags]
        return argv, addr

    def ready(port: int) -> bool:
        return tcp_open(port) and buildkit_workers_ok(f"tcp://127.0.0.1:{port}")

    log = workdir / "logs" / f"{name}.log"
    env = None
    if otlp_endpoint:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
               "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_SERVICE_NAME": name}  # fmt: skip
    return start_on_free_port(name, log, launch, ready, timeout=timeout, env=env)


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


def _busybox_rootfs(dest: Path) -> None:
    """A minimal root filesystem: static busybox, one symlink per applet, /etc, /tmp."""
    busybox = Path(find_tool("busybox")).resolve()
    bin_dir = dest / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(busybox, bin_dir / "busybox")
    (bin_dir / "busybox").chmod(0o755)
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            (bin_dir / applet).symlink_to("busybox")
    for sub in ("etc", "root", "tmp", "usr/bin", "var/tmp"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")


def push_base_image(buildkitd_addr: str, registry: str, *, timeout: float = 300.0) -> str:
    """Build `REGISTRY/base/busybox:latest` FROM scratch with busybox-static and push it."""
    ref = f"{registry}/{BASE_IMAGE_NAME}:latest"
    with tempfile.TemporaryDirectory(prefix="buildfleet-base-") as tmp:
        context = Path(tmp)
        _busybox_rootfs(context / "rootfs")
        (context / "Dockerfile").write_text(
            f'FROM scratch\nCOPY rootfs/ /\nENV PATH={DEFAULT_PATH_ENV}\nCMD ["sh"]\n'
        )
        argv = [find_tool("buildctl"), "--addr", buildkitd_addr, "build",
                "--frontend", "dockerfile.v0", "--progress", "plain",
                "--local", f"context={context}", "--local", f"dockerfile={context}",
                "--output", f"type=image,name={ref},push=true,registry.insecure=true"]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise ServiceError(f"pushing {ref} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return ref


class LocalFleetServices:
    """Redis, a registry, N buildkitd daemons, a git daemon and the base image, together.

    With `otlp_endpoint` (OTLP/gRPC), the daemons export their spans there.

    Use as a context manager; everything stops in reverse order on exit, also on errors.
    Logs go to `workdir/logs/`; a temporary `workdir` is made (and removed) if none is given.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        buildkitd_count: int = 1,
        redis: bool = True,
        base_image: bool = True,
        otlp_endpoint: str | None = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.otlp_endpoint = otlp_endpoint
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="buildfleet-services-"))
        self.buildkitd_count = buildkitd_count
        self._want_redis = redis
        self._want_base_image = base_image
        self._services: list[Service] = []
        self.redis_url = ""
        self.registry = ""
        self.buildkitd_addrs: list[str] = []
        self.git_root = self.workdir / "git"
        self.git_url = ""
        self.base_image = ""

    @property
    def services(self) -> tuple[Service, ...]:
        return tuple(self._services)

    def _track(self, service: Service) -> Service:
        self._services.append(service)
        return service

    def start(self) -> Self:
        try:
            if self._want_redis:
                self.redis_url = self._track(start_redis(self.workdir)).address
            self.registry = self._track(start_registry(self.workdir)).address
            for _ in range(self.buildkitd_count):
                self.add_buildkitd()
            self.git_url = self._track(start_git_daemon(self.git_root)).address
            if self._want_base_image and self.buildkitd_addrs:
                self.base_image = push_base_image(self.buildkitd_addrs[0], self.registry)
        except BaseException:
            self.stop()
            raise
        return self

    def add_buildkitd(self) -> Service:
        """Start one more buildkitd (trusting the registry) and add it to the pool."""
        name = f"buildkitd-{len(self.buildkitd_addrs) + 1}"
        registries = [self.registry] if self.registry else []
        service = self._track(
            start_buildkitd(self.workdir, registries, name=name, otlp_endpoint=self.otlp_endpoint)
        )
        self.buildkitd_addrs.append(service.address)
        return service

    def stop(self) -> None:
        while self._services:
            self._services.pop().stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def addresses(self) -> dict[str, object]:
        """Every address, e.g. for `buildfleet up --json`."""
        return {
            "redis_url": self.redis_url,
            "registry": self.registry,
            "buildkitd": list(self.buildkitd_addrs),
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
