"""Workers for tests: in this process (arq in a task) or as real `buildfleet worker` processes;
and the gateway as a real `buildfleet gateway` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from buildfleet.services import Service, find_tool, free_port, spawn, wait_ready
from buildfleet.traceviewer import TraceViewer
from producer.settings import QueueSettings, RedisSettings
from worker.app import running_worker
from worker.retry import RetrySettings
from worker.settings import (
    BuildahSettings,
    BuildkitSettings,
    DaemonSettings,
    DockerSettings,
    JibSettings,
    KanikoSettings,
    SchedulingSettings,
    SecretSource,
    SimulateSettings,
    WorkerConfig,
    WorkerSettings,
)
from worker.subprocesses import die_with_this_process

FAST_RETRIES = RetrySettings(max_attempts=3, base_delay_s=0.05, max_delay_s=0.2)
# Short leases, so that recovery after a SIGKILL happens within a test's patience.
QUICK_RECOVERY = SchedulingSettings(
    slot_ttl_s=4.0, lease_ttl_s=3.0, reap_interval_s=1.0, health_interval_s=1.0, spill_after_s=0.3
)
INSTANT = SimulateSettings()


def worker_config(
    redis_url: str,
    *,
    backend: str = "buildkit",
    daemons: Sequence[str] = (),
    max_builds: int = 4,
    concurrency: int = 4,
    retry: RetrySettings = FAST_RETRIES,
    simulate: SimulateSettings = INSTANT,
    drain_grace_s: float = 0.0,
    scheduling: SchedulingSettings = QUICK_RECOVERY,
    docker: DockerSettings | None = None,
    buildah: BuildahSettings | None = None,
    kaniko: KanikoSettings | None = None,
    jib: JibSettings | None = None,
    log_cap_bytes: int = 1 << 20,
    secrets: Sequence[SecretSource] = (),
) -> WorkerConfig:
    """A worker's configuration for tests; `daemons` are BuildKit's (docker's come in
    `docker`)."""
    return WorkerConfig(
        redis=RedisSettings(url=redis_url),
        queue=QueueSettings(),
        worker=WorkerSettings(
            backend=backend,  # type: ignore[arg-type]
            concurrency=concurrency,
            poll_delay_s=0.01,
            drain_grace_s=drain_grace_s,
            log_cap_bytes=log_cap_bytes,
            secrets=tuple(secrets),
        ),
        retry=retry,
        buildkit=BuildkitSettings(
            daemons=tuple(DaemonSettings(address=a, max_builds=max_builds) for a in daemons),
            buildctl=find_tool("buildctl"),
        ),
        simulate=simulate,
        scheduling=scheduling,
        docker=docker or DockerSettings(),
        buildah=buildah or BuildahSettings(),
        kaniko=kaniko or KanikoSettings(),
        jib=jib or JibSettings(),
    )


@asynccontextmanager
async def worker_in_task(config: WorkerConfig) -> AsyncIterator[None]:
    """A worker polling the queue in a task of the test's own event loop."""
    async with running_worker(config, handle_signals=False) as worker:
        task = asyncio.create_task(worker.main())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def worker_env(config: WorkerConfig) -> dict[str, str]:
    """The environment that gives a `buildfleet worker` process this configuration."""
    return {
        **os.environ,
        "BUILDFLEET_REDIS_URL": config.redis.url,
        "BUILDFLEET_WORKER_BACKEND": config.worker.backend,
        "BUILDFLEET_WORKER_CONCURRENCY": str(config.worker.concurrency),
        "BUILDFLEET_WORKER_POLL_DELAY_S": str(config.worker.poll_delay_s),
        "BUILDFLEET_WORKER_DRAIN_GRACE_S": str(config.worker.drain_grace_s),
        **(
            {"BUILDFLEET_RETRY_MAX_ATTEMPTS": str(config.retry.max_attempts)}
            if config.retry.max_attempts is not None
            else {}
        ),
        "BUILDFLEET_RETRY_BUDGET_S": str(config.retry.budget_s),
        "BUILDFLEET_RETRY_BASE_DELAY_S": str(config.retry.base_delay_s),
        "BUILDFLEET_RETRY_MAX_DELAY_S": str(config.retry.max_delay_s),
        "BUILDFLEET_BUILDKIT_BUILDCTL": config.buildkit.buildctl,
        "BUILDFLEET_BUILDKIT_DAEMONS": json.dumps(
            [{"address": d.address, "max_builds": d.max_builds} for d in config.buildkit.daemons]
        ),
        "BUILDFLEET_JIB_INSECURE_REGISTRIES": json.dumps(list(config.jib.insecure_registries)),
        "BUILDFLEET_SIMULATE_DURATION_S": str(config.simulate.duration_s),
        "BUILDFLEET_SIMULATE_OUTCOME": config.simulate.outcome,
        **(
            {"BUILDFLEET_SIMULATE_JOURNAL": config.simulate.journal}
            if config.simulate.journal
            else {}
        ),
        **{
            f"BUILDFLEET_SCHEDULING_{name.upper()}": str(getattr(config.scheduling, name))
            for name in config.scheduling.__struct_fields__
        },
    }


