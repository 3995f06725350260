"""Child processes that never outlive us: started in a session of their own, stopped as a
group, found among the tools scripts/setup installs. Synchronous and stdlib-only.

Every child runs in its own session (so `stop()` reaches its whole process group) and
with PR_SET_PDEATHSIG=SIGKILL, so nothing outlives its parent, even a SIGKILLed one.
The death signal fires when the *thread* that started the child exits: start services
from the main thread or another thread that lives as long as they should.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from buildfleet.tools import tool_home
from worker.subprocesses import die_with_this_process

_PORT_RETRIES = 3


class ServiceError(RuntimeError):
    """A local service could not be started or used."""


class ToolMissing(ServiceError):
    """A required executable is not installed."""


def find_tool(name: str) -> str:
    """Path of executable `name`: the pinned BuildKit build first, then PATH."""
    pinned = tool_home("buildkit", "BUILDKIT_VERSION") / "bin" / name
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
    scratch: Path | None = None
    """A directory of its own outside `workdir` (dockerd's short exec root), removed on stop."""
    release: Callable[[], None] | None = None
    """Undoes what was set up on the host for it (buildkitd's build network), once it exited."""

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
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if self.release is not None:
            self.release()

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
    scratch: Path | None = None,
    release: Callable[[], None] | None = None,
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
    service = Service(
        name=name,
        process=process,
        log_path=log_path,
        address=address,
        scratch=scratch,
        release=release,
    )
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
    release: Callable[[], None] | None = None,
) -> Service:
    """Start a service on a fresh port, retrying when another process took the port first.

    `release` runs whenever an attempt's process is stopped, so `launch` sets up again
    what it undoes."""
    for attempt in range(1, _PORT_RETRIES + 1):
        port = free_port()
        argv, address = launch(port)
        service = spawn(name, argv, log_path, address, cwd=cwd, env=env, release=release)
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
