"""Serving the gateway: on a port, or as `buildfleet gateway` until SIGINT/SIGTERM.

server = await start_gateway(settings, client)   # server.url; await server.aclose()
run_gateway(settings, redis, queue)              # the command: serve, drain, stop
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from producer.client import BuildfleetClient
from producer.gateway.app import make_app
from producer.gateway.settings import GatewaySettings
from producer.settings import QueueSettings, RedisSettings, TelemetrySettings

log = logging.getLogger("buildfleet.gateway")


class GatewayServer:
    """A started gateway; `url` is where it listens (the port may have been chosen by the OS)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def aclose(self) -> None:
        await self.runner.cleanup()


async def start_gateway(
    settings: GatewaySettings,
    client: BuildfleetClient,
    *,
    telemetry: TelemetrySettings | None = None,
) -> GatewayServer:
    """Serve the gateway on `settings.host`:`settings.port` (0 picks a free port)."""
    app = make_app(settings, client, telemetry=telemetry)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout_s,
        lingering_time=2.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    await site.start()
    port = settings.port
    server = site._server  # the only way to learn the port the OS picked
    sockets = getattr(server, "sockets", None)
    if sockets:
        port = int(sockets[0].getsockname()[1])
    return GatewayServer(runner, settings.host, port)


def run_gateway(
    settings: GatewaySettings,
    redis: RedisSettings | None = None,
    queue: QueueSettings | None = None,
    *,
    telemetry: TelemetrySettings | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """`buildfleet gateway`: serve until SIGINT or SIGTERM, then drain and stop."""
    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        runner.run(serve_gateway(settings, redis, queue, telemetry=telemetry, on_ready=on_ready))


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for `uvloop` (which must be installed) and for `auto` when it is
    installed; None (asyncio's own) otherwise."""
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def serve_gateway(
    settings: GatewaySettings,
    redis: RedisSettings | None = None,
    queue: QueueSettings | None = None,
    *,
    telemetry: TelemetrySettings | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """The body of `run_gateway`, for callers that already run an event loop."""
    client = BuildfleetClient.connect(redis or RedisSettings(), queue)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        server = await start_gateway(settings, client, telemetry=telemetry)
        log.info("gateway listening on %s (%s)", server.url, type(loop).__module__)
        if on_ready is not None:
            on_ready(server.url)
        try:
            await stop.wait()
        finally:
            await server.aclose()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
        await client.aclose()
