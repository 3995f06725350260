"""The test harness: real services on free loopback ports, started lazily once per session.

Session fixtures (each starts its service on first use and stops it at session end):
    redis_url       str        redis://127.0.0.1:PORT/0
    registry        str        127.0.0.1:PORT           (plain-HTTP docker-registry)
    buildkitd       str        tcp://127.0.0.1:PORT     (trusts `registry`)
    buildkitd_pool  list[str]  two daemon addresses, the first is `buildkitd`
    dockerd         str        unix://DIR/docker.sock   (a Docker daemon of our own)
    buildah_storage (Path, Path) buildah's --root and --runroot for the session
    git_server      GitServer  git daemon root + URL; `git_server.create_repo(...)`
    base_image      str        REGISTRY/base/busybox:latest, built FROM scratch
    trace_viewer    TraceViewer  otel-desktop-viewer: OTLP in, web UI and query API out
    traced_buildkitd str       tcp://127.0.0.1:PORT, a buildkitd exporting its spans to it
Module fixture:
    empty_redis_url the session Redis's URL, FLUSHALLed once before the module

Function fixture:
    redis           redis.asyncio.Redis (bytes), the server FLUSHALLed before the test
    fleet           BuildfleetClient on that same (flushed) server

When a test fails, the logs of the services it used are attached to its report.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
import redis.asyncio as aioredis

from buildfleet import services
from buildfleet.services import Service
from buildfleet.traceviewer import TraceViewer, start_trace_viewer
from producer.client import BuildfleetClient

from gitrepos import GitServer

# pytest keeps its temporary directories under one root per user and deletes old sessions'
# there: a checkout of its own keeps concurrent test runs of other checkouts from deleting
# this one's working directories (service data, logs) while it runs.
# (Short: daemons put unix sockets under test directories, and a socket path has at most
# 107 bytes.)
_CHECKOUT = hashlib.sha256(str(Path(__file__).resolve().parent).encode()).hexdigest()[:6]
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", str(Path(tempfile.gettempdir()) / f"bf{_CHECKOUT}"))
Path(os.environ["PYTEST_DEBUG_TEMPROOT"]).mkdir(parents=True, exist_ok=True)

if (Path(__file__).parent / "kube.py").exists():
    pytest_plugins = ["kube"]  # kube_cluster / kubeconfig fixtures (Kaniko backend tests)

BUILDKITD_POOL_SIZE = 2
LOG_SECTION_LINES = 200

# fixture name -> services it started; used to attach logs to failing tests' reports
_SERVICES_BY_FIXTURE: dict[str, list[Service]] = {}
_LOG_OFFSETS = pytest.StashKey[dict[Path, int]]()


def _started(fixture: str, service: Service) -> Service:
    _SERVICES_BY_FIXTURE.setdefault(fixture, []).append(service)
    return service


def _serve(fixture: str, start: Callable[[], Service]) -> Iterator[Service]:
    service = _started(fixture, start())
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Working directories and logs of the session's services."""
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_url(services_dir: Path) -> Iterator[str]:
    """The session's Redis, with a password of its own: a worker left over from another
    test session (workers retry a lost Redis forever) can never attach to it."""
    password = secrets.token_hex(16)
    start = functools.partial(services.start_redis, services_dir, password=password)
    for service in _serve("redis_url", start):
        yield service.address.replace("redis://", f"redis://:{password}@", 1)


@pytest.fixture(scope="session")
def registry(services_dir: Path) -> Iterator[str]:
    for service in _serve("registry", lambda: services.start_registry(services_dir)):
        yield service.address


@pytest.fixture(scope="session")
def buildkitd(services_dir: Path, registry: str) -> Iterator[str]:
    def start() -> Service:
        return services.start_buildkitd(services_dir, [registry], name="buildkitd-1")

    for service in _serve("buildkitd", start):
        yield service.address


@pytest.fixture(scope="session")
def buildkitd_pool(services_dir: Path, registry: str, buildkitd: str) -> Iterator[list[str]]:
    extra: list[Service] = []
    try:
        for index in range(2, BUILDKITD_POOL_SIZE + 1):
            service = services.start_buildkitd(services_dir, [registry], name=f"buildkitd-{index}")
            extra.append(_started("buildkitd_pool", service))
        yield [buildkitd, *(service.address for service in extra)]
    finally:
        for service in reversed(extra):
            service.stop()


