"""The gateway as an aiohttp Application: routes, and the middlewares every request passes.

    app = make_app(settings, client)      # for tests and embedding; serving: gateway.server

Middlewares, outermost first:
- errors and metrics: a body over the limit is 413 before it is read; Redis unreachable is
  503 (never a 500, never a false 202); an unknown build is 404; anything else is a logged
  500. Every answer is counted by route, method and status.
- authentication: every /v1 route needs a valid bearer token, checked in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware
from redis.exceptions import RedisError

from producer.client import BuildfleetClient
from producer.errors import BuildNotFound, FleetUnavailable
from producer.gateway.handlers import Gateway, error
from producer.gateway.openapi import openapi_document
from producer.gateway.settings import Forge, GatewaySettings

log = logging.getLogger("buildfleet.gateway")

GATEWAY: Final = web.AppKey("gateway", Gateway)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_API_PREFIX: Final = "/v1/"
_json: Final = msgspec.json.Encoder()


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    if resource is None or isinstance(request.match_info.http_exception, web.HTTPException):
        return "unmatched"
    return resource.canonical


def _errors_and_metrics(gateway: Gateway) -> Middleware:
    limit = gateway.settings.body_limit_bytes

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response: web.StreamResponse
        try:
            if request.content_length is not None and request.content_length > limit:
                response = error(413, f"request body larger than {limit} bytes")
                response.force_close()
            else:
                response = await handler(request)
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


def _authentication(settings: GatewaySettings) -> Middleware:
    tokens = tuple(token.encode() for token in settings.api_tokens)

    def authorized(request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode("utf-8", "replace")
        found = False
        for candidate in tokens:  # every token is compared: no early exit
            found |= hmac.compare_digest(candidate, given)
        return found

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _route_name(request).startswith(_API_PREFIX) and not authorized(request):
            return error(
                401,
                "missing or invalid bearer token",
                {"WWW-Authenticate": 'Bearer realm="buildfleet"'},
            )
        return await handler(request)

    return middleware


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


def make_app(settings: GatewaySettings, client: BuildfleetClient) -> web.Application:
    """The gateway as an aiohttp Application over `client` (which the caller closes)."""
    gateway = Gateway(settings, client)
    app = web.Application(
        client_max_size=settings.body_limit_bytes,
        middlewares=[_errors_and_metrics(gateway), _authentication(settings)],
    )
    app[GATEWAY] = gateway
    document = _json.encode(openapi_document(settings))

    def hook(forge: Forge) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await gateway.webhook(request, forge)

        return handler

    async def openapi(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=document, content_type="application/json")

    async def on_shutdown(_app: web.Application) -> None:
        gateway.stopping.set()

    app.on_shutdown.append(on_shutdown)
    for forge in ("github", "gitlab", "gitea"):
        app.router.add_post(f"/hooks/{forge}", hook(forge))
    app.router.add_post("/v1/builds", gateway.submit)
    app.router.add_get("/v1/builds/{build_id}", gateway.get, allow_head=False)
    app.router.add_delete("/v1/builds/{build_id}", gateway.cancel)
    app.router.add_get("/v1/builds/{build_id}/events", gateway.events, allow_head=False)
    app.router.add_get("/healthz", gateway.healthz, allow_head=False)
    app.router.add_get("/readyz", gateway.readyz, allow_head=False)
    app.router.add_get("/metrics", gateway.metrics_text, allow_head=False)
    app.router.add_get("/openapi.json", openapi, allow_head=False)
    return app
