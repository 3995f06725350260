"""`buildfleet up`: a whole fleet on this machine, stopped cleanly by Ctrl-C.

Real services on free loopback ports (a trace viewer, Redis unless `BUILDFLEET_REDIS_URL`
names one, a registry, the builders of `--backend`: buildkitd, or a Docker daemon of its own,
or buildah storage; a git daemon, a base image), then worker processes and the HTTP gateway
pointed at them. Every service listens on 127.0.0.1 only. The fleet's own Redis wants the
work directory's password (`redis.password` there, mode 0600; printed never, only the file's
name). buildkitd's RUN steps get a network of their own that cannot reach this host
(buildfleet.build_network): not Redis, not the worker's loopback, nothing bound to 0.0.0.0.
The gateway, the workers and buildkitd export their traces (and the
processes their metrics) to the trace viewer; each worker serves Prometheus text, /healthz
and /readyz on a port of its own. The gateway's API token is made up for this fleet and
printed; it may push to the fleet's registry only, build from its git daemon and the usual
forges, and, since `up` runs on the user's own host, from local directories under the
current one.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import sys
import threading
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from buildfleet.config import FleetConfig
from buildfleet.processes import Service, find_tool, free_port, spawn, wait_ready
from buildfleet.services import Backend, LocalFleetServices, buildah_storage
from buildfleet.traceviewer import TraceViewer, start_trace_viewer
from producer.gateway.auth import hash_token, new_token

REDIS_PASSWORD_FILE = "redis.password"  # noqa: S105 - the name of the file that holds it


def _otel_env(viewer: TraceViewer, service_name: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": viewer.otlp_http, "OTEL_SERVICE_NAME": service_name}


def _backend_env(fleet: LocalFleetServices) -> dict[str, str]:
    """The settings that point workers at this fleet's builders."""
    daemons = json.dumps([{"address": address, "max_builds": 4} for address in fleet.builders])
    match fleet.backend:
        case "buildkit":
            return {
                "BUILDFLEET_BUILDKIT_DAEMONS": daemons,
                "BUILDFLEET_BUILDKIT_BUILDCTL": find_tool("buildctl"),
            }
        case "docker":  # its dockerd has no bridge: RUN steps share the host's network
            return {"BUILDFLEET_DOCKER_DAEMONS": daemons, "BUILDFLEET_DOCKER_NETWORK_MODE": "host"}
        case "buildah":
            root, runroot = buildah_storage(fleet.workdir)
            return {
                "BUILDFLEET_BUILDAH_BUILDAH": find_tool("buildah"),
                "BUILDFLEET_BUILDAH_ROOT": str(root),
                "BUILDFLEET_BUILDAH_RUNROOT": str(runroot),
                "BUILDFLEET_BUILDAH_TLS_VERIFY": "false",  # the fleet's plain-HTTP registry
            }


def redis_password(workdir: Path) -> str:
    """The password of the work directory's own Redis: made up on first use and kept,
    readable by its owner only, in `workdir/redis.password`."""
    path = workdir / REDIS_PASSWORD_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return path.read_text().strip()
    password = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return password


def _redis_env(redis_url: str, password: str | None) -> dict[str, str]:
    env = {"BUILDFLEET_REDIS_URL": redis_url}
    if password is not None:
        env["BUILDFLEET_REDIS_PASSWORD"] = password
    return env


def _worker_env(
    fleet: LocalFleetServices, redis_url: str, password: str | None = None
) -> dict[str, str]:
    return {
        **os.environ,
        **_redis_env(redis_url, password),
        "BUILDFLEET_WORKER_BACKEND": fleet.backend,
        **_backend_env(fleet),
    }


def _start_workers(
    fleet: LocalFleetServices,
    redis: tuple[str, str | None],
    count: int,
    viewer: TraceViewer,
) -> list[Service]:
    """`count` worker processes, each serving its metrics on a port of its own (the
    service's address is that server's URL)."""
    env = {**_worker_env(fleet, *redis), **_otel_env(viewer, "buildfleet-worker")}
    workers = []
    for n in range(1, count + 1):
        port = free_port()
        argv = [sys.executable, "-m", "buildfleet.cli", "worker", "--metrics-port", str(port)]
        log = fleet.workdir / "logs" / f"worker-{n}.log"
        workers.append(spawn(f"worker-{n}", argv, log, f"http://127.0.0.1:{port}", env=env))
    return workers


def _gateway_policy(fleet: LocalFleetServices, token: str) -> dict[str, str]:
    """The `[gateway]` settings of the fleet's token and sources, as environment overrides."""
    tokens = [
        {
            "name": "local",
            "sha256": hash_token(token),
            "tenant": "default",  # the tenant of builds `buildfleet submit` makes
            "images": [f"{fleet.registry}/*"],
        }
    ]
    git_host = urllib.parse.urlsplit(fleet.git_url).netloc
    sources = {"hosts": [git_host] if git_host else [], "local_roots": [str(Path.cwd())]}
    return {
        "BUILDFLEET_GATEWAY_TOKENS": json.dumps(tokens),
        "BUILDFLEET_GATEWAY_SOURCES": json.dumps(sources),
    }


