"""A worker's own small HTTP server, for Kubernetes probes and Prometheus scraping.

    GET /metrics   Prometheus text: the build metrics (worker.telemetry, through the
                   OpenTelemetry Prometheus reader) and the process's own
    GET /healthz   200 while the worker's event loop answers (liveness: never Redis, so a
                   Redis outage does not restart every worker)
    GET /readyz    200 when Redis answers PING and, with BuildKit daemons configured, at
                   least one of them passes its health probe; 503 otherwise. The body says
                   which check failed.

It runs on the worker's own event loop: a probe that times out means the loop is stuck.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.scheduling import DaemonHealth
from worker.settings import WorkerConfig

_PING_TIMEOUT_S: Final = 2.0
_json: Final = msgspec.json.Encoder()


class Readiness(msgspec.Struct, frozen=True):
    ready: bool
    redis: str
    """"ok", or why Redis did not answer."""
    daemons: dict[str, bool] = {}
    """Each BuildKit daemon and whether its last health probe passed."""


async def readiness(redis: Redis, daemons: DaemonHealth | None) -> Readiness:
    try:
        async with asyncio.timeout(_PING_TIMEOUT_S):
            await redis.ping()
        redis_state = "ok"
    except (RedisError, OSError, TimeoutError) as exc:
        redis_state = f"unreachable: {type(exc).__name__}"
    states: dict[str, bool] = {}
    if daemons is not None:
        healthy = set(daemons.healthy())
        states = {address: address in healthy for address in daemons.addresses}
    ready = redis_state == "ok" and (not states or any(states.values()))
    return Readiness(ready=ready, redis=redis_state, daemons=states)


def make_app(redis: Redis, daemons: DaemonHealth | None) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        state = await readiness(redis, daemons)
        return web.Response(
            status=200 if state.ready else 503,
            body=_json.encode(state),
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    return app


@dataclass(frozen=True, slots=True)
class MetricsServer:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def aclose(self) -> None:
        await self.runner.cleanup()


async def serve_metrics(
    config: WorkerConfig, redis: Redis, health: DaemonHealth
) -> MetricsServer | None:
    """Start the server when `worker.metrics_port` is set (0 picks a free port)."""
    settings = config.worker
    if settings.metrics_port is None:
        return None
    daemons = health if settings.backend == "buildkit" and health.addresses else None
    runner = web.AppRunner(make_app(redis, daemons), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.metrics_host, settings.metrics_port)
    await site.start()
    port = settings.metrics_port
    sockets = getattr(site._server, "sockets", None)  # the only way to learn a port 0 chose
    if sockets:
        port = int(sockets[0].getsockname()[1])
    return MetricsServer(runner, settings.metrics_host, port)