@contextmanager
def worker_processes(
    config: WorkerConfig, count: int, logs: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` real worker processes; stopped (SIGKILL after a drain) on exit."""
    env = worker_env(config)
    processes = []
    for n in range(count):
        log = (logs / f"worker-{n}.log").open("ab")
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "buildfleet.cli", "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_this_process(),  # noqa: PLW1509 - prctl only
            )
        )
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def cli_env(redis_url: str) -> dict[str, str]:
    """The environment a `buildfleet` command needs to reach the test's Redis (git on PATH)."""
    return {"BUILDFLEET_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]}


def cli(
    redis_url: str, *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `buildfleet ARGS...` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "buildfleet.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(redis_url),
        cwd=cwd,
        timeout=timeout,
    )


@contextmanager
def cli_process(redis_url: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`buildfleet ARGS...` running in the background (text pipes); killed if still running
    on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "buildfleet.cli", *args],
        env=cli_env(redis_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def exporting_to(viewer: TraceViewer, service_name: str) -> dict[str, str]:
    """The environment that makes a process export its traces and metrics to `viewer`,
    promptly (a test waits for them)."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": viewer.otlp_http,
        "OTEL_SERVICE_NAME": service_name,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
    }


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


def start_worker_process(
    config: WorkerConfig,
    logs: Path,
    *,
    name: str = "worker",
    env: Mapping[str, str] | None = None,
    steps: int = 0,
) -> Service:
    """One `buildfleet worker --metrics-port P` process; its address is the metrics server's
    URL, and it is returned once /healthz answers."""
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    service = spawn(
        name,
        [sys.executable, "-m", "buildfleet.cli", "worker", "--metrics-port", str(port)],
        logs / f"{name}.log",
        address,
        env={**worker_env(config), "BUILDFLEET_SIMULATE_STEPS": str(steps), **(env or {})},
    )
    wait_ready(service, lambda: _http_ok(f"{address}/healthz"), timeout=30)
    return service


def start_gateway_process(
    redis_url: str, logs: Path, settings: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> Service:
    """One `buildfleet gateway` process configured by `settings` (the [gateway] table);
    returned once /readyz answers."""
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    overrides = {
        f"BUILDFLEET_GATEWAY_{key.upper()}": value if isinstance(value, str) else json.dumps(value)
        for key, value in settings.items()
    }
    service = spawn(
        "gateway",
        [sys.executable, "-m", "buildfleet.cli", "gateway"],
        logs / "gateway.log",
        address,
        env={
            **os.environ,
            **overrides,
            "BUILDFLEET_REDIS_URL": redis_url,
            "BUILDFLEET_GATEWAY_PORT": str(port),
            **(env or {}),
        },
    )
    wait_ready(service, lambda: _http_ok(f"{address}/readyz"), timeout=30)
    return service