def _start_gateway(
    fleet: LocalFleetServices, redis: tuple[str, str | None], token: str, viewer: TraceViewer
) -> Service:
    port = free_port()
    env = {
        **os.environ,
        **_otel_env(viewer, "buildfleet-gateway"),
        **_redis_env(*redis),
        "BUILDFLEET_GATEWAY_PORT": str(port),
        "BUILDFLEET_TELEMETRY_TRACE_LINK": viewer.trace_link,  # the web view links traces
        **_gateway_policy(fleet, token),
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


def run_local_fleet(
    config: FleetConfig, *, workers: int, as_json: bool, backend: Backend = "buildkit"
) -> int:
    own_redis = "BUILDFLEET_REDIS_URL" not in os.environ
    workdir = Path(os.environ.get("BUILDFLEET_WORKDIR", "") or Path.cwd() / ".tmp" / "fleet")
    workdir.mkdir(parents=True, exist_ok=True)
    password = redis_password(workdir) if own_redis else None
    with ExitStack() as stack:
        viewer = start_trace_viewer(workdir)
        stack.callback(viewer.stop)
        fleet = stack.enter_context(
            LocalFleetServices(
                workdir,
                backend=backend,
                redis=own_redis,
                otlp_endpoint=viewer.otlp_grpc,
                redis_password=password,
                run_network="isolated",
            )
        )
        redis_url = fleet.redis_url or config.redis.url
        redis = (redis_url, password)
        fleet_workers = _start_workers(fleet, redis, workers, viewer)
        for worker in fleet_workers:
            stack.callback(worker.stop, grace=config.worker.drain_grace_s + 5)
        token = new_token()
        gateway = _start_gateway(fleet, redis, token, viewer)
        stack.callback(gateway.stop, grace=config.gateway.shutdown_timeout_s + 5)
        metrics = [f"{worker.address}/metrics" for worker in fleet_workers]
        every = (viewer.service, *fleet.services, *fleet_workers, gateway)
        password_file = str(workdir / REDIS_PASSWORD_FILE) if password is not None else None
        addresses = {
            **fleet.addresses(),
            "redis_url": redis_url,
            "redis_password_file": password_file,
            "workers": workers,
            "worker_metrics": metrics,
            "gateway": gateway.address,
            "web_view": f"{gateway.address}/ui",
            "api_token": token,
            "trace_viewer": viewer.ui,
            "trace_link": viewer.trace_link,
            "otlp_endpoint": viewer.otlp_http,
            "logs": {service.name: str(service.log_path) for service in every},
        }
        if as_json:
            print(json.dumps(addresses), flush=True)
        else:
            print(_summary(fleet, addresses, password_file), flush=True)
        _wait_for_stop_signal()
    return 0


def _summary(
    fleet: LocalFleetServices, addresses: dict[str, object], password_file: str | None
) -> str:
    """What `up` prints: where everything is and how to submit a build. Never the Redis
    password: the file that holds it."""
    redis_url, metrics = addresses["redis_url"], addresses["worker_metrics"]
    assert isinstance(metrics, list)
    if password_file is None:
        redis_line, export_password = f"{redis_url}", ""
    else:
        quoted = shlex.quote(password_file)
        redis_line = f"{redis_url}   (password in {password_file})"
        export_password = f'  export BUILDFLEET_REDIS_PASSWORD="$(cat {quoted})"\n'
    builders = f" at {fleet.builders[0]}" if fleet.builders else ""
    return (
        f"buildfleet is up: {addresses['workers']} workers building with {fleet.backend}"
        f"{builders}\n"
        f"  redis     {redis_line}\n"
        f"  registry  {fleet.registry}   (base image {fleet.base_image})\n"
        f"  gateway   {addresses['gateway']}   (API token {addresses['api_token']})\n"
        f"  web view  {addresses['gateway']}/ui   (sign in with the API token)\n"
        f"  traces    {addresses['trace_viewer']}   (OTLP {addresses['otlp_endpoint']})\n"
        f"  metrics   {' '.join(metrics)}\n"
        f"  logs      {fleet.workdir / 'logs'}\n"
        f"Submit a build from another shell:\n"
        f"  export BUILDFLEET_REDIS_URL={redis_url}\n"
        f"{export_password}"
        f"  export BUILDFLEET_TELEMETRY_TRACE_LINK={addresses['trace_link']}\n"
        f"  export OTEL_EXPORTER_OTLP_ENDPOINT={addresses['otlp_endpoint']}\n"
        f"  buildfleet submit config/example --image {fleet.registry}/demo/hello:latest"
        f" --build-arg BASE={fleet.base_image} --wait\n"
        f"  buildfleet get BUILD_ID   (its state, trace id and trace link)\n"
        f"Ctrl-C stops everything."
    )
