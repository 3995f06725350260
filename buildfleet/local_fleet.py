"""`buildfleet up`: a whole fleet on this machine, stopped cleanly by Ctrl-C.

Real services on free loopback ports (Redis unless `BUILDFLEET_REDIS_URL` names one, a
registry, buildkitd, a git daemon, a base image), then worker processes and the HTTP
gateway pointed at them. The gateway's API token is made up for this fleet and printed; it
may push to the fleet's registry only, build from its git daemon and the usual forges, and,
since `up` runs on the user's own host, from local directories under the current one.
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
from buildfleet.services import (
    LocalFleetServices,
    Service,
    find_tool,
    free_port,
    spawn,
    wait_ready,
)
from producer.gateway.auth import hash_token, new_token


def _worker_env(fleet: LocalFleetServices, redis_url: str) -> dict[str, str]:
    daemons = [{"address": address, "max_builds": 4} for address in fleet.buildkitd_addrs]
    return {
        **os.environ,
        "BUILDFLEET_REDIS_URL": redis_url,
        "BUILDFLEET_BUILDKIT_DAEMONS": json.dumps(daemons),
        "BUILDFLEET_BUILDKIT_BUILDCTL": find_tool("buildctl"),
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


def run_local_fleet(config: FleetConfig, *, workers: int, as_json: bool) -> int:
    own_redis = "BUILDFLEET_REDIS_URL" not in os.environ
    workdir = Path(os.environ.get("BUILDFLEET_WORKDIR", "") or Path.cwd() / ".tmp" / "fleet")
    workdir.mkdir(parents=True, exist_ok=True)
    with LocalFleetServices(workdir, redis=own_redis) as fleet:
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
                f"buildfleet is up: {workers} workers, buildkitd at {fleet.buildkitd_addrs[0]}\n"
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
