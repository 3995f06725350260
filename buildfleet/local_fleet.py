"""`buildfleet up`: a whole fleet on this machine, stopped cleanly by Ctrl-C.

Real services on free loopback ports (a trace viewer, Redis unless `BUILDFLEET_REDIS_URL`
names one, a registry, buildkitd, a git daemon, a base image), then worker processes and the
HTTP gateway pointed at them. The gateway, the workers and buildkitd export their traces
(and the processes their metrics) to the trace viewer; each worker serves Prometheus text,
/healthz and /readyz on a port of its own. The gateway's API token is made up for this
fleet and printed.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import threading
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from buildfleet.config import FleetConfig
from buildfleet.services import (
    LocalFleetServices,
    Service,
    find_tool,
    free_port,
    spawn,
    wait_ready,
)
from buildfleet.traceviewer import TraceViewer, start_trace_viewer


def _otel_env(viewer: TraceViewer, service_name: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": viewer.otlp_http, "OTEL_SERVICE_NAME": service_name}


def _worker_env(fleet: LocalFleetServices, redis_url: str) -> dict[str, str]:
    daemons = [{"address": address, "max_builds": 4} for address in fleet.buildkitd_addrs]
    return {
        **os.environ,
        "BUILDFLEET_REDIS_URL": redis_url,
        "BUILDFLEET_BUILDKIT_DAEMONS": json.dumps(daemons),
        "BUILDFLEET_BUILDKIT_BUILDCTL": find_tool("buildctl"),
    }


def _start_workers(
    fleet: LocalFleetServices, redis_url: str, count: int, viewer: TraceViewer
) -> list[Service]:
    """`count` worker processes, each serving its metrics on a port of its own (the
    service's address is that server's URL)."""
    env = {**_worker_env(fleet, redis_url), **_otel_env(viewer, "buildfleet-worker")}
    workers = []
    for n in range(1, count + 1):
        port = free_port()
        argv = [sys.executable, "-m", "buildfleet.cli", "worker", "--metrics-port", str(port)]
        log = fleet.workdir / "logs" / f"worker-{n}.log"
        workers.append(spawn(f"worker-{n}", argv, log, f"http://127.0.0.1:{port}", env=env))
    return workers


def _start_gateway(
    fleet: LocalFleetServices, redis_url: str, token: str, viewer: TraceViewer
) -> Service:
    port = free_port()
    env = {
        **os.environ,
        **_otel_env(viewer, "buildfleet-gateway"),
        "BUILDFLEET_REDIS_URL": redis_url,
        "BUILDFLEET_GATEWAY_PORT": str(port),
        "BUILDFLEET_GATEWAY_API_TOKENS": json.dumps([token]),
    }
    address = f"http://127.0.0.1:{port}"
    gateway = spawn(
        "gateway",
        [sys.executable, "-m", "buildfleet.cli", "gateway"],
        fleet.workdir / "logs" / "gateway.log",
        address,
        env=env,
    )
    wait_ready(gateway, lambda: _http_ok(f"{address}/readyz"), timeout=30)
    return gateway


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our loopback URL
        return bool(response.status == 200)


def _wait_for_stop_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def run_local_fleet(config: FleetConfig, *, workers: int, as_json: bool) -> int:
    own_redis = "BUILDFLEET_REDIS_URL" not in os.environ
    workdir = Path(os.environ.get("BUILDFLEET_WORKDIR", "") or Path.cwd() / ".tmp" / "fleet")
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        viewer = start_trace_viewer(workdir)
        stack.callback(viewer.stop)
        fleet = stack.enter_context(
            LocalFleetServices(workdir, redis=own_redis, otlp_endpoint=viewer.otlp_grpc)
        )
        redis_url = fleet.redis_url or config.redis.url
        fleet_workers = _start_workers(fleet, redis_url, workers, viewer)
        for worker in fleet_workers:
            stack.callback(worker.stop, grace=config.worker.drain_grace_s + 5)
        token = secrets.token_urlsafe(24)
        gateway = _start_gateway(fleet, redis_url, token, viewer)
        stack.callback(gateway.stop, grace=config.gateway.shutdown_timeout_s + 5)
        metrics = [f"{worker.address}/metrics" for worker in fleet_workers]
        every = (viewer.service, *fleet.services, *fleet_workers, gateway)
        addresses = {
            **fleet.addresses(),
            "redis_url": redis_url,
            "workers": workers,
            "worker_metrics": metrics,
            "gateway": gateway.address,
            "api_token": token,
            "trace_viewer": viewer.ui,
            "trace_link": viewer.trace_link,
            "otlp_endpoint": viewer.otlp_http,
            "logs": {service.name: str(service.log_path) for service in every},
        }
        if as_json:
            print(json.dumps(addresses), flush=True)
        else:
            print(
                f"buildfleet is up: {workers} workers, buildkitd at {fleet.buildkitd_addrs[0]}\n"
                f"  redis     {redis_url}\n"
                f"  registry  {fleet.registry}   (base image {fleet.base_image})\n"
                f"  gateway   {gateway.address}   (API token {token})\n"
                f"  traces    {viewer.ui}   (OTLP {viewer.otlp_http})\n"
                f"  metrics   {' '.join(metrics)}\n"
                f"  logs      {workdir / 'logs'}\n"
                f"Submit a build from another shell:\n"
                f"  export BUILDFLEET_REDIS_URL={redis_url}\n"
                f"  export BUILDFLEET_TELEMETRY_TRACE_LINK={viewer.trace_link}\n"
                f"  export OTEL_EXPORTER_OTLP_ENDPOINT={viewer.otlp_http}\n"
                f"  buildfleet submit config/example --image {fleet.registry}/demo/hello:latest"
                f" --build-arg BASE={fleet.base_image} --wait\n"
                f"  buildfleet get BUILD_ID   (its state, trace id and trace link)\n"
                f"Ctrl-C stops everything.",
                flush=True,
            )
        _wait_for_stop_signal()
    return 0
