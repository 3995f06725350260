"""The gateway as an aiohttp Application: routes, and the middlewares every request passes.

    app = make_app(settings, client)      # for tests and embedding; serving: gateway.server

Middlewares, outermost first:
- tracing (producer.gateway.tracing), only when an SDK tracer provider is installed as the
  app is made: untraced, a request pays for no layer at all;
- errors and metrics: a body over its route's limit is 413 before it is read; Redis
  unreachable is 503 (never a 500, never a false 202); an unknown build is 404; anything
  else is a logged 500. Every answer is counted by route, method and status.

Every /v1 route is registered behind authentication (`_authenticated`): a configured bearer
token (its SHA-256 compared in constant time), then that token's rate limit (429 with
Retry-After). The token is put on the request (`producer.gateway.http.TOKEN`) for the
handler. Webhooks authenticate by their forge's signature instead (producer.gateway.hooks),
and the web view's page (/ui) holds no data and needs none: everything it shows comes from
/v1.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware
from redis.exceptions import RedisError

from producer.client import BuildfleetClient
from producer.errors import BuildNotFound, FleetUnavailable
from producer.gateway import api, hooks, ui
from producer.gateway.http import TOKEN, BodyTooLarge, error, too_many
from producer.gateway.limits import retry_after
from producer.gateway.openapi import openapi_document
from producer.gateway.settings import GatewaySettings
from producer.gateway.state import Gateway
from producer.gateway.tracing import tracing_middlewares
from producer.settings import TelemetrySettings

log = logging.getLogger("buildfleet.gateway")

GATEWAY: Final = web.AppKey("gateway", Gateway)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_HOOKS_PREFIX: Final = "/hooks/"
_UNAUTHORIZED: Final = {"WWW-Authenticate": 'Bearer realm="buildfleet"'}
_json: Final = msgspec.json.Encoder()


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    if resource is None or isinstance(request.match_info.http_exception, web.HTTPException):
        return "unmatched"
    return resource.canonical


def _body_limit(settings: GatewaySettings, request: web.Request) -> int:
    if request.path.startswith(_HOOKS_PREFIX):
        return settings.body_limit_bytes
    return settings.api_body_limit_bytes


def _errors_and_metrics(gateway: Gateway) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response: web.StreamResponse
        try:
            limit = _body_limit(gateway.settings, request)
            if request.content_length is not None and request.content_length > limit:
                raise BodyTooLarge(limit)
            response = await handler(request)
        except BodyTooLarge as exc:
            response = error(413, str(exc))
            response.force_close()
        except web.HTTPException as exc:
            response = error(exc.status, exc.reason, _allow_header(exc))
            if exc.status == 413:
                response.force_close()
        except BuildNotFound as exc:
            response = error(404, str(exc))
        except (FleetUnavailable, RedisError, ConnectionError) as exc:
            log.warning("Redis unreachable: %s", type(exc).__name__)
            response = error(503, "the build queue (Redis) is unreachable; retry later")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = error(500, "internal error")
        method = request.method if request.method in _METHODS else "OTHER"
        gateway.metrics.requests.inc(_route_name(request), method, str(response.status))
        return response

    return middleware


def _authenticated(gateway: Gateway, handler: Handler) -> Handler:
    """`handler` behind the API's bearer token and that token's rate limit."""

    async def authenticated(request: web.Request) -> web.StreamResponse:
        token = gateway.tokens.verify(request.headers.get("Authorization", ""))
        if token is None:
            return error(401, "missing or invalid bearer token (Authorization)", _UNAUTHORIZED)
        wait = gateway.api_rate.take(token.name, time.monotonic())
        if wait:
            gateway.metrics.limited.inc("rate")
            return too_many("too many requests for this token; retry later", retry_after(wait))
        request[TOKEN] = token
        return await handler(request)

    return authenticated


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


def make_app(
    settings: GatewaySettings,
    client: BuildfleetClient,
    *,
    telemetry: TelemetrySettings | None = None,
) -> web.Application:
    """The gateway as an aiohttp Application over `client` (which the caller closes);
    `telemetry` says where the web view links each build's trace."""
    gateway = Gateway(settings, client, telemetry)
    app = web.Application(
        client_max_size=max(settings.body_limit_bytes, settings.api_body_limit_bytes),
        middlewares=[*tracing_middlewares(), _errors_and_metrics(gateway)],
    )
    app[GATEWAY] = gateway
    document = _json.encode(openapi_document(settings, client.store.queue))

    async def openapi(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=document, content_type="application/json")

    async def on_shutdown(_app: web.Application) -> None:
        gateway.stopping.set()

    async def on_cleanup(_app: web.Application) -> None:
        await gateway.aclose()

    def route(handler: Callable[[Gateway, web.Request], Awaitable[web.StreamResponse]]) -> Handler:
        return functools.partial(handler, gateway)

    def v1(handler: Callable[[Gateway, web.Request], Awaitable[web.StreamResponse]]) -> Handler:
        return _authenticated(gateway, route(handler))

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    for forge in ("github", "gitlab", "gitea"):
        app.router.add_post(
            f"/hooks/{forge}", functools.partial(hooks.webhook, gateway, forge=forge)
        )
    app.router.add_post("/v1/builds", v1(api.submit))
    app.router.add_get("/v1/builds", v1(api.builds), allow_head=False)
    app.router.add_get("/v1/fleet", v1(api.fleet), allow_head=False)
    app.router.add_get("/v1/builds/{build_id}", v1(api.get), allow_head=False)
    app.router.add_delete("/v1/builds/{build_id}", v1(api.cancel))
    app.router.add_get("/v1/builds/{build_id}/events", v1(api.events), allow_head=False)
    app.router.add_get("/healthz", route(api.healthz), allow_head=False)
    app.router.add_get("/readyz", route(api.readyz), allow_head=False)
    app.router.add_get("/metrics", route(api.metrics), allow_head=False)
    app.router.add_get("/openapi.json", openapi, allow_head=False)
    app.router.add_get("/ui", ui.page, allow_head=False)
    return app