@pytest.fixture(scope="session")
def dockerd(services_dir: Path) -> Iterator[str]:
    def start() -> Service:
        return services.start_dockerd(services_dir, name="dockerd-1")

    for service in _serve("dockerd", start):
        yield service.address


@pytest.fixture(scope="session")
def trace_viewer(services_dir: Path) -> Iterator[TraceViewer]:
    viewer = start_trace_viewer(services_dir)
    _started("trace_viewer", viewer.service)
    try:
        yield viewer
    finally:
        viewer.stop()


@pytest.fixture(scope="session")
def traced_buildkitd(services_dir: Path, registry: str, trace_viewer: TraceViewer) -> Iterator[str]:
    def start() -> Service:
        return services.start_buildkitd(
            services_dir, [registry], name="buildkitd-traced", otlp_endpoint=trace_viewer.otlp_grpc
        )

    for service in _serve("traced_buildkitd", start):
        yield service.address


@pytest.fixture(scope="session")
def buildah_storage(services_dir: Path) -> Iterator[tuple[Path, Path]]:
    yield services.buildah_storage(services_dir)
    services.release_buildah_storage(services_dir)


@pytest.fixture(scope="session")
def git_server(services_dir: Path) -> Iterator[GitServer]:
    root = services_dir / "git"
    for service in _serve("git_server", lambda: services.start_git_daemon(root)):
        yield GitServer(root=root, url=service.address)


@pytest.fixture(scope="session")
def base_image(buildkitd: str, registry: str) -> str:
    return services.push_base_image(buildkitd, registry)


@pytest.fixture(scope="module")
def empty_redis_url(redis_url: str) -> str:
    """The session Redis, emptied first: for a module whose worker processes would otherwise
    run (or requeue, as lost) builds earlier tests left behind."""
    with sync_redis.Redis.from_url(redis_url) as client:
        client.flushall()
    return redis_url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


def _known_services() -> list[Service]:
    seen: dict[int, Service] = {}
    for started in _SERVICES_BY_FIXTURE.values():
        for service in started:
            seen.setdefault(service.process.pid, service)
    return list(seen.values())


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Remember where each log ends, so a failure shows only what this test caused.
    item.stash[_LOG_OFFSETS] = {s.log_path: _log_size(s.log_path) for s in _known_services()}


def _log_since(service: Service, offset: int) -> str:
    try:
        with service.log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<cannot read {service.log_path}: {exc}>"
    lines = text.splitlines()
    if len(lines) > LOG_SECTION_LINES:
        lines = [
            f"... {len(lines) - LOG_SECTION_LINES} earlier lines ...",
            *lines[-LOG_SECTION_LINES:],
        ]
    return "\n".join(lines) or "<nothing logged during this test>"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        offsets = item.stash.get(_LOG_OFFSETS, {})
        shown: set[int] = set()
        for fixture in item.fixturenames:  # type: ignore[attr-defined]
            for service in _SERVICES_BY_FIXTURE.get(fixture, []):
                if service.process.pid in shown:
                    continue
                shown.add(service.process.pid)
                state = "running" if service.running else f"EXITED {service.process.returncode}"
                title = f"{service.name} log ({state}, {service.log_path})"
                body = _log_since(service, offsets.get(service.log_path, 0))
                report.sections.append((title, body))
    return report


@pytest.fixture
async def fleet(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[BuildfleetClient]:
    async with BuildfleetClient.from_url(redis_url) as client:
        yield client


def _dump_tasks() -> None:
    """Every asyncio task's stack, to stderr: what a hung test was waiting on."""
    for task in asyncio.all_tasks():
        print(f"\n--- {task!r}", file=sys.stderr)
        task.print_stack(limit=12, file=sys.stderr)


@pytest.fixture(autouse=True)
async def _tasks_dumped_before_a_timeout(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    marker = request.node.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else request.config.getini("timeout")
    handle = asyncio.get_running_loop().call_later(max(1.0, float(timeout) - 5.0), _dump_tasks)
    try:
        yield
    finally:
        handle.cancel()
