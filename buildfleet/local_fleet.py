"""`buildfleet up`: a whole fleet on this machine, stopped cleanly by Ctrl-C.

Real services on free loopback ports (Redis unless `BUILDFLEET_REDIS_URL` names one, a
registry, the builders of `--backend`: buildkitd, or a Docker daemon of its own, or buildah
storage; a git daemon, a base image), then worker processes and the HTTP gateway pointed at
them. The gateway's API token is made up for this fleet and printed; it may push to the
fleet's registry only, build from its git daemon and the usual forges, and, since `up` runs
on the user's own host, from local directories under the current one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from buildfleet.config import FleetConfig
from buildfleet.processes import Service, find_tool, free_port, spawn, wait_ready
from buildfleet.services import Backend, LocalFleetServices, buildah_storage
from producer.gateway.auth import hash_token, new_token


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


def _worker_env(fleet: LocalFleetServices, redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "BUILDFLEET_REDIS_URL": redis_url,
        "BUILDFLEET_WORKER_BACKEND": fleet.backend,
        **_backend_env(fleet),
    }


def _start_workers(fleet: LocalFleetServices, redis_url: str, count: int) -> list[Service]:
    env = _worker_env(fleet, redis_url)
    argv = [sys.executable, "-m", "buildfleet.cli", "worker"]
    return [
        spawn(f"worker-{n}", argv, fleet.workdir / "logs" / f"worker-{n}.log", "", env=env)
        for n in range(1, count + 1)
    ]


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


def _start_gateway(fleet: LocalFleetServices, redis_url: str, token: str) -> Service:
    port = free_port()
    env = {
        **os.environ,
        "BUILDFLEET_REDIS_URL": redis_url,
        "BUILDFLEET_GATEWAY_PORT": str(port),
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
    with LocalFleetServices(workdir, backend=backend, redis=own_redis) as fleet:
        redis_url = fleet.redis_url or config.redis.url
        fleet_workers = _start_workers(fleet, redis_url, workers)
        token = new_token()
        gateway = _start_gateway(fleet, redis_url, token)
        addresses = {
            **fleet.addresses(),
            "redis_url": redis_url,
            "workers": workers,
            "gateway": gateway.address,
            "api_token": token,
        }
        if as_json:
            print(json.dumps(addresses), flush=True)
        else:
            print(
                f"buildfleet is up: {workers} workers building with {backend}"
                f"{' at ' + fleet.builders[0] if fleet.builders else ''}\n"
                f"  redis     {redis_url}\n"
                f"  registry  {fleet.registry}   (base image {fleet.base_image})\n"
                f"  gateway   {gateway.address}   (API token {token})\n"
                f"  logs      {workdir / 'logs'}\n"
                f"Submit a build from another shell:\n"
                f"  export BUILDFLEET_REDIS_URL={redis_url}\n"
                f"  buildfleet submit config/example --image {fleet.registry}/demo/hello:latest"
                f" --build-arg BASE={fleet.base_image} --wait\n"
                f"Ctrl-C stops everything.",
                flush=True,
            )
        try:
            _wait_for_stop_signal()
        finally:
            gateway.stop(grace=config.gateway.shutdown_timeout_s + 5)
            for worker in fleet_workers:
                worker.stop(grace=config.worker.drain_grace_s + 5)
    return 0
